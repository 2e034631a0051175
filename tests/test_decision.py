"""The one referral decision: temperature, threshold, uncertainty band and CAM peak, on known inputs."""
import json

import numpy as np
import pytest

from edge_runtime.contract import ArtifactManifest, OperatingPoint
from edge_runtime.decision import decide, decide_batch, softmax
from edge_runtime.errors import ManifestError


def logits_for(probabilities):
    return np.log(np.asarray(probabilities, float))


def test_softmax_applies_the_temperature():
    z = np.array([[2.0, 0.0, 0.0, 0.0, 0.0]])
    assert softmax(z)[0, 0] == pytest.approx(np.exp(2) / (np.exp(2) + 4))
    assert softmax(z, temperature=2.0)[0, 0] == pytest.approx(np.exp(1) / (np.exp(1) + 4))


def test_referral_is_decided_at_the_operating_point_not_at_the_argmax():
    # P(grade >= 2) = 0.30: the argmax is grade 0, yet a sensitivity-chosen threshold of 0.25 refers.
    z = logits_for([0.6, 0.1, 0.2, 0.05, 0.05])
    low = decide(z, None, OperatingPoint(rule="sensitivity", target=0.9, threshold=0.25))
    assert (low.grade, low.referable, low.referable_probability) == (0, True, pytest.approx(0.30))
    high = decide(z, None, OperatingPoint(threshold=0.5))
    assert high.referable is False and high.outcome == "graded"


def test_a_probability_inside_the_band_is_uncertain_never_a_clean_negative():
    point = OperatingPoint(rule="sensitivity", target=0.9, threshold=0.3, uncertain_band=(0.2, 0.4))
    inside = decide(logits_for([0.75, 0.0001, 0.2499, 0.0, 0.0] + np.array([0, 0, 0, 1e-9, 1e-9])), None, point)
    assert inside.referable is False and inside.uncertain is True and inside.outcome == "uncertain"
    outside = decide(logits_for([0.9, 0.05, 0.03, 0.01, 0.01]), None, point)
    assert outside.uncertain is False and outside.referable is False


def test_batch_and_single_decisions_agree():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 5)) * 3
    point = OperatingPoint(rule="youden", threshold=0.4, temperature=1.7, uncertain_band=(0.35, 0.45))
    batch = decide_batch(z, point)
    for i in range(len(z)):
        one = decide(z[i], None, point)
        assert one.grade == batch.grades[i] and one.referable == batch.referable[i]
        assert one.uncertain == batch.uncertain[i]
    assert batch.referable.sum() == int((batch.referable_probability >= 0.4).sum())


def test_cam_peak_is_the_maximum_of_the_graded_class_map():
    cam = np.zeros((5, 4, 8), np.float32)
    cam[3, 1, 6] = 5.0  # grade 3's map peaks at row 1, column 6
    cam[0, 3, 0] = 9.0  # another grade's map must not matter
    d = decide(logits_for([0.05, 0.05, 0.1, 0.7, 0.1]), cam, OperatingPoint())
    assert d.grade == 3 and d.cam_peak == (6.5 / 8, 1.5 / 4)
    assert d.cam.max() == 1.0 and d.cam.min() == 0.0


def test_schema_1_manifests_load_with_their_bare_threshold():
    data = json.loads(ArtifactManifest(model_name="m", model_version="v", format="onnx").to_json())
    data.pop("operating_point")
    data.update(schema_version=1, referable_threshold=0.35)
    old = ArtifactManifest.from_dict(data)
    assert old.operating_point.threshold == 0.35 and not old.operating_point.chosen_on_data


def test_operating_point_validates_itself():
    with pytest.raises(ManifestError, match="temperature"):
        OperatingPoint(temperature=0.0)
    with pytest.raises(ManifestError, match="sensitivity_ci"):
        OperatingPoint(sensitivity_ci=(0.9, 0.8))
