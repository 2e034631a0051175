"""Time of the quality gate per photo, before and after, on the same photos in the same process, beside inference.

Each photo is decoded as the Screener decodes it for a 224-px model and its field of view found once (the
Screener's ``fov`` stage, shared with the crop); the timed call is what the Screener's ``quality`` stage runs:
``assess(bgr, thresholds, fov)`` (rules, the not-a-fundus check and the learned score). The gate of
``--before-ref`` (a git revision, imported from a temporary copy like ``quality_report --before-ref``) and the
working tree's gate are timed in alternating rounds, so both see the same load; each photo's time is the minimum
over rounds, and the table gives the median and p90 over photos. ``--artifact`` adds one row: the artifact's
inference (``Session.run_heads`` on the photos' preprocessed inputs) timed the same way. The CPU's int8 features
are printed with the table.

    python -m benchmarks.quality_speed --before-ref 1c4167e --n 40 --rounds 7 --threads 2 [--artifact model.onnx]
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import time
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.preprocess import decode_image, preprocess
from edge_runtime.preprocess import detect_fov as detect_fov_after
from edge_runtime.quality import assess as assess_after
from edge_runtime.screen import decode_side

from .quality_report import load_before_gate


def screened_photos(datasets: list[Path], split: str, n: int) -> list[tuple[str, np.ndarray]]:
    """The first ``n`` photos of ``split`` per folder, decoded as the Screener decodes them (224-px model)."""
    side = decode_side(PreprocessPolicy())
    out = []
    for data in datasets:
        rows = [r for r in csv.DictReader(open(data / "labels.csv")) if r.get("split") == split][:n]
        out += [(data.name, decode_image((data / "images" / r["image"]).read_bytes(), min_side=side)) for r in rows]
    return out


def time_gates(photos: list[tuple[str, np.ndarray]], gates: dict[str, tuple], rounds: int) -> dict[str, np.ndarray]:
    """Per gate, each photo's minimum time (ms) over ``rounds`` alternating rounds; FOV found once per gate."""
    prepared = {name: [detect(img) for _, img in photos] for name, (_, detect) in gates.items()}
    best = {name: np.full(len(photos), np.inf) for name in gates}
    for name, (gate, _) in gates.items():  # warm-up (imports, kernel caches)
        gate(photos[0][1], fov=prepared[name][0])
    for _ in range(rounds):
        for name, (gate, _) in gates.items():
            for i, (_, img) in enumerate(photos):
                started = time.perf_counter()
                gate(img, fov=prepared[name][i])
                best[name][i] = min(best[name][i], (time.perf_counter() - started) * 1000)
    return best


def cpu_int8_features() -> str:
    """The CPU's int8 instruction sets (avx512_vnni, avx_vnni, amx_int8), as /proc/cpuinfo lists them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return ", ".join(sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})) or "none (no VNNI/AMX)"


def inference_gate(artifact: Path, threads: int) -> tuple:
    """(timed call, FOV finder) pair that runs the artifact's inference on a photo's preprocessed input."""
    from edge_runtime.backends import open_session

    session = open_session(artifact, allow_ungated=True, threads=threads)
    policy = session.info.manifest.preprocess
    inputs: dict[int, np.ndarray] = {}

    def infer(img: np.ndarray, fov=None):
        tensor = inputs.setdefault(id(img), preprocess(img, policy, fov).tensor)
        return session.run_heads(tensor)

    return infer, detect_fov_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[Path("../shared/data/eyepacs_full"), Path("../shared/data/messidor2")])
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=40, help="photos per folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV threads (the Screener's default on 2 cores)")
    parser.add_argument("--before-ref", help="git revision whose gate is the 'before'")
    parser.add_argument("--artifact", type=Path, help="an exported model: time its inference beside the gate")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    photos = screened_photos(args.data, args.split, args.n)
    gates = {}
    if args.before_ref:
        load_before_gate(args.before_ref)
        before = importlib.import_module("edge_runtime_before.quality")
        before_pre = importlib.import_module("edge_runtime_before.preprocess")
        gates[f"before ({args.before_ref})"] = (before.assess, before_pre.detect_fov)
    gates["after"] = (assess_after, detect_fov_after)
    if args.artifact:
        gates[f"inference ({args.artifact.name})"] = inference_gate(args.artifact, args.threads)
    best = time_gates(photos, gates, args.rounds)
    names = sorted({d for d, _ in photos})
    lines = [f"# Quality gate time per photo (ms), split {args.split}, {args.threads} OpenCV threads",
             f"load average (1/5/15 min) {', '.join(f'{v:.1f}' for v in os.getloadavg())}; min of {args.rounds} "
             "alternating rounds per photo; FOV given (found once, as the Screener does); CPU int8 features: "
             f"{cpu_int8_features()}", "",
             "| gate | " + " | ".join(f"{d} p50 (n={sum(x == d for x, _ in photos)})" for d in names)
             + " | all p50 | all p90 |", "|---|" + "---|" * (len(names) + 2)]
    for name, times in best.items():
        per = [float(np.median([t for t, (d, _) in zip(times, photos, strict=True) if d == ds])) for ds in names]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per)
                     + f" | {np.median(times):.2f} | {np.percentile(times, 90):.2f} |")
    if args.before_ref:
        t_before, t_after = best[f"before ({args.before_ref})"], best["after"]
        lines.append(f"\nafter / before (median of per-photo ratios): {np.median(t_after / t_before):.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
