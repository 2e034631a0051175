"""Fit the quality gate's learned gradability score and choose its operating point; write the runtime's data file.

Data (never the test split):

- the EyeQ-graded photos of eyepacs_full's train split (``quality_eyeq.csv``: good / usable -> gradable, reject ->
  ungradable), their code-made degradations (``benchmarks/degradations.py``, ungradable, weight
  ``DEGRADED_WEIGHT`` each) and their gradable photos framed as other cameras frame them (``REFRAMED``, gradable,
  weight ``REFRAMED_WEIGHT`` each): what graders reject, what the rules were built for, and what a camera change
  must not turn into a reject. ``--other`` adds other cameras' train photos as gradable (``OTHER_CAMERA_WEIGHT``;
  tried and left off: the model then separates the cameras rather than the qualities);
- a logistic regression (scikit-learn, L2, ``C`` picked by grouped 5-fold cross-validation on the train photos'
  graders' labels) on the standardised indicators (log of the heavy-tailed ones): numpy at run time;
- the operating point: out-of-fold scores of the train photos plus the val and calib photos (scored by the model
  fitted on all of train), the highest threshold at which the gate as a whole (rules or learned score) catches
  >= ``--target`` of the graders' rejects; recorded with the share caught and the graders' gradable photos kept,
  each with a 95% Wilson interval, the n's and a fingerprint of the photos.

    python -m studies.quality_model --cache /tmp/quality_eyepacs_train.json /tmp/quality_eyepacs_valcalib.json --write
    # --write: edge_runtime/data/quality_model.json (packaged with the runtime; the gate's learned score)
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from benchmarks.degradations import DEGRADATIONS
from benchmarks.quality_report import ORIGINAL
from edge_runtime.contract import OperatingPoint
from edge_runtime.metrics import wilson_interval
from edge_runtime.quality import DEFAULT_THRESHOLDS, RULE_METRICS, verdict
from edge_runtime.quality_model import LOG_OFFSET, MODEL_FILE, GradabilityModel

from .quality_thresholds import REFRAMED_PREFIX, measure

FEATURES = (*RULE_METRICS, "fov_fraction", "field_coverage", "redness")
# Indicators on a linear scale (bounded, or already logarithmic); the rest are logged.
LINEAR = frozenset({"mean", "std", "entropy", "dynamic_range", "dark_channel", "decentering", "field_coverage",
                    "redness", "sharpness_isotropy", "illumination_balance", "dark_patch", "fov_fraction"})
DEGRADED_WEIGHT = 0.1  # 11 copies per photo: together about one real reject's weight per photo
REFRAMED_WEIGHT = 0.25
OTHER_CAMERA_WEIGHT = 0.5  # a messidor2 / mexico_dme train photo: gradable by diagnosis, not by a quality grade
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
DATA_FILE = Path(__file__).resolve().parents[1] / "edge_runtime" / MODEL_FILE


def _matrix(records: list[dict]) -> np.ndarray:
    return np.array([[np.log(max(r["metrics"][f], 0.0) + LOG_OFFSET) if f not in LINEAR else r["metrics"][f]
                      for f in FEATURES] for r in records], np.float64)


def training_set(records: list[dict]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(records, label 1 = ungradable, weight) of the train split: graded originals, their degradations and
    reframings, and the other cameras' photos (no quality labels: diagnosed by specialists, so taken as gradable
    at ``OTHER_CAMERA_WEIGHT``) with their reframings."""
    rows, labels, weights = [], [], []

    def add(record: dict, ungradable: bool, weight: float) -> None:
        rows.append(record), labels.append(ungradable), weights.append(weight)

    for r in records:
        if r["split"] != "train" or r["metrics"] is None:
            continue
        reframed = r["case"].startswith(REFRAMED_PREFIX)
        if r["quality"] is None:  # another camera's photo, diagnosed by specialists
            if r["case"] == ORIGINAL or reframed:
                add(r, False, OTHER_CAMERA_WEIGHT * (REFRAMED_WEIGHT if reframed else 1.0))
        elif r["case"] == ORIGINAL:
            add(r, r["quality"] == "reject", 1.0)
        elif r["case"] in DEGRADATIONS:
            add(r, True, DEGRADED_WEIGHT)
        elif reframed and r["quality"] != "reject":
            add(r, False, REFRAMED_WEIGHT)
    return rows, np.array(labels, int), np.array(weights)


def fit(records: list[dict], labels: np.ndarray, weights: np.ndarray, c: float) -> GradabilityModel:
    from sklearn.linear_model import LogisticRegression

    x = _matrix(records)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    model = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, labels, sample_weight=weights)
    return GradabilityModel(FEATURES, frozenset(FEATURES) - LINEAR, mean, scale, model.coef_[0],
                            float(model.intercept_[0]), OperatingPoint(), "unsaved")


def out_of_fold(records: list[dict], labels: np.ndarray, weights: np.ndarray, c: float,
                folds: int = 5, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Out-of-fold logits of the train originals (photos of one patient stay in one fold, with their copies)."""
    from sklearn.model_selection import GroupKFold

    groups = np.array([f'{r["dataset"]}:{r["image"].split("_")[0]}' for r in records])
    originals = np.array([r["case"] == ORIGINAL and r["quality"] is not None for r in records])
    logits = np.full(len(records), np.nan)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(np.zeros(len(records)), labels, groups):
        model = fit([records[i] for i in train], labels[train], weights[train], c)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eyepacs_full"))
    parser.add_argument("--other", type=Path, nargs="*", default=[],
                        help="other cameras' folders whose train photos (120 each) join as gradable: tried, off "
                        "(the model then learns the camera: see docs/studies/2026-12-07_quality_gate_any_camera.md)")
    parser.add_argument("--target", type=float, default=0.95, help="share of the graders' rejects the gate catches")
    parser.add_argument("--cache", type=Path, nargs="+", help="measurements (JSON lists of studies.quality_thresholds."
                        "measure records); measured and stored in the first when absent")
    parser.add_argument("--write", action="store_true", help=f"write the model to {DATA_FILE}")
    args = parser.parse_args()
    if args.cache and all(p.is_file() for p in args.cache):
        records = [r for p in args.cache for r in json.loads(p.read_text())]
    else:
        records = measure([args.data], ("train", "val", "calib"), labelled_only=("train",))
        records += [r for other in args.other for r in measure([other], ("train",), limit=120, degraded=False)]
        if args.cache:
            args.cache[0].write_text(json.dumps(records))
    rows, labels, weights = training_set(records)
    scores = {}
    for c in C_GRID:
        photos, logits = out_of_fold(rows, labels, weights, c)
        scores[c] = _auc(np.array([p["quality"] == "reject" for p in photos]), logits)
    c = max(scores, key=scores.get)
    photos, logits = out_of_fold(rows, labels, weights, c)
    model = fit(rows, labels, weights, c)
    held = [r for r in records if r["split"] in ("val", "calib") and r["case"] == ORIGINAL and r["quality"]
            and r["metrics"] is not None]
    photos += held
    logits = np.concatenate([logits, [model.logit(r["metrics"]) for r in held]])
    point, detail = choose_point(photos, logits, args.target)
    data = {**GradabilityModel(model.features, model.log_features, model.mean, model.scale, model.coef,
                               model.intercept, point, "unsaved").to_dict(),
            "written_by": "python -m studies.quality_model",
            "chosen_on": {"C": c, "cv_auc_by_C": {str(k): round(v, 4) for k, v in scores.items()},
                          "n_train_rows": len(rows), "photos": len(photos), **detail}}
    print(json.dumps(data["chosen_on"], indent=2))
    print(json.dumps(data["operating_point"], indent=2))
    if args.write:
        DATA_FILE.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
