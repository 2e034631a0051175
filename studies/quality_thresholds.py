"""Choose the quality gate's thresholds on the val + calib photos of eyepacs_full and messidor2, and write them.

Every original photo and one degraded copy per class (benchmarks/degradations.py, random strength) are
measured as the Screener measures them. Each threshold starts just outside the range of the originals (it
rejects none of them), then a greedy search relaxes the threshold whose next step (past 1 to 6 more originals) catches the most
still-uncaught degraded photos per original it newly rejects, as long as the originals' false-reject rate
stays within ``--budget`` and no single indicator rejects more than 2% of them. A threshold is placed halfway between the last original it rejects
and the first it keeps (beyond the range by a quarter of the gap to the 2nd-percentile original when it rejects
none), so photos just like the originals are not rejected by an edge drawn exactly on one of them.

With ``--folder-budget`` the false-reject rate must also stay within that rate in each folder (the gate's target
is per folder; pooled, a clean folder lets the search spend its share of the budget on another). Off by default:
on val/calib a 5% folder budget traded EyePACS occlusion (100% -> 96.5%) for EyePACS false rejects (6.9% -> 4.9%),
see docs/quality_gate.md.

    python -m studies.quality_thresholds --budget 0.03 --write   # rewrites QualityThresholds' defaults
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from edge_runtime.quality import RULES, SHARE_LIMITS, QualityThresholds

from .quality_report import ORIGINAL, collect

LOOKAHEAD = 6  # originals a threshold may move past in one greedy step
QUALITY_MODULE = Path(__file__).resolve().parents[1] / "edge_runtime" / "quality.py"


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
    measured = [r for r in records if r["metrics"] is not None]
    originals = [r for r in measured if r["case"] == ORIGINAL]
    degraded = [r for r in measured if r["case"] != ORIGINAL]
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


def write_defaults(thresholds: QualityThresholds, path: Path = QUALITY_MODULE) -> None:
    """Rewrite the ``name: float = value`` defaults of QualityThresholds in edge_runtime/quality.py."""
    text = path.read_text()
    for f in fields(QualityThresholds):
        value = getattr(thresholds, f.name)
        text, count = re.subn(rf"(\n    {f.name}: float = )[-0-9.e+]+", rf"\g<1>{value!r}", text, count=1)
        if count != 1:
            raise RuntimeError(f"could not find the default of {f.name} in {path}")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[Path("../shared/data/eyepacs_full"), Path("../shared/data/messidor2")])
    parser.add_argument("--split", nargs="+", default=["val", "calib"])
    parser.add_argument("--budget", type=float, default=0.02, help="false-reject rate of the originals allowed here")
    parser.add_argument("--folder-budget", type=float, help="false-reject rate allowed in each folder as well")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--cache", type=Path, help="reuse/store the measured indicators (JSON)")
    parser.add_argument("--out", type=Path, default=Path("reports/quality_thresholds.json"))
    parser.add_argument("--write", action="store_true", help="rewrite QualityThresholds' defaults in edge_runtime/quality.py")
    args = parser.parse_args()
    if args.cache and args.cache.is_file():
        records = json.loads(args.cache.read_text())
    else:
        records = collect(args.data, tuple(args.split), args.limit)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_text(json.dumps(records))
    thresholds, detail = choose(records, args.budget, folder_budget=args.folder_budget)
    report = {"splits": args.split, "datasets": [d.name for d in args.data], "budget": args.budget,
              "folder_budget": args.folder_budget,
              "thresholds": asdict(thresholds), **detail}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.write:
        write_defaults(thresholds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
