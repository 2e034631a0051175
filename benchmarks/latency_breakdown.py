"""Per-stage latency of on-device screening against the artifact's bare inference, on real photos.

Stages: decode, quality, preprocess, infer, decide, cam (+ overlay when stored), store (the outbox commit, WAL +
synchronous=FULL). The step is the wall time of ``Screener.screen_bytes`` on bytes already in memory; its p50 is
divided by the p50 of ``session.run`` alone on the same preprocessed inputs (bare inference), same session,
same process. ``--before-root`` runs another checkout's Screener (e.g. ``/work/main``, the code before this
change) on the same photos in a subprocess, artifact by artifact, so before and after share the machine and
the minute they ran in.

    python -m benchmarks.latency_breakdown ARTIFACT [ARTIFACT ...] --data ../shared/data/eyepacs_full --n 30 \\
        --threads 2 --before-root /work/main
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_runtime.backends import RuntimeOptions, cpu_features
from edge_runtime.outbox import Outbox
from edge_runtime.preprocess import decode_image, preprocess
from edge_runtime.screen import Screener

STAGES = ("decode", "fov", "quality", "preprocess", "infer", "gate_wait", "decide", "cam", "overlay", "store")

# Run in the other checkout's interpreter path: its own Screener, our photos and artifact; prints JSON.
_BEFORE_SNIPPET = """
import json, sys, tempfile, time
from pathlib import Path
from edge_runtime.outbox import Outbox
from edge_runtime.screen import Screener
artifact, threads, passes, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
datas = [Path(p).read_bytes() for p in paths]
from edge_runtime.preprocess import decode_image, preprocess
with tempfile.TemporaryDirectory() as tmp:
    screener = Screener.from_artifact(artifact, allow_ungated=True, threads=threads, outbox=Outbox(Path(tmp) / "o.db"))
    policy = screener.session.info.manifest.preprocess
    tensors = [preprocess(decode_image(d), policy).tensor for d in datas]
    screener.screen_bytes(datas[0])
    rows = []
    for _ in range(passes):
        for data, x in zip(datas, tensors):
            t0 = time.perf_counter()
            r = screener.screen_bytes(data).result
            t1 = time.perf_counter()
            screener.session.run(x)
            bare = (time.perf_counter() - t1) * 1000
            rows.append({"wall": (t1 - t0) * 1000, "bare": bare, "outcome": r.outcome, "stages": r.latency_ms})
print(json.dumps(rows))
"""


def summarise(rows: list[dict]) -> dict:
    """Medians per stage and of the step wall time, over the graded photos (the whole pipeline ran)."""
    graded = [r for r in rows if r["outcome"] != "ungradable"] or rows
    stages = {s: float(np.median([r["stages"].get(s, 0.0) for r in graded])) for s in STAGES}
    step, bare = np.array([r["wall"] for r in graded]), np.array([r["bare"] for r in graded])
    return {"stages": stages, "step_p50": float(np.median(step)), "step_p90": float(np.percentile(step, 90)),
            "bare_p50": float(np.median(bare)), "ratio_p50": float(np.median(step) / np.median(bare)),
            "ratio_no_store_p50": float(np.median(step - np.array([r["stages"].get("store", 0.0) for r in graded]))
                                        / np.median(bare)),
            "graded": len(graded), "n": len(rows)}


def run_after(artifact: Path, datas: list[bytes], threads: int | None, passes: int, store_overlays: bool,
              spin_wait: bool = True, parallel_gate: bool = False) -> dict:
    """Each photo: the whole step, then bare inference on that photo's own tensor (paired, same load)."""
    with tempfile.TemporaryDirectory() as tmp:
        screener = Screener.from_artifact(artifact, allow_ungated=True, threads=threads,
                                          options=RuntimeOptions(spin_wait=spin_wait), parallel_gate=parallel_gate,
                                          outbox=Outbox(Path(tmp) / "o.db"), store_overlays=store_overlays)
        policy = screener.session.info.manifest.preprocess
        tensors = [preprocess(decode_image(d, min_side=screener.min_side), policy).tensor for d in datas]
        screener.screen_bytes(datas[0])  # warm-up
        rows = []
        for _ in range(passes):
            for data, x in zip(datas, tensors, strict=True):
                t0 = time.perf_counter()
                result = screener.screen_bytes(data).result
                t1 = time.perf_counter()
                screener.session.run(x)
                rows.append({"wall": (t1 - t0) * 1000, "bare": (time.perf_counter() - t1) * 1000,
                             "outcome": result.outcome, "stages": result.latency_ms})
    out = summarise(rows)
    out["backend"] = f"{result.backend}/{result.provider}"
    return out


def run_before(root: Path, artifact: Path, paths: list[Path], threads: int | None, passes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _BEFORE_SNIPPET, str(artifact.resolve()), str(threads or 0),
                           str(passes), *map(str, paths)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"before run in {root} failed: {proc.stderr[-800:]}")
    return summarise(json.loads(proc.stdout.strip().splitlines()[-1]))


def to_markdown(results: list[dict], threads: int | None) -> str:
    features = cpu_features()
    lines = [f"# Screening step vs bare inference, {threads or 'default'} threads, batch 1",
             f"CPU int8 features: {', '.join(features.int8) or 'none'}; vector: {', '.join(features.vector)}; "
             f"load average (1/5/15 min) {', '.join(f'{v:.1f}' for v in os.getloadavg())}", "",
             "| artifact | code | graded/n | " + " | ".join(STAGES) + " | step p50 | bare infer p50 | step / bare | "
             "step without store / bare |", "|---|---|---|" + "---|" * (len(STAGES) + 4)]
    for entry in results:
        for label in ("before", "after", "after, parallel gate", "after, spin off", "after+overlay"):
            row = entry.get(label)
            if row is None:
                continue
            cells = " | ".join(f"{row['stages'][s]:.2f}" for s in STAGES)
            lines.append(f"| {entry['artifact']} | {label} | {row['graded']}/{row['n']} | {cells} | {row['step_p50']:.2f} "
                         f"| {row['bare_p50']:.2f} | **{row['ratio_p50']:.2f}x** | {row['ratio_no_store_p50']:.2f}x |")
    lines += ["", "Stages: medians (ms) over graded photos. Step: wall time of screen_bytes on in-memory bytes. Bare: "
              "session.run alone on that photo's tensor, right after its step (paired, same load). store = the outbox "
              "commit (SQLite WAL, synchronous=FULL: one fsync). 'parallel gate': the quality gate runs in a worker thread "
              "beside preprocess + infer, so 'quality' overlaps them and 'gate_wait' is what it added after inference "
              "(stages do not sum to the step). Target: step / bare <= 1.5."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eyepacs_full"))
    parser.add_argument("--n", type=int, default=30, help="photos (the first n of the folder, sorted)")
    parser.add_argument("--passes", type=int, default=3, help="times each photo is screened")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel-gate", action="store_true", help="also time the gate in a thread beside inference")
    parser.add_argument("--no-spin", action="store_true", help="also time the after code with ORT thread spinning off")
    parser.add_argument("--overlay", action="store_true", help="also time store_overlays=True (overlay in the step)")
    parser.add_argument("--before-root", type=Path, help="checkout whose Screener is the 'before' (e.g. /work/main)")
    parser.add_argument("--out", type=Path, help="also write the table (.md) and raw numbers (.json) here")
    args = parser.parse_args()
    paths = sorted((args.data / "images").glob("*.jpg"))[: args.n]
    datas = [p.read_bytes() for p in paths]
    results = []
    for artifact in args.artifacts:
        entry = {"artifact": artifact.name}
        if args.before_root:
            entry["before"] = run_before(args.before_root, artifact, paths, args.threads, args.passes)
        entry["after"] = run_after(artifact, datas, args.threads, args.passes, store_overlays=False)
        if args.no_spin:
            entry["after, spin off"] = run_after(artifact, datas, args.threads, args.passes, False, spin_wait=False)
        if args.parallel_gate:
            entry["after, parallel gate"] = run_after(artifact, datas, args.threads, args.passes, False, parallel_gate=True)
        if args.overlay:
            entry["after+overlay"] = run_after(artifact, datas, args.threads, args.passes, store_overlays=True)
        results.append(entry)
        print(f"{artifact.name}: done", file=sys.stderr)
    markdown = to_markdown(results, args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(markdown)
        args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu_features().to_dict(), "results": results}, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
