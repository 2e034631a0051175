"""Choose the quality gate's rule limits on val + calib photos and write them to the runtime's data file.

Every original photo, one degraded copy per class (benchmarks/degradations.py, random strength) and the
photo framed as other cameras frame it (``REFRAMED``: gradable copies, chosen limits must keep them) are measured
as the Screener measures them (the photo as a JPEG, decoded for a 224-px model, then ``quality_metrics``). Each
limit starts just outside the range of the originals (it rejects none of them), then a greedy search relaxes the
limit whose next step (past 1 to 6 more originals) catches the most still-uncaught degraded photos per original it
newly rejects, as long as the originals' false-reject rate stays within ``--budget`` and no single indicator
rejects more than 2% of them. A limit is placed halfway between the last original it rejects and the first it
keeps (beyond the range by a quarter of the gap to the 2nd-percentile original when it rejects none), so photos
just like the originals are not rejected by an edge drawn exactly on one of them.

With ``--folder-budget`` the false-reject rate must also stay within that rate in each folder (the gate's target
is per folder; pooled, a clean folder lets the search spend its share of the budget on another).

    python -m studies.quality_thresholds --budget 0.03 --cache /tmp/valcalib.json --write
    # --write: edge_runtime/data/quality_thresholds.json (packaged with the runtime; QualityThresholds' defaults)

``measure`` is shared with ``studies.quality_model``, which fits the learned score on the same measurements.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.degradations import DEGRADATIONS, REFRAMINGS, degrade
from benchmarks.quality_report import EYEQ_FILE, INPUT_SIZE, ORIGINAL, as_jpeg
from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ImageError
from edge_runtime.preprocess import decode_image, read_image
from edge_runtime.quality import RULES, SHARE_LIMITS, THRESHOLDS_FILE, QualityThresholds, quality_metrics
from edge_runtime.screen import decode_side

# Other cameras' framings measured as gradable originals (a subset of REFRAMINGS: a clipped 3:2 frame, the public
# 760 x 570 format at JPEG 75, a field small in a large frame, the photo at JPEG 50).
REFRAMED = ("clip_3x2", "camera_760x570_q75", "field_small", "jpeg_q50")
REFRAMED_PREFIX = "reframed:"
DATA_FILE = Path(__file__).resolve().parents[1] / "edge_runtime" / THRESHOLDS_FILE


def measure(datasets: list[Path], splits: tuple[str, ...], limit: int | None = None, seed: int = 0,
            labelled_only: tuple[str, ...] = (), degraded: bool = True, reframed: tuple[str, ...] = REFRAMED,
            progress: bool = True, every: int = 1) -> list[dict]:
    """One record per (photo, case): the indicators as the Screener measures them (None: refused, no field).

    ``labelled_only``: splits of which only photos with an EyeQ grade are measured (the train split, for the
    learned score). ``every``: every k-th photo of a folder's rows (a sample spread over all its patients and
    centres, where ``limit`` takes the first ones). Records carry ``dataset``, ``image``, ``split``, ``quality`` (EyeQ grade or None), ``case``
    (``original``, a degradation, or ``reframed:<name>``) and ``strength``.
    """
    side = decode_side(PreprocessPolicy(input_size=INPUT_SIZE))
    records, started = [], time.time()
    for data in datasets:
        labels = {}
        if (data / EYEQ_FILE).is_file():
            labels = {r["image"]: r["quality"] for r in csv.DictReader(open(data / EYEQ_FILE))}
        rows = [r for r in csv.DictReader(open(data / "labels.csv")) if r["split"] in splits
                and (r["split"] not in labelled_only or r["image"] in labels)]
        rows = rows[::every][:limit] if limit else rows[::every]
        for i, row in enumerate(rows):
            rng = np.random.default_rng([seed, i, len(data.name)])
            image = read_image(data / "images" / row["image"])
            cases = [(ORIGINAL, (data / "images" / row["image"]).read_bytes(), None)]
            if degraded:
                for name in DEGRADATIONS:
                    copy, strength = degrade(image, name, rng)
                    cases.append((name, as_jpeg(copy), strength))
            cases += [(REFRAMED_PREFIX + name, REFRAMINGS[name](image), None) for name in reframed]
            for case, encoded, strength in cases:
                try:
                    metrics = quality_metrics(decode_image(encoded, min_side=side))
                except ImageError:
                    metrics = None
                records.append({"dataset": data.name, "image": row["image"], "split": row["split"],
                                "quality": labels.get(row["image"]), "case": case, "strength": strength,
                                "metrics": metrics})
            if progress and (i + 1) % 25 == 0:
                print(f"{data.name}: {i + 1}/{len(rows)} photos, {time.time() - started:.0f} s", file=sys.stderr)
    return records


LOOKAHEAD = 6  # originals a threshold may move past in one greedy step


def _place(sorted_values: np.ndarray, k: int, op: str) -> float:
    """Threshold rejecting the k most extreme originals (ascending ``sorted_values`` for ">=", descending for "<=")."""
    if k == 0:
        extreme = sorted_values[0]
        q2 = sorted_values[min(len(sorted_values) - 1, max(1, int(0.02 * len(sorted_values))))]
        return float(extreme - 0.25 * (q2 - extreme))
    return float((sorted_values[k - 1] + sorted_values[k]) / 2)


def choose(records: list[dict], budget: float, max_per_indicator: float = 0.02,
           folder_budget: float | None = None) -> tuple[QualityThresholds, dict]:
    """Greedy threshold choice (module docstring); returns the thresholds and what each one catches.

    ``folder_budget``: a false-reject budget that must also hold in each folder (``dataset``) of originals, since
    the gate's target is per folder: pooled alone, a clean folder lets the search spend its share on another.
    """
    measured = [r for r in records if r["metrics"] is not None and r.get("quality") != "reject"]
    originals = [r for r in measured if r["case"] == ORIGINAL or r["case"].startswith(REFRAMED_PREFIX)]
    degraded = [r for r in measured if r["case"] in DEGRADATIONS]
    n_orig = len(originals)
    folders = np.array([r.get("dataset", "") for r in originals])
    folder_sizes = {f: int((folders == f).sum()) for f in np.unique(folders)} if folder_budget is not None else {}
    rules = [(metric, field_name, op) for metric, field_name, op, _ in RULES]
    orig_values = {f: np.array([r["metrics"][m] for r in originals]) for m, f, _ in rules}
    deg_values = {f: np.array([r["metrics"][m] for r in degraded]) for m, f, _ in rules}
    order = {f: np.sort(orig_values[f]) if op == ">=" else -np.sort(-orig_values[f]) for _, f, op in rules}
    ops = {f: op for _, f, op in rules}
    k = {f: 0 for f in ops}

    def fails(values: np.ndarray, field_name: str, limit: float) -> np.ndarray:
        return values < limit if ops[field_name] == ">=" else values > limit

    def limit(field_name: str, count: int) -> float:
        return _place(order[field_name], count, ops[field_name])

    def rejected(values: dict[str, np.ndarray], counts: dict[str, int]) -> np.ndarray:
        out = np.zeros(len(next(iter(values.values()))), bool)
        for f in ops:
            out |= fails(values[f], f, limit(f, counts[f]))
        return out

    per_indicator_cap = max(1, int(max_per_indicator * n_orig))
    while True:
        current_orig = rejected(orig_values, k)
        current_deg = rejected(deg_values, k)
        best, best_gain = None, 0.0  # (indicator, step)
        for f in ops:
            # Look up to LOOKAHEAD originals ahead: a gap of degraded photos can sit behind a few originals.
            for step in range(1, LOOKAHEAD + 1):
                if k[f] + step > min(n_orig - 1, per_indicator_cap):
                    break
                trial = dict(k, **{f: k[f] + step})
                trial_orig = rejected(orig_values, trial)
                new_orig = trial_orig.sum() - current_orig.sum()
                if trial_orig.sum() / n_orig > budget or any(
                        trial_orig[folders == f].sum() / n > folder_budget for f, n in folder_sizes.items()):
                    break
                gain = (rejected(deg_values, trial).sum() - current_deg.sum()) / max(new_orig, 0.5)
                if gain > best_gain:
                    best, best_gain = (f, step), gain
        if best is None:
            break
        k[best[0]] += best[1]
    # Prune: an indicator that catches no degraded photo the others miss keeps its guard against failures the
    # code-made set lacks (e.g. a zoomed-out capture), but at a lenient edge, a full 5th-percentile gap beyond
    # the originals' extreme: camera models differ (field-of-view share, brightness) more than val/calib shows.
    limits = {f: limit(f, k[f]) for f in ops}
    lenient = []
    for f in ops:
        others = np.zeros(len(degraded), bool)
        for g in ops:
            if g != f:
                others |= fails(deg_values[g], g, limits[g])
        if not (fails(deg_values[f], f, limits[f]) & ~others).any():
            ordered = order[f]
            q5 = ordered[min(len(ordered) - 1, max(1, int(0.05 * len(ordered))))]
            limits[f] = float(ordered[0] - (q5 - ordered[0]))
            if f in SHARE_LIMITS:  # a share limit past [0, 1] could never fire, and is refused by QualityThresholds
                limits[f] = float(np.clip(limits[f], 0.0, 1.0))
            lenient.append(f)
    thresholds = QualityThresholds(**{f: round(v, 6) for f, v in limits.items()})
    k = {f: (0 if f in lenient else k[f]) for f in ops}
    final_orig = np.zeros(n_orig, bool)
    final_deg = np.zeros(len(degraded), bool)
    for f in ops:
        final_orig |= fails(orig_values[f], f, limits[f])
        final_deg |= fails(deg_values[f], f, limits[f])
    cases = sorted({r["case"] for r in degraded})
    detail = {"n_originals": n_orig, "false_reject": float(final_orig.mean()),
              "false_reject_per_folder": {f: float(final_orig[folders == f].mean()) for f in np.unique(folders)},
              "caught_per_folder": {f: {c: float(np.mean(hits)) for c in cases
                                        if (hits := [d for d, r in zip(final_deg, degraded, strict=True)
                                                     if r["case"] == c and r.get("dataset", "") == f])}
                                    for f in sorted({r.get("dataset", "") for r in degraded})},
              "rejected_originals_per_indicator": k, "lenient_indicators": lenient,
              "caught": {c: float(np.mean([d for d, r in zip(final_deg, degraded, strict=True) if r["case"] == c])) for c in cases},
              "n_degraded": {c: sum(r["case"] == c for r in degraded) for c in cases},
              "no_fundus_found": sum(r["metrics"] is None for r in records)}
    return thresholds, detail


def write_data(thresholds: QualityThresholds, report: dict, path: Path = DATA_FILE) -> None:
    """Write the limits (and how they were chosen) to the runtime's data file, which QualityThresholds reads."""
    summary = {k: report[k] for k in ("splits", "datasets", "budget", "folder_budget", "n_originals", "false_reject",
                                      "false_reject_per_folder", "lenient_indicators")}
    path.write_text(json.dumps({"written_by": "python -m studies.quality_thresholds", "chosen_on": summary,
                                "thresholds": asdict(thresholds)}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[Path("../shared/data/eyepacs_full"),
                        Path("../shared/data/messidor2"), Path("../shared/data/mexico_dme")])
    parser.add_argument("--split", nargs="+", default=["val", "calib"])
    parser.add_argument("--budget", type=float, default=0.02, help="false-reject rate of the originals allowed here")
    parser.add_argument("--folder-budget", type=float, help="false-reject rate allowed in each folder as well")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--cache", type=Path, nargs="+", help="measured indicators (JSON lists of measure records, "
                        "e.g. one per folder); measured and stored in the first when absent")
    parser.add_argument("--out", type=Path, default=Path("reports/quality_thresholds.json"))
    parser.add_argument("--write", action="store_true", help=f"write the limits to {DATA_FILE}")
    args = parser.parse_args()
    if args.cache and all(p.is_file() for p in args.cache):
        records = [r for p in args.cache for r in json.loads(p.read_text())]
    else:
        records = measure(args.data, tuple(args.split), args.limit)
        if args.cache:
            args.cache[0].parent.mkdir(parents=True, exist_ok=True)
            args.cache[0].write_text(json.dumps(records))
    records = [r for r in records if r["split"] in args.split]
    thresholds, detail = choose(records, args.budget, folder_budget=args.folder_budget)
    report = {"splits": args.split, "datasets": sorted({r["dataset"] for r in records}), "budget": args.budget,
              "folder_budget": args.folder_budget,
              "thresholds": asdict(thresholds), **detail}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.write:
        write_data(thresholds, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
