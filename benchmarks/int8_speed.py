"""INT8 against FP32 of the same model, per format, on this CPU: does INT8 pay here?

Builds (once per input size, cached in ``--work``) an EfficientNet-Lite0 DR classifier with ImageNet backbone weights and a
seeded random head (speed does not depend on the weights), exports ONNX FP32, ONNX full-INT8 for this CPU's
``--target auto`` preset (U8S8 on VNNI / ARM dot-product CPUs) and TFLite FP32 + INT8, then times each at batch 1
under the runtime options being compared (threads, ORT graph optimisation level and execution mode, XNNPACK
threads) and prints the INT8/FP32 table per format with the CPU's int8 features named. ``--input-size`` (repeatable)
measures the cost of a larger input (224 / 300 / 380 px: DR lesions are small) at the same settings.

    python -m benchmarks.int8_speed --data ../shared/data/eyepacs_full --threads 2 --work /tmp/retinaedge_int8
    python -m benchmarks.int8_speed --input-size 224 --input-size 300 --input-size 380

``--artifact`` (repeatable) times already exported artifacts instead, e.g. a study's FP32 and gated INT8 files,
interleaved in one run at each ``--threads`` value:

    python -m benchmarks.int8_speed --artifact model_fp32.onnx --artifact model_int8.onnx --threads 2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_runtime.backends import RuntimeOptions, cpu_features, int8_target, open_session

from .device import fingerprint
from .report import write_markdown_and_json
from .runner import artifact_size_mb

MODEL = "tf_efficientnet_lite0"


def build_artifacts(work: Path, data: Path | None, target: str, formats: tuple[str, ...] = ("onnx", "tflite"),
                    calib_limit: int = 32, input_size: int = 224, model_name: str = MODEL,
                    pretrained: bool = True) -> dict[tuple[str, str], Path]:
    """FP32 + INT8 artifacts of one model (Lite0: ImageNet backbone, seeded random head) at ``input_size``,
    exported once and reused while ``work`` exists."""
    work = work if (input_size, model_name) == (224, MODEL) else work / f"{model_name}_{input_size}px"
    index = work / "artifacts" / "index.json"
    if index.is_file():
        found = {(r["format"], r["precision"]): Path(r["path"])
                 for r in json.loads(index.read_text()).get("artifacts", []) if r.get("status") == "ok" and r.get("path")}
        if all((f, p) in found for f in formats for p in ("fp32", "int8")):
            return found
    import torch

    from compression.gate import GateThresholds
    from compression.quantize import QuantRecipe
    from edge_runtime.contract import PreprocessPolicy
    from exporters.pipeline import ExportPlan, export_all, load_inputs
    from training.checkpoint import CheckpointMeta
    from training.models import create_model, get_model_cfg

    torch.manual_seed(0)
    model = create_model(model_name, pretrained=pretrained).eval()
    cfg = get_model_cfg(model_name)
    meta = CheckpointMeta(model_name=model_name, preprocess=PreprocessPolicy(input_size=input_size, mean=cfg.mean,
                                                                            std=cfg.std),
                          data_fingerprint="imagenet0", num_features=model.num_features,
                          config={"note": "ImageNet backbone, random head: for speed only"},
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    checkpoint = work / f"{model_name}_imagenet_random_head.pt"
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": model.state_dict(), "meta": meta.to_dict()}, checkpoint)
    # A random head has no clinical fidelity to hold: the gate runs (and is recorded) with bounds that always
    # pass, and nothing escalates, so the INT8 artifact is the recipe's own.
    no_bounds = GateThresholds(min_referral_agreement=0.0, min_sensitivity_difference=-1.0,
                               min_specificity_difference=-1.0, min_auc_ratio=0.0)
    inputs = load_inputs(checkpoint, work / "artifacts", data, data, thresholds=no_bounds, calib_limit=calib_limit,
                         val_limit=calib_limit, tuning_limit=0)
    plan = ExportPlan(tuple(formats), ("fp32", "int8"), recipe=QuantRecipe.for_target(target), escalate=False)
    records = export_all(inputs, plan, progress=False)
    return {(r.format, r.precision): Path(r.path) for r in records if r.status == "ok" and r.path}


def _input_for(session) -> np.ndarray:
    policy = session.info.manifest.preprocess
    size = policy.input_size
    shape = (1, 3, size, size) if policy.layout == "NCHW" else (1, size, size, 3)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def time_interleaved(sessions: list, rounds: int, per_round: int = 10, warmup: int = 10) -> list[list[float]]:
    """Latency samples (ms) per session, taken in rounds that visit every session in turn, so load from other
    processes on a shared machine falls on all of them alike rather than on whichever ran last."""
    inputs = [_input_for(s) for s in sessions]
    for session, x in zip(sessions, inputs, strict=True):
        for _ in range(warmup):
            session.run(x)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (session, x) in enumerate(zip(sessions, inputs, strict=True)):
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(x)
                samples[i].append((time.perf_counter() - start) * 1000)
    return samples


def add_speedups(fp32: Path, rows: list[dict], threads: int, runs: int) -> float:
    """Time the FP32 artifact and every exported row's artifact (``row["path"]``, rows with status "ok"), samples
    interleaved; fill each row's ``p50_ms`` and ``speedup`` over FP32 and return FP32's p50 (ms)."""
    from edge_runtime.backends import open_session

    timed = [Path(fp32)] + [Path(r["path"]) for r in rows if r["status"] == "ok"]
    sessions = [open_session(p, allow_ungated=True, threads=threads) for p in timed]
    samples = time_interleaved(sessions, rounds=max(1, runs // 10))
    p50 = {str(p): float(np.percentile(s, 50)) for p, s in zip(timed, samples, strict=True)}
    fp32_p50 = p50[str(Path(fp32))]
    for row in rows:
        if row["status"] == "ok":
            row["p50_ms"] = p50[str(Path(row["path"]))]
            row["speedup"] = fp32_p50 / row["p50_ms"]
    return fp32_p50


def option_grid(threads: int) -> dict[str, list[RuntimeOptions]]:
    """Session options compared per format; the fastest becomes the device's recorded setting."""
    onnx = [RuntimeOptions(threads=threads, graph_optimization=level, execution_mode=mode)
            for level in ("extended", "all") for mode in ("sequential", "parallel")]
    onnx.append(RuntimeOptions(threads=threads, graph_optimization="all", execution_mode="sequential", spin_wait=False))
    tflite = [RuntimeOptions(threads=threads), RuntimeOptions(threads=threads, xnnpack=False)]
    return {"onnx": onnx, "tflite": tflite}


def _stats(values: list[float]) -> dict:
    return {"p10": float(np.percentile(values, 10)), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "n": len(values)}


def run(work: Path, data: Path | None, threads: int, runs: int, target: str = "auto",
        input_sizes: tuple[int, ...] = (224,)) -> dict:
    """Per input size, phase 1: every option set of every artifact, one artifact at a time (a short run each), to
    pick the fastest per artifact. Phase 2: the picked FP32 and INT8 sessions of every format, interleaved for
    ``runs`` samples each, so the INT8/FP32 ratio is measured under the same load."""
    features = cpu_features()
    target = int8_target(features) if target == "auto" else target
    sweep, final = [], []
    for size in input_sizes:
        size_sweep, size_rows = _measure(build_artifacts(work, data, target, input_size=size), threads, runs)
        sweep += [{**row, "input_size": size} for row in size_sweep]
        final += [{**row, "input_size": size} for row in size_rows]
    return {"device": fingerprint(), "cpu_features": features.to_dict(), "target": target, "threads": threads,
            "load_average": os.getloadavg(), "sweep": sweep, "rows": final}


def _measure(artifacts: dict[tuple[str, str], Path], threads: int, runs: int) -> tuple[list[dict], list[dict]]:
    """(every option set's row, the fastest set per artifact re-timed interleaved) for one input size."""
    grid = option_grid(threads)
    sweep, chosen = [], {}
    for (fmt, precision), path in sorted(artifacts.items()):
        for options in grid.get(fmt, [RuntimeOptions(threads=threads)]):
            row = {"format": fmt, "precision": precision, "file": path.name, "options": options}
            try:
                session = open_session(path, allow_ungated=True, options=options)
                values = time_interleaved([session], rounds=max(1, runs // 40))[0]
                row.update(provider=session.info.provider, **_stats(values))
                del session
            except Exception as exc:  # noqa: BLE001 - a failing combination is a row, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
            sweep.append(row)
            if "p50" in row and ((fmt, precision) not in chosen or row["p50"] < chosen[(fmt, precision)]["p50"]):
                chosen[(fmt, precision)] = row
    keys = sorted(chosen)
    sessions = [open_session(artifacts[k], allow_ungated=True, options=chosen[k]["options"]) for k in keys]
    samples = time_interleaved(sessions, rounds=max(1, runs // 10))
    final = [{**chosen[k], **_stats(values)} for k, values in zip(keys, samples, strict=True)]
    for row in sweep + final:
        if isinstance(row["options"], RuntimeOptions):
            row["options"] = asdict(row["options"])
    return sweep, final


def _options_text(options: dict) -> str:
    shown = ("threads", "graph_optimization", "execution_mode", "spin_wait", "xnnpack")
    return ", ".join(f"{k}={options[k]}" for k in shown if options.get(k) is not None)


def to_markdown(report: dict) -> str:
    features = report["cpu_features"]
    named = ", ".join(features["int8"]) or "none (no int8 dot-product instructions)"
    sizes = "/".join(str(s) for s in dict.fromkeys(r["input_size"] for r in report["rows"]))
    lines = [f"# INT8 vs FP32, {MODEL} @{sizes}, batch 1, {report['threads']} threads - {report['device']['cpu']}", "",
             f"CPU int8 features: **{named}**; ONNX INT8 preset `--target auto` -> `{report['target']}`. "
             f"Load average while measuring (1/5/15 min): {', '.join(f'{v:.1f}' for v in report['load_average'])} "
             f"on {report['device']['cores']} cores.", "",
             "## Runtime options swept (one artifact at a time; the fastest p50 per artifact is kept)", "",
             "| px | format | precision | options | p10 ms | p50 ms | p90 ms | n |", "|---|---|---|---|---|---|---|---|"]
    for r in report["sweep"]:
        opts = _options_text(r["options"])
        if "error" in r:
            lines.append(f"| {r['input_size']} | {r['format']} | {r['precision']} | {opts} | failed: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['input_size']} | {r['format']} | {r['precision']} | {opts} | {r['p10']:.2f} | "
                         f"{r['p50']:.2f} | {r['p90']:.2f} | {r['n']} |")
    best = {(r["input_size"], r["format"], r["precision"]): r for r in report["rows"]}
    lines += ["", "## INT8 / FP32 per format (each with its fastest options, samples interleaved)", "",
              "| px | format | FP32 options | INT8 options | FP32 p10 / p50 ms | INT8 p10 / p50 ms | speed-up p10 | "
              "speed-up p50 | CPU int8 features |", "|---|---|---|---|---|---|---|---|---|"]
    for size, fmt in sorted({(s, f) for s, f, _ in best}):
        fp32, int8 = best.get((size, fmt, "fp32")), best.get((size, fmt, "int8"))
        if fp32 and int8:
            lines.append(f"| {size} | {fmt} | {_options_text(fp32['options'])} | {_options_text(int8['options'])} | "
                         f"{fp32['p10']:.2f} / {fp32['p50']:.2f} | {int8['p10']:.2f} / {int8['p50']:.2f} | "
                         f"{fp32['p10'] / int8['p10']:.2f}x | {fp32['p50'] / int8['p50']:.2f}x | {named} |")
    return "\n".join(lines) + "\n"


def time_artifacts(paths: list[Path], threads: tuple[int, ...], runs: int) -> dict:
    """Batch-1 latency of each artifact, interleaved (``time_interleaved``), once per thread count."""
    report: dict = {"device": fingerprint(), "cpu_features": cpu_features().to_dict(), "runs": runs, "rows": []}
    for n in threads:
        sessions = [open_session(p, allow_ungated=True, threads=n) for p in paths]
        load_before = os.getloadavg()
        samples = time_interleaved(sessions, rounds=max(1, runs // 10))
        for path, s in zip(paths, samples, strict=True):
            report["rows"].append({"artifact": path.name, "threads": n, "size_mb": round(artifact_size_mb(path), 2),
                                   "load_before": load_before, "load_after": os.getloadavg(), **_stats(s)})
    return report


def artifacts_markdown(report: dict) -> str:
    features = ", ".join(report["cpu_features"].get("int8", [])) or "none"
    lines = [f"# Batch-1 latency, interleaved: {report['device']['cpu']}, int8 features: {features}", "",
             "| artifact | threads | MB | p50 ms | p90 ms | samples | load before -> after |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['artifact']} | {r['threads']} | {r['size_mb']:.2f} | {r['p50']:.2f} | {r['p90']:.2f} | "
                     f"{r['n']} | {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eyepacs_full"),
                        help="photos whose calib split calibrates INT8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retinaedge_int8"), help="artifact cache (not the repo)")
    parser.add_argument("--threads", type=int, action="append", help="intra-op threads (repeatable with --artifact; "
                        "default 2)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--artifact", type=Path, action="append", help="time these exported artifacts instead")
    parser.add_argument("--target", default="auto", help="ONNX INT8 preset; auto = from this CPU's flags")
    parser.add_argument("--input-size", type=int, action="append", help="model input side in px (repeatable; default 224)")
    parser.add_argument("--out", type=Path, help="also write the report (.md and .json) here")
    args = parser.parse_args()
    threads = tuple(args.threads or (2,))
    if args.artifact:
        report = time_artifacts(args.artifact, threads, args.runs)
        markdown = artifacts_markdown(report)
    else:
        report = run(args.work, args.data if args.data.is_dir() else None, threads[0], args.runs, args.target,
                     tuple(args.input_size or (224,)))
        markdown = to_markdown(report)
    if args.out:
        write_markdown_and_json(args.out, markdown, report)
    print(markdown)


if __name__ == "__main__":
    main()
