"""What float islands buy and cost: ONNX INT8 of one trained checkpoint with chosen layers kept in float.

Full-INT8 artifacts are fastest, but some layers lose most in INT8; where float islands remain, their cost in speed
and in fidelity is what this measures. It exports the checkpoint's FP32 ONNX once and one
INT8 artifact per variant (the ``ort`` recipe of ``--target``, a set of node-name substrings or op types kept in
float, as ``retinaedge export --keep-float`` does), judges each with the evidence gate on the val photos (its own
operating point, no escalation), and times every artifact against FP32 at batch 1, samples interleaved. The table:
float Conv/Gemm nodes of all, referral flips and agreement with its one-sided bound, the sensitivity- and
specificity-difference bounds, the verdict, p50 latency and the speed-up over FP32.

    python -m studies.float_islands runs/lite0_2f/best.pt --data ../shared/data/eyepacs_full \\
        --data ../shared/data/messidor2 --out reports/float_islands
    python -m studies.float_islands CKPT --data DIR --variant head=conv_head,/Conv --variant adds=Add
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.device import fingerprint
from benchmarks.int8_speed import add_speedups
from benchmarks.report import number_or_dash, write_markdown_and_json
from edge_runtime.backends import cpu_features, int8_target, open_session
from edge_runtime.preprocess import level_step

# Lite0 stages (timm ``blocks.0`` .. ``blocks.6``): the later ones hold few MACs and the lowest SQNR (11-13 dB against
# 30 dB after the stem, docs/studies/2026-11-25_per_format_referral.md); the residual Adds and the linear
# projections (``conv_pwl``) carry unbounded activations that share one per-tensor scale; the stem sees the
# input, which INT8 rounds.
DEFAULT_VARIANTS: dict[str, tuple[str, ...]] = {
    "full_int8": (),
    "stem": ("conv_stem",),  # the stem in float also leaves the input unquantized
    "stem+head": ("conv_stem", "conv_head", "/Conv"),
    "residual_adds": ("Add",),
    "projections": ("conv_pwl",),
    "last_stage+head": ("blocks.6", "conv_head", "/Conv"),
    "last_2_stages+head": ("blocks.5", "blocks.6", "conv_head", "/Conv"),
    "first_2_stages": ("conv_stem", "blocks.0", "blocks.1"),
}
WEIGHTED = ("Conv", "Gemm", "MatMul")
NOISE_LEVELS = (0.25, 0.5, 1.0, 2.0)  # Gaussian sigmas, in 8-bit levels of the photo


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=PATTERN,PATTERN`` (an empty list: full INT8)."""
    name, sep, patterns = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant takes NAME=PATTERN[,PATTERN...], got {text!r}")
    return name, tuple(p for p in patterns.split(",") if p)


def float_weighted_nodes(path: Path) -> tuple[int, int]:
    """(weighted nodes left in float, weighted nodes) of a QDQ ONNX graph: a Conv/Gemm/MatMul is quantized when its
    weight input comes from a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED and len(n.input) > 1]
    return sum(n.input[1] not in dequantized for n in weighted), len(weighted)


def input_grid(path: Path) -> tuple[float, int] | None:
    """(scale, zero point) with which a QDQ graph quantizes its input; None when the input stays float."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = {i.name for i in model.graph.input}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in graph_inputs:
            return float(constants[node.input[1]]), int(constants[node.input[2]])
    return None


def gate_figures(path: Path) -> dict:
    """What an INT8 artifact's manifest says of its gate on the val photos: the verdict, referral flips (all, and
    the clean ones outside both uncertainty bands), agreement with its one-sided bound, the sensitivity- and
    specificity-difference bounds, the AUC ratio, and how many weighted nodes stayed float."""
    gate = open_session(path, allow_ungated=True).info.manifest.gate
    criteria = {c.name: c for c in gate.criteria}
    agreement = criteria["referral_agreement"]
    floats, weighted = float_weighted_nodes(path)
    return {"verdict": gate.status, "float_nodes": floats, "weighted_nodes": weighted,
            "flips": int(round((1 - agreement.value) * agreement.n)), "n": agreement.n,
            "clean_flips": int(gate.metrics["clean_referral_flips"]),
            "referral_agreement": agreement.value, "agreement_bound": agreement.bound,
            "sensitivity_bound": criteria["sensitivity_difference"].bound,
            "specificity_bound": criteria["specificity_difference"].bound, "auc_ratio": criteria["auc_ratio"].value}


def perturbation_flips(session, photos: np.ndarray, grid: tuple[float, int] | None,
                       sigmas: tuple[float, ...] = NOISE_LEVELS, seed: int = 0) -> list[dict]:
    """FP32's referrals at its own point against FP32 on perturbed copies of the same photos: rounded onto the INT8
    input grid (what INT8's first QuantizeLinear does, nothing else), and with Gaussian noise of ``sigmas`` 8-bit
    levels. How many referrals noise no one can see changes says how much of INT8's disagreement is the model's."""
    from edge_runtime.decision import decide_batch

    point = session.info.manifest.operating_point
    reference = session.run_heads(photos).logits
    refer = decide_batch(reference, point).referable
    level = level_step(session.info.manifest.preprocess).reshape(1, 3, 1, 1)
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, np.ndarray]] = []
    if grid is not None:
        scale, zero = grid
        q = np.clip(np.rint(photos / scale) + zero, 0, 255)
        cases.append(("input rounded to the INT8 grid", ((q - zero) * scale).astype(np.float32)))
    for sigma in sigmas:
        noise = rng.standard_normal(photos.shape).astype(np.float32) * (sigma * level)
        cases.append((f"Gaussian noise, sigma {sigma:g} levels", (photos + noise).astype(np.float32)))
    rows = []
    for label, perturbed in cases:
        logits = session.run_heads(perturbed).logits
        rows.append({"perturbation": label, "flips": int((decide_batch(logits, point).referable != refer).sum()),
                     "n": len(photos), "median_max_abs_logit_change": float(np.median(np.abs(logits - reference).max(1)))})
    return rows


def run(checkpoint: Path, data: list[Path], out: Path, variants: dict[str, tuple[str, ...]], target: str,
        threads: int, runs: int, val_limit: int, calib_limit: int) -> dict:
    from compression.quantize import QuantRecipe
    from exporters.base import Reference
    from exporters.pipeline import ExportPipeline, ExportPlan, load_inputs

    features = cpu_features()
    target = int8_target(features) if target == "auto" else target
    inputs = load_inputs(checkpoint, out / "artifacts", data, data, calib_limit=calib_limit, val_limit=val_limit,
                         tuning_limit=0)
    reference = Reference.compute(inputs)
    base = QuantRecipe.for_target(target)
    fp32 = ExportPipeline(inputs, ExportPlan(("onnx",), ("fp32",), base, escalate=False), reference).export("onnx", "fp32")
    if fp32.status != "ok":
        raise RuntimeError(f"FP32 ONNX export failed: {fp32.error}")
    rows = []
    for name, patterns in variants.items():
        variant_inputs = replace(inputs, name=f"islands_{name.replace('+', '_')}")
        plan = ExportPlan(("onnx",), ("int8",), base.with_exclusions(patterns), escalate=False)
        record = ExportPipeline(variant_inputs, plan, reference).export("onnx", "int8")
        row = {"variant": name, "keep_float": list(patterns), "status": record.status, "path": record.path,
               "error": record.error}
        if record.status == "ok":
            row.update(gate_figures(Path(record.path)))
        rows.append(row)
    full = next((Path(r["path"]) for r in rows if r["status"] == "ok" and not r["keep_float"]), None)
    perturbations = perturbation_flips(open_session(Path(fp32.path), allow_ungated=True), inputs.photos.val,
                                       input_grid(full) if full else None)
    fp32_p50 = add_speedups(Path(fp32.path), rows, threads, runs)
    return {"device": fingerprint(), "cpu_features": features.to_dict(), "target": target, "threads": threads,
            "load_average": os.getloadavg(), "checkpoint": str(checkpoint), "data": [str(d) for d in data],
            "fp32_p50_ms": fp32_p50, "rows": rows, "fp32_perturbations": perturbations}


def to_markdown(report: dict) -> str:
    named = ", ".join(report["cpu_features"]["int8"]) or "none"
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    n = rows[0]["n"] if rows else 0
    lines = [f"# Float islands in ONNX INT8 ({report['target']} preset), {report['checkpoint']}", "",
             f"CPU: {report['device']['cpu']}, int8 features **{named}**, {report['threads']} threads, batch 1; "
             f"load average {', '.join(f'{v:.1f}' for v in report['load_average'])}. Gate on n = {n} val photos of "
             f"{', '.join(Path(d).name for d in report['data'])} (each artifact at its own operating point). "
             f"FP32 ONNX p50 {report['fp32_p50_ms']:.2f} ms.", "",
             "| variant | kept in float | float / weighted nodes | referral flips (outside both uncertainty bands) | "
             "agreement (one-sided 95 % bound) | "
             "sensitivity diff. bound | specificity diff. bound | AUC ratio | gate | p50 ms | vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        kept = ", ".join(f"`{p}`" for p in r["keep_float"]) or "-"
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {kept} | export failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {kept} | {r['float_nodes']} / {r['weighted_nodes']} | {r['flips']} "
                     f"({r['clean_flips']}) | "
                     f"{r['referral_agreement']:.3f} ({r['agreement_bound']:.3f}) | {number_or_dash(r['sensitivity_bound'], '+.3f')} | "
                     f"{number_or_dash(r['specificity_bound'], '+.3f')} | {number_or_dash(r['auc_ratio'], '.3f')} | {r['verdict']} | {r['p50_ms']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", "FP32 alone, its referrals at its own point against FP32 on perturbed copies of the same photos:", "",
              "| perturbation | referral flips | median max abs logit change |", "|---|---|---|"]
    lines += [f"| {p['perturbation']} | {p['flips']} of {p['n']} | {p['median_max_abs_logit_change']:.3f} |"
              for p in report.get("fp32_perturbations", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder whose calib split calibrates and whose val split judges (repeatable)")
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="NAME=PATTERN[,PATTERN] kept in float (repeatable; default: a preset sweep)")
    parser.add_argument("--target", default="auto", help="ONNX INT8 preset; auto = from this CPU's flags")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200, help="latency samples per artifact")
    parser.add_argument("--val-limit", type=int, default=400, help="val photos per folder")
    parser.add_argument("--calib-limit", type=int, default=64, help="calibration photos per folder")
    parser.add_argument("--out", type=Path, default=Path("reports/float_islands"))
    args = parser.parse_args()
    variants = dict(args.variant) if args.variant else DEFAULT_VARIANTS
    report = run(args.checkpoint, args.data, args.out, variants, args.target, args.threads, args.runs,
                 args.val_limit, args.calib_limit)
    text = to_markdown(report)
    print(text)
    write_markdown_and_json(args.out / "float_islands", text, report)


if __name__ == "__main__":
    main()
