"""Quality gate: each indicator moves the way its degradation says, verdicts explain themselves, thresholds are
chosen by a rule that can fail, and the gate holds on real photos when they are beside the checkout."""
import numpy as np
import pytest

from benchmarks.degradations import DEGRADATIONS, degrade, strength_bin
from benchmarks.quality_thresholds import choose
from edge_runtime.errors import ConfigError
from edge_runtime.quality import (
    DEFAULT_THRESHOLDS,
    RULE_METRICS,
    QualityThresholds,
    assess,
    quality_metrics,
    quality_score,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from training.data.synthetic import generate_fundus

    return generate_fundus(1, 512, np.random.default_rng(11)).image


@pytest.fixture(scope="module")
def clean(photo):
    return quality_metrics(photo)


def metrics_of(photo, name, strength=0.5, seed=0):
    return quality_metrics(degrade(photo, name, np.random.default_rng(seed), strength)[0])


def test_every_rule_metric_is_measured(clean):
    assert set(RULE_METRICS) <= set(clean) and all(np.isfinite(v) for v in clean.values())


@pytest.mark.parametrize("name, metric, direction", [
    ("defocus", "laplacian_var", -1), ("defocus", "directional_sharpness", -1),
    ("motion_blur", "directional_sharpness", -1), ("haze", "local_contrast", -1), ("haze", "dark_channel", +1),
    ("occlusion", "dark_area", +1), ("occlusion", "illumination_balance", -1), ("overexpose", "red_clipped", +1),
    ("overexpose", "mean", +1), ("overexpose", "bright_area", +1), ("underexpose", "mean", -1), ("noise", "noise", +1),
    ("flare", "pale_area", +1), ("motion_blur", "sharpness_isotropy", -1),
])
def test_indicator_moves_with_its_degradation(photo, clean, name, metric, direction):
    degraded = metrics_of(photo, name)
    assert direction * (degraded[metric] - clean[metric]) > 0, (name, metric, clean[metric], degraded[metric])


def test_stronger_degradation_moves_further(photo, clean):
    mild, severe = metrics_of(photo, "defocus", 0.0), metrics_of(photo, "defocus", 1.0)
    assert clean["directional_sharpness"] > mild["directional_sharpness"] > severe["directional_sharpness"]


def test_motion_blur_at_any_angle_is_seen(photo):
    # the weakest direction's edge energy drops whatever the angle the rng picks
    clean = quality_metrics(photo)["directional_sharpness"]
    drops = [metrics_of(photo, "motion_blur", 0.5, seed)["directional_sharpness"] / clean for seed in range(4)]
    assert max(drops) < 0.6, drops


def test_indicators_do_not_depend_on_pixel_count(photo):
    import cv2

    big = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    a, b = quality_metrics(photo), quality_metrics(big)
    for metric in ("mean", "std", "fov_fraction", "dark_channel", "illumination_balance"):
        assert abs(a[metric] - b[metric]) <= 0.05 * abs(a[metric]) + 1.0, metric


def test_clean_photo_gradable_and_degraded_explained(photo):
    assert assess(photo).gradable
    blurred = degrade(photo, "defocus", np.random.default_rng(0), 1.0)[0]
    report = assess(blurred)
    assert not report.gradable and any("refocus" in r for r in report.reasons)
    assert report.score < assess(photo).score


def test_no_fundus_says_what_to_do():
    report = assess(np.zeros((300, 300, 3), np.uint8))
    assert not report.gradable and report.score == 0 and "re-capture" in report.reasons[0]


def test_score_is_monotone_in_the_worst_margin(clean):
    loose = QualityThresholds(min_laplacian_var=0.0)
    tight = QualityThresholds(min_laplacian_var=clean["laplacian_var"] * 2)
    assert quality_score(clean, tight) < 0.5 <= quality_score(clean, loose)


def test_thresholds_validate():
    with pytest.raises(ConfigError, match="unknown"):
        QualityThresholds.from_dict({"min_sharpness_typo": 1.0})
    with pytest.raises(ConfigError, match="finite"):
        QualityThresholds(min_mean=float("nan"))


def test_degradations_cover_strength_bins():
    assert [strength_bin(s) for s in (0.0, 0.5, 0.99)] == ["mild", "moderate", "severe"]
    assert {"occlusion", "haze", "overexpose", "motion_blur", "flare", "heavy_jpeg"} <= set(DEGRADATIONS)


def _records(metric_values: dict[str, list[float]], case: str) -> list[dict]:
    base = quality_metrics_default()
    n = len(next(iter(metric_values.values())))
    return [{"case": case, "metrics": {**base, **{k: v[i] for k, v in metric_values.items()}}} for i in range(n)]


def quality_metrics_default() -> dict[str, float]:
    """Indicator values comfortably inside every default limit."""
    t = DEFAULT_THRESHOLDS
    values = {}
    for metric in RULE_METRICS:
        lows = [getattr(t, f) for f in (f"min_{metric}",) if hasattr(t, f)]
        highs = [getattr(t, f) for f in (f"max_{metric}",) if hasattr(t, f)]
        values[metric] = (lows[0] + highs[0]) / 2 if lows and highs else (lows[0] * 2 + 1 if lows else highs[0] / 2)
    return values


def test_chooser_separates_what_is_separable_within_budget():
    rng = np.random.default_rng(0)
    originals = _records({"laplacian_var": list(rng.uniform(50, 150, 200))}, "original")
    blurred = _records({"laplacian_var": list(rng.uniform(1, 30, 100))}, "defocus")
    overlapping = _records({"laplacian_var": list(rng.uniform(40, 160, 100))}, "motion_blur")
    thresholds, detail = choose(originals + blurred + overlapping, budget=0.02)
    values = [r["metrics"]["laplacian_var"] for r in originals]
    assert 30 <= thresholds.min_laplacian_var <= 60 and thresholds.min_laplacian_var not in values  # never on an original
    assert detail["caught"]["defocus"] == 1.0 and detail["false_reject"] <= 0.02
    assert detail["caught"]["motion_blur"] < 0.3  # an overlapping class is not "caught" by fiat


def test_gate_on_real_photos(shared_data):
    """Originals of the test split pass (most of them) and severe degradations are caught (most of them)."""
    import csv

    from edge_runtime.preprocess import read_image

    data = shared_data / "messidor2"
    rows = [r for r in csv.DictReader(open(data / "labels.csv")) if r["split"] == "test"][:12]
    rng = np.random.default_rng(0)
    passed = caught = 0
    for row in rows:
        image = read_image(data / "images" / row["image"])
        passed += assess(image).gradable
        caught += not assess(degrade(image, "defocus", rng, 1.0)[0]).gradable
    assert passed >= 10 and caught == len(rows)
