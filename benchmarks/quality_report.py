"""Quality-gate report on real photos: detection rate per code-made degradation and false rejects.

    python -m benchmarks.quality_report --data ../shared/data/eyepacs_full --split test --out reports/quality_gate.md
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from edge_runtime.preprocess import read_image
from edge_runtime.quality import assess

from .degradations import DEGRADATIONS


def run(data: Path, split: str, limit: int | None = None, seed: int = 0) -> dict:
    rows = [r for r in csv.DictReader(open(data / "labels.csv")) if r.get("split", split) == split]
    rows = rows[:limit] if limit else rows
    rng = np.random.default_rng(seed)
    rejected_good, detected = 0, {name: 0 for name in DEGRADATIONS}
    for row in rows:
        image = read_image(data / "images" / row["image"])
        rejected_good += not assess(image).gradable
        for name, degrade in DEGRADATIONS.items():
            detected[name] += not assess(degrade(image, rng)).gradable
    n = len(rows)
    return {"n": n, "false_reject_rate": rejected_good / n, "detection": {k: v / n for k, v in detected.items()}}


def to_markdown(result: dict, data: Path, split: str) -> str:
    lines = [f"# Quality gate on real photos ({data.name}, split `{split}`, n = {result['n']})", "",
             "| case | ungradable verdicts |", "|---|---|",
             f"| original photos (false rejects) | {result['false_reject_rate']:.1%} |"]
    lines += [f"| {name} | {rate:.1%} |" for name, rate in result["detection"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eyepacs_full"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path, default=Path("reports/quality_gate.md"))
    args = parser.parse_args()
    result = run(args.data, args.split, args.limit)
    markdown = to_markdown(result, args.data, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
