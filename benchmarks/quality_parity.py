"""Does the working tree's quality gate give the same answers as another revision's, photo by photo?

Every photo of the shared folders' chosen splits goes through both gates the way the Screener runs them (decoded
for a 224-px model, its field of view found once, then ``assess``); with ``--copies-every k``, every k-th photo's
code-made degradations and other cameras' framings too (the quality report's copies), and the code-made
non-fundus captures. Verdicts must be identical: gradable or not, refused as not a fundus or not, and the same
failing rules. Every indicator is compared too: the largest relative difference per indicator is printed, and
any over ``--rtol`` (or a verdict that differs) makes the exit status 1.

    python -m benchmarks.quality_parity --before-ref HEAD --splits val test --copies-every 10
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import numpy as np

from edge_runtime import preprocess, quality
from edge_runtime.contract import PreprocessPolicy
from edge_runtime.preprocess import read_image
from edge_runtime.screen import decode_side

from .degradations import NON_FUNDUS
from .quality_report import _cases, as_jpeg, load_before_module, photo_rows

# A reason ends with "(metric value vs limit limit)": the rule is what is compared, not the printed digits.
_MEASURED = re.compile(r" \([a-z_]+ [^()]* vs limit [^()]*\)$")


def answer(gate, preprocess, data: bytes, side: int) -> tuple:
    """The gate's report on encoded ``data`` and its indicators before rounding (empty where it finds no field),
    through the Screener's decode and one field-of-view search."""
    img = preprocess.decode_image(data, min_side=side)
    try:
        fov = preprocess.detect_fov(img)
        metrics = gate.quality_metrics(img, fov)
    except ValueError:  # no field at all (either revision's ImageError): the gate answers for itself
        fov, metrics = None, {}
    return gate.assess(img, fov=fov), metrics


def verdict_of(report) -> tuple:
    """What must not change: gradable, refused as not a fundus, and which rules failed."""
    return bool(report.gradable), tuple(_MEASURED.sub("", r) for r in report.reasons)


def encoded_cases(datasets: list[Path], splits: tuple[str, ...], copies_every: int, seed: int = 0):
    """(name, encoded photo) for every photo of ``splits``, the copies of every ``copies_every``-th, and the
    non-fundus captures."""
    for data in datasets:
        for i, row in enumerate(photo_rows(data, splits, None)):
            path = data / "images" / row["image"]
            copies = copies_every > 0 and i % copies_every == 0
            image = read_image(path) if copies else None
            rng = np.random.default_rng([seed, i, len(data.name)])
            for case, encoded, _ in _cases(image, rng, True, path.read_bytes()):
                yield f"{data.name}/{row['image']}/{case}", encoded
    rng = np.random.default_rng(seed)
    for name, make in NON_FUNDUS.items():
        for k in range(3):
            yield f"non_fundus/{name}_{k}", as_jpeg(make(rng))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-ref", default="HEAD", help="git revision whose gate is the reference")
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[Path("../shared/data") / name for name in
                                 ("eyepacs_full", "messidor2", "mexico_dme", "eyepacs_256")])
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--copies-every", type=int, default=10, help="degraded and reframed copies of every k-th photo")
    parser.add_argument("--rtol", type=float, default=1e-9, help="largest relative difference allowed per indicator")
    args = parser.parse_args()
    load_before_module(args.before_ref)
    before = importlib.import_module("edge_runtime_before.quality")
    before_pre = importlib.import_module("edge_runtime_before.preprocess")
    side = decode_side(PreprocessPolicy())
    worst: dict[str, float] = {}
    n, verdicts_differ, over = 0, [], []
    for name, encoded in encoded_cases(args.data, tuple(args.splits), args.copies_every):
        (old, old_metrics), (new, new_metrics) = answer(before, before_pre, encoded, side), answer(
            quality, preprocess, encoded, side)
        n += 1
        if verdict_of(old) != verdict_of(new):
            verdicts_differ.append((name, verdict_of(old), verdict_of(new)))
        if list(old_metrics) != list(new_metrics) or list(old.metrics) != list(new.metrics):
            verdicts_differ.append((name, list(old_metrics), list(new_metrics)))
            continue
        for metric, value in old_metrics.items():
            rel = abs(new_metrics[metric] - value) / max(abs(value), 1e-12)
            worst[metric] = max(worst.get(metric, 0.0), rel)
            if rel > args.rtol:
                over.append((name, metric, value, new_metrics[metric]))
        if old.score != new.score:
            over.append((name, "score", old.score, new.score))
    print(f"{n} photos and copies, before {args.before_ref} vs the working tree: "
          f"{n - len(verdicts_differ)}/{n} identical verdicts; {len(over)} values over rtol {args.rtol:g}")
    for metric, rel in sorted(worst.items(), key=lambda kv: -kv[1]):
        print(f"  {metric:24s} largest relative difference {rel:.3g}")
    for row in (verdicts_differ + over)[:20]:
        print("DIFFERS", *row)
    return 1 if verdicts_differ or over else 0


if __name__ == "__main__":
    sys.exit(main())
