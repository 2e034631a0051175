"""Training throughput on this device: the model alone on random tensors vs ``retinaedge train``'s loop.

For each model and size it prints photos per second of
- the raw training step on random tensors (the ceiling): fp16 autocast NCHW and bf16 autocast channels_last on
  CUDA, fp32 on the CPU;
- the training loop of ``training.train.fit`` on real or synthetic photos, once with the augmentation on the
  device (the GPU default) and once in the DataLoader's workers (the CPU path), median over the epochs after the
  first (cuDNN autotuning and caches warm up in epoch 1);
and the loop's share of the raw bf16 channels_last figure (issue target: >= 70 % on a GPU).

    python -m benchmarks.train_throughput --data ../shared/data/eyepacs_full --out runs/bench/train_throughput
    python -m benchmarks.train_throughput --models tf_efficientnet_lite0@224 --epochs 2   # CPU smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.models import create_model
from training.train import fit, resolve_device

from .device import fingerprint
from .report import write_markdown_and_json


@dataclass(frozen=True)
class RawMode:
    name: str
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool


def raw_modes(device: torch.device) -> list[RawMode]:
    if device.type != "cuda":
        return [RawMode("fp32", None, False)]
    modes = [RawMode("fp16 NCHW", torch.float16, False)]
    if torch.cuda.is_bf16_supported():
        modes.append(RawMode("bf16 channels_last", torch.bfloat16, True))
    return modes


def raw_images_per_s(model_name: str, size: int, batch: int, mode: RawMode, device: torch.device,
                     steps: int, warmup: int) -> float:
    """Forward + backward + AdamW step on random tensors: the model's own training speed on this device."""
    torch.backends.cudnn.benchmark = True
    model = create_model(model_name, pretrained=False).to(device).train()
    memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=mode.dtype == torch.float16)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 5, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=mode.dtype or torch.float32, enabled=mode.dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def loop_images_per_s(model_name: str, size: int, batch: int, data: tuple[str, ...], epochs: int,
                      augment_on: str, workers: int, device: str) -> float:
    """Median photos/s of ``fit``'s training epochs after the first (validation excluded)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model_name, data=data, input_size=size, pretrained=False, epochs=epochs,
                          batch_size=batch, augment_on=augment_on, workers=workers, device=device, patience=epochs,
                          synthetic_per_grade=100, cache_dir=os.environ.get("RETINAEDGE_CACHE", ".cache/retinaedge"),
                          out=out)
        history = fit(cfg, progress=False).metrics["history"]
    rates = [h["train_images_per_s"] for h in history]
    return statistics.median(rates[1:] or rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b4@380", "tf_efficientnet_lite0@224"],
                        help="NAME@SIZE pairs")
    parser.add_argument("--data", action="append", default=[], help="dataset folder (repeatable); none -> synthetic")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32 on CUDA, 8 on the CPU)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per loop measurement")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench/train_throughput")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    rows = []
    for spec in args.models:
        name, size = spec.split("@")
        size_px = int(size)
        raw = {m.name: raw_images_per_s(name, size_px, batch, m, device, args.steps, warmup=5) for m in raw_modes(device)}
        loops = {}
        for augment_on in (("device", "loader") if device.type == "cuda" else ("loader", "device")):
            loops[augment_on] = loop_images_per_s(name, size_px, batch, tuple(args.data), args.epochs, augment_on,
                                                  args.workers if augment_on == "loader" else 0, str(device))
        ceiling = max(raw.values())
        rows.append({"model": name, "size": size_px, "batch": batch, "raw": raw, "loop": loops,
                     "loop_share_of_best_raw": {k: v / ceiling for k, v in loops.items()}})
        print(f"{name}@{size_px}: raw {raw}  loop {loops}", flush=True)
    device_facts = fingerprint()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    modes = sorted({m for r in rows for m in r["raw"]})
    header = (["model", "px", "batch"] + [f"raw {m}" for m in modes]
              + ["`fit`, augment on device", "`fit`, augment in DataLoader", "best loop / best raw"])
    lines = [f"# Training throughput (photos/s) on {device} ({gpu}); CPU: {device_facts.get('cpu')}, "
             f"int8 features: {device_facts.get('cpu_int8')}; torch {torch.__version__}", "",
             f"data: {', '.join(args.data) or 'synthetic'}; loop figures are the median of epochs 2..{args.epochs}; "
             f"DataLoader workers {args.workers}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        best_loop = max(r["loop"].values())
        lines.append("| " + " | ".join([r["model"], str(r["size"]), str(r["batch"])]
                                       + [f"{r['raw'][m]:.0f}" if m in r["raw"] else "-" for m in modes]
                                       + [f"{r['loop'].get('device', 0):.0f}", f"{r['loop'].get('loader', 0):.0f}",
                                          f"{best_loop / max(r['raw'].values()):.0%}"]) + " |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_markdown_and_json(Path(args.out), markdown, {"device": device_facts, "gpu": gpu, "rows": rows})


if __name__ == "__main__":
    main()
