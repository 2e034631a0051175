"""Screening metrics and their confidence intervals: QWK, confusion, referable sensitivity/specificity/AUC,
Wilson and Clopper-Pearson intervals, and a seeded paired bootstrap.

numpy only at import: scikit-learn, scipy and statsmodels are imported inside the functions that use them,
because the ``edge`` install (a phone companion, a Jetson) has none of them and never computes these numbers.
Training, compression, export and the benchmarks (which do) import them from here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .contract import NUM_GRADES, REFERABLE_MIN_GRADE

CONFIDENCE = 0.95  # every interval RetinaEdge reports, unless a caller asks otherwise


def confusion(y_true, y_pred, k: int = NUM_GRADES) -> np.ndarray:
    """k x k confusion matrix, rows = reference grade, columns = predicted grade (all k grades, even unseen)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(y_true, int), np.asarray(y_pred, int), labels=np.arange(k)).astype(np.int64)


def quadratic_weighted_kappa(y_true, y_pred, k: int = NUM_GRADES) -> float:
    """Cohen's kappa with quadratic weights over the k ICDR grades; NaN on no photos.

    When reference and prediction are the same single grade, chance agreement is total and kappa is 0/0;
    agreement is perfect, so 1.0 is returned rather than scikit-learn's NaN."""
    from sklearn.metrics import cohen_kappa_score

    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if len(y_true) == 0:
        return float("nan")
    if (y_true == y_pred).all() and len(np.unique(y_true)) == 1:
        return 1.0
    return float(cohen_kappa_score(y_true, y_pred, labels=np.arange(k), weights="quadratic"))


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score

    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def referable_probability(probs: np.ndarray) -> np.ndarray:
    """P(grade >= 2) per photo from 5-grade probabilities."""
    return np.asarray(probs, float)[:, REFERABLE_MIN_GRADE:].sum(axis=1)


def is_referable(y_true) -> np.ndarray:
    """Referable DR is "more than mild": reference grade >= 2."""
    return np.asarray(y_true, int) >= REFERABLE_MIN_GRADE


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def _proportion_interval(successes: int, n: int, confidence: float, method: str) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    _check_counts(successes, n)
    if n == 0:
        return float("nan"), float("nan")
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method=method)
    return float(low), float(high)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion (statsmodels); (nan, nan) when n == 0."""
    return _proportion_interval(successes, n, confidence, "wilson")


def clopper_pearson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a proportion (statsmodels ``beta``); (nan, nan) when n == 0."""
    return _proportion_interval(successes, n, confidence, "beta")


def clopper_pearson_lower(successes: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact lower confidence bound: the lower end of the two-sided interval at 1 - 2 * (1 - confidence)
    (each tail of Clopper-Pearson is exact on its own); NaN when n == 0."""
    return clopper_pearson_interval(successes, n, 1 - 2 * (1 - confidence))[0]


def photos_needed_for_lower_bound(threshold: float, confidence: float = CONFIDENCE) -> int:
    """Fewest photos n for which even n agreements out of n give a one-sided Clopper-Pearson lower bound >= threshold.

    With all n agreeing the bound is (1 - confidence) ** (1 / n), so n = ceil(log(alpha) / log(threshold));
    the closed form is checked against the bound itself, which guards the float rounding at the edge."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) for a finite number of photos, got {threshold}")
    n = max(1, math.ceil(math.log(1 - confidence) / math.log(threshold)))
    while n > 1 and clopper_pearson_lower(n - 1, n - 1, confidence) >= threshold:
        n -= 1
    while clopper_pearson_lower(n, n, confidence) < threshold:
        n += 1
    return n


@dataclass(frozen=True)
class BootstrapInterval:
    """A bootstrap confidence interval of a statistic (here: a paired difference)."""

    estimate: float  # the statistic on the observed photos
    low: float
    high: float
    confidence: float  # of the two-sided interval [low, high]
    lower_bound: float  # one-sided lower bound at ``confidence`` (the lower end of the 1 - 2(1 - c) interval)
    n: int
    n_resamples: int
    method: str  # BCa, or percentile when the resamples are degenerate (every paired difference equal)


def _bootstrap(statistic: Callable[..., np.ndarray], samples: tuple[np.ndarray, ...], paired: bool,
               confidence: float, n_resamples: int, seed: int, method: str = "BCa") -> BootstrapInterval:
    """scipy's bootstrap (BCa by default; percentile where BCa is undefined), read at the two-sided ``confidence``
    and at the one-sided lower bound, from one seeded set of resamples."""
    import warnings

    from scipy import stats

    if n_resamples < 1000:
        raise ValueError(f"n_resamples must be >= 1000 for a stable 95% bound, got {n_resamples}")
    if any(len(sample) < 2 for sample in samples):
        raise ValueError(f"a bootstrap needs at least 2 photos per sample, got {[len(x) for x in samples]}")
    estimate = float(statistic(*samples, axis=-1))
    n = len(samples[0]) if paired else sum(len(x) for x in samples)
    one_sided = 1 - 2 * (1 - confidence)  # the lower end of this two-sided level is the one-sided bound

    def run(level: float, method: str, previous=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: handled below by the percentile fallback
            # With ``bootstrap_result`` and no new resamples scipy re-reads the same bootstrap distribution.
            return stats.bootstrap(samples, statistic, paired=paired, vectorized=True,
                                   n_resamples=0 if previous else n_resamples, confidence_level=level,
                                   method=method, bootstrap_result=previous, rng=np.random.default_rng(seed))

    result = run(confidence, method)
    bound_result = run(one_sided, method, result)
    ends = [result.confidence_interval.low, result.confidence_interval.high, bound_result.confidence_interval.low]
    if method == "BCa" and not all(np.isfinite(ends)):
        # BCa is undefined when every resample gives the same value (e.g. no decision changed): the percentile
        # interval is then exactly that value, which is the right answer.
        method = "percentile"
        result, bound_result = run(confidence, method, result), run(one_sided, method, result)
    return BootstrapInterval(estimate, float(result.confidence_interval.low), float(result.confidence_interval.high),
                             confidence, float(bound_result.confidence_interval.low), n, n_resamples, method)


def paired_bootstrap_difference(test, reference, statistic: Callable[..., np.ndarray] | None = None,
                                confidence: float = CONFIDENCE, n_resamples: int = 2000,
                                seed: int = 0) -> BootstrapInterval:
    """Bootstrap interval of statistic(test) - statistic(reference), resampling photos in pairs (scipy, BCa).

    ``test`` and ``reference`` are per-photo values of the same photos (e.g. 0/1 referral decisions of INT8 and
    FP32 on the referable photos, whose mean difference is the sensitivity difference). Seeded: the same inputs
    and seed give the same interval. ``statistic`` must accept ``axis=-1`` (default: the mean)."""
    test, reference = np.asarray(test, float), np.asarray(reference, float)
    if test.shape != reference.shape or test.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {test.shape} and {reference.shape}")
    stat = statistic or np.mean

    def difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return stat(a, axis=axis) - stat(b, axis=axis)

    return _bootstrap(difference, (test, reference), True, confidence, n_resamples, seed)


def paired_bootstrap_auc_ratio(labels, test_scores, reference_scores, confidence: float = CONFIDENCE,
                               n_resamples: int = 2000, seed: int = 0) -> BootstrapInterval:
    """Bootstrap interval of AUC(test) / AUC(reference) on the same photos (scipy, percentile).

    Referable and non-referable photos are resampled separately (each resample keeps the val set's class counts,
    so every resample has an AUC) and each drawn photo brings both models' scores (paired). AUC is the
    Mann-Whitney U of referable vs non-referable scores over n_pos * n_neg (ties count half). Percentile rather
    than BCa: BCa's jackknife costs n_pos + n_neg more AUCs of every photo, and the gate only shows this interval."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    test_scores, reference_scores = np.asarray(test_scores, float), np.asarray(reference_scores, float)
    if not labels.shape == test_scores.shape == reference_scores.shape or labels.ndim != 1:
        raise ValueError(f"labels and both models' scores must be 1-D of one length, got {labels.shape}, "
                         f"{test_scores.shape} and {reference_scores.shape}")

    def auc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        # Mann-Whitney: U = (rank sum of the referable photos) - n_pos (n_pos + 1) / 2, ties at mid-rank.
        lead = np.broadcast_shapes(pos.shape[:-1], neg.shape[:-1])  # scipy's jackknife broadcasts the samples
        pos, neg = np.broadcast_to(pos, lead + pos.shape[-1:]), np.broadcast_to(neg, lead + neg.shape[-1:])
        ranks = rankdata(np.concatenate([scores[pos], scores[neg]], axis=-1), axis=-1)
        n_pos, n_neg = pos.shape[-1], neg.shape[-1]
        return (ranks[..., :n_pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    def ratio(positive_rows: np.ndarray, negative_rows: np.ndarray, axis: int = -1) -> np.ndarray:
        pos, neg = positive_rows.astype(int), negative_rows.astype(int)  # the resampled photos, by index
        return auc(test_scores, pos, neg) / auc(reference_scores, pos, neg)

    samples = (np.flatnonzero(labels).astype(float), np.flatnonzero(~labels).astype(float))
    return _bootstrap(ratio, samples, False, confidence, n_resamples, seed, method="percentile")


def sensitivity_specificity(y_true, referred) -> dict[str, float | int | tuple[float, float]]:
    """Referable sensitivity and specificity of 0/1 referral decisions, each with its 95% Wilson interval and n."""
    return binary_sensitivity_specificity(is_referable(y_true), referred)


def binary_sensitivity_specificity(positive, referred) -> dict[str, float | int | tuple[float, float]]:
    """Sensitivity and specificity of 0/1 decisions against 0/1 reference labels (any binary finding, e.g. DME),
    each with its 95% Wilson interval and n."""
    positive, referred = np.asarray(positive, bool), np.asarray(referred, bool)
    tp, n_pos = int((referred & positive).sum()), int(positive.sum())
    tn, n_neg = int((~referred & ~positive).sum()), int((~positive).sum())
    return {
        "sensitivity": tp / n_pos if n_pos else float("nan"), "sensitivity_ci": wilson_interval(tp, n_pos),
        "specificity": tn / n_neg if n_neg else float("nan"), "specificity_ci": wilson_interval(tn, n_neg),
        "n_positive": n_pos, "n_negative": n_neg,
    }


def screening_metrics(y_true, probs, referable_threshold: float = 0.5) -> dict:
    """All metrics reported by training, distillation, export parity and benchmarks, with n and 95% intervals.

    ``probs`` are (calibrated) 5-grade probabilities; referral is P(grade >= 2) >= ``referable_threshold``."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    y_pred = probs.argmax(1)
    ref_score = referable_probability(probs)
    cm = confusion(y_true, y_pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(1)
    correct = int((y_pred == y_true).sum())
    referral = sensitivity_specificity(y_true, ref_score >= referable_threshold)
    return {
        "n": int(len(y_true)),
        "qwk": quadratic_weighted_kappa(y_true, y_pred),
        "accuracy": correct / len(y_true) if len(y_true) else float("nan"),
        "accuracy_ci": wilson_interval(correct, len(y_true)),
        "per_grade_recall": [None if np.isnan(r) else float(r) for r in recall],
        "referable_threshold": float(referable_threshold),
        "referable_sensitivity": referral["sensitivity"], "referable_sensitivity_ci": referral["sensitivity_ci"],
        "referable_specificity": referral["specificity"], "referable_specificity_ci": referral["specificity_ci"],
        "n_positive": referral["n_positive"], "n_negative": referral["n_negative"],
        "referable_auc": roc_auc(is_referable(y_true), ref_score),
        "confusion_matrix": cm.tolist(),
    }


def auc_interval(y_true, score, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of the referable AUC (scipy): referable and non-referable photos
    are resampled separately, so every resample has both classes; the AUC is the Mann-Whitney U / (n+ n-)."""
    return binary_auc_interval(is_referable(y_true), score, confidence, n_resamples, seed)


def binary_auc_interval(positive, score, confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """``auc_interval`` for any 0/1 reference labels (e.g. DME); (nan, nan) with fewer than 2 photos per class."""
    from scipy import stats

    positive, score = np.asarray(positive, bool), np.asarray(score, float)
    pos, neg = score[positive], score[~positive]
    if len(pos) < 2 or len(neg) < 2:
        return float("nan"), float("nan")

    def auc(p: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return stats.mannwhitneyu(p, n, axis=axis).statistic / (p.shape[axis] * n.shape[axis])

    result = stats.bootstrap((pos, neg), auc, vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def qwk_interval(y_true, y_pred, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the QWK (scipy), resampling photos with their (reference, predicted) pair;
    (nan, nan) with fewer than 2 photos."""
    from scipy import stats

    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if len(y_true) < 2:
        return float("nan"), float("nan")
    result = stats.bootstrap((y_true, y_pred), quadratic_weighted_kappa, paired=True, vectorized=False,
                             n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def tango_interval(gained: int, lost: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's (1998) score interval of a paired difference of proportions, p_test - p_reference.

    ``gained``: pairs positive under the test only (b), ``lost``: positive under the reference only (c), ``n``: all
    pairs; the difference is (b - c) / n. Each limit is the root in delta of the score statistic
    (b - c - n delta) / sqrt(n (2 p21(delta) + delta (1 - delta))) = -+z, with p21(delta) the constrained maximum
    likelihood estimate of the reference-only cell (scipy brentq). Unlike a bootstrap it holds with 0-3 discordant
    pairs: with none it is a proper interval around 0 whose width shrinks with n. Statistics in Medicine
    17:891-908 (1998); the closed form of Yang, Sun and Hardin (2013) gives the same limits."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if n <= 0 or gained < 0 or lost < 0 or gained + lost > n:
        raise ValueError(f"need 0 <= gained + lost <= n and n > 0, got gained={gained}, lost={lost}, n={n}")
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    b, c = float(gained), float(lost)

    def score(delta: float) -> float:
        slope = -b - c + (2 * n - b + c) * delta  # the quadratic 2n p^2 + slope p - c delta (1 - delta) = 0
        p21 = (math.sqrt(max(slope ** 2 + 8 * n * c * delta * (1 - delta), 0.0)) - slope) / (4 * n)
        numerator, variance = b - c - n * delta, n * (2 * p21 + delta * (1 - delta))
        if numerator == 0:
            return 0.0
        return numerator / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, numerator)

    estimate = (b - c) / n
    eps = 1e-12
    low = -1.0 if estimate <= -1 else brentq(lambda d: score(d) - z, -1 + eps, estimate)
    high = 1.0 if estimate >= 1 else brentq(lambda d: score(d) + z, estimate, 1 - eps)
    return float(low), float(high)


def tango_lower(gained: int, lost: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided lower bound of p_test - p_reference: the lower end of Tango's two-sided 1 - 2 (1 - confidence)
    interval (the score statistic is symmetric in its two tails)."""
    return tango_interval(gained, lost, n, 1 - 2 * (1 - confidence))[0]
