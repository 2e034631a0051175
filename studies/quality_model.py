"""Fit the quality gate's learned gradability score on several cameras and choose its operating point; write the
runtime's data file.

Data (never the test split), measured as the Screener measures a photo (``studies.quality_thresholds.measure``):

- the EyeQ-graded photos of eyepacs_full's train split (``quality_eyeq.csv``: good / usable -> gradable, reject ->
  ungradable), weight 1: what human graders reject;
- the train photos of the other cameras (messidor2, mexico_dme: a sample spread over each folder, ``PLAN``),
  diagnosed by specialists and so taken as gradable (``OTHER_CAMERA_WEIGHT``), except a nearly black field (mean
  luminance < ``DARK_FIELD_MEAN``), which a grader would not grade: left unlabelled;
- every train photo's code-made degradations (``benchmarks/degradations.py``), ungradable (``DEGRADED_WEIGHT``
  each), so the model learns what a defect does *within* each camera rather than which camera took the photo;
- every gradable train photo framed as other cameras frame it (``TRAIN_REFRAMED``: 3:2 and 4:3 frames clipping the
  field, a smaller and a larger field, the 760 x 570 format, JPEG 50 and 70), gradable (``REFRAMED_WEIGHT``).

The model: logistic regression (scikit-learn, L2, ``C`` and the indicator set picked by grouped 5-fold
cross-validation: out-of-fold AUC on the train photos' graders' labels) on the standardised indicators (log of the
heavy-tailed ones), numpy at run time. ``FEATURE_SETS["quality"]`` leaves out the indicators that describe the
camera's frame and colour rather than the photo's quality (field size and share of the frame, coverage, redness);
``"detail"`` also the JPEG's (block grid, the smoothed noise estimate); ``"relative"`` also the edge energies in raw
levels, which scale with exposure and the field's pixel size (their brightness-normalised forms stay).

The operating point: out-of-fold scores of the graded train photos plus the graded val and calib photos (scored by
the model fitted on all of train), the highest P(ungradable) threshold at which the gate as a whole (rules or
learned score) catches >= ``--target`` of the graders' rejects; recorded with the share caught and the graders'
gradable photos kept, each with a 95% Wilson interval, the n's and a fingerprint of the photos. Each camera's val +
calib originals and reframings rejected at that point are printed beside it. The recipe kept is the one whose gate
rejects the fewest val + calib gradable originals, all folders pooled, among those with a field mean >=
``DARK_FIELD_MEAN`` (the training labels leave nearly black diagnosed photos out too: every EyeQ-graded photo that
dark is a graders' reject); the count with them is printed beside it.

    python -m studies.quality_model --cache-dir reports/quality_cache --write
    # measures what PLAN lists into --cache-dir (once), fits, chooses the point;
    # --write: edge_runtime/data/quality_model.json (packaged with the runtime; the gate's learned score)
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.degradations import DEGRADATIONS
from benchmarks.quality_report import ORIGINAL
from edge_runtime.contract import OperatingPoint
from edge_runtime.metrics import wilson_interval
from edge_runtime.quality import DEFAULT_THRESHOLDS, RULE_METRICS, verdict
from edge_runtime.quality_model import LOG_OFFSET, MODEL_FILE, GradabilityModel

from .quality_thresholds import REFRAMED, REFRAMED_PREFIX, measure

FEATURES = (*RULE_METRICS, "fov_fraction", "field_coverage", "redness")
# The camera's frame and colour (what tells one camera from another), not the photo's quality.
CAMERA_INDICATORS = frozenset({"field_diameter", "fov_fraction", "field_coverage", "redness"})
# The frame's geometry, which the rules judge with their own reasons (centring on the visible arc, the field's
# size): in the learned score it reads a camera that clips its field (3:2, 4:3, a field larger than the frame)
# as the off-centre degradation.
FRAME_INDICATORS = frozenset({"decentering", "field_diameter", "fov_fraction", "field_coverage"})
# The JPEG's block grid and smoothing: they differ with the encoder and with the scale the photo is decoded at
# (the grid is 8 px in a 512-px photo decoded whole, 4 px and blurred in a 1024-px one decoded at 1/2), so across
# cameras they read the file more than the photo; the rules still judge heavy JPEG and sensor noise.
ENCODING_INDICATORS = frozenset({"blockiness", "noise"})
# Edge energies in raw 8-bit levels: they scale with the exposure squared and with the field's size in pixels.
# directional_sharpness and local_contrast are the same kind of measure divided by the field's brightness.
ABSOLUTE_FOCUS = frozenset({"laplacian_var", "tenengrad"})
FEATURE_SETS = {"all": FEATURES, "quality": tuple(f for f in FEATURES if f not in CAMERA_INDICATORS),
                "content": tuple(f for f in FEATURES if f not in CAMERA_INDICATORS | FRAME_INDICATORS),
                "detail": tuple(f for f in FEATURES if f not in CAMERA_INDICATORS | ENCODING_INDICATORS),
                "relative": tuple(f for f in FEATURES
                                  if f not in CAMERA_INDICATORS | ENCODING_INDICATORS | ABSOLUTE_FOCUS)}
# Indicators on a linear scale (bounded, or already logarithmic); the rest are logged.
LINEAR = frozenset({"mean", "std", "entropy", "dynamic_range", "dark_channel", "decentering", "field_coverage",
                    "redness", "sharpness_isotropy", "illumination_balance", "dark_patch", "fov_fraction"})
DEGRADED_WEIGHT = 0.1  # 11 copies per photo: together about one real reject's weight per photo
REFRAMED_WEIGHT = 0.25
OTHER_CAMERA_WEIGHT = 0.5  # a messidor2 / mexico_dme train photo: gradable by diagnosis, not by a quality grade
DARK_FIELD_MEAN = 40.0  # a diagnosed photo this dark (mean field luminance) is not taken as gradable
TRAIN_REFRAMED = ("clip_3x2", "clip_4x3", "camera_760x570_q75", "field_small", "field_large", "jpeg_q50", "jpeg_q70")
# (folder, splits, every k-th photo, degraded copies): what is measured into --cache-dir, one file per row.
PLAN = (
    ("eyepacs_full", ("train",), 1, True),  # the EyeQ-graded ones only
    ("messidor2", ("train",), 6, True),
    ("mexico_dme", ("train",), 7, True),
    ("eyepacs_full", ("val", "calib"), 1, False),
    ("messidor2", ("val", "calib"), 2, False),
    ("mexico_dme", ("val", "calib"), 2, False),
)
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
DATA_FILE = Path(__file__).resolve().parents[1] / "edge_runtime" / MODEL_FILE


def _matrix(records: list[dict], features: tuple[str, ...] = FEATURES) -> np.ndarray:
    return np.array([[np.log(max(r["metrics"][f], 0.0) + LOG_OFFSET) if f not in LINEAR else r["metrics"][f]
                      for f in features] for r in records], np.float64)


def measure_plan(data_root: Path, cache_dir: Path) -> list[dict]:
    """The records of every ``PLAN`` row, measured into ``cache_dir`` once (one JSON file per row) and read back."""
    records = []
    cache_dir.mkdir(parents=True, exist_ok=True)
    for folder, splits, every, degraded in PLAN:
        path = cache_dir / f"{folder}_{'+'.join(splits)}.json"
        if not path.is_file():
            measured = measure([data_root / folder], splits, labelled_only=("train",) if folder == "eyepacs_full" else (),
                               degraded=degraded, reframed=TRAIN_REFRAMED, every=every)
            path.write_text(json.dumps(measured))
        records += json.loads(path.read_text())
    return records


@dataclass(frozen=True)
class Recipe:
    """What the learned score is fitted on, and with which weights and indicators."""

    name: str
    other_cameras: bool  # the other folders' train photos (gradable by diagnosis) and their copies join
    degraded_weight: float = DEGRADED_WEIGHT  # each code-made degradation (ungradable)
    reject_weight: float = 1.0  # each photo the graders rejected
    features: str = "all"  # a FEATURE_SETS key
    framings: tuple[str, ...] = TRAIN_REFRAMED  # other-camera framings of gradable photos that count as gradable

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SETS:
            raise ValueError(f"Recipe.features must be one of {sorted(FEATURE_SETS)}, got {self.features!r}")
        if min(self.degraded_weight, self.reject_weight) <= 0:
            raise ValueError("Recipe weights must be positive")


# The other cameras triple the code-made degradations; their weight drops to keep the synthetic share of the
# ungradable class as it was, and the graders' rejects weigh more, so that real rejects still lead.
RECIPES = {r.name: r for r in (
    Recipe("graders", other_cameras=False, framings=REFRAMED),
    Recipe("graders_7_framings", other_cameras=False),
    Recipe("graders_content", other_cameras=False, features="content"),
    Recipe("graders_detail", other_cameras=False, features="detail"),
    Recipe("graders_relative", other_cameras=False, features="relative"),
    Recipe("cameras", other_cameras=True, degraded_weight=0.03, reject_weight=3.0),
    Recipe("cameras_quality", other_cameras=True, degraded_weight=0.03, reject_weight=3.0, features="quality"),
)}


def training_set(records: list[dict], recipe: Recipe = RECIPES["graders"]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(records, label 1 = ungradable, weight) of the train split: graded originals, their degradations and
    reframings, and with ``recipe.other_cameras`` the other cameras' photos (no quality labels: diagnosed by
    specialists, so taken as gradable at ``OTHER_CAMERA_WEIGHT`` unless nearly black) with their degradations and
    reframings."""
    rows, labels, weights = [], [], []

    def add(record: dict, ungradable: bool, weight: float) -> None:
        rows.append(record), labels.append(ungradable), weights.append(weight)

    train = [r for r in records if r["split"] == "train" and (recipe.other_cameras or r["quality"] is not None)]
    dark = {(r["dataset"], r["image"]) for r in train if r["case"] == ORIGINAL and r["quality"] is None
            and r["metrics"] is not None and r["metrics"]["mean"] < DARK_FIELD_MEAN}
    for r in train:
        if r["metrics"] is None:
            continue
        reframed = r["case"].startswith(REFRAMED_PREFIX)
        if reframed and r["case"].removeprefix(REFRAMED_PREFIX) not in recipe.framings:
            continue
        if r["case"] in DEGRADATIONS:
            add(r, True, recipe.degraded_weight)
        elif r["quality"] is None:  # another camera's photo, diagnosed by specialists
            if (r["dataset"], r["image"]) not in dark and (r["case"] == ORIGINAL or reframed):
                add(r, False, OTHER_CAMERA_WEIGHT * (REFRAMED_WEIGHT if reframed else 1.0))
        elif r["case"] == ORIGINAL:
            add(r, r["quality"] == "reject", recipe.reject_weight if r["quality"] == "reject" else 1.0)
        elif reframed and r["quality"] != "reject":
            add(r, False, REFRAMED_WEIGHT)
    return rows, np.array(labels, int), np.array(weights)


def fit(records: list[dict], labels: np.ndarray, weights: np.ndarray, c: float,
        features: tuple[str, ...] = FEATURES) -> GradabilityModel:
    from sklearn.linear_model import LogisticRegression

    x = _matrix(records, features)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    model = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, labels, sample_weight=weights)
    return GradabilityModel(features, frozenset(features) - LINEAR, mean, scale, model.coef_[0],
                            float(model.intercept_[0]), OperatingPoint(), "unsaved")


def out_of_fold(records: list[dict], labels: np.ndarray, weights: np.ndarray, c: float,
                features: tuple[str, ...] = FEATURES, folds: int = 5, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Out-of-fold logits of the train originals (photos of one patient stay in one fold, with their copies)."""
    from sklearn.model_selection import GroupKFold

    groups = np.array([f'{r["dataset"]}:{r["image"].split("_")[0]}' for r in records])
    originals = np.array([r["case"] == ORIGINAL and r["quality"] is not None for r in records])
    logits = np.full(len(records), np.nan)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(np.zeros(len(records)), labels, groups):
        model = fit([records[i] for i in train], labels[train], weights[train], c, features)
        for i in held[originals[held]]:
            logits[i] = model.logit(records[i]["metrics"])
    keep = originals
    return [r for r, k in zip(records, keep, strict=True) if k], logits[keep]


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def choose_point(photos: list[dict], logits: np.ndarray, target: float) -> tuple[OperatingPoint, dict]:
    """The highest P(ungradable) threshold at which rules or learned score catch >= ``target`` of the rejects."""
    rejects = np.array([p["quality"] == "reject" for p in photos])
    rules = np.array([not verdict(p["metrics"], DEFAULT_THRESHOLDS).gradable for p in photos])
    probability = 1 / (1 + np.exp(-logits))
    chosen = None
    for t in np.unique(np.round(probability, 4))[::-1]:  # from strict to lenient: the first that reaches the target
        caught = rules | (probability >= t)
        if caught[rejects].mean() >= target:
            chosen = float(np.clip(t - 1e-4, 1e-4, 1 - 1e-4))
            break
    if chosen is None:
        raise RuntimeError("no threshold reaches the target; lower --target")
    caught = rules | (probability >= chosen)
    k_pos, n_pos = int(caught[rejects].sum()), int(rejects.sum())
    k_neg, n_neg = int((~caught[~rejects]).sum()), int((~rejects).sum())
    fingerprint = hashlib.sha256(json.dumps(sorted((p["dataset"], p["image"], p["quality"]) for p in photos))
                                 .encode()).hexdigest()
    point = OperatingPoint(rule="sensitivity", target=target, threshold=chosen, sensitivity=k_pos / n_pos,
                           sensitivity_ci=wilson_interval(k_pos, n_pos), specificity=k_neg / n_neg,
                           specificity_ci=wilson_interval(k_neg, n_neg), n_positive=n_pos, n_negative=n_neg,
                           val_fingerprint=fingerprint)
    learned_only = probability >= chosen
    detail = {"rules_alone_caught": f"{int(rules[rejects].sum())}/{n_pos}",
              "rules_alone_false_rejects": f"{int(rules[~rejects].sum())}/{n_neg}",
              "learned_alone_caught": f"{int(learned_only[rejects].sum())}/{n_pos}",
              "learned_alone_false_rejects": f"{int(learned_only[~rejects].sum())}/{n_neg}",
              "gate_caught": f"{k_pos}/{n_pos}", "gate_false_rejects": f"{n_neg - k_neg}/{n_neg}",
              "auc_learned": _auc(rejects, logits)}
    return point, detail


def _bright(records: list[dict]) -> set[tuple[str, str]]:
    """(dataset, image) of the originals whose field's mean luminance is >= ``DARK_FIELD_MEAN``."""
    return {(r["dataset"], r["image"]) for r in records if r["case"] == ORIGINAL and r["metrics"] is not None
            and r["metrics"]["mean"] >= DARK_FIELD_MEAN}


def camera_false_rejects(records: list[dict], model: GradabilityModel) -> dict[str, dict]:
    """Per folder, the val + calib photos a diagnosis or a grader calls gradable (originals; those whose field's
    mean is >= ``DARK_FIELD_MEAN``, as the training labels take them; and the reframings) that the gate (rules or
    the learned score at its point) rejects: {"k", "n", "rate", "ci"}."""
    out = {}
    rows = [r for r in records if r["split"] in ("val", "calib") and r["metrics"] is not None
            and r["quality"] != "reject" and (r["quality"] is not None or r["dataset"] != "eyepacs_full")]
    bright = _bright(rows)
    for folder in sorted({r["dataset"] for r in rows}):
        for name, keep in (("originals", lambda r: r["case"] == ORIGINAL),
                           (f"originals, field mean >= {DARK_FIELD_MEAN:.0f}",
                            lambda r: r["case"] == ORIGINAL and (r["dataset"], r["image"]) in bright),
                           ("reframed", lambda r: r["case"].startswith(REFRAMED_PREFIX))):
            chosen = [r for r in rows if r["dataset"] == folder and keep(r)]
            k = sum(not verdict(r["metrics"], DEFAULT_THRESHOLDS, model).gradable for r in chosen)
            low, high = wilson_interval(k, len(chosen))
            out[f"{folder} {name}"] = {"k": k, "n": len(chosen), "rate": round(k / max(len(chosen), 1), 4),
                                       "ci": [round(low, 4), round(high, 4)]}
    return out


def fit_recipe(records: list[dict], recipe: Recipe, target: float) -> tuple[GradabilityModel, dict]:
    """The recipe's model (``C`` by grouped CV on the graders' labels) at its operating point, and how it was chosen."""
    rows, labels, weights = training_set(records, recipe)
    features = FEATURE_SETS[recipe.features]
    scores = {}
    for c in C_GRID:
        photos, logits = out_of_fold(rows, labels, weights, c, features)
        scores[c] = _auc(np.array([p["quality"] == "reject" for p in photos]), logits)
    c = max(scores, key=scores.get)
    photos, logits = out_of_fold(rows, labels, weights, c, features)
    model = fit(rows, labels, weights, c, features)
    held = [r for r in records if r["split"] in ("val", "calib") and r["case"] == ORIGINAL and r["quality"]
            and r["metrics"] is not None]
    photos += held
    logits = np.concatenate([logits, [model.logit(r["metrics"]) for r in held]])
    point, detail = choose_point(photos, logits, target)
    chosen = GradabilityModel(model.features, model.log_features, model.mean, model.scale, model.coef,
                              model.intercept, point, "unsaved")
    false_rejects = camera_false_rejects(records, chosen)
    originals = [v for k, v in false_rejects.items() if k.endswith(" originals")]
    bright = [v for k, v in false_rejects.items() if k.endswith(f"field mean >= {DARK_FIELD_MEAN:.0f}")]
    return chosen, {"recipe": recipe.name, "C": c, "cv_auc_by_C": {str(k): round(v, 4) for k, v in scores.items()},
                    "n_train_rows": len(rows), "n_train_ungradable": int(labels.sum()),
                    "train_rows_per_folder": {f: sum(r["dataset"] == f for r in rows)
                                              for f in sorted({r["dataset"] for r in rows})},
                    "photos": len(photos), **detail,
                    "val_calib_false_rejects": false_rejects,
                    "val_calib_gradable_rejected": f"{sum(v['k'] for v in bright)}/{sum(v['n'] for v in bright)}",
                    "val_calib_gradable_rejected_with_dark": f"{sum(v['k'] for v in originals)}/"
                                                              f"{sum(v['n'] for v in originals)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache-dir", type=Path, default=Path("reports/quality_cache"),
                        help="measurements (studies.quality_thresholds.measure records), one JSON file per PLAN row")
    parser.add_argument("--target", type=float, default=0.95, help="share of the graders' rejects the gate catches")
    parser.add_argument("--recipe", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES),
                        help="recipes compared; the one whose gate rejects the fewest val + calib gradable originals "
                        f"with a field mean >= {DARK_FIELD_MEAN:.0f} (all folders pooled) at its operating point is kept")
    parser.add_argument("--out", type=Path, default=Path("reports/quality_model.json"))
    parser.add_argument("--write", action="store_true", help=f"write the kept model to {DATA_FILE}")
    args = parser.parse_args()
    records = measure_plan(args.data_root, args.cache_dir)
    fitted = {name: fit_recipe(records, RECIPES[name], args.target) for name in args.recipe}
    for name, (model, detail) in fitted.items():
        print(f"{name}: threshold {model.point.threshold:.4f}; graders' rejects caught {detail['gate_caught']}, "
              f"graders' gradable rejected {detail['gate_false_rejects']}; val + calib gradable originals rejected "
              f"{detail['val_calib_gradable_rejected']} (with nearly black fields "
              f"{detail['val_calib_gradable_rejected_with_dark']}); CV AUC {max(detail['cv_auc_by_C'].values()):.3f}")
        for key, share in detail["val_calib_false_rejects"].items():
            print(f"    {key}: {share['k']}/{share['n']} = {share['rate']:.1%} "
                  f"[{share['ci'][0]:.1%}, {share['ci'][1]:.1%}]")

    def rejected(name: str) -> float:
        k, n = fitted[name][1]["val_calib_gradable_rejected"].split("/")
        return int(k) / int(n)

    kept = min(fitted, key=rejected)
    model, detail = fitted[kept]
    data = {**model.to_dict(), "written_by": "python -m studies.quality_model",
            "chosen_on": {**detail, "recipes_compared": {name: {
                "val_calib_gradable_rejected": d["val_calib_gradable_rejected"],
                "val_calib_gradable_rejected_with_dark": d["val_calib_gradable_rejected_with_dark"],
                "per_folder": {k: f"{v['k']}/{v['n']}" for k, v in d["val_calib_false_rejects"].items()},
                "gate_caught": d["gate_caught"],
                "gate_false_rejects": d["gate_false_rejects"], "threshold": m.point.threshold}
                for name, (m, d) in fitted.items()}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({name: d for name, (_, d) in fitted.items()}, indent=2))
    print(f"kept: {kept}")
    print(json.dumps(data["operating_point"], indent=2))
    if args.write:
        DATA_FILE.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
