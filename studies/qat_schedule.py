"""How a quantization-aware fine-tuning schedule moves INT8's referrals: NNCF QAT watched step by step, then gated.

Where post-training INT8 fails the fidelity gate, QAT with a margin-aware objective and a longer schedule is the
next step. This runs one fixed schedule of the ``qat`` recipe (``retinaedge export --recipe qat``) on one trained
checkpoint and, every ``--eval-every`` steps, runs the fake-quantized model on the val photos: how many referrals it
changes against FP32 at the checkpoint's operating point, and how far its logits move. The length is fixed before
the run and nothing is chosen from that curve (the gate judges the same val photos), so the final model is then
exported, gated at its own operating point exactly as ``retinaedge export`` gates it, and timed against FP32 and
against post-training INT8 of the same preset (``ort``), samples interleaved.

    python -m studies.qat_schedule runs/lite0_2f/best.pt --data ../shared/data/eyepacs_full \\
        --data ../shared/data/messidor2 --steps 1200 --lr 3e-5 --schedule cosine --margin-weight 1 \\
        --out reports/qat_schedule
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.device import fingerprint
from benchmarks.int8_speed import add_speedups
from benchmarks.report import number_or_dash, write_markdown_and_json
from edge_runtime.backends import cpu_features, int8_target
from edge_runtime.contract import ArtifactManifest, manifest_path_for
from edge_runtime.decision import decide_batch

from .float_islands import gate_figures


def referral_changes(logits: np.ndarray, reference: np.ndarray, point) -> dict:
    """Referrals at ``point`` that ``logits`` change against ``reference`` (both N x 5), and the median of each
    photo's largest absolute logit change."""
    flips = decide_batch(logits, point).referable != decide_batch(reference, point).referable
    return {"flips": int(flips.sum()), "n": len(logits),
            "median_max_abs_logit_change": float(np.median(np.abs(logits - reference).max(1)))}


@torch.no_grad()
def val_logits(module: torch.nn.Module, photos: np.ndarray, batch: int = 32) -> np.ndarray:
    """The grade logits (the first output of an ``ExportModule``-like module) on ``photos``."""
    return np.concatenate([module(torch.from_numpy(photos[i:i + batch]).float())[0].numpy()
                           for i in range(0, len(photos), batch)])


def run(checkpoint: Path, data: list[Path], out: Path, steps: int, lr: float, schedule: str, margin_weight: float,
        batch_size: int, eval_every: int, tuning_limit: int, target: str, threads: int, runs: int, val_limit: int,
        calib_limit: int) -> dict:
    from compression.qat import QATConfig, fidelity_qat
    from compression.quantize import QuantRecipe, nncf_qat_graph
    from exporters.base import Reference
    from exporters.pipeline import ExportPipeline, ExportPlan, load_inputs
    from training.models import ExportModule

    features = cpu_features()
    target = int8_target(features) if target == "auto" else target
    inputs = load_inputs(checkpoint, out / "artifacts", data, data, calib_limit=calib_limit, val_limit=val_limit,
                         tuning_limit=tuning_limit)
    reference = Reference.compute(inputs)
    point = inputs.meta.operating_point
    cfg = QATConfig(steps=steps, batch_size=batch_size, lr=lr, schedule=schedule)
    if margin_weight > 0:
        cfg = cfg.holding_margins(margin_weight, point, inputs.meta.dme_point)

    curve: list[dict] = []
    started = time.monotonic()

    def watch(step: int, fake_quantized: torch.nn.Module) -> None:
        if step % eval_every == 0:
            curve.append({"step": step, "minutes": (time.monotonic() - started) / 60,
                          **referral_changes(val_logits(fake_quantized, inputs.photos.val), reference.logits, point)})

    stripped = fidelity_qat(ExportModule(inputs.model), inputs.photos.calib, inputs.photos.tuning, cfg,
                            progress=False, on_step=watch)
    curve.append({"step": steps, "minutes": (time.monotonic() - started) / 60,
                  **referral_changes(val_logits(stripped, inputs.photos.val), reference.logits, point)})

    ptq = QuantRecipe.for_target(target)
    fp32 = ExportPipeline(inputs, ExportPlan(("onnx",), ("fp32",), ptq, escalate=False), reference).export("onnx", "fp32")
    if fp32.status != "ok":
        raise RuntimeError(f"FP32 ONNX export failed: {fp32.error}")
    rows = []
    for label, recipe, qat in (("post-training INT8 (ort)", ptq, None),
                               (f"QAT, {steps} steps", QuantRecipe.for_target(target, "qat"), cfg)):
        pipeline = ExportPipeline(replace(inputs, name=f"qat_study_{recipe.name}"),
                                  ExportPlan(("onnx",), ("int8",), recipe, qat, escalate=False), reference)
        if qat is not None:  # export and gate the very model the curve watched, not a second run
            pipeline.graphs.provide(recipe, nncf_qat_graph(stripped))
        record = pipeline.export("onnx", "int8")
        row = {"artifact": label, "status": record.status, "path": record.path, "error": record.error}
        if record.status == "ok":
            row.update(gate_figures(Path(record.path)))
            counted = ArtifactManifest.from_json(manifest_path_for(record.path).read_text()).quantization
            row["integer_convs"], row["convs"] = counted.integer_kernels, counted.convolutions
        rows.append(row)
    fp32_p50 = add_speedups(Path(fp32.path), rows, threads, runs)
    return {"device": fingerprint(), "cpu_features": features.to_dict(), "target": target, "threads": threads,
            "load_average": os.getloadavg(), "checkpoint": str(checkpoint), "data": [str(d) for d in data],
            "qat": {"steps": steps, "lr": lr, "schedule": schedule, "margin_weight": margin_weight,
                    "batch_size": batch_size, "tuning_images": len(inputs.photos.tuning)},
            "threshold": point.threshold, "fp32_p50_ms": fp32_p50, "curve": curve, "rows": rows}


def to_markdown(report: dict) -> str:
    named = ", ".join(report["cpu_features"]["int8"]) or "none"
    q = report["qat"]
    lines = [f"# QAT schedule ({report['target']} preset), {report['checkpoint']}", "",
             f"CPU: {report['device']['cpu']}, int8 features **{named}**, {report['threads']} threads, batch 1; load "
             f"average {', '.join(f'{v:.1f}' for v in report['load_average'])}. QAT: {q['steps']} steps, lr {q['lr']:g} "
             f"({q['schedule']}), batch {q['batch_size']}, margin weight {q['margin_weight']:g}, "
             f"{q['tuning_images']} unlabelled train photos. Val photos of "
             f"{', '.join(Path(d).name for d in report['data'])}.", "",
             f"The fake-quantized model during QAT, against FP32 at the checkpoint's operating point (threshold "
             f"{report['threshold']:.3f}); the last row is the stripped model that is exported:", "",
             "| step | minutes | referral flips | median max abs logit change |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['minutes']:.1f} | {c['flips']} of {c['n']} | {c['median_max_abs_logit_change']:.3f} |"
              for c in report["curve"]]
    lines += ["", f"Exported ONNX INT8, gated at its own operating point; FP32 ONNX p50 {report['fp32_p50_ms']:.2f} ms:",
              "", "| artifact | referral flips (outside both uncertainty bands) | agreement (one-sided 95 % bound) | "
              "sensitivity diff. bound | specificity diff. bound | AUC ratio | gate | integer convs (ORT) | p50 ms | "
              "vs FP32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['artifact']} | export failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['artifact']} | {r['flips']} ({r['clean_flips']}) of {r['n']} | {r['referral_agreement']:.3f} "
                     f"({r['agreement_bound']:.3f}) | {number_or_dash(r['sensitivity_bound'], '+.3f')} | "
                     f"{number_or_dash(r['specificity_bound'], '+.3f')} | {number_or_dash(r['auc_ratio'], '.3f')} | {r['verdict']} | "
                     f"{r['integer_convs']} / {r['convs']} | {r['p50_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder whose train split tunes, calib split calibrates and val split judges (repeatable)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--schedule", default="cosine", help="constant | cosine")
    parser.add_argument("--margin-weight", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--tuning-limit", type=int, default=1024, help="unlabelled train photos per folder")
    parser.add_argument("--target", default="auto", help="ONNX INT8 preset; auto = from this CPU's flags")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200, help="latency samples per artifact")
    parser.add_argument("--val-limit", type=int, default=400, help="val photos per folder")
    parser.add_argument("--calib-limit", type=int, default=64, help="calibration photos per folder")
    parser.add_argument("--out", type=Path, default=Path("reports/qat_schedule"))
    args = parser.parse_args()
    report = run(args.checkpoint, args.data, args.out, args.steps, args.lr, args.schedule, args.margin_weight,
                 args.batch_size, args.eval_every, args.tuning_limit, args.target, args.threads, args.runs,
                 args.val_limit, args.calib_limit)
    text = to_markdown(report)
    print(text)
    write_markdown_and_json(args.out / "qat_schedule", text, report)


if __name__ == "__main__":
    main()
