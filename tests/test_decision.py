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
    # Referred, so the grade shown is the most probable referable grade (2), never the argmax 0.
    assert (low.grade, low.referable, low.referable_probability) == (2, True, pytest.approx(0.30))
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


@pytest.mark.parametrize("probabilities, threshold, grade, referable", [
    # argmax 4, P(grade >= 2) = 0.40 below the 0.5 threshold: shown as grade 0 or 1, never "4 ... not referable".
    ((0.35, 0.25, 0.0, 0.0, 0.40), 0.5, 0, False),
    ((0.20, 0.40, 0.05, 0.30, 0.05), 0.5, 1, False),
    # argmax 0, P(grade >= 2) = 0.45 above a 0.3 threshold: referred, shown as the most probable of grades 2-4.
    ((0.50, 0.05, 0.10, 0.05, 0.30), 0.3, 4, True),
    ((0.10, 0.10, 0.50, 0.20, 0.10), 0.5, 2, True),
])
def test_medium5_grade_and_referral_agree(probabilities, threshold, grade, referable):
    """Re-test: a result showed argmax grade 4 and "not referable" (P(grade >= 2) below the threshold)."""
    point = OperatingPoint(threshold=threshold)
    one = decide(logits_for(np.asarray(probabilities) + 1e-12), None, point)
    assert (one.grade, one.referable) == (grade, referable)
    assert (one.grade >= 2) == one.dr_referable
    assert one.confidence == pytest.approx(probabilities[grade], abs=1e-6)
    batch = decide_batch(logits_for(np.asarray([probabilities]) + 1e-12), point)
    assert int(batch.grades[0]) == grade and bool(batch.referable[0]) == referable
