import json

import numpy as np
import pytest

from edge_runtime.backends import open_session
from edge_runtime.contract import ArtifactManifest, manifest_path_for
from exporters.formats import FORMATS, format_for_path, get_format


def test_format_table_is_the_single_source():
    assert format_for_path("x.onnx").name == "onnx" and format_for_path("x.mlpackage").name == "coreml"
    assert not FORMATS["coreml"].runs_here or FORMATS["coreml"].runs_on == ("Darwin",)
    with pytest.raises(ValueError, match="did you mean"):
        get_format("onxx")


@pytest.mark.parametrize("fmt, precision", [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"),
                                            ("tflite", "int8")])
def test_round_trip_parity_and_cam_identity(tiny_artifacts, fmt, precision):
    records, out, ctx = tiny_artifacts
    record = records[(fmt, precision)]
    assert record.status == "ok", record.error
    manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
    assert manifest.format == fmt and manifest.quantization.precision == precision
    assert manifest.sha256 == record.sha256 and manifest.preprocess.input_size == 64
    session = open_session(record.path, allow_ungated=True)
    logits, cam = session.run(ctx.val[:4])
    ref_logits, ref_cam = ctx.reference()
    assert logits.shape == (4, 5) and cam.shape == ref_cam[:4].shape
    bias = logits - cam.mean(axis=(2, 3))  # logits = spatial mean of cam + bias, on every format
    if precision in ("fp32", "fp16"):
        tolerance = 1e-3 if precision == "fp32" else 5e-2 * max(1.0, float(np.abs(ref_logits).max()))
        assert np.abs(logits - ref_logits[:4]).max() < tolerance
        assert np.abs(bias - bias[0]).max() < tolerance
        assert record.gate == "not_required"
        if precision == "fp16":
            assert record.size_mb < 0.8 * records[("tflite", "fp32")].size_mb
    else:
        cos = (logits * ref_logits[:4]).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(ref_logits[:4], axis=1)
        assert cos.mean() > 0.9
        assert record.gate in ("passed", "failed") and "agreement" in manifest.gate.metrics
        assert manifest.quantization.recipe in ("ort", "pt2e") and manifest.quantization.calibration_images > 0
        assert manifest.quantization.target == ("litert_xnnpack" if fmt == "tflite" else ctx.recipe.target)


def test_onnx_checker_and_embedded_manifest(tiny_artifacts):
    import onnx

    from exporters.onnx import read_embedded_manifest

    records, _, _ = tiny_artifacts
    path = records[("onnx", "int8")].path
    onnx.checker.check_model(onnx.load(path))
    embedded = json.loads(read_embedded_manifest(path))
    assert embedded["format"] == "onnx" and embedded["quantization"]["precision"] == "int8"
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_tflite_embedded_manifest(tiny_artifacts):
    from exporters.tflite import read_embedded_manifest

    records, _, _ = tiny_artifacts
    embedded = json.loads(read_embedded_manifest(records[("tflite", "int8")].path))
    assert embedded["format"] == "tflite" and embedded["output_names"] == ["logits", "cam"]


def test_index_json_lists_every_artifact(tiny_artifacts):
    _, out, _ = tiny_artifacts
    index = json.loads((out / "index.json").read_text())
    rows = {(a["format"], a["precision"]) for a in index["artifacts"]}
    assert rows == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8")}
    assert all(a["sha256"] and a["size_mb"] > 0 for a in index["artifacts"])


def test_coreml_spec_is_verified_on_linux(tiny_artifacts, tmp_path):
    from dataclasses import replace

    from exporters.registry import export_artifact

    _, _, ctx = tiny_artifacts
    ctx = replace(ctx, out_dir=tmp_path, simulated={})  # the loose gate of the fixture: the tiny model passes
    ctx._reference = tiny_artifacts[2].reference()
    for precision in ("fp16", "int8"):
        record = export_artifact(ctx, "coreml", precision)
        assert record.status == "ok", record.error
        assert record.path.endswith(".mlpackage")
        if not FORMATS["coreml"].runs_here and precision == "fp16":
            assert record.gate == "not_run" and "spec checked" in record.verified
        if precision == "int8":
            # W8A8: int8 weights and activation quantize ops in the spec; numerics gated on the converted graph.
            assert record.parity["int8_weight_ops"] > 0 and record.parity["int8_activation_ops"] > 0
            assert record.gate == "passed" and 0 < record.parity["agreement"] <= 1
            manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
            assert manifest.quantization.activation_type == "int8" and manifest.gate.metrics["cam_correlation"] > 0.5


def test_failing_format_becomes_a_row(tiny_artifacts, tmp_path):
    from dataclasses import replace

    from exporters.registry import export_artifact

    ctx = replace(tiny_artifacts[2], out_dir=tmp_path)
    record = export_artifact(ctx, "onnx", "fp16")  # not in the table's precisions for ONNX
    assert record.status == "failed" and "supports precisions" in record.error


def test_strict_gate_fails_and_marks_manifest(tiny_artifacts, tmp_path):
    from dataclasses import replace

    from compression.gate import GateThresholds
    from edge_runtime.errors import ArtifactError
    from exporters.registry import export_artifact

    ctx = replace(tiny_artifacts[2], out_dir=tmp_path, thresholds=GateThresholds(min_logit_cosine=1.0))
    record = export_artifact(ctx, "onnx", "int8")
    assert record.status == "ok" and record.gate == "failed"
    manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
    assert not manifest.ready and manifest.gate.failures[0].startswith("logit_cosine ")
    with pytest.raises(ArtifactError, match="allow-ungated"):
        open_session(record.path)
    assert open_session(record.path, allow_ungated=True)


def test_failed_gate_retries_with_sensitive_layers_in_float(tiny_artifacts, tmp_path):
    from dataclasses import replace

    import numpy as np
    import onnx

    from compression.gate import GateThresholds
    from exporters.registry import export_artifact

    base = tiny_artifacts[2]
    # An impossible threshold forces the retry; without tuning photos the escalation stops after its first step.
    ctx = replace(base, out_dir=tmp_path, thresholds=GateThresholds(min_logit_cosine=1.0),
                  tuning_images=np.empty((0,) + base.calib.shape[1:], np.float32))
    ctx._reference = base.reference()
    record = export_artifact(ctx, "onnx", "int8")
    assert "sensitive layers in float after" in record.verified and record.gate == "failed"
    assert "accuracy-controlled" not in record.verified
    manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
    assert "conv_stem" in manifest.quantization.notes
    graph = onnx.load(record.path).graph
    stem = next(n for n in graph.node if n.name == "/conv_stem/Conv")
    producers = {o: n for n in graph.node for o in n.output}
    weight_source = producers.get(stem.input[1])  # None: a float initializer
    assert weight_source is None or weight_source.op_type != "DequantizeLinear"  # the stem's weights stayed float
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)  # the rest is still INT8


def test_cli_export_exits_nonzero_on_a_failed_gate_and_can_skip_escalation(tiny_run, synthetic_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "export", "--checkpoint", str(tiny_run.best_checkpoint),
                           "--formats", "onnx", "--precisions", "int8", "--calib", str(synthetic_dir), "--val",
                           str(synthetic_dir), "--out", str(out), "--min-logit-cosine", "1.0", "--no-escalate"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "agreement" in proc.stdout and "failed" in proc.stdout
    (row,) = json.loads((out / "index.json").read_text())["artifacts"]
    assert row["gate"] == "failed" and "after" not in row["verified"]  # no retry ran
    manifest = ArtifactManifest.from_json(manifest_path_for(row["path"]).read_text())
    assert manifest.quantization.recipe == "ort" and not manifest.ready


def test_calibration_and_gate_can_use_several_folders(tiny_run, synthetic_dir, tmp_path):
    from exporters.pipeline import build_context

    limits = dict(calib_limit=8, val_limit=12, tuning_limit=10)
    one = build_context(tiny_run.best_checkpoint, tmp_path, synthetic_dir, synthetic_dir, **limits)
    two = build_context(tiny_run.best_checkpoint, tmp_path, [synthetic_dir] * 2, [synthetic_dir] * 2, **limits)
    assert len(one.val) == len(one.val_labels) > 0 and len(one.calib) > 0 and len(one.tuning_images) > 0
    assert len(two.val) == len(two.val_labels) == 2 * len(one.val)
    assert len(two.calib) == 2 * len(one.calib) and len(two.tuning_images) == 2 * len(one.tuning_images)


def test_pt2e_formats_escalate_to_quantization_aware_fine_tuning(tiny_artifacts, tmp_path):
    from dataclasses import replace

    from ai_edge_litert.interpreter import Interpreter

    from compression.gate import GateThresholds
    from compression.qat import QATConfig
    from exporters.registry import export_artifact

    base = tiny_artifacts[2]
    # An impossible threshold fails the post-training PT2E artifacts; TFLite and CoreML have no mixed precision,
    # so their only retry is PT2E QAT.
    ctx = replace(base, out_dir=tmp_path, thresholds=GateThresholds(min_logit_cosine=1.0), shared={},
                  qat=QATConfig(steps=2, batch_size=4), tuning_images=base.calib[:8])
    ctx._reference = base.reference()
    records = {fmt: export_artifact(ctx, fmt, "int8") for fmt in ("tflite", "coreml")}
    for fmt, record in records.items():
        assert record.status == "ok", record.error
        assert "quantization-aware fine-tuning (2 steps) after" in record.verified
        assert "sensitive layers" not in record.verified and "accuracy-controlled" not in record.verified
        manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
        assert manifest.quantization.recipe == "pt2e_qat" and manifest.gate.status == "failed"
        assert manifest.quantization.target == {"tflite": "litert_xnnpack", "coreml": "apple_ane"}[fmt]
        assert 0.0 <= record.parity["agreement"] <= 1.0
    assert len(ctx.shared) == 1  # both converters took the one fine-tuned graph
    interpreter = Interpreter(records["tflite"].path)
    assert [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8 and len(d["shape"]) == 4]
    assert records["tflite"].parity["cam_identity_error"] < 1e-3
    # CoreML on Linux: spec checked, gate judged on the converted QAT torch graph.
    assert records["coreml"].parity["int8_weight_ops"] > 0 and records["coreml"].parity["int8_activation_ops"] > 0
