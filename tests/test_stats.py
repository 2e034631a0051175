"""Screening statistics, intervals, temperature scaling and the operating-point picker, against reference values."""
import math

import numpy as np
import pytest
from scipy import stats

from edge_runtime.calibration import (
    brier_score,
    calibration_report,
    choose_operating_point,
    expected_calibration_error,
    fit_temperature,
    referable_brier_score,
    referral_decisions,
    softmax,
)
from edge_runtime.contract import OperatingPoint
from edge_runtime.errors import ManifestError
from edge_runtime.metrics import (
    clopper_pearson_interval,
    clopper_pearson_lower,
    confusion,
    paired_bootstrap_auc_ratio,
    paired_bootstrap_difference,
    photos_needed_for_lower_bound,
    quadratic_weighted_kappa,
    roc_auc,
    screening_metrics,
    wilson_interval,
)

# ---------------------------------------------------------------- intervals


def test_intervals_match_newcombe_1998_and_scipy():
    # Newcombe (1998), Stat Med 17:857, 81/263: Wilson 0.2553-0.3662, exact (Clopper-Pearson) 0.2527-0.3676.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert clopper_pearson_interval(81, 263) == pytest.approx((0.2527, 0.3676), abs=5e-5)
    for k, n in [(0, 10), (1, 10), (9, 10), (10, 10), (45, 50), (200, 214), (399, 400)]:
        reference = stats.binomtest(k, n)  # an implementation independent of statsmodels
        assert wilson_interval(k, n) == pytest.approx(tuple(reference.proportion_ci(method="wilson")), abs=1e-9)
        assert clopper_pearson_interval(k, n) == pytest.approx(tuple(reference.proportion_ci(method="exact")),
                                                               abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_one_sided_clopper_pearson_lower_bound():
    for k, n in [(395, 400), (200, 214), (48, 50), (0, 30)]:
        one_sided = stats.binomtest(k, n, alternative="greater").proportion_ci(0.95, method="exact").low
        assert clopper_pearson_lower(k, n) == pytest.approx(one_sided, abs=1e-9)
    assert clopper_pearson_lower(395, 400) == pytest.approx(stats.beta.ppf(0.05, 395, 6), abs=1e-12)
    # All n agreeing: the bound is alpha ** (1 / n).
    assert clopper_pearson_lower(400, 400) == pytest.approx(0.05 ** (1 / 400), abs=1e-12)  # 0.99254


def test_photos_needed_for_a_lower_bound_is_exact():
    assert photos_needed_for_lower_bound(0.98) == 149  # ceil(ln 0.05 / ln 0.98) = ceil(148.28)
    assert clopper_pearson_lower(148, 148) < 0.98 <= clopper_pearson_lower(149, 149)
    assert photos_needed_for_lower_bound(0.99) == 299
    assert photos_needed_for_lower_bound(0.98, confidence=0.975) == 183  # ceil(ln 0.025 / ln 0.98)
    with pytest.raises(ValueError, match="threshold"):
        photos_needed_for_lower_bound(1.0)


def test_paired_bootstrap_matches_the_normal_theory_interval_at_large_n():
    # 2,000 paired 0/1 decisions, 60 lost by the test model and 20 gained: difference -0.02.
    reference = np.ones(2000)
    test = reference.copy()
    test[:60] = 0
    reference[60:80] = 0
    boot = paired_bootstrap_difference(test, reference, n_resamples=4000, seed=1)
    d = test - reference
    se = d.std() / math.sqrt(len(d))  # Wald interval of a paired mean difference
    assert boot.estimate == pytest.approx(-0.02, abs=1e-12)
    assert boot.low == pytest.approx(-0.02 - 1.959964 * se, abs=0.0015)
    assert boot.high == pytest.approx(-0.02 + 1.959964 * se, abs=0.0015)
    assert boot.lower_bound == pytest.approx(-0.02 - 1.644854 * se, abs=0.0015)
    assert boot.low < boot.lower_bound < boot.estimate < boot.high
    assert (boot.n, boot.n_resamples, boot.method) == (2000, 4000, "BCa")
    assert paired_bootstrap_difference(test, reference, n_resamples=4000, seed=1) == boot  # seeded
    assert paired_bootstrap_difference(test, reference, n_resamples=4000, seed=2) != boot


def test_paired_bootstrap_of_identical_decisions_is_exactly_zero():
    same = (np.arange(50) % 3 == 0).astype(float)
    boot = paired_bootstrap_difference(same, same)
    assert (boot.estimate, boot.low, boot.high, boot.lower_bound) == (0.0, 0.0, 0.0, 0.0)
    assert boot.method == "percentile"  # BCa is undefined on a degenerate bootstrap distribution
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap_difference(same, same, n_resamples=100)
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap_difference(same, same[:-1])


def test_paired_bootstrap_auc_ratio():
    rng = np.random.default_rng(5)
    labels = rng.random(600) < 0.3
    reference = rng.normal(size=600) + 1.5 * labels
    test = reference + rng.normal(scale=0.5, size=600)  # a noisier copy ranks worse
    boot = paired_bootstrap_auc_ratio(labels, test, reference, seed=3)
    assert boot.estimate == pytest.approx(roc_auc(labels, test) / roc_auc(labels, reference), abs=1e-12)
    assert boot.low < boot.lower_bound < boot.estimate < boot.high and boot.estimate < 1.0
    assert (boot.n, boot.method) == (600, "percentile")
    assert paired_bootstrap_auc_ratio(labels, test, reference, seed=3) == boot
    same = paired_bootstrap_auc_ratio(labels, reference, reference)
    assert (same.estimate, same.low, same.high) == (1.0, 1.0, 1.0)  # paired: every resample's ratio is exactly 1


# ---------------------------------------------------------------- screening metrics


def test_kappa_auc_confusion_known_values():
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0
    assert quadratic_weighted_kappa([0, 0, 4, 4], [4, 4, 0, 0]) == pytest.approx(-1.0)
    assert quadratic_weighted_kappa([2, 2], [2, 2]) == 1.0  # one grade, perfect agreement: not sklearn's NaN
    # Weighted kappa by hand: observed [[1,1],[0,2]] over grades 0/1 of 5, weights (i-j)^2/16.
    assert quadratic_weighted_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # ties count half
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert confusion([0, 4, 4], [0, 3, 4]).tolist() == [[1, 0, 0, 0, 0], [0] * 5, [0] * 5, [0] * 5, [0, 0, 0, 1, 1]]


def test_qwk_interval_is_a_seeded_paired_bootstrap():
    from training.metrics import qwk_interval

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    noisy = np.clip(y + rng.integers(-1, 2, 400), 0, 4)  # off by at most one grade: high but imperfect kappa
    low, high = qwk_interval(y, noisy)
    assert low < quadratic_weighted_kappa(y, noisy) < high and high - low < 0.1
    assert qwk_interval(y[:40], noisy[:40])[1] - qwk_interval(y[:40], noisy[:40])[0] > high - low  # fewer photos
    assert qwk_interval(y, noisy) == (low, high)  # seeded
    assert qwk_interval(y, y) == (1.0, 1.0)
    assert all(math.isnan(v) for v in qwk_interval([2], [2]))


def test_screening_metrics_report_n_and_wilson_intervals():
    probs = [[0.9, 0.1, 0, 0, 0], [0.1, 0.1, 0.8, 0, 0], [0.6, 0.1, 0.1, 0.1, 0.1]]
    m = screening_metrics([0, 2, 3], probs)
    assert (m["referable_sensitivity"], m["referable_specificity"]) == (0.5, 1.0)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (3, 2, 1)
    assert m["referable_sensitivity_ci"] == wilson_interval(1, 2)
    assert m["referable_specificity_ci"] == wilson_interval(1, 1)
    assert screening_metrics([0, 2, 3], probs, referable_threshold=0.25)["referable_sensitivity"] == 1.0


# ---------------------------------------------------------------- calibration


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_temperature = 2.5
    logits = rng.normal(scale=4.0, size=(20000, 5))
    p = softmax(logits, true_temperature)
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # one draw from softmax(z / T0) per row
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    report = calibration_report(logits, labels, fitted)
    # Logits 2.5x too sharp are overconfident; scaling fixes it, and never changes the grade.
    assert report["ece_after"] < 0.02 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"] and report["brier_after"] < report["brier_before"]
    assert report["referable_ece_after"] < report["referable_ece_before"]
    assert (softmax(logits, fitted).argmax(1) == logits.argmax(1)).all()


def test_ece_and_brier_known_values():
    # Bins of width 1/15: 0.9 -> bin 13 (accuracy 0.5, gap 0.4), 0.6 -> bin 8 (accuracy 1, gap 0.4).
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
    probs = np.array([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0, 0.8, 0, 0]])
    assert brier_score(probs, [0, 0, 2]) == pytest.approx((0 + 0.5 + 0.08) / 3)
    assert referable_brier_score(probs, [0, 0, 2]) == pytest.approx((0 + 0 + 0.04) / 3)


# ---------------------------------------------------------------- operating point


def binormal(n: int, seed: int = 0, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Referable photos score N(shift, 1), the others N(0, 1): a known ROC. Logits [0, -30, s, -30, -30] give
    P(grade >= 2) = sigmoid(s) at temperature 1."""
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.normal(shift, 1, n), rng.normal(0, 1, n)])
    labels = np.repeat([2, 0], n)
    logits = np.full((2 * n, 5), -30.0)
    logits[:, 0], logits[:, 2] = 0.0, s
    return logits, labels, s


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_sensitivity_rule_on_a_known_roc():
    logits, labels, s = binormal(20000)
    op = choose_operating_point(labels, logits, rule="sensitivity", target=0.90, temperature=1.0, fingerprint="abc")
    # Population: cut at s = 1 - z(0.90) = -0.2816, P = sigmoid(-0.2816) = 0.4301, specificity Phi(-0.2816) = 0.389.
    assert op.threshold == pytest.approx(sigmoid(1 - stats.norm.ppf(0.90)), abs=0.01)
    assert op.specificity == pytest.approx(stats.norm.cdf(1 - stats.norm.ppf(0.90)), abs=0.015)
    # On val: at least the target, and the highest such threshold (one positive fewer drops below it).
    assert 0.90 <= op.sensitivity < 0.90 + 1 / 20000
    score, referred = referral_decisions(logits, op)
    positive_scores = np.sort(score[labels == 2])
    lowest_referred = positive_scores[positive_scores >= op.threshold][0]
    assert (positive_scores > lowest_referred).mean() < 0.90
    assert (op.n_positive, op.n_negative, op.rule, op.target, op.val_fingerprint) == (20000, 20000, "sensitivity",
                                                                                     0.90, "abc")
    tp = int(referred[labels == 2].sum())
    assert op.sensitivity == tp / 20000 and op.sensitivity_ci == wilson_interval(tp, 20000)
    assert op.specificity_ci == wilson_interval(int((~referred[labels == 0]).sum()), 20000)
    assert op.temperature == 1.0 and set(op.calibration) >= {"ece_before", "ece_after", "brier_before", "brier_after"}


def test_specificity_and_youden_rules_on_a_known_roc():
    logits, labels, _ = binormal(20000, seed=1)
    op = choose_operating_point(labels, logits, rule="specificity", target=0.95, temperature=1.0)
    assert 0.95 <= op.specificity < 0.95 + 1 / 20000
    assert op.threshold == pytest.approx(sigmoid(stats.norm.ppf(0.95)), abs=0.01)  # cut at s = 1.645
    assert op.sensitivity == pytest.approx(stats.norm.sf(stats.norm.ppf(0.95) - 1), abs=0.015)  # 0.2595
    youden = choose_operating_point(labels, logits, rule="youden", temperature=1.0)
    # Equal-variance binormal: J is maximal at s = shift / 2 = 0.5, J = 2 Phi(0.5) - 1 = 0.3829 (J is flat there,
    # so the threshold's tolerance is wide and J's is tight).
    assert youden.target is None
    assert youden.sensitivity + youden.specificity - 1 == pytest.approx(2 * stats.norm.cdf(0.5) - 1, abs=0.015)
    assert youden.threshold == pytest.approx(sigmoid(0.5), abs=0.08)


def test_operating_point_exact_on_a_small_set():
    # 10 referable photos at s = 1..10 and 10 others at s = -10..-1 (+0.5): 90% sensitivity refers s >= 2,
    # halfway to the next lower score (s = 1).
    s = np.concatenate([np.arange(1, 11), np.arange(-10, 0) + 0.5]).astype(float)
    logits = np.full((20, 5), -30.0)
    logits[:, 0], logits[:, 2] = 0.0, s
    labels = np.repeat([3, 1], 10)
    op = choose_operating_point(labels, logits, target=0.90, temperature=1.0, band_fraction=0.10)
    assert op.threshold == pytest.approx((sigmoid(2.0) + sigmoid(1.0)) / 2, rel=1e-9)
    assert (op.sensitivity, op.specificity) == (0.9, 1.0)
    # The band holds the 2 photos nearest the threshold (s = 1 and s = 2) and nothing else.
    score, _ = referral_decisions(logits, op)
    inside = (score >= op.uncertain_band[0]) & (score < op.uncertain_band[1])
    assert sorted(s[inside]) == [1.0, 2.0]


def test_uncertainty_band_holds_the_chosen_fraction():
    logits, labels, _ = binormal(1000, seed=3)
    for fraction in (0.05, 0.10, 0.20):
        op = choose_operating_point(labels, logits, temperature=1.0, band_fraction=fraction)
        score, _ = referral_decisions(logits, op)
        low, high = op.uncertain_band
        assert low < op.threshold < high
        assert high - op.threshold == pytest.approx(op.threshold - low)  # symmetric around the threshold
        assert ((score >= low) & (score < high)).sum() == math.ceil(fraction * 2000)
    assert choose_operating_point(labels, logits, temperature=1.0, band_fraction=0).uncertain_band is None


def test_operating_point_fits_the_temperature_when_not_given():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, 3000)
    logits = 3.0 * (rng.normal(size=(3000, 5)) + 1.5 * np.eye(5)[labels])  # overconfident by about 3x
    op = choose_operating_point(labels, logits)
    assert op.temperature == pytest.approx(fit_temperature(logits, labels))
    assert op.temperature > 1.5 and op.calibration["ece_after"] < op.calibration["ece_before"]


def test_operating_point_rejects_bad_input_with_a_fix():
    logits, labels, _ = binormal(50)
    with pytest.raises(ValueError, match="both referable"):
        choose_operating_point(np.zeros(100, int), logits, temperature=1.0)
    with pytest.raises(ValueError, match="rule"):
        choose_operating_point(labels, logits, rule="accuracy")
    with pytest.raises(ValueError, match="target"):
        choose_operating_point(labels, logits, target=1.5)
    with pytest.raises(ValueError, match="one grade per"):
        choose_operating_point(labels[:-1], logits)
    with pytest.raises(ManifestError, match="uncertain_band"):
        OperatingPoint(threshold=0.4, uncertain_band=(0.5, 0.6))
    with pytest.raises(ManifestError, match="threshold"):
        OperatingPoint(threshold=1.0)


def test_roc_png_marks_the_operating_point(tmp_path):
    pytest.importorskip("matplotlib")
    from training.metrics import save_roc_png

    logits, labels, _ = binormal(300)
    op = choose_operating_point(labels, logits, temperature=1.0)
    score, _ = referral_decisions(logits, op)
    path = tmp_path / "roc.png"
    save_roc_png(labels, score, op, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
