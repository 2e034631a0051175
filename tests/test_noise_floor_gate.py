"""The default fidelity gate: FP32's noise floor under the nuisance draws, Tango non-inferiority at the parent's
operating point, minimum evidence, and the controls it must pass and fail (constructed outputs of known effect)."""
import numpy as np
import pytest
from scipy.stats import norm

from compression.gate import Draws, GateSet, GateThresholds, folder_figures, judge
from compression.noise_floor import ClusteredBootstrap, NuisanceModel, noise_floor, score_shift, to_rgb8
from edge_runtime.contract import OperatingPoint, PreprocessPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import tango_interval, tango_lower
from edge_runtime.preprocess import normalize

AT_HALF = OperatingPoint(threshold=0.5)
K = 16


# ---------------------------------------------------------------- Tango's interval
def yang_closed_form(n: int, gained: int, lost: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's limits as the outer real roots of Yang, Sun and Hardin's (2013) quartic: an independent derivation."""
    g = norm.ppf(1 - (1 - confidence) / 2) ** 2
    b, c, d = gained, lost, gained - lost
    coefficients = [n ** 2 * (n / g + 1) ** 2, -n * d * (n / g + 1) * (4 * n / g + 1),
                    2 * n * d ** 2 * (3 * n / g + 2) / g - n ** 2 * ((b + c) / g + 1),
                    n * d * (2 * (b + c) / g + 1) - d ** 3 * (4 * n / g + 1) / g, d ** 2 * (d ** 2 / g - (b + c)) / g]
    roots = np.roots(coefficients)
    real = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
    return float(real[0]), float(real[-1])


def test_tango_interval_reproduces_the_published_example_and_the_closed_form():
    # Bentur et al. (airway hyper-responsiveness, pairs (1, 1, 7, 12)): Fagerland, Lydersen and Laake (2014),
    # Statistics in Medicine 33:2850, Table V: Tango asymptotic score 95% CI -0.517 to -0.026.
    low, high = tango_interval(1, 7, 21)
    assert (round(low, 3), round(high, 3)) == (-0.517, -0.026)
    for n, gained, lost in ((21, 1, 7), (161, 6, 16), (44, 0, 1), (160, 40, 20), (270, 0, 3), (270, 0, 0)):
        assert tango_interval(gained, lost, n) == pytest.approx(yang_closed_form(n, gained, lost), abs=1e-9)


def test_tango_holds_with_no_or_few_discordant_pairs_where_a_bootstrap_collapses():
    # No decision changed: a percentile bootstrap says exactly [0, 0]; the score interval keeps a width set by n.
    low, high = tango_interval(0, 0, 270)
    assert low == pytest.approx(-high) and 0.01 < high < 0.02
    assert tango_lower(0, 0, 270) > low  # one-sided 95% is the lower end of the two-sided 90% interval
    # One lost referral of 270 is a -0.0037 point estimate whose 95% lower bound stays above -0.05.
    assert -0.05 < tango_lower(0, 1, 270) < -1 / 270
    with pytest.raises(ValueError):
        tango_interval(5, 5, 8)


# ---------------------------------------------------------------- the noise-floor estimator
def test_noise_floor_recovers_a_constructed_excess_folder_weighted():
    """Folder a (200 photos): 50 coin tosses for FP32 (q = 0.5), the rest sure; the candidate copies q except on
    4 sure photos it reverses (r = 1 - q). Folder b (800 photos): all sure, copied exactly.
    D0 = (50/200 * 0.5 + 0) / 2 = 0.0625; E = (4/200 + 0) / 2 = 0.01; D1 / D0 = 1.16."""
    q = np.concatenate([np.full(50, 0.5), np.ones(75), np.zeros(75), np.ones(400), np.zeros(400)])
    r = q.copy()
    r[[50, 51, 125, 126]] = 1 - q[[50, 51, 125, 126]]
    folders = np.array(["a"] * 200 + ["b"] * 800)
    floor = noise_floor(q, r, ClusteredBootstrap(folders, np.arange(1000), seed=0), draws=K)
    assert floor.d0 == pytest.approx(0.0625) and floor.excess == pytest.approx(0.01)
    assert floor.ratio == pytest.approx(0.0725 / 0.0625)
    assert floor.d0_interval[0] < 0.0625 < floor.d0_interval[1]
    assert floor.excess_interval[0] <= 0.01 <= floor.excess_upper <= floor.excess_interval[1]
    # Unweighted, folder b's 800 easy photos would dilute the excess to 0.004.
    assert np.mean(r * (1 - q) + q * (1 - r) - 2 * q * (1 - q)) == pytest.approx(0.004)
    # A flip where FP32 is a coin toss costs nothing: reversing the 50 coin tosses leaves E unchanged.
    tossed = r.copy()
    tossed[:50] = 1 - tossed[:50]
    assert noise_floor(q, tossed, ClusteredBootstrap(folders, np.arange(1000))).excess == pytest.approx(0.01)


def test_the_bootstrap_moves_a_patients_photos_together():
    rng = np.random.default_rng(1)
    values = rng.random(300)
    single = ClusteredBootstrap(np.full(300, "f"), np.arange(300), seed=3).resampled(values)
    # Each patient photographed twice (identical photos): same clusters, same means, the same distribution.
    twice = ClusteredBootstrap(np.full(600, "f"), np.repeat(np.arange(300), 2), seed=3).resampled(np.repeat(values, 2))
    np.testing.assert_allclose(single, twice)
    # Treated as 600 independent photos, the same values look twice as certain (the error clustering prevents).
    naive = ClusteredBootstrap(np.full(600, "f"), np.arange(600), seed=3).resampled(np.repeat(values, 2))
    assert naive.std() < 0.8 * single.std()


def test_score_shift_is_measured_in_fp32s_own_spread():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 2, (500, 1)) + rng.normal(0, 0.3, (500, K))  # sigma_W = 0.3
    boot = ClusteredBootstrap(np.full(500, "f"), np.arange(500))
    shifted = score_shift(base, base + 0.3, boot)
    assert shifted.sigma_w == pytest.approx(0.3, rel=0.05)
    assert shifted.mean == pytest.approx(1.0, rel=0.05) and shifted.rms == pytest.approx(1.0, rel=0.05)
    assert shifted.interval[0] < shifted.mean < shifted.interval[1]
    assert score_shift(base, base, boot).mean == 0.0


# ---------------------------------------------------------------- the nuisance model
def test_the_nuisance_model_is_seeded_small_and_the_same_for_both_models():
    policy = PreprocessPolicy(input_size=64)
    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 200, (3, 64, 64, 3)).astype(np.uint8)
    x = normalize(rgb, policy)
    np.testing.assert_array_equal(to_rgb8(x, policy), rgb)  # the normalised batch maps back exactly
    model = NuisanceModel()
    first, again = model.perturb_batch(x, policy, 0), model.perturb_batch(x, policy, 0)
    np.testing.assert_array_equal(first, again)
    other = model.perturb_batch(x, policy, 1)
    assert not np.array_equal(first, other)
    centre = (slice(None), slice(None), slice(8, 56), slice(8, 56))
    moved = np.abs(to_rgb8(first, policy).astype(int) - rgb)[:, 8:56, 8:56]
    assert 0 < np.median(moved) <= 40  # noise texture and a 2-px shift: a re-capture, not another photo
    assert np.isfinite(first[centre]).all()
    with pytest.raises(ConfigError, match="jpeg_quality"):
        NuisanceModel(jpeg_quality=(95, 90))
    with pytest.raises(ConfigError, match="draws"):
        NuisanceModel(draws=1)


# ---------------------------------------------------------------- the gate on constructed draws
def logits_of(s: np.ndarray) -> np.ndarray:
    """Logits whose P(grade >= 2) = sigmoid(s) (all referable mass in grade 2, the rest in grade 0)."""
    out = np.full(s.shape + (5,), -30.0)
    out[..., 0] = 0.0
    out[..., 2] = s
    return out


def gate_inputs(n: int = 640, n_referable: int = 200, folders: int = 2, seed: int = 0, sigma_w: float = 0.3):
    """A model that scores s_i on a photo and s_i + sigma_W e_ik on its draws; AUC about 0.93."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([rng.integers(2, 5, n_referable), rng.integers(0, 2, n - n_referable)])
    s = np.where(y >= 2, 1.5, -1.5) + rng.normal(0, 1.2, n)
    noise = rng.normal(0, sigma_w, (K, n))
    folder = np.array([f"f{i % folders}" for i in rng.permutation(n)])
    return y, s, noise, GateSet(folder, np.array([f"p{i // 2}" for i in range(n)]))  # two eyes a patient


def run_gate(y, s, noise, gate_set, test_s=None, test_noise=None, point=AT_HALF, ref_point=None,
             thresholds=None):
    test_s = s if test_s is None else test_s
    test_noise = noise if test_noise is None else test_noise
    draws = Draws(logits_of(s[None] + noise), logits_of(test_s[None] + test_noise))
    return judge(logits_of(s), None, logits_of(test_s), None, y, point, thresholds or GateThresholds(), draws=draws,
                 gate_set=gate_set, ref_operating_point=ref_point)


def failed(gate) -> list[str]:
    return [c.name for c in gate.criteria if c.passed is False]


def test_control_a_re_export_of_fp32_passes_with_every_criterion_judged():
    y, s, noise, gate_set = gate_inputs()
    rng = np.random.default_rng(5)
    gate = run_gate(y, s, noise, gate_set, s + rng.normal(0, 1e-4, s.shape), noise)  # float rounding only
    assert gate.status == "passed", gate.failures
    judged = {c.name for c in gate.criteria if c.threshold is not None}
    assert judged == {"sensitivity_difference", "sensitivity_difference_point", "specificity_difference",
                      "specificity_difference_point", "auc_ratio", "excess_disagreement", "disagreement_ratio",
                      "hard_flips", "score_shift", "score_rms"}
    assert 0.02 < gate.metrics["noise_floor_d0"] < 0.2 and abs(gate.metrics["excess_disagreement"]) < 1e-3
    figures = folder_figures(gate)
    assert set(figures) == {"f0", "f1"} and figures["f0"]["n"] + figures["f1"]["n"] == 640
    assert gate.metrics["gate_photos"] == 640 and gate.metrics["draws"] == K


def test_control_b_a_collapsed_int8_fails():
    """INT8 calibrated on black frames: activations saturate and every photo gets about the same score."""
    y, s, noise, gate_set = gate_inputs()
    collapsed = np.full_like(s, 0.2) + 0.05 * s
    gate = run_gate(y, s, noise, gate_set, collapsed, 0.05 * noise)
    assert gate.status == "failed"
    assert {"specificity_difference", "excess_disagreement"} <= set(failed(gate))


def test_control_c_a_five_point_sensitivity_loss_fails():
    """Weights perturbed until val sensitivity drops by 5 points: the referable photos nearest the threshold
    lose their referral on every draw."""
    y, s, noise, gate_set = gate_inputs(seed=1)
    referred = np.flatnonzero((y >= 2) & (s > 0))
    lost = referred[np.argsort(s[referred])][:10]  # 10 of 200 referable photos: -0.05
    weakened = s.copy()
    weakened[lost] = -2.0
    gate = run_gate(y, s, noise, gate_set, weakened)
    assert gate.status == "failed"
    sensitivity = next(c for c in gate.criteria if c.name == "sensitivity_difference")
    assert sensitivity.value == pytest.approx(-0.05) and sensitivity.bound < -0.05
    assert {"sensitivity_difference", "sensitivity_difference_point"} <= set(failed(gate))


def test_control_d_a_threshold_shifted_by_a_tenth_fails():
    y, s, noise, gate_set = gate_inputs(seed=2)
    gate = run_gate(y, s, noise, gate_set, point=OperatingPoint(threshold=0.6), ref_point=AT_HALF)
    assert gate.status == "failed"
    assert "excess_disagreement" in failed(gate) and "sensitivity_difference_point" in failed(gate)


def test_one_hard_flip_fails_even_when_the_excess_is_small():
    y, s, noise, gate_set = gate_inputs(seed=3)
    sure = np.flatnonzero((y >= 2) & (s + noise.min(0) > 0.5))[0]  # referable, FP32 refers on every draw
    flipped = s.copy()
    flipped[sure] = -3.0
    gate = run_gate(y, s, noise, gate_set, flipped)
    assert gate.metrics["hard_flips"] == 1 and gate.metrics["excess_disagreement"] < 0.005
    assert failed(gate) == ["hard_flips"] and gate.status == "failed"


def test_a_systematic_score_shift_fails_before_it_flips_much():
    y, s, noise, gate_set = gate_inputs(seed=4)
    gate = run_gate(y, s, noise, gate_set, s + 0.6 * 0.3)  # +0.6 sigma_W on every photo
    shift = next(c for c in gate.criteria if c.name == "score_shift")
    assert shift.value == pytest.approx(0.6, rel=0.1) and shift.passed is False
    assert "score_shift" in failed(gate)


def test_below_the_minimum_evidence_the_verdict_is_insufficient_and_says_how_much_more():
    y, s, noise, gate_set = gate_inputs(n=599, n_referable=149)
    gate = run_gate(y, s, noise, gate_set)
    assert gate.status == "insufficient_evidence"
    assert "needs 1 more graded val photos" in gate.failures[0]
    assert "needs 1 more referable val photos" in gate.failures[1]
    y, s, noise, gate_set = gate_inputs()
    few = judge(logits_of(s), None, logits_of(s), None, y, AT_HALF,
                draws=Draws(logits_of(s[None] + noise[:8]), logits_of(s[None] + noise[:8])), gate_set=gate_set)
    assert few.status == "insufficient_evidence" and any("8 per photo < 16" in f for f in few.failures)
    none = judge(logits_of(s), None, logits_of(s), None, y, AT_HALF, gate_set=gate_set)
    assert none.status == "insufficient_evidence"
    # Even a broken candidate below the minimum is not called failed for its numbers, but for its bad outputs it is.
    y, s, noise, gate_set = gate_inputs(n=300, n_referable=100)
    assert run_gate(y, s, noise, gate_set, np.zeros_like(s)).status == "insufficient_evidence"


def test_profiles_and_threshold_validation():
    strict = GateThresholds.profile("strict")
    assert strict.min_referral_agreement == 0.98 and not strict.judges_noise_floor
    assert GateThresholds().judges_noise_floor and GateThresholds().min_gate_photos == 600
    assert GateThresholds.profile("default", max_excess_disagreement=0.01).max_excess_disagreement == 0.01
    with pytest.raises(ConfigError, match="unknown gate profile"):
        GateThresholds.profile("lenient")
    with pytest.raises(ConfigError, match="the fields are"):
        GateThresholds.profile("strict", max_excess=0.1)
    with pytest.raises(ConfigError, match="max_disagreement_ratio"):
        GateThresholds(max_disagreement_ratio=0.9)
    with pytest.raises(ConfigError, match="max_hard_flips"):
        GateThresholds(max_hard_flips=-1)
    with pytest.raises(ConfigError, match="min_draws"):
        GateThresholds(min_draws=1)
    with pytest.raises(ConfigError, match="difference_interval"):
        GateThresholds(difference_interval="wald")
