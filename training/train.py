"""The training loop shared by fine-tuning and distillation; single process or DDP under torchrun."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from edge_runtime.contract import GRADE_NAMES, PreprocessPolicy, utcnow
from edge_runtime.metrics import screening_metrics

from .config import TrainConfig, save_config
from .data.dataset import FundusDataset, cache_images
from .data.layouts import Sample, assign_splits, fingerprint, read_dataset, select
from .data.synthetic import write_synthetic_dataset
from .metrics import save_confusion_png
from .models import DRClassifier, create_model, get_model_cfg

log = logging.getLogger(__name__)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def policy_for(cfg: TrainConfig) -> PreprocessPolicy:
    model_cfg = get_model_cfg(cfg.model)
    return PreprocessPolicy(input_size=cfg.input_size or model_cfg.input_size, mean=model_cfg.mean,
                            std=model_cfg.std, ben_graham=cfg.ben_graham)


def load_samples(cfg: TrainConfig) -> list[Sample]:
    """All samples of every dataset folder, split per patient; synthetic data when none is given."""
    roots = list(cfg.data)
    if not roots:
        synthetic_dir = Path(cfg.cache_dir) / f"synthetic_{cfg.synthetic_per_grade}_{cfg.synthetic_size}_{cfg.seed}"
        if not (synthetic_dir / "labels.csv").is_file():
            write_synthetic_dataset(synthetic_dir, cfg.synthetic_per_grade, cfg.synthetic_size, cfg.seed)
        roots = [str(synthetic_dir)]
    samples: list[Sample] = []
    for root in roots:
        samples += assign_splits(read_dataset(root), seed=cfg.seed)
    return samples


def class_weights(grades: np.ndarray, k: int = 5) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 and capped so a 10-image grade cannot dominate."""
    counts = np.bincount(grades, minlength=k).astype(float)
    weights = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    weights = np.minimum(weights, 10.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def focal_loss(logits, target, weight, gamma):
    log_p = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(log_p, target, weight=weight, reduction="none")
    p_t = log_p.gather(1, target[:, None]).squeeze(1).exp()
    return ((1 - p_t) ** gamma * ce).mean()


@torch.no_grad()
def predict(model: DRClassifier, loader: DataLoader, device: torch.device, with_cam: bool = False):
    """Softmax probabilities (and CAMs) for every batch of a loader, in order."""
    model.eval()
    probs, cams = [], []
    for x, _ in loader:
        x = x.to(device)
        if with_cam:
            logits, cam = model.forward_with_cam(x)
            cams.append(cam.float().cpu().numpy())
        else:
            logits = model(x)
        probs.append(logits.float().softmax(1).cpu().numpy())
    probs = np.concatenate(probs) if probs else np.zeros((0, 5), np.float32)
    return (probs, np.concatenate(cams)) if with_cam else probs


@dataclass
class RunResult:
    out_dir: Path
    best_checkpoint: Path
    metrics: dict


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def fit(cfg: TrainConfig, extra_loss: Callable | None = None, extra_targets: dict[str, np.ndarray] | None = None,
        progress: bool = True) -> RunResult:
    """Train ``cfg.model``; returns the run folder, best checkpoint and final metrics.

    ``extra_targets`` are per-training-image arrays (e.g. cached teacher logits) handed to
    ``extra_loss(logits, cam, targets, batch_extra) -> loss`` with the batch's rows.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(cfg.out)
    if _is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    policy = policy_for(cfg)
    samples = load_samples(cfg)
    train_samples = select(samples, cfg.train_splits)
    val_samples = select(samples, cfg.val_split)
    test_samples = select(samples, cfg.test_split)
    if not train_samples or not val_samples:
        raise ValueError(f"need non-empty train {cfg.train_splits} and val {cfg.val_split!r} splits; "
                         f"got {len(train_samples)} / {len(val_samples)} images")
    data_fp = fingerprint(train_samples)
    show = progress and _is_main()
    # Every rank needs the crops; rank 0 builds the cache first so the others only read it.
    if _is_main():
        train_x = cache_images(train_samples, policy, cfg.cache_dir, show)
    if distributed:
        dist.barrier()
    if not _is_main():
        train_x = cache_images(train_samples, policy, cfg.cache_dir, False)
    val_x = cache_images(val_samples, policy, cfg.cache_dir, show)
    train_y = np.array([s.grade for s in train_samples])
    val_y = np.array([s.grade for s in val_samples])

    model = create_model(cfg.model, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file).to(device)
    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    indices = np.arange(len(train_y))
    train_ds = _IndexedDataset(FundusDataset(train_x, train_y, policy, train=True, seed=cfg.seed + rank,
                                                    geometric=cfg.cam_weight == 0), indices)
    sampler = DistributedSampler(train_ds, seed=cfg.seed) if distributed else None
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(FundusDataset(val_x, val_y, policy), batch_size=cfg.batch_size * 2, num_workers=cfg.workers)

    weight = class_weights(train_y).to(device) if cfg.class_weighted else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
                                                  0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_qwk, stale, history = 0, -float("inf"), 0, []
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if cfg.resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_qwk, stale, history = state["epoch"] + 1, state["best_qwk"], state["stale"], state["history"]
        log.info("resumed from %s at epoch %d", last_path, start_epoch)

    def meta(metrics: dict) -> dict:
        return {"model_name": cfg.model, "input_size": policy.input_size, "preprocess": policy.__dict__,
                "class_names": list(GRADE_NAMES), "metrics": metrics, "data_fingerprint": data_fp,
                "git_sha": git_sha(), "created_at": utcnow(), "referable_threshold": cfg.referable_threshold,
                "config": cfg.to_dict(), "num_features": model.num_features}

    started = time.monotonic()
    progress_bar = _progress(show)
    with progress_bar:
        task = progress_bar.add_task("training", total=(cfg.epochs - start_epoch) * steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_model.train()
            running, seen = 0.0, 0
            for x, y, idx in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=use_amp):
                    if extra_loss is not None:
                        logits, cam = train_model(x, return_cam=True)
                    else:
                        logits, cam = train_model(x), None
                    if cfg.loss == "focal":
                        loss = focal_loss(logits.float(), y, weight, cfg.focal_gamma)
                    else:
                        loss = F.cross_entropy(logits.float(), y, weight=weight)
                    if extra_loss is not None:
                        batch_extra = {k: torch.as_tensor(v[idx.numpy()]).to(device) for k, v in (extra_targets or {}).items()}
                        loss = extra_loss(logits.float(), cam.float(), y, loss, batch_extra, x)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                running += float(loss.detach()) * len(y)
                seen += len(y)
                progress_bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {running / seen:.3f}")
            val_metrics = screening_metrics(val_y, predict(model, val_loader, device), cfg.referable_threshold)
            history.append({"epoch": epoch + 1, "train_loss": running / max(1, seen), "val_qwk": val_metrics["qwk"],
                            "val_accuracy": val_metrics["accuracy"], "minutes": (time.monotonic() - started) / 60})
            improved = val_metrics["qwk"] > best_qwk
            best_qwk, stale = (val_metrics["qwk"], 0) if improved else (best_qwk, stale + 1)
            if _is_main():
                log.info("epoch %d: loss %.4f val QWK %.4f acc %.3f", epoch + 1, history[-1]["train_loss"],
                         val_metrics["qwk"], val_metrics["accuracy"])
                if improved:
                    torch.save({"model_state": model.state_dict(), "meta": meta({"val": val_metrics})}, best_path)
                torch.save({"model_state": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_qwk": best_qwk, "stale": stale,
                            "history": history, "meta": meta({"val": val_metrics})}, last_path)
            if stale >= cfg.patience:
                log.info("early stopping: validation QWK has not improved for %d epochs", cfg.patience)
                break
            if cfg.max_minutes and (time.monotonic() - started) / 60 > cfg.max_minutes:
                log.info("stopping: time budget of %.1f min reached", cfg.max_minutes)
                break

    if distributed:
        dist.barrier()
    metrics: dict = {"history": history}
    if _is_main():
        best = torch.load(best_path, map_location=device, weights_only=False)
        model.load_state_dict(best["model_state"])
        for split_name, split_samples in (("val", val_samples), ("test", test_samples)):
            if not split_samples:
                continue
            xs = val_x if split_name == "val" else cache_images(split_samples, policy, cfg.cache_dir, show)
            ys = np.array([s.grade for s in split_samples])
            loader = DataLoader(FundusDataset(xs, ys, policy), batch_size=cfg.batch_size * 2)
            metrics[split_name] = screening_metrics(ys, predict(model, loader, device), cfg.referable_threshold)
            save_confusion_png(metrics[split_name]["confusion_matrix"], str(out_dir / f"confusion_{split_name}.png"),
                               f"{cfg.model} - {split_name}")
        metrics["train_minutes"] = (time.monotonic() - started) / 60
        best["meta"]["metrics"] = {k: v for k, v in metrics.items() if k != "history"}
        torch.save(best, best_path)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(out_dir, best_path, metrics)


class _IndexedDataset(torch.utils.data.Dataset):
    """Adds the row index so per-image extra targets (teacher logits, CAMs) can be looked up."""

    def __init__(self, base: FundusDataset, indices: np.ndarray):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[int(self.indices[i])]
        return x, y, int(self.indices[i])


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # Off a terminal (logs, CI, nohup) a live bar would capture stderr until the end and hide the epoch logs.
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled or not console.is_terminal, transient=False)
