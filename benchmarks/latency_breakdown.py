"""Per-stage latency of on-device screening (decode, quality, preprocess, infer, cam, store) over real photos.

    python -m benchmarks.latency_breakdown ARTIFACT [ARTIFACT ...] --data ../shared/data/eyepacs_full --n 30
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.outbox import Outbox
from edge_runtime.screen import Screener


def breakdown(artifact: Path, images: list[Path], threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        screener = Screener.from_artifact(artifact, allow_ungated=True, threads=threads, outbox=Outbox(Path(tmp) / "o.db"))
        screener.screen_file(images[0])  # warm-up
        runs = [screener.screen_file(p).result for p in images]
    graded = [r for r in runs if r.outcome == "graded"]
    stages = ("decode", "quality", "preprocess", "infer", "cam", "store")
    median = {s: float(np.median([r.latency_ms[s] for r in graded])) for s in stages}
    median["total"] = float(np.median([sum(r.latency_ms[s] for s in stages) for r in graded]))
    return {"artifact": artifact.name, "backend": f"{runs[0].backend}/{runs[0].provider}", "graded": len(graded),
            "ungradable": len(runs) - len(graded), "median_ms": median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eyepacs_full"))
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    images = sorted((args.data / "images").glob("*.jpg"))[: args.n]
    stages = ("decode", "quality", "preprocess", "infer", "cam", "store", "total")
    print("| artifact | backend | graded/ungradable | " + " | ".join(stages) + " |")
    print("|---|---|---|" + "---|" * len(stages))
    for artifact in args.artifacts:
        row = breakdown(artifact, images, args.threads)
        print(f"| {row['artifact']} | {row['backend']} | {row['graded']}/{row['ungradable']} | "
              + " | ".join(f"{row['median_ms'][s]:.1f}" for s in stages) + " |")


if __name__ == "__main__":
    main()
