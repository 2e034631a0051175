import json

import pytest

from edge_runtime.contract import (
    GRADE_NAMES,
    ArtifactManifest,
    Grade,
    PreprocessPolicy,
    manifest_path_for,
)
from edge_runtime.errors import ManifestError
from edge_runtime.wire import QualityReport, ScreeningResult


def manifest(**kw):
    return ArtifactManifest(model_name="m", model_version="m-1", format="onnx", sha256="a" * 64, **kw)


def test_grades_and_referable():
    assert [g.label for g in Grade] == list(GRADE_NAMES)
    assert [g.referable for g in Grade] == [False, False, True, True, True]


def test_manifest_json_round_trip():
    m = manifest(preprocess=PreprocessPolicy(input_size=300, ben_graham=True), cam_shape=(10, 10))
    again = ArtifactManifest.from_json(m.to_json())
    assert again == m
    assert again.preprocess.input_size == 300 and again.cam_shape == (10, 10)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["operating_point"].update(threshold=1.5), "operating_point.threshold"),
    (lambda d: d["operating_point"].update(rule="vibes"), "operating_point.rule"),
    (lambda d: d["operating_point"].update(threshold=0.3, uncertain_band=[0.4, 0.5]), "uncertain_band"),
    (lambda d: d.update(referable_threshold=0.4), "referable_threshold"),  # schema 2 has no bare threshold
    (lambda d: d["preprocess"].update(input_size=5), "preprocess.input_size"),
    (lambda d: d["preprocess"].update(color_order="XYZ"), "preprocess.color_order"),
    (lambda d: d.update(sha256="nothex"), "sha256"),
    (lambda d: d.update(class_names=["a"]), "class_names"),
    (lambda d: d.pop("model_name"), "model_name"),
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d["quantization"].update(precision="int4"), "quantization.precision"),
    (lambda d: d["gate"].update(status="maybe"), "gate.status"),
])
def test_manifest_errors_name_the_bad_field(mutate, field):
    data = json.loads(manifest().to_json())
    mutate(data)
    with pytest.raises(ManifestError, match=field.split(".")[-1]):
        ArtifactManifest.from_dict(data)


def test_manifest_rejects_non_json_and_newer_schema():
    with pytest.raises(ManifestError, match="not valid JSON"):
        ArtifactManifest.from_json("{")
    data = json.loads(manifest().to_json())
    data["schema_version"] = 99
    with pytest.raises(ManifestError, match="newer"):
        ArtifactManifest.from_dict(data)


def test_ready_depends_on_gate():
    from edge_runtime.contract import GateResult

    assert not manifest().ready  # an INT8 gate that never ran is not ready
    assert manifest(gate=GateResult("passed")).ready
    assert not manifest(gate=GateResult("failed", failures=("agreement",))).ready


def test_sidecar_names_are_unique_per_format(tmp_path):
    assert manifest_path_for(tmp_path / "m_fp32.onnx") != manifest_path_for(tmp_path / "m_fp32.tflite")


def graded(**kw):
    fields = dict(device_id="d", model_version="v", model_sha256="a" * 64, backend="b", provider="p",
                  quality=QualityReport(True, 0.9, (), {"mean": 1.0}), grade=2, probabilities=(0, 0, 1, 0, 0),
                  confidence=1.0, referable=True, threshold=0.5, cam_peak=(0.5, 0.5))
    return ScreeningResult(**{**fields, **kw})


def test_screening_result_round_trip_and_hash():
    r = graded(encounter_id="visit-7", eye="left")
    again = ScreeningResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and again.content_hash() == r.content_hash()
    assert r.to_dict()["grade_name"] == "Moderate NPDR"
    assert r.referable_probability == 1.0  # derived from the probabilities when not given
    assert "does not diagnose" in r.disclaimer
    assert ScreeningResult.from_dict(r.to_dict()).captured_at.tzinfo is not None


def test_the_manifest_contract_does_not_load_the_wire_schema():
    # Manifest-only readers (an integrator's loader, the updater) need no pydantic, and contract -> wire -> contract
    # would be an import circle.
    import subprocess
    import sys

    code = "import sys, edge_runtime.contract; print('edge_runtime.wire' in sys.modules, 'pydantic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]


@pytest.mark.parametrize("change, message", [
    ({"grade": "3"}, "valid integer"),
    ({"grade": True}, "valid integer"),
    ({"referable": "yes"}, "valid boolean"),
    ({"probabilities": [0.2, 0.2, 0.2, 0.2, 0.3]}, "sum to 1"),
    ({"probabilities": [0, 0, 1, 0]}, "5 values"),
    ({"probabilities": [-1, 0, 2, 0, 0]}, "greater than or equal to 0"),
    ({"referable": False}, "contradicts"),
    ({"referable_probability": 0.7}, "sum\(probabilities\[2:\]\)"),
    ({"grade_name": "No DR"}, "does not match grade"),
    ({"outcome": "ungradable"}, "carries no grade"),
    ({"outcome": "maybe"}, "graded"),
    ({"threshold": None}, "needs threshold"),
    ({"grade": 4}, "not the most probable"),
    ({"confidence": 0.5}, "confidence"),
    ({"captured_at": "2026-01-01T10:00:00"}, "UTC offset"),
    ({"captured_at": 1767261600}, "ISO 8601"),
    ({"encounter_id": "../etc"}, "pattern"),
    ({"eye": "both"}, "left"),
    ({"image_name": "x" * 300}, "at most 255"),
    ({"disclaimer": "x" * 100_000}, "at most 500"),
    ({"surprise": 1}, "Extra inputs"),
])
def test_wire_schema_rejects_contradictions_and_coercions(change, message):
    from pydantic import ValidationError

    data = graded().to_dict()
    data.pop("grade_name")  # derived: a device may omit it
    data.update(change)
    if change.get("threshold", 0) is None:
        data.pop("threshold")
    with pytest.raises(ValidationError, match=message):
        ScreeningResult.from_dict(data)


def test_captured_at_is_normalised_to_utc_and_windowed():
    from datetime import datetime, timedelta, timezone

    from pydantic import ValidationError

    r = ScreeningResult.from_dict({**graded().to_dict(), "captured_at": "2026-03-01T10:00:00+05:30"})
    assert r.captured_at == datetime(2026, 3, 1, 4, 30, tzinfo=timezone.utc)
    assert r.to_dict()["captured_at"] == "2026-03-01T04:30:00+00:00"
    received = datetime(2026, 3, 1, tzinfo=timezone.utc)
    context = {"received_at": received, "max_future": timedelta(hours=1)}
    with pytest.raises(ValidationError, match="plausible window"):
        ScreeningResult.from_dict({**graded().to_dict(), "captured_at": "2026-03-01T02:00:00+00:00"}, **context)
    for extreme in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "1999-12-31T23:59:59+00:00"):
        with pytest.raises(ValidationError, match="plausible window"):
            ScreeningResult.from_dict({**graded().to_dict(), "captured_at": extreme})


def test_ungradable_and_uncertain_results():
    u = ScreeningResult(device_id="d", model_version="v", model_sha256="", backend="b", provider="p",
                        quality=QualityReport(False, 0.1, ("blurred",)), outcome="ungradable")
    assert u.grade_name is None and u.needs_referral and ScreeningResult.from_dict(u.to_dict()) == u
    uncertain = graded(probabilities=(0.3, 0.22, 0.4, 0.04, 0.04), grade=0, confidence=0.3, referable=False,
                       threshold=0.5, outcome="uncertain")
    assert uncertain.referable_probability == pytest.approx(0.48) and uncertain.needs_referral


def test_encounter_rule_refers_when_either_eye_needs_it():
    from datetime import datetime, timedelta, timezone

    from edge_runtime.wire import encounter_decision

    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)

    def eye(side, minutes, **kw):
        return graded(eye=side, encounter_id="v1", captured_at=t0 + timedelta(minutes=minutes), **kw)

    clean = dict(grade=0, probabilities=(0.9, 0.05, 0.03, 0.01, 0.01), confidence=0.9, referable=False)
    ungradable = dict(outcome="ungradable", grade=None, probabilities=None, confidence=None, referable=None,
                      threshold=None, quality=QualityReport(False, 0.1, ("blurred",)))
    assert encounter_decision([eye("left", 0, **clean), eye("right", 1, **clean)]).decision == "no_referral"
    referred = encounter_decision([eye("left", 0, **clean), eye("right", 1)])
    assert referred.decision == "refer" and referred.reason == "right eye referable"
    # An ungradable capture followed by a gradable retake: the retake counts.
    assert encounter_decision([eye("left", 0, **ungradable), eye("left", 2, **clean), eye("right", 1, **clean)]).decision \
        == "no_referral"
    # Still ungradable after the retake: refer.
    assert encounter_decision([eye("left", 0, **ungradable), eye("left", 2, **ungradable),
                               eye("right", 1, **clean)]).decision == "refer"
    assert encounter_decision([eye("left", 0, **clean)]).decision == "incomplete"


def _visit_capture(side, minutes, grade=0, outcome="graded", result_id=None, **kw):
    """One capture of visit v1; grade 0 clean, grade >= 2 referable (threshold 0.5), or ungradable."""
    from datetime import datetime, timedelta, timezone

    at = datetime(2026, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes)
    ids = {} if result_id is None else {"result_id": result_id}
    if outcome == "ungradable":
        return ScreeningResult(device_id="d", model_version="v", model_sha256="", backend="b", provider="p",
                               quality=QualityReport(False, 0.1, ("blurred",)), outcome="ungradable", eye=side,
                               encounter_id="v1", captured_at=at, **ids)
    probs = [0.05] * 5
    probs[grade] = 0.8
    return graded(grade=grade, probabilities=tuple(probs), confidence=0.8, referable=grade >= 2, threshold=0.5,
                  eye=side, encounter_id="v1", captured_at=at, outcome=outcome, **ids, **kw)


@pytest.mark.parametrize("unknown", [dict(grade=4), dict(outcome="ungradable"), dict(grade=0, outcome="uncertain")])
def test_medium3_a_capture_without_an_eye_counts_in_the_visit(unknown):
    """Re-test: left and right clean plus a referable retake_2.png (eye None) gave "no referral"."""
    from edge_runtime.wire import encounter_decision

    clean = [_visit_capture("left", 0), _visit_capture("right", 1)]
    assert encounter_decision(clean).decision == "no_referral"
    decision = encounter_decision([*clean, _visit_capture(None, 2, **unknown)])
    assert decision.decision == "refer" and "unknown eye" in decision.reason
    # A clean capture of unknown eye changes nothing.
    assert encounter_decision([*clean, _visit_capture(None, 2)]).decision == "no_referral"


def test_low2_a_later_clean_retake_does_not_cancel_a_referable_capture():
    """Re-test: a later non-referable retake overrode an earlier grade-4 capture of the same eye."""
    from edge_runtime.wire import encounter_decision

    decision = encounter_decision([_visit_capture("left", 0, grade=4), _visit_capture("left", 5),
                                   _visit_capture("right", 1)])
    assert decision.decision == "refer" and decision.reason == "left eye referable"
    assert decision.eyes["left"].grade == 4


def test_low3_equal_timestamps_do_not_make_the_visit_depend_on_insert_order():
    """Re-test: two captures of one eye with the same captured_at: the visit followed the row order."""
    from edge_runtime.wire import encounter_decision

    ids = ("00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002")
    a = _visit_capture("left", 0, grade=3, result_id=ids[0])
    b = _visit_capture("left", 0, grade=0, result_id=ids[1])
    right = _visit_capture("right", 0)
    first, second = encounter_decision([a, b, right]), encounter_decision([b, right, a])
    assert first.decision == second.decision == "refer"
    assert first.eyes["left"].result_id == second.eyes["left"].result_id == ids[0]
    # Clean captures with equal times: the same one is shown whatever the order.
    c = _visit_capture("right", 0, result_id=ids[1])
    assert encounter_decision([a, right, c]).eyes["right"].result_id == encounter_decision([c, a, right]).eyes["right"].result_id


def test_medium5_wire_schema_refuses_a_grade_that_contradicts_the_referral():
    with pytest.raises(ValueError, match="contradicts the referral"):
        graded(grade=4, probabilities=(0.35, 0.25, 0.0, 0.0, 0.40), confidence=0.40, referable=False, threshold=0.5)


def test_quantization_counts_are_integers_and_older_manifests_still_load():
    from edge_runtime.contract import ArtifactManifest, QuantizationInfo
    from edge_runtime.errors import ManifestError

    old = ArtifactManifest(model_name="m", model_version="v", format="onnx").to_dict()
    old["schema_version"] = 3  # before the counts: the integer-kernel count lived in the notes' prose
    old["quantization"] = {"precision": "int8", "recipe": "ort",
                           "notes": "0 of 51 weighted layers in float; ONNX Runtime runs 50 of 50 convolutions"}
    loaded = ArtifactManifest.from_dict(old).quantization
    assert loaded.integer_kernels is None and loaded.fully_integer is None and loaded.float_layers == ()

    info = QuantizationInfo("int8", "ort", weighted_layers=51, float_layers=["/conv_head/Conv"], convolutions=50,
                            integer_kernels=49)
    assert info.float_layers == ("/conv_head/Conv",) and info.fully_integer is False
    assert info.describe() == ("1 of 51 weighted layers in float (/conv_head/Conv); "
                               "49 of 50 convolutions run as integer kernels")
    with pytest.raises(ManifestError, match="count"):
        QuantizationInfo("int8", integer_kernels=2.5)
    with pytest.raises(ManifestError, match="exceeds"):
        QuantizationInfo("int8", convolutions=3, integer_kernels=4)
