"""Quality-gate report on real photos: per-class detection of code-made degradations, false rejects of the
originals, and the ROC of the overall quality score, before and after.

Photos go through what the Screener does: the degraded photo is JPEG-encoded (quality 95, as a camera would)
and decoded at the Screener's reduced scale, then assessed. ``--before-ref`` also assesses every photo with the
gate of another git revision (its quality and preprocess modules, full-resolution decode as it did), so before
and after see the very same degraded pixels.

    python -m benchmarks.quality_report --data ../shared/data/eyepacs_full ../shared/data/messidor2 --split test \\
        --before-ref 5c6e41c --out reports/quality_gate
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ImageError
from edge_runtime.preprocess import decode_image, read_image
from edge_runtime.quality import (
    DEFAULT_THRESHOLDS,
    QualityThresholds,
    quality_metrics,
    quality_score,
    verdict,
)
from edge_runtime.screen import decode_side

from .degradations import DEGRADATIONS, degrade, strength_bin
from .report import write_markdown_and_json

ORIGINAL = "original"
SCREEN_DECODE_SIDE = decode_side(PreprocessPolicy())  # the Screener's decode for a 224-px model


def photo_rows(data: Path, splits: tuple[str, ...], limit: int | None) -> list[dict]:
    rows = [r for r in csv.DictReader(open(data / "labels.csv")) if r.get("split") in splits]
    return rows[:limit] if limit else rows


def as_screened(img: np.ndarray) -> np.ndarray:
    """Encode as a camera would (JPEG 95) and decode as the Screener does (reduced scale)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return decode_image(buf.tobytes(), min_side=SCREEN_DECODE_SIDE)


def load_before_gate(ref: str) -> Callable[[np.ndarray], tuple[bool, float]]:
    """The gate of git revision ``ref`` as a function (uint8 BGR -> (gradable, score)), imported from a temp copy."""
    root = Path(tempfile.mkdtemp(prefix="gate_before_"))
    package = root / "edge_runtime_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    repo = Path(__file__).resolve().parents[1]
    # wire.py: contract.py re-exports QualityReport from it lazily since the pydantic wire schema (absent before);
    # decision.py and metrics.py: wire.py imports the referral reason from them since the DME head
    optional = ("wire", "decision", "metrics")
    for name in ("quality", "preprocess", "contract", "errors", *optional):
        shown = subprocess.run(["git", "show", f"{ref}:edge_runtime/{name}.py"], cwd=repo, capture_output=True, text=True)
        if shown.returncode != 0 and name in optional:
            continue
        shown.check_returncode()
        (package / f"{name}.py").write_text(shown.stdout)
    sys.path.insert(0, str(root))
    module = importlib.import_module("edge_runtime_before.quality")

    def gate(img: np.ndarray) -> tuple[bool, float]:
        report = module.assess(img)
        return bool(report.gradable), float(report.score)

    return gate


def collect(datasets: list[Path], splits: tuple[str, ...], limit: int | None = None, seed: int = 0,
            before: Callable[[np.ndarray], tuple[bool, float]] | None = None, progress: bool = True,
            before_screened: bool = False) -> list[dict]:
    """One record per (photo, case): its indicators after the Screener's decode (None: no fundus found) and,
    with ``before``, the old gate's verdict on the same pixels: full resolution, or with ``before_screened`` the
    very decode the current gate sees."""
    records = []
    started = time.time()
    for data in datasets:
        rows = photo_rows(data, splits, limit)
        for i, row in enumerate(rows):
            rng = np.random.default_rng([seed, i, len(data.name)])
            image = read_image(data / "images" / row["image"])
            cases = [(ORIGINAL, image, None)] + [(name, *degrade(image, name, rng)) for name in DEGRADATIONS]
            for case, img, strength in cases:
                record = {"dataset": data.name, "image": row["image"], "split": row["split"], "case": case,
                          "strength": strength}
                screened = as_screened(img)
                try:
                    record["metrics"] = quality_metrics(screened)
                except ImageError:
                    record["metrics"] = None
                if before is not None:
                    record["before_gradable"], record["before_score"] = before(screened if before_screened else img)
                records.append(record)
            if progress and (i + 1) % 25 == 0:
                print(f"{data.name}: {i + 1}/{len(rows)} photos, {time.time() - started:.0f} s", file=sys.stderr)
    return records


def judge(records: list[dict], thresholds: QualityThresholds) -> None:
    """Adds the current gate's verdict and score to each record."""
    for r in records:
        if r["metrics"] is None:
            r["gradable"], r["score"] = False, 0.0
        else:
            r["gradable"] = verdict(r["metrics"], thresholds).gradable
            r["score"] = quality_score(r["metrics"], thresholds)


def run(data: Path, split: str, limit: int | None = None, seed: int = 0,
        thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> dict:
    """One folder and split: {"n", "false_reject_rate", "detection": {class: rate}} with the current gate."""
    records = collect([data], (split,), limit, seed, progress=False)
    judge(records, thresholds)
    summary = summarise(records)["all"]
    return {"n": summary["n_originals"], "false_reject_rate": summary["false_reject"][0],
            "detection": {name: value["all"][0] for name, value in summary["detection"].items()}}


def _rate(hits: int, n: int) -> tuple[float, float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = proportion_confint(hits, n, method="wilson")
    return hits / n, float(low), float(high)


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, seed: int = 0, resamples: int = 1000) -> tuple[float, float, float]:
    """ROC AUC (degraded = positive, higher score = more likely degraded) with a 95% percentile-bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            boots.append(roc_auc_score(labels[idx], scores[idx]))
    return auc, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def summarise(records: list[dict], gradable_key: str = "gradable", score_key: str = "score") -> dict:
    """Per dataset and overall: false-reject rate, detection per class and per strength bin, ROC AUC."""
    out = {}
    groups = {"all": records} | {d: [r for r in records if r["dataset"] == d] for d in sorted({r["dataset"] for r in records})}
    for group, rows in groups.items():
        originals = [r for r in rows if r["case"] == ORIGINAL]
        entry = {"n_originals": len(originals),
                 "false_reject": _rate(sum(not r[gradable_key] for r in originals), len(originals)), "detection": {}}
        for name in DEGRADATIONS:
            cases = [r for r in rows if r["case"] == name]
            entry["detection"][name] = {"all": (*_rate(sum(not r[gradable_key] for r in cases), len(cases)), len(cases))}
            for bin_name in ("mild", "moderate", "severe"):
                subset = [r for r in cases if strength_bin(r["strength"]) == bin_name]
                entry["detection"][name][bin_name] = (*_rate(sum(not r[gradable_key] for r in subset), len(subset)),
                                                      len(subset))
        labels = np.array([r["case"] != ORIGINAL for r in rows], int)
        scores = -np.array([r[score_key] for r in rows], float)
        entry["auc"] = (*auc_with_ci(labels, scores), int(labels.sum()), int((1 - labels).sum()))
        out[group] = entry
    return out


def to_markdown(summaries: dict[str, dict], title: str) -> str:
    lines = [f"# {title}", ""]
    for group in summaries[next(iter(summaries))]:
        lines += [f"## {group}", "", "| case | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]

        def cell(value) -> str:
            rate, low, high = value[:3]
            n = value[3] if len(value) > 3 else None
            return "-" if np.isnan(rate) else f"{rate:.1%} [{low:.1%}, {high:.1%}]" + (f" (n={n})" if n is not None else "")

        first = summaries[next(iter(summaries))][group]
        lines.append(f"| originals rejected (false rejects, n={first['n_originals']}) | "
                     + " | ".join(cell(s[group]["false_reject"]) for s in summaries.values()) + " |")
        for name in DEGRADATIONS:
            lines.append(f"| {name} caught | " + " | ".join(cell(s[group]["detection"][name]["all"])
                                                        for s in summaries.values()) + " |")
            for bin_name in ("mild", "moderate", "severe"):
                lines.append(f"| &nbsp;&nbsp;{bin_name} | " + " | ".join(cell(s[group]["detection"][name][bin_name])
                                                                       for s in summaries.values()) + " |")
        lines.append("| ROC AUC of the quality score (degraded vs originals) | " + " | ".join(
            f"{s[group]['auc'][0]:.3f} [{s[group]['auc'][1]:.3f}, {s[group]['auc'][2]:.3f}] "
            f"(n={s[group]['auc'][3]} degraded, {s[group]['auc'][4]} originals)" for s in summaries.values()) + " |")
        lines.append("")
    lines.append("Rates with Wilson 95% intervals; AUC with a 1000-resample percentile bootstrap. Strength bins: "
                 "thirds of each degradation's range (benchmarks/degradations.py).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[Path("../shared/data/eyepacs_full"), Path("../shared/data/messidor2")])
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--limit", type=int, help="at most this many photos per folder")
    parser.add_argument("--before-ref", help="git revision whose gate is the 'before' (e.g. 5c6e41c)")
    parser.add_argument("--before-screened", action="store_true", help="run the --before-ref gate on the Screener's "
                        "reduced decode too (default: full resolution, as that gate was run)")
    parser.add_argument("--thresholds", type=Path, help="JSON of QualityThresholds fields (default: the module's)")
    parser.add_argument("--cache", type=Path, help="reuse/store the measured photos (JSON): re-judging with new "
                        "thresholds then takes seconds")
    parser.add_argument("--out", type=Path, default=Path("reports/quality_gate"))
    args = parser.parse_args()
    thresholds = (QualityThresholds.from_dict(json.loads(args.thresholds.read_text())["thresholds"])
                  if args.thresholds else DEFAULT_THRESHOLDS)
    before = load_before_gate(args.before_ref) if args.before_ref else None
    if args.cache and args.cache.is_file():
        records = json.loads(args.cache.read_text())
    else:
        records = collect(args.data, tuple(args.split), args.limit, before=before, before_screened=args.before_screened)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_text(json.dumps(records))
    judge(records, thresholds)
    summaries = {}
    if before is not None:
        decode = "Screener decode" if args.before_screened else "full resolution"
        summaries[f"before ({args.before_ref}, {decode})"] = summarise(records, "before_gradable", "before_score")
    summaries["after"] = summarise(records)
    markdown = to_markdown(summaries, f"Quality gate on real photos, split {'+'.join(args.split)}")
    write_markdown_and_json(args.out, markdown, summaries)
    print(markdown)


if __name__ == "__main__":
    main()
