import json

import pytest

from edge_runtime.contract import (
    GRADE_NAMES,
    ArtifactManifest,
    Grade,
    PreprocessPolicy,
    QualityReport,
    ScreeningResult,
    manifest_path_for,
)
from edge_runtime.errors import ManifestError


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


def test_screening_result_round_trip_and_hash():
    r = ScreeningResult(device_id="d", model_version="v", model_sha256="s", backend="b", provider="p",
                        quality=QualityReport(True, 0.9, (), {"mean": 1.0}), grade=2, probabilities=(0, 0, 1, 0, 0),
                        confidence=1.0, referable=True, cam_peak=(0.5, 0.5))
    again = ScreeningResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and again.content_hash() == r.content_hash()
    assert r.to_dict()["grade_name"] == "Moderate NPDR"
    assert "does not diagnose" in r.disclaimer
