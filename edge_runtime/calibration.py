"""Calibrated probabilities and the referral operating point, both chosen on labelled val photos.

- ``fit_temperature``: temperature scaling (Guo et al., 2017), one scalar T minimising the val negative
  log-likelihood of softmax(logits / T); it changes confidence, never the predicted grade.
- ``expected_calibration_error`` and ``brier_score``: how far stated probabilities are from observed frequencies,
  for the 5 grades and for the referable probability P(grade >= 2).
- ``choose_operating_point``: the referral threshold on the calibrated P(grade >= 2) that reaches a target
  sensitivity (or specificity, or maximises Youden's J) on val, with 95% Wilson intervals, n, and the
  "uncertain" band around it.
- ``choose_binary_operating_point``: the same for a binary head (DME): temperature-scaled sigmoid of its logit,
  threshold by the same rules, Wilson intervals and n.

numpy at import; scipy and scikit-learn are imported inside the functions (the ``edge`` install has neither and
only reads the resulting ``OperatingPoint`` from the manifest).
"""
from __future__ import annotations

import math

import numpy as np

from .contract import NUM_GRADES, OperatingPoint
from .decision import decide_batch, sigmoid, softmax
from .metrics import (
    binary_sensitivity_specificity,
    is_referable,
    referable_probability,
    sensitivity_specificity,
)

TEMPERATURE_BOUNDS = (0.05, 20.0)  # beyond these a model is broken, not over- or under-confident
ECE_BINS = 15  # Guo et al. (2017); equal-width bins on [0, 1]


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, float), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] != NUM_GRADES:
        raise ValueError(f"logits must be (n, {NUM_GRADES}), got {logits.shape}")
    if labels.shape != (len(logits),):
        raise ValueError(f"labels must be one grade per logits row ({len(logits)}), got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no photos: calibration and the operating point need labelled val photos")
    if not np.isfinite(logits).all():
        raise ValueError(f"logits contain {int((~np.isfinite(logits)).sum())} non-finite values; check the model")
    labels = labels.astype(int)
    if labels.min() < 0 or labels.max() >= NUM_GRADES:
        raise ValueError(f"labels must be ICDR grades 0..{NUM_GRADES - 1}, got {sorted(set(labels.tolist()))}")
    return logits, labels


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    from scipy.special import log_softmax

    logits, labels = _check(logits, labels)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def _minimise_over_temperature(nll) -> float:
    """The T in TEMPERATURE_BOUNDS minimising ``nll(T)``, searched over log T (scipy, bounded)."""
    from scipy.optimize import minimize_scalar

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(math.exp(log_t)), bounds=(low, high), method="bounded",
                             options={"xatol": 1e-6})
    if not result.success:
        raise RuntimeError(f"temperature fit did not converge: {result.message}")
    return float(math.exp(result.x))


def fit_temperature(logits, labels) -> float:
    """Temperature T minimising the val NLL of softmax(logits / T)."""
    logits, labels = _check(logits, labels)
    return _minimise_over_temperature(lambda t: negative_log_likelihood(logits, labels, t))


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: the photo-weighted mean |accuracy - confidence| over equal-width bins.

    Multiclass (top-label): ``confidence`` = max probability, ``correct`` = predicted grade is right.
    Referable: ``confidence`` = P(grade >= 2), ``correct`` = the photo is referable (reliability of a binary
    probability)."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    if confidence.shape != correct.shape or confidence.ndim != 1 or len(confidence) == 0:
        raise ValueError(f"need two 1-D arrays of one non-zero length, got {confidence.shape} and {correct.shape}")
    # Bin i holds (edge_i, edge_i+1]; confidence 0 goes to the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / counts.sum())


def brier_score(probs, labels) -> float:
    """Multiclass Brier score: mean over photos of sum_k (p_k - [label == k])^2 (0 is perfect, 2 the worst)."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def referable_brier_score(probs, labels) -> float:
    """Brier score of P(grade >= 2) against referable/not (scikit-learn)."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(is_referable(labels), np.clip(referable_probability(probs), 0.0, 1.0)))


def calibration_report(logits, labels, temperature: float) -> dict[str, float]:
    """ECE, Brier score and NLL before (T = 1) and after temperature scaling, multiclass and referable."""
    logits, labels = _check(logits, labels)
    report: dict[str, float] = {"temperature": float(temperature), "n": float(len(labels))}
    for when, t in (("before", 1.0), ("after", float(temperature))):
        probs = softmax(logits, t)
        report[f"ece_{when}"] = expected_calibration_error(probs.max(1), probs.argmax(1) == labels)
        report[f"brier_{when}"] = brier_score(probs, labels)
        report[f"nll_{when}"] = negative_log_likelihood(logits, labels, t)
        report[f"referable_ece_{when}"] = expected_calibration_error(referable_probability(probs), is_referable(labels))
        report[f"referable_brier_{when}"] = referable_brier_score(probs, labels)
    return report


def pick_threshold(positive: np.ndarray, score: np.ndarray, rule: str, target: float | None) -> float:
    """The threshold t (referral: score >= t) the rule picks on these photos, placed halfway to the next lower
    score so that photos scoring just below the chosen one (as new photos will) are not decided by a hair."""
    from sklearn.metrics import roc_curve

    fpr, tpr, candidates = roc_curve(positive, score, drop_intermediate=False)
    fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]  # row 0 is the +inf threshold: refer no one
    specificity = 1 - fpr
    if rule == "sensitivity":
        # tpr rises as the threshold falls: the first (highest) threshold reaching the target keeps the most
        # specificity.
        reached = np.flatnonzero(tpr >= target)
        index = int(reached[0])
    elif rule == "specificity":
        reached = np.flatnonzero(specificity >= target)
        if not len(reached):
            raise ValueError(f"no threshold reaches specificity {target} on these photos")
        index = int(reached[-1])  # the lowest threshold that still reaches it: the most sensitivity
    else:  # youden: max J = sensitivity + specificity - 1; ties go to the higher sensitivity
        j = tpr - fpr
        index = int(np.flatnonzero(j == j.max())[-1])
    chosen = float(candidates[index])
    below = score[score < chosen]
    threshold = (chosen + float(below.max())) / 2 if len(below) else chosen
    return float(np.clip(threshold, 1e-6, 1 - 1e-6))  # the manifest keeps thresholds strictly inside (0, 1)


def uncertain_band(score: np.ndarray, threshold: float, band_fraction: float) -> tuple[float, float] | None:
    """[low, high) symmetric around the threshold, holding the ``band_fraction`` of photos nearest to it.

    The half-width sits halfway between the k-th and the (k+1)-th nearest distance (k = ceil(fraction * n)),
    so exactly k val photos fall inside when distances are distinct."""
    if band_fraction <= 0:
        return None
    if band_fraction >= 1:
        raise ValueError(f"band_fraction must be in [0, 1), got {band_fraction}")
    distance = np.sort(np.abs(np.asarray(score, float) - threshold))
    k = math.ceil(band_fraction * len(distance))
    half_width = (distance[k - 1] + distance[k]) / 2 if k < len(distance) else distance[-1] * (1 + 1e-9) + 1e-12
    return float(max(0.0, threshold - half_width)), float(min(1.0, threshold + half_width))


def _rule_target(rule: str, target: float | None) -> float | None:
    """The target a threshold rule aims for, validated (Youden's J has none)."""
    if rule not in ("sensitivity", "specificity", "youden"):
        raise ValueError(f"rule must be sensitivity | specificity | youden, got {rule!r}")
    if rule == "youden":
        return None
    if target is None or not 0.0 < target < 1.0:
        raise ValueError(f"rule {rule!r} needs a target in (0, 1), got {target!r}")
    return target


def choose_operating_point(y_true, logits, rule: str = "sensitivity", target: float | None = 0.90,
                           temperature: float | None = None, band_fraction: float = 0.05,
                           fingerprint: str | None = None) -> OperatingPoint:
    """The referral operating point chosen on labelled val photos.

    Args:
        y_true: reference ICDR grades of the val photos.
        logits: the model's (n, 5) logits on them (of the artifact itself, to choose per artifact).
        rule: ``sensitivity`` (the highest threshold whose val sensitivity >= target), ``specificity`` (the lowest
            whose val specificity >= target) or ``youden`` (max sensitivity + specificity - 1; target unused).
        target: the sensitivity or specificity to reach on val (default 0.90, the floor most programmes require).
        temperature: softmax temperature; None fits it on these photos (``fit_temperature``).
        band_fraction: share of val photos nearest the threshold that the "uncertain" band holds (0: no band).
        fingerprint: of the val photos, recorded so the point can be traced to its data.

    Returns:
        An ``OperatingPoint`` with the threshold on the calibrated P(grade >= 2), val sensitivity and specificity
        with 95% Wilson intervals, n_positive and n_negative, and ECE/Brier before and after calibration.
    """
    logits, labels = _check(logits, y_true)
    target = _rule_target(rule, target)
    positive = is_referable(labels)
    if positive.all() or not positive.any():
        raise ValueError(f"the val photos need both referable (grade >= 2) and non-referable photos to choose an "
                         f"operating point; got {int(positive.sum())} referable of {len(positive)}")
    if temperature is None:
        temperature = fit_temperature(logits, labels)
    score = referable_probability(softmax(logits, temperature))
    threshold = pick_threshold(positive, score, rule, target)
    val = sensitivity_specificity(labels, score >= threshold)
    return OperatingPoint(
        rule=rule, target=target, threshold=threshold, temperature=float(temperature),
        uncertain_band=uncertain_band(score, threshold, band_fraction),
        sensitivity=val["sensitivity"], sensitivity_ci=val["sensitivity_ci"],
        specificity=val["specificity"], specificity_ci=val["specificity_ci"],
        n_positive=val["n_positive"], n_negative=val["n_negative"], val_fingerprint=fingerprint,
        calibration=calibration_report(logits, labels, temperature),
    )


def referral_decisions(logits, operating_point: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated P(grade >= 2) and the 0/1 referral decision (probability >= threshold) for a batch."""
    decisions = decide_batch(logits, operating_point)
    return decisions.referable_probability, decisions.referable


def _check_binary(positive, logits) -> tuple[np.ndarray, np.ndarray]:
    positive, logits = np.asarray(positive), np.asarray(logits, float).reshape(-1)
    if positive.shape != logits.shape:
        raise ValueError(f"need one 0/1 label per logit, got {positive.shape} labels and {logits.shape} logits")
    if not np.isin(positive, (0, 1)).all():
        raise ValueError(f"binary labels must be 0/1 (drop missing labels first), got {sorted(set(positive.tolist()))}")
    if not np.isfinite(logits).all():
        raise ValueError(f"logits contain {int((~np.isfinite(logits)).sum())} non-finite values; check the model")
    return positive.astype(bool), logits


def binary_negative_log_likelihood(positive, logits, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of 0/1 labels under sigmoid(logits / temperature)."""
    from scipy.special import log_expit

    positive, logits = _check_binary(positive, logits)
    z = logits / temperature
    return float(-np.where(positive, log_expit(z), log_expit(-z)).mean())


def fit_binary_temperature(positive, logits) -> float:
    """Temperature T minimising the val NLL of sigmoid(logit / T) (a binary head's ``fit_temperature``)."""
    positive, logits = _check_binary(positive, logits)
    return _minimise_over_temperature(lambda t: binary_negative_log_likelihood(positive, logits, t))


def choose_binary_operating_point(positive, logits, rule: str = "sensitivity", target: float | None = 0.90,
                                  temperature: float | None = None,
                                  fingerprint: str | None = None) -> OperatingPoint:
    """The operating point of a binary head (DME) chosen on labelled val photos, as ``choose_operating_point``
    chooses the referral point: threshold on sigmoid(logit / T) by ``rule`` (sensitivity | specificity | youden),
    with val sensitivity/specificity, 95% Wilson intervals and n. No uncertainty band: the band belongs to the
    grade (an uncertain grade is already referred or read twice).

    Args:
        positive: 0/1 reference labels of the val photos that have one (missing labels removed by the caller).
        logits: the head's logit per photo.
        temperature: None fits it on these photos (``fit_binary_temperature``).
    """
    positive, logits = _check_binary(positive, logits)
    target = _rule_target(rule, target)
    if positive.all() or not positive.any():
        raise ValueError(f"the val photos need both positive and negative labels to choose an operating point; "
                         f"got {int(positive.sum())} positive of {len(positive)}")
    if temperature is None:
        temperature = fit_binary_temperature(positive, logits)
    score = sigmoid(logits, temperature)
    threshold = pick_threshold(positive, score, rule, target)
    val = binary_sensitivity_specificity(positive, score >= threshold)
    from sklearn.metrics import brier_score_loss

    report: dict[str, float] = {"temperature": float(temperature), "n": float(len(positive))}
    for when, t in (("before", 1.0), ("after", float(temperature))):
        probs = sigmoid(logits, t)
        report[f"ece_{when}"] = expected_calibration_error(probs, positive)
        report[f"brier_{when}"] = float(brier_score_loss(positive, probs))
        report[f"nll_{when}"] = binary_negative_log_likelihood(positive, logits, t)
    return OperatingPoint(
        rule=rule, target=target, threshold=threshold, temperature=float(temperature),
        sensitivity=val["sensitivity"], sensitivity_ci=val["sensitivity_ci"],
        specificity=val["specificity"], specificity_ci=val["specificity_ci"],
        n_positive=val["n_positive"], n_negative=val["n_negative"], val_fingerprint=fingerprint, calibration=report,
    )
