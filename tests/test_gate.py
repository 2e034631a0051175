"""The fidelity gate's verdicts on constructed FP32/INT8 outputs with known differences.

The first part judges with the ``strict`` profile (the single-draw agreement gate); tests/test_noise_floor_gate.py
judges the default design (noise floor, Tango non-inferiority, minimum evidence) and its controls."""
import dataclasses

import numpy as np
import pytest
from rich.console import Console

from compression.gate import GateThresholds, criteria_table
from edge_runtime.contract import ArtifactManifest, GateResult, OperatingPoint
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import clopper_pearson_lower, photos_needed_for_lower_bound
from training.data.layouts import MISSING

AT_HALF = OperatingPoint(threshold=0.5)
STRICT = GateThresholds.profile("strict")


def judge(*args, **kwargs):
    """The strict profile unless a test passes its own thresholds."""
    from compression.gate import judge as gate_judge

    if len(args) < 7 and "thresholds" not in kwargs:
        kwargs["thresholds"] = STRICT
    return gate_judge(*args, **kwargs)


def outputs(n: int, n_positive: int, seed: int = 0):
    """FP32 logits whose P(grade >= 2) = sigmoid(s) (|s| >= 0.5, so no photo sits on the 0.5 threshold), CAMs,
    grades, and a near-copy (the "INT8" outputs) that takes no referral decision differently."""
    rng = np.random.default_rng(seed)
    grades = np.concatenate([rng.integers(2, 5, n_positive), rng.integers(0, 2, n - n_positive)])
    # Referable photos mostly score high, the others mostly low, 10% each on the wrong side: AUC about 0.9.
    side = np.where(grades >= 2, 1.0, -1.0) * np.where(rng.random(n) < 0.1, -1.0, 1.0)
    rows = np.arange(n)
    logits = np.full((n, 5), -30.0)
    logits[rows, np.where(grades < 2, grades, 0)] = 0.0  # all non-referable mass in one column
    logits = with_scores(logits, side * (0.5 + rng.exponential(1.5, n)))
    cam = rng.normal(size=(n, 5, 4, 4)) + logits[:, :, None, None]
    near = logits + rng.normal(scale=1e-3, size=logits.shape)
    return logits, cam, near, cam + rng.normal(scale=1e-3, size=cam.shape), grades


def scores(logits):
    """The referable column of each row and its logit s (P(grade >= 2) = sigmoid(s))."""
    column = logits[:, 2:].argmax(1) + 2
    return column, logits[np.arange(len(logits)), column]


def with_scores(logits, s):
    out = logits.copy()
    out[:, 2:] = -30.0
    column = np.where(logits[:, 2:].max(1) > -30.0, logits[:, 2:].argmax(1) + 2, 2)
    out[np.arange(len(out)), column] = s
    return out


def p_referable(logits):
    return 1 / (1 + np.exp(-scores(logits)[1]))


def flip(logits, rows):
    """Move the given photos just across the 0.5 threshold, as an INT8 near-tie would."""
    s = scores(logits)[1].copy()
    s[rows] = -0.05 * np.sign(s[rows])
    return with_scores(logits, s)


def criterion(gate: GateResult, name: str):
    return next(c for c in gate.criteria if c.name == name)


def test_zero_disagreements_at_400_photos_passes_with_known_bounds():
    ref, cam, test, test_cam, y = outputs(400, 120)
    gate = judge(ref, cam, test, test_cam, y, AT_HALF)
    assert gate.status == "passed" and gate.failures == ()
    agreement = criterion(gate, "referral_agreement")
    assert (agreement.value, agreement.n) == (1.0, 400)
    assert agreement.bound == pytest.approx(0.05 ** (1 / 400), abs=1e-12)  # 0.99254
    assert agreement.margin == pytest.approx(0.05 ** (1 / 400) - 0.98, abs=1e-12)
    for name, n in (("sensitivity_difference", 120), ("specificity_difference", 280)):
        c = criterion(gate, name)
        assert (c.value, c.bound, c.interval, c.n, c.passed) == (0.0, 0.0, (0.0, 0.0), n, True)
    auc = criterion(gate, "auc_ratio")
    assert auc.value == pytest.approx(1.0, abs=1e-3) and auc.interval[0] <= auc.value <= auc.interval[1]
    assert auc.bound is None and "judged on the value" in auc.method
    assert [c.name for c in gate.criteria] == ["sensitivity_difference", "sensitivity_difference_point",
                                               "specificity_difference", "specificity_difference_point", "auc_ratio",
                                               "referral_agreement", "grade_agreement", "clean_referral_agreement",
                                               "qwk_ratio", "logit_cosine", "cam_correlation"]
    judged = {c.name for c in gate.criteria if c.threshold is not None}
    assert judged == {"sensitivity_difference", "specificity_difference", "auc_ratio", "referral_agreement"}
    assert gate.metrics["n_positive"] == 120 and gate.thresholds["min_referral_agreement"] == 0.98
    # The whole verdict survives the manifest's JSON.
    manifest = ArtifactManifest("m", "1", "onnx", gate=gate)
    assert ArtifactManifest.from_json(manifest.to_json()).gate == gate and manifest.ready


def test_fifty_photos_is_insufficient_evidence_and_says_how_many_more():
    ref, cam, test, test_cam, y = outputs(50, 15)
    gate = judge(ref, cam, test, test_cam, y, AT_HALF)
    assert gate.status == "insufficient_evidence"
    assert criterion(gate, "referral_agreement").bound == pytest.approx(0.05 ** (1 / 50))  # 0.9418 < 0.98
    assert gate.metrics["val_photos_needed"] == 149
    assert len(gate.failures) == 1 and "needs 99 more val photos" in gate.failures[0]
    assert not ArtifactManifest("m", "1", "onnx", gate=gate).ready
    # One lost referral in 15 referable photos is a 6.7-point sensitivity loss: a failure whatever the n, and the
    # agreement (49/50 = 0.98, at its threshold) still only lacks photos.
    lost = judge(ref, cam, flip(test, [0]), test_cam, y, AT_HALF)
    assert lost.status == "failed"
    assert {"referral_agreement", "sensitivity_difference"} <= {c.name for c in lost.criteria if c.passed is False}
    assert lost.failures[0].startswith("sensitivity_difference") and "needs 99 more" in lost.failures[-1]


def test_the_evidence_boundary_is_exactly_149_photos():
    assert photos_needed_for_lower_bound(0.98) == 149
    ref, cam, test, test_cam, y = outputs(149, 45)
    assert judge(ref, cam, test, test_cam, y, AT_HALF).status == "passed"
    assert judge(ref[:148], cam[:148], test[:148], test_cam[:148], y[:148], AT_HALF).status == "insufficient_evidence"


def test_a_sensitivity_drop_of_five_points_fails():
    ref, cam, test, test_cam, y = outputs(400, 200)
    referred_positives = np.flatnonzero((y >= 2) & (p_referable(ref) >= 0.5))
    gate = judge(ref, cam, flip(test, referred_positives[:10]), test_cam, y, AT_HALF)  # 10 of 200 referable
    assert gate.status == "failed"
    sensitivity = criterion(gate, "sensitivity_difference")
    assert sensitivity.value == pytest.approx(-0.05) and sensitivity.n == 200
    assert sensitivity.bound < -0.02 and sensitivity.passed is False
    assert gate.metrics["sensitivity_fp32"] - gate.metrics["sensitivity"] == pytest.approx(0.05)
    assert criterion(gate, "referral_agreement").value == 390 / 400
    assert any(f.startswith("sensitivity_difference lower bound") for f in gate.failures)


def test_sensitivity_is_judged_on_its_own_when_agreement_is_high():
    # 1,000 photos, 100 referable: 5 lost referrals are 0.5% of decisions (agreement bound 0.990, passes) but
    # 5 points of sensitivity (fails).
    ref, cam, test, test_cam, y = outputs(1000, 100, seed=1)
    referred_positives = np.flatnonzero((y >= 2) & (p_referable(ref) >= 0.5))
    gate = judge(ref, cam, flip(test, referred_positives[:5]), test_cam, y, AT_HALF)
    assert criterion(gate, "referral_agreement").bound == pytest.approx(clopper_pearson_lower(995, 1000))
    assert criterion(gate, "referral_agreement").passed is True
    assert [c.name for c in gate.criteria if c.passed is False] == ["sensitivity_difference"]
    assert gate.status == "failed"


def test_a_small_specificity_loss_within_the_margin_passes():
    ref, cam, test, test_cam, y = outputs(1000, 500, seed=2)
    cleared_negatives = np.flatnonzero((y < 2) & (p_referable(ref) < 0.5))
    gate = judge(ref, cam, flip(test, cleared_negatives[:3]), test_cam, y, AT_HALF)  # 3 of 500: -0.6 points
    specificity = criterion(gate, "specificity_difference")
    assert specificity.value == pytest.approx(-0.006)
    assert -0.02 < specificity.bound < -0.006 and specificity.interval[0] < specificity.bound
    assert gate.status == "passed"


def test_auc_ratio_fails_when_ranking_degrades_without_changing_decisions():
    ref, cam, test, test_cam, y = outputs(400, 120, seed=3)
    # On each side of the threshold, hand that side's highest referable probabilities to its non-referable photos:
    # every referral decision stays, the ranking the AUC measures does not.
    s = scores(test)[1]
    reordered = s.copy()
    for side in (s >= 0, s < 0):
        idx = np.flatnonzero(side)
        negatives_first = idx[np.lexsort((s[idx], y[idx] >= 2))]  # non-referable, then referable
        reordered[negatives_first] = np.sort(s[idx])[::-1]
    scrambled = with_scores(test, reordered)
    gate = judge(ref, cam, scrambled, test_cam, y, AT_HALF)
    assert criterion(gate, "referral_agreement").value == 1.0
    assert criterion(gate, "auc_ratio").value < 0.95
    assert [c.name for c in gate.criteria if c.passed is False] == ["auc_ratio"] and gate.status == "failed"


def test_the_operating_point_decides_where_referral_is_judged():
    ref, cam, test, test_cam, y = outputs(400, 120, seed=4)
    shifted = with_scores(test, scores(test)[1] - 0.2)  # INT8 a little less sure of referable DR: matters only near the threshold used
    assert judge(ref, cam, shifted, test_cam, y, AT_HALF).status == "passed"  # every |s| >= 0.5
    ref_p = p_referable(ref)
    threshold = float(np.sort(ref_p)[len(ref_p) // 2])  # a threshold in the thick of the scores
    at_median = judge(ref, cam, shifted, test_cam, y, OperatingPoint(threshold=threshold, temperature=1.0))
    assert criterion(at_median, "referral_agreement").value < 1.0
    # The temperature is applied before the threshold: the hottest allowed softmax pulls P(grade >= 2)
    # towards 3/5, above the threshold for all but a few photos.
    hot = judge(ref, cam, test, test_cam, y, OperatingPoint(threshold=0.5, temperature=20.0))
    assert hot.metrics["sensitivity"] == 1.0 and hot.metrics["specificity"] < 0.05


def test_without_labels_or_without_a_class_the_gate_cannot_pass():
    ref, cam, test, test_cam, y = outputs(400, 120)
    unlabelled = judge(ref, cam, test, test_cam, None, AT_HALF)
    assert unlabelled.status == "insufficient_evidence"
    assert any("sensitivity_difference: cannot be estimated" in f for f in unlabelled.failures)
    no_referable = judge(ref, cam, test, test_cam, np.zeros(400, int), AT_HALF)
    assert no_referable.status == "insufficient_evidence"
    assert criterion(no_referable, "auc_ratio").value is None


def test_optional_thresholds_and_broken_outputs_fail():
    ref, cam, test, test_cam, y = outputs(400, 120)
    noisy_cam = np.random.default_rng(9).normal(size=cam.shape)
    gate = judge(ref, cam, test, noisy_cam, y, AT_HALF, GateThresholds.profile("strict", min_cam_correlation=0.9))
    c = criterion(gate, "cam_correlation")
    assert c.passed is False and c.value < 0.9 and c.margin == pytest.approx(c.value - 0.9)
    assert gate.status == "failed" and gate.failures[0].startswith("cam_correlation 0.")
    nan = test.copy()
    nan[3, 1] = np.nan
    broken = judge(ref, cam, nan, test_cam, y, AT_HALF)
    assert broken.status == "failed" and broken.failures == ("the artifact produced 1 non-finite logits on 400 val "
                                                             "photos",)
    with pytest.raises(ValueError, match="one shape"):
        judge(ref, cam, test[:-1], test_cam, y, AT_HALF)
    with pytest.raises(ValueError, match="one grade per val photo"):
        judge(ref, cam, test, test_cam, y[:-1], AT_HALF)


def test_thresholds_validate_and_are_keyword_only():
    with pytest.raises(ConfigError, match="n_resamples"):
        GateThresholds(n_resamples=500)
    with pytest.raises(ConfigError, match="non-inferiority margin"):
        GateThresholds(min_sensitivity_difference=0.02)
    with pytest.raises(ConfigError, match="min_referral_agreement"):
        GateThresholds(min_referral_agreement=1.5)
    with pytest.raises(ConfigError, match="never reaches 1"):
        GateThresholds(min_grade_agreement=1.0)
    with pytest.raises(ConfigError, match="min_logit_cosine"):
        GateThresholds(min_logit_cosine=1.01)
    with pytest.raises(TypeError):
        GateThresholds(0.98)  # positional thresholds were the old gate's, with other meanings
    assert "min_grade_agreement" not in GateThresholds().as_dict()  # unset optional thresholds are not recorded
    assert dataclasses.replace(GateThresholds(), confidence=0.975).confidence == 0.975


def test_the_criteria_table_shows_every_number_and_what_is_missing():
    ref, cam, test, test_cam, y = outputs(50, 15)
    console = Console(record=True, width=200)
    console.print(criteria_table(judge(ref, cam, test, test_cam, y, AT_HALF), title="onnx int8"))
    text = console.export_text()
    assert "onnx int8: insufficient_evidence" in text
    assert "referral_agreement" in text and "needs 99 more photos" in text
    assert "0.9418" in text and "[0.9289, 1.0000]" in text and "-0.0382" in text  # bound, 95% CP, margin
    assert text.count("reported") == 7


def test_an_optional_agreement_threshold_asks_for_its_own_number_of_photos():
    ref, cam, test, test_cam, y = outputs(400, 120)
    gate = judge(ref, cam, test, test_cam, y, AT_HALF, GateThresholds.profile("strict", min_grade_agreement=0.995))
    grade = criterion(gate, "grade_agreement")
    assert grade.photos_needed == 598 and grade.evidence_limited  # ceil(ln 0.05 / ln 0.995) = ceil(597.6)
    assert gate.status == "insufficient_evidence" and "needs 198 more val photos" in gate.failures[0]


def test_a_referral_change_inside_an_uncertainty_band_is_not_a_clean_flip():
    """Four photos flip just across the threshold; a band around it holds them, so no result changes from one clean
    referral to the opposite one, while the required referral agreement still counts all four."""
    ref, cam, test, test_cam, y = outputs(400, 120)
    moved = flip(test, [0, 1, 200, 201])
    banded = OperatingPoint(threshold=0.5, uncertain_band=(0.45, 0.55))
    gate = judge(ref, cam, moved, test_cam, y, banded)
    clean = criterion(gate, "clean_referral_agreement")
    assert criterion(gate, "referral_agreement").value == pytest.approx(396 / 400)
    assert (clean.value, clean.passed) == (1.0, None) and gate.metrics["clean_referral_flips"] == 0
    # Without a band every flip is clean, and an optional threshold judges the bound like the other agreements.
    strict = judge(ref, cam, moved, test_cam, y, AT_HALF,
                   GateThresholds.profile("strict", min_clean_referral_agreement=0.995))
    clean = criterion(strict, "clean_referral_agreement")
    assert clean.value == pytest.approx(396 / 400) and strict.metrics["clean_referral_flips"] == 4
    assert clean.passed is False and clean.bound == pytest.approx(clopper_pearson_lower(396, 400, 0.95))


# ---------------------------------------------------------------- artifacts with a DME head
DME_AT_HALF = OperatingPoint(threshold=0.5)


def dme_outputs(y, seed: int = 0):
    """DME labels (60 present: 20 with referable DR, 40 without; 30 DR-negative photos unlabelled), FP32 DME
    logits s (P(DME) = sigmoid(s), |s| >= 0.5, 10% on the wrong side) and a near-copy that decides alike."""
    rng = np.random.default_rng(seed)
    referable, rest = np.flatnonzero(y >= 2), np.flatnonzero(y < 2)
    labels = np.zeros(len(y), int)
    labels[referable[:20]] = 1
    labels[rest[:40]] = 1
    labels[rest[40:70]] = MISSING
    side = np.where(labels == 1, 1.0, -1.0) * np.where(rng.random(len(y)) < 0.1, -1.0, 1.0)
    s = side * (0.5 + rng.exponential(1.5, len(y)))
    return labels, s, s + rng.normal(scale=1e-3, size=len(y))


def with_dme(labels, ref_s, test_s, point=DME_AT_HALF):
    from compression.gate import DmeOutputs

    return DmeOutputs(ref_s[:, None], test_s[:, None], labels, point)


def test_a_dme_artifact_that_decides_alike_passes_with_dme_criteria_and_grade_only_gates_are_unchanged():
    ref, cam, test, test_cam, y = outputs(400, 120)
    labels, ref_s, test_s = dme_outputs(y)
    grade_only = judge(ref, cam, test, test_cam, y, AT_HALF)
    gate = judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(labels, ref_s, test_s))
    assert gate.status == "passed"
    assert [c.name for c in gate.criteria] == [
        "sensitivity_difference", "sensitivity_difference_point", "specificity_difference",
        "specificity_difference_point", "auc_ratio", "dme_sensitivity_difference", "dme_sensitivity_difference_point",
        "dme_specificity_difference", "dme_specificity_difference_point", "dme_auc_ratio", "referral_agreement",
        "dme_agreement", "grade_agreement", "clean_referral_agreement", "qwk_ratio", "logit_cosine", "cam_correlation"]
    agreement = criterion(gate, "dme_agreement")
    assert (agreement.value, agreement.n, agreement.threshold) == (1.0, 400, 0.98)
    assert agreement.bound == pytest.approx(0.05 ** (1 / 400)) and "Clopper-Pearson" in agreement.method
    auc = criterion(gate, "dme_auc_ratio")
    assert auc.value == pytest.approx(1.0, abs=1e-3) and auc.n == 370 and auc.interval is not None
    assert auc.method.startswith("DME AUC, candidate / FP32")
    # The referral is DR or DME: its reference is known on the referable photos and the DME-labelled others.
    assert gate.metrics["n_positive"] == 120 + 40 and gate.metrics["n_negative"] == 280 - 40 - 30
    assert gate.metrics["dme_n_positive"] == 60 and gate.metrics["dme_n_negative"] == 310
    assert {"min_dme_agreement", "min_dme_auc_ratio"} <= set(gate.thresholds)
    # A grade-only gate records what it recorded before: no DME criterion, threshold or metric.
    assert not any(c.name.startswith("dme") for c in grade_only.criteria)
    assert not any(k.startswith(("dme", "min_dme")) for k in {**grade_only.metrics, **grade_only.thresholds})
    assert grade_only.metrics["n_positive"] == 120 and grade_only.metrics["n_negative"] == 280


def test_lost_dme_referrals_fail_the_referral_sensitivity_that_a_grade_only_gate_cannot_see():
    ref, cam, test, test_cam, y = outputs(400, 120, seed=5)
    labels, ref_s, test_s = dme_outputs(y, seed=5)
    # DME-positive photos that FP32 refers only for DME: INT8 no longer finds DME in 10 of them.
    dme_only = np.flatnonzero((labels == 1) & (y < 2) & (ref_s >= 0) & (p_referable(ref) < 0.5))[:10]
    lost = test_s.copy()
    lost[dme_only] = -0.05
    gate = judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(labels, ref_s, lost))
    assert judge(ref, cam, test, test_cam, y, AT_HALF).status == "passed"  # the grade head alone is unchanged
    assert gate.status == "failed"
    sensitivity = criterion(gate, "sensitivity_difference")
    assert sensitivity.value == pytest.approx(-10 / 160) and sensitivity.n == 160 and sensitivity.passed is False
    assert criterion(gate, "referral_agreement").value == 390 / 400
    assert criterion(gate, "dme_agreement").value == 390 / 400 and criterion(gate, "dme_agreement").passed is False
    assert gate.metrics["dme_sensitivity_fp32"] - gate.metrics["dme_sensitivity"] == pytest.approx(10 / 60)


def test_dme_auc_ratio_fails_when_the_dme_ranking_degrades_without_changing_decisions():
    ref, cam, test, test_cam, y = outputs(400, 120, seed=6)
    labels, ref_s, test_s = dme_outputs(y, seed=6)
    reordered = test_s.copy()
    for side in (test_s >= 0, test_s < 0):  # as for the referable AUC: each side's highest scores to its negatives
        idx = np.flatnonzero(side)
        negatives_first = idx[np.lexsort((test_s[idx], labels[idx] == 1))]
        reordered[negatives_first] = np.sort(test_s[idx])[::-1]
    gate = judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(labels, ref_s, reordered))
    assert criterion(gate, "dme_agreement").value == 1.0 and criterion(gate, "referral_agreement").value == 1.0
    assert criterion(gate, "dme_auc_ratio").value < 0.95
    assert [c.name for c in gate.criteria if c.passed is False] == ["dme_auc_ratio"] and gate.status == "failed"


def test_a_dme_artifact_without_dme_labels_or_with_a_broken_dme_output_cannot_pass():
    ref, cam, test, test_cam, y = outputs(400, 120)
    _, ref_s, test_s = dme_outputs(y)
    unlabelled = judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(None, ref_s, test_s))
    assert unlabelled.status == "insufficient_evidence"
    assert criterion(unlabelled, "dme_auc_ratio").value is None and criterion(unlabelled, "dme_agreement").passed
    # Nor is the reference referral of a non-referable photo known without its DME label: no specificity.
    dme_line = "cannot be estimated on these val photos (n=0); needs val photos with DME present and absent by their " \
        "DME label"
    assert unlabelled.failures == (
        "specificity_difference: cannot be estimated on these val photos (n=0); needs labelled photos of both "
        "referable and non-referable eyes",
        f"dme_sensitivity_difference: {dme_line}", f"dme_specificity_difference: {dme_line}",
        f"dme_auc_ratio: {dme_line}")
    broken = test_s.copy()
    broken[7] = np.inf
    assert judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(None, ref_s, broken)).status == "failed"
    with pytest.raises(ValueError, match="DME labels must be"):
        judge(ref, cam, test, test_cam, y, AT_HALF, dme=with_dme(np.full(400, 2), ref_s, test_s))
    with pytest.raises(ConfigError, match="min_dme_agreement"):
        GateThresholds(min_dme_agreement=1.0)
