"""The referral point chosen on the val photos of several camera folders with each folder weighted equally.

Pooled, the largest folder chooses the threshold and a small camera's photos barely move it; a point chosen for
sensitivity 0.90 on two cameras then missed 0.83, 0.67 and 0.89 on three unseen ones. Weighting each photo by
1 / (its folder's referable, or non-referable, photos) makes the weighted sensitivity the mean of the folders'
sensitivities (and likewise specificity), so every camera counts the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.calibration import choose_operating_point, uncertain_band
from edge_runtime.contract import OperatingPoint
from edge_runtime.decision import softmax
from edge_runtime.metrics import is_referable, referable_probability, sensitivity_specificity

REFERRAL_WEIGHTINGS = ("pooled", "per_folder")


def folder_weights(positive: np.ndarray, folders: np.ndarray) -> np.ndarray:
    """Per photo 1 / (photos of its folder on its side of the label): every folder's referable photos sum to 1,
    and so do its non-referable ones."""
    weights = np.zeros(len(positive))
    for folder in np.unique(folders):
        for side in (True, False):
            rows = (folders == folder) & (positive == side)
            if rows.any():
                weights[rows] = 1.0 / rows.sum()
    return weights


def pick_weighted_threshold(positive: np.ndarray, score: np.ndarray, weights: np.ndarray, rule: str,
                            target: float | None) -> float:
    """``edge_runtime.calibration.pick_threshold`` on weighted photos: the same rules and the same halfway step
    to the next lower score, with sensitivity and specificity the weighted shares."""
    from sklearn.metrics import roc_curve

    fpr, tpr, candidates = roc_curve(positive, score, sample_weight=weights, drop_intermediate=False)
    fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]  # row 0 is the +inf threshold: refer no one
    if rule == "sensitivity":
        index = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # weighted sums round; 1e-12 keeps an exact hit
    elif rule == "specificity":
        reached = np.flatnonzero(1 - fpr >= target - 1e-12)
        if not len(reached):
            raise ValueError(f"no threshold reaches the folder-weighted specificity {target} on these photos")
        index = int(reached[-1])
    else:
        j = tpr - fpr
        index = int(np.flatnonzero(j == j.max())[-1])
    chosen = float(candidates[index])
    below = score[score < chosen]
    threshold = (chosen + float(below.max())) / 2 if len(below) else chosen
    return float(np.clip(threshold, 1e-6, 1 - 1e-6))


def folder_report(y: np.ndarray, score: np.ndarray, threshold: float, folders: np.ndarray) -> dict:
    """Each folder's val sensitivity and specificity at ``threshold`` (95% Wilson intervals, n), and their means."""
    per_folder = {}
    for folder in np.unique(folders):
        rows = folders == folder
        per_folder[Path(str(folder)).name] = sensitivity_specificity(y[rows], score[rows] >= threshold)
    means = {}
    for figure in ("sensitivity", "specificity"):
        values = [f[figure] for f in per_folder.values() if f[f"n_{'positive' if figure == 'sensitivity' else 'negative'}"]]
        means[f"folder_mean_{figure}"] = float(np.mean(values)) if values else float("nan")
    return {"folders": per_folder, **means}


def choose_folder_weighted_point(y, logits, folders, rule: str = "sensitivity", target: float | None = 0.90,
                                 band_fraction: float = 0.05, fingerprint: str | None = None
                                 ) -> tuple[OperatingPoint, dict]:
    """The referral point whose folder-mean val sensitivity (or specificity, or Youden's J) meets the rule, and a
    record of the photos that chose it.

    The temperature is fitted on all the photos pooled (it calibrates the model, not a camera); the threshold is
    chosen on the folder-weighted ROC. The returned point's ``sensitivity``/``specificity`` are those of the pooled
    val photos at that threshold (what the field always means); the record holds each folder's, with n and 95%
    Wilson intervals, and their means (the figures the rule was applied to)."""
    y, logits, folders = np.asarray(y), np.asarray(logits, float), np.asarray(folders).astype(str)
    pooled = choose_operating_point(y, logits, rule=rule, target=target, band_fraction=band_fraction,
                                    fingerprint=fingerprint)  # validates the inputs and fits T once
    temperature = pooled.temperature
    positive = is_referable(y)
    score = referable_probability(softmax(logits, temperature))
    threshold = pick_weighted_threshold(positive, score, folder_weights(positive, folders), rule, target)
    val = sensitivity_specificity(y, score >= threshold)
    point = OperatingPoint(
        rule=rule, target=pooled.target, threshold=threshold, temperature=temperature,
        uncertain_band=uncertain_band(score, threshold, band_fraction),
        sensitivity=val["sensitivity"], sensitivity_ci=val["sensitivity_ci"],
        specificity=val["specificity"], specificity_ci=val["specificity_ci"],
        n_positive=val["n_positive"], n_negative=val["n_negative"], val_fingerprint=fingerprint,
        calibration=pooled.calibration)
    record = {"weighting": "per_folder", "val_fingerprint": fingerprint, "n": len(y),
              **folder_report(y, score, threshold, folders)}
    return point, record

