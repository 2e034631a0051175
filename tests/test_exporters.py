import json
import platform
from dataclasses import replace

import numpy as np
import pytest
import yaml

from edge_runtime.backends import open_session
from edge_runtime.contract import ArtifactManifest, manifest_path_for, sha256_file
from edge_runtime.formats import RUNTIME_FORMATS
from exporters.formats import FORMATS, format_for_path, get_format

FIXTURE_JOBS = [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8")]


def _sidecar(path) -> ArtifactManifest:
    return ArtifactManifest.from_json(manifest_path_for(path).read_text())


def _agreement(logits: np.ndarray, ref_logits: np.ndarray) -> float:
    return float((logits.argmax(1) == ref_logits.argmax(1)).mean())


def test_format_table_extends_the_runtime_half():
    assert format_for_path("x.onnx").name == "onnx" and format_for_path("x.mlpackage").name == "coreml"
    assert {n: (s.suffix, s.runtime) for n, s in FORMATS.items()} == {
        "onnx": (".onnx", "onnxruntime"), "tflite": (".tflite", "litert"), "coreml": (".mlpackage", "coreml")}
    assert FORMATS["coreml"].runs_on == ("Darwin",) and FORMATS["coreml"].is_directory
    assert FORMATS["coreml"].runs_here == (platform.system() == "Darwin")
    for name, runtime_half in RUNTIME_FORMATS.items():  # every runtime fact is the runtime table's, not a copy
        assert all(getattr(FORMATS[name], f) == getattr(runtime_half, f) for f in runtime_half.__dataclass_fields__)
    assert [s.name for s in FORMATS["onnx"].int8_escalation] == ["sensitive_float", "accuracy_control", "qat"]
    assert [s.name for s in FORMATS["tflite"].int8_escalation] == ["sensitive_float", "qat"]
    with pytest.raises(ValueError, match=r"did you mean \['onnx'\]"):
        get_format("onxx")


def test_plan_derives_escalation_and_tuning_needs():
    from compression.qat import QATConfig
    from compression.quantize import QuantRecipe
    from exporters.pipeline import ExportPlan

    ort = ExportPlan(("onnx", "tflite"), ("fp32", "int8"), QuantRecipe("ort"))
    assert [s.name for s in ort.escalation("onnx", True)] == ["sensitive_float", "accuracy_control"]
    assert [s.name for s in ort.escalation("onnx", False)] == ["sensitive_float"]
    assert [s.name for s in ort.escalation("tflite", True)] == ["sensitive_float"]  # QAT needs qat steps
    assert ort.needs_tuning_images  # ONNX accuracy control can use them
    with_qat = replace(ort, qat=QATConfig(steps=5))
    assert [s.name for s in with_qat.escalation("tflite", True)] == ["sensitive_float", "qat"]
    assert with_qat.escalation("onnx", True)[-1].describe(5) == "quantization-aware fine-tuning (5 steps)"
    assert not ExportPlan(("tflite",), ("int8",), QuantRecipe("ort")).needs_tuning_images
    assert not ExportPlan(("onnx",), ("fp32",), QuantRecipe("nncf_ac")).needs_tuning_images  # no INT8 job
    assert ExportPlan(("tflite",), ("int8",), QuantRecipe("qat"), escalate=False).needs_tuning_images
    assert not replace(ort, escalate=False).needs_tuning_images and replace(ort, escalate=False).escalation("onnx", True) == []
    # The retry recipes: float exclusions added, then cleared for accuracy control and QAT.
    first, second = ort.escalation("onnx", True)
    assert "conv_stem" in first.retry_recipe(ort.recipe).exclude and first.retry_recipe(ort.recipe).name == "ort"
    assert second.retry_recipe(first.retry_recipe(ort.recipe)) == replace(ort.recipe, name="nncf_ac", exclude=())
    assert [s.name for s in ExportPlan(("onnx",), ("int8",), QuantRecipe("ort", exclude=("x",))).escalation("onnx", True)] \
        == ["accuracy_control"]


@pytest.mark.parametrize("fmt, precision", FIXTURE_JOBS)
def test_round_trip_parity_and_cam_identity(tiny_artifacts, fmt, precision):
    records, out, pipeline = tiny_artifacts
    record = records[(fmt, precision)]
    assert record.status == "ok", record.error
    manifest = _sidecar(record.path)
    assert manifest.format == fmt and manifest.quantization.precision == precision
    assert manifest.sha256 == record.sha256 == sha256_file(record.path) and manifest.preprocess.input_size == 64
    session = open_session(record.path)  # every fixture artifact passed its gate or parity check
    val, ref_logits = pipeline.inputs.photos.val, pipeline.reference.logits
    logits, cam = session.run(val)
    assert logits.shape == (len(val), 5) and cam.shape == pipeline.reference.cam.shape
    bias = logits - cam.mean(axis=(2, 3))  # logits = spatial mean of cam + bias, on every format
    if precision in ("fp32", "fp16"):
        tolerance = 1e-3 if precision == "fp32" else 5e-2 * max(1.0, float(np.abs(ref_logits).max()))
        assert np.abs(logits - ref_logits).max() < tolerance
        assert np.abs(bias - bias[0]).max() < tolerance
        # FP32 is the reference (parity only); FP16 passes parity, then the (loose) fidelity gate like INT8.
        assert record.gate == manifest.gate.status == ("not_required" if precision == "fp32" else "passed")
        assert record.parity["max_abs_logit_diff"] == pytest.approx(np.abs(logits - ref_logits).max(), abs=1e-6)
        if precision == "fp16":
            assert record.size_mb < 0.8 * records[("tflite", "fp32")].size_mb
    else:
        cos = (logits * ref_logits).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(ref_logits, axis=1)
        assert cos.mean() > 0.9
        # The fixture's gate is loose (0, 0, 1): it must pass, on the agreement this run reproduces.
        assert record.gate == manifest.gate.status == "passed" and manifest.gate.failures == ()
        assert manifest.gate.metrics["agreement"] == record.parity["agreement"] == _agreement(logits, ref_logits)
        assert manifest.gate.metrics["n"] == len(val)
        assert manifest.quantization.recipe == {"onnx": "ort", "tflite": "pt2e"}[fmt]
        assert manifest.quantization.calibration_images == len(pipeline.inputs.photos.calib)
        assert manifest.quantization.target == ("litert_xnnpack" if fmt == "tflite" else pipeline.plan.recipe.target)


def test_fp32_reference_of_the_draws_is_the_checkpoint(tiny_artifacts):
    """The gate runs FP32 on its nuisance draws through ONNX Runtime (speed); it must be the checkpoint's outputs."""
    _, _, pipeline = tiny_artifacts
    ran = pipeline._fp32_runner(pipeline.inputs.photos.val)
    np.testing.assert_allclose(ran.logits, pipeline.reference.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ran.cam, pipeline.reference.cam, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt, precision", FIXTURE_JOBS)
def test_embedded_manifest_is_the_sidecar_with_its_gate_verdict(tiny_artifacts, fmt, precision):
    record = tiny_artifacts[0][(fmt, precision)]
    sidecar = _sidecar(record.path)
    embedded = RUNTIME_FORMATS[fmt].read_embedded_manifest(record.path)
    assert embedded.to_dict() == {**sidecar.to_dict(), "sha256": None}  # identical but for the file's own hash
    assert embedded.gate.status == record.gate == ("not_required" if precision == "fp32" else "passed")
    assert embedded.gate.metrics["agreement"] == sidecar.gate.metrics["agreement"]


def test_onnx_checker_and_qdq_graph(tiny_artifacts):
    import onnx

    path = tiny_artifacts[0][("onnx", "int8")].path
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert [p.key for p in model.metadata_props] == ["retinaedge_manifest"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}


def test_index_json_and_export_config_describe_the_run(tiny_artifacts):
    records, out, pipeline = tiny_artifacts
    index = json.loads((out / "index.json").read_text())
    assert {(a["format"], a["precision"]) for a in index["artifacts"]} == set(FIXTURE_JOBS)
    for row in index["artifacts"]:
        assert row["sha256"] == sha256_file(row["path"]) and row["size_mb"] > 0
    config = yaml.safe_load((out / f"{pipeline.inputs.stem}.export_config.yaml").read_text())
    assert config["plan"]["formats"] == ["onnx", "tflite"] and config["plan"]["recipe"]["name"] == "ort"
    assert config["thresholds"]["min_referral_agreement"] == 0.0 and config["thresholds"]["min_auc_ratio"] == 0.0
    assert config["thresholds"]["min_sensitivity_difference"] == -1.0 and config["thresholds"]["n_resamples"] == 2000
    photos = pipeline.inputs.photos
    assert config["photos"]["val"] == {"n": len(photos.val), "sha1": photos.digest("val")}
    assert config["checkpoint"] == str(pipeline.inputs.checkpoint)


def test_finalise_hook_embeds_then_hashes_then_signs(tiny_artifacts, tmp_path):
    import shutil

    from exporters.manifest import ArtifactEvidence, finalise_manifest
    from exporters.onnx import embed_manifest

    record = tiny_artifacts[0][("onnx", "fp32")]
    path = tmp_path / "copy.onnx"
    shutil.copy(record.path, path)
    pipeline = tiny_artifacts[2]
    draft = _sidecar(record.path).replace(sha256=None, model_version="copy-v2")
    evidence = ArtifactEvidence(None, None, None, pipeline.reference)
    signed = []
    final = finalise_manifest(path, draft, evidence, embed_manifest,
                              sign=lambda d: signed.append(d["sha256"]) or {**d, "signature": "sig-of-" + d["sha256"]})
    assert final.sha256 == sha256_file(path) == signed[0]  # the signer saw the final file's hash
    sidecar = json.loads(manifest_path_for(path).read_text())
    assert sidecar["signature"] == "sig-of-" + final.sha256 and sidecar["model_version"] == "copy-v2"
    assert RUNTIME_FORMATS["onnx"].read_embedded_manifest(path).model_version == "copy-v2"


@pytest.mark.slow  # ~17 s: two coremltools conversions
def test_coreml_spec_is_verified_on_linux(tiny_artifacts, tmp_path):
    import torch

    from exporters.formats import pt2e_recipe
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    # The fixture's loose gate: the tiny model passes; the reference and the calibrated PT2E graph are reused.
    pipeline = ExportPipeline(replace(base.inputs, out_dir=tmp_path), base.plan, base.reference)
    for precision in ("fp16", "int8"):
        record = pipeline.export("coreml", precision)
        assert record.status == "ok", record.error
        assert record.path.endswith(".mlpackage")
        embedded = RUNTIME_FORMATS["coreml"].read_embedded_manifest(record.path)
        assert embedded.to_dict() == {**_sidecar(record.path).to_dict(), "sha256": None}
        if not FORMATS["coreml"].runs_here and precision == "fp16":
            assert record.gate == embedded.gate.status == "not_run" and "spec checked" in record.verified
        if precision == "int8":
            # W8A8: int8 weights and activation quantize ops in the spec; numerics gated on the converted graph,
            # whose agreement with FP32 is recomputed here from the same calibrated graph.
            assert record.parity["int8_weight_ops"] > 0 and record.parity["int8_activation_ops"] > 0
            graph = base.graphs.quantize(pt2e_recipe(base.plan.recipe, "apple_ane")).convert(fold_quantize=True)
            val = base.inputs.photos.val
            with torch.no_grad():
                logits = np.concatenate([graph(torch.from_numpy(val[i:i + 1]))[0].numpy() for i in range(len(val))])
            assert record.gate == embedded.gate.status == "passed"
            assert record.parity["agreement"] == _agreement(logits, base.reference.logits)
            assert embedded.quantization.activation_type == "int8" and embedded.gate.metrics["cam_correlation"] > 0.5


def test_failing_format_becomes_a_row(tiny_artifacts, tmp_path):
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    record = ExportPipeline(replace(base.inputs, out_dir=tmp_path), base.plan, base.reference).export("onnx", "fp16")
    assert record.status == "failed" and record.error == (
        "ExportConfigError: onnx supports precisions ('fp32', 'int8'), not 'fp16'")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_reference_must_belong_to_the_val_photos(tiny_artifacts):
    from exporters.errors import ExportConfigError
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    full = base.inputs.photos
    photos = replace(full, val=full.val[:4], val_labels=full.val_labels[:4], val_folders=full.val_folders[:4],
                     val_patients=full.val_patients[:4])
    with pytest.raises(ExportConfigError, match="other val photos"):
        ExportPipeline(replace(base.inputs, photos=photos), base.plan, base.reference)


def test_strict_gate_fails_and_marks_both_manifests(tiny_artifacts, tmp_path):
    from compression.gate import GateThresholds
    from edge_runtime.errors import ArtifactError
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    inputs = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds.profile("strict", min_logit_cosine=1.0))
    record = ExportPipeline(inputs, replace(base.plan, escalate=False), base.reference).export("onnx", "int8")
    assert record.status == "ok" and record.gate == "failed"
    manifest = _sidecar(record.path)
    embedded = RUNTIME_FORMATS["onnx"].read_embedded_manifest(record.path)
    assert not manifest.ready and embedded.gate == manifest.gate
    assert any(f.startswith("logit_cosine ") and "< 1.0000" in f for f in manifest.gate.failures)
    assert record.failures == list(manifest.gate.failures)
    with pytest.raises(ArtifactError, match="allow-ungated"):
        open_session(record.path)
    session = open_session(record.path, allow_ungated=True)
    assert session.info.backend == "onnxruntime" and session.info.manifest.gate.status == "failed"


def test_failed_gate_retries_with_sensitive_layers_in_float(tiny_artifacts, tmp_path):
    import onnx

    from compression.gate import GateThresholds
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    # An impossible threshold forces the retry; without tuning photos the escalation stops after its first step.
    photos = replace(base.inputs.photos, tuning=base.inputs.photos.tuning[:0])
    inputs = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds.profile("strict", min_logit_cosine=1.0), photos=photos)
    record = ExportPipeline(inputs, base.plan, base.reference).export("onnx", "int8")
    assert [a.step for a in record.attempts] == ["as asked", "sensitive layers in float"] and record.gate == "failed"
    assert any("logit_cosine 1.0000 < 1.0000" in f for f in record.attempts[0].gate.failures)
    assert record.gate_result.criteria and record.operating_point is not None  # the CLI prints these as returned
    manifest = _sidecar(record.path)
    assert "conv_stem" in manifest.quantization.notes
    counted = manifest.quantization  # counts as integers, read back from the file: the stem is a float layer
    assert "/conv_stem/Conv" in counted.float_layers and len(counted.float_layers) < counted.weighted_layers
    assert counted.integer_kernels < counted.convolutions and counted.fully_integer is False
    assert RUNTIME_FORMATS["onnx"].read_embedded_manifest(record.path).quantization == manifest.quantization
    graph = onnx.load(record.path).graph
    stem = next(n for n in graph.node if n.name == "/conv_stem/Conv")
    producers = {o: n for n in graph.node for o in n.output}
    weight_source = producers.get(stem.input[1])  # None: a float initializer
    assert weight_source is None or weight_source.op_type != "DequantizeLinear"  # the stem's weights stayed float
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)  # the rest is still INT8


def test_cli_export_exits_nonzero_on_a_failed_gate_can_skip_escalation_and_keep_layers_float(tiny_run, synthetic_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "export", "--checkpoint", str(tiny_run.best_checkpoint),
                           "--formats", "onnx", "--precisions", "int8", "--calib", str(synthetic_dir), "--val",
                           str(synthetic_dir), "--out", str(out), "--gate-profile", "strict", "--gate", "min_logit_cosine=1.0", "--no-escalate",
                           "--keep-float", "conv_stem"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "logit_cosine" in proc.stdout and "failed" in proc.stdout
    (row,) = json.loads((out / "index.json").read_text())["artifacts"]
    assert row["gate"] == "failed" and [a["step"] for a in row["attempts"]] == ["as asked"]  # no retry ran
    manifest = _sidecar(row["path"])
    assert manifest.quantization.recipe == "ort" and not manifest.ready
    assert "conv_stem" in manifest.quantization.notes  # --keep-float reached the recipe and the manifest
    config = yaml.safe_load((out / f"{manifest.model_name}.export_config.yaml").read_text())
    assert config["plan"]["escalate"] is False and config["thresholds"]["min_logit_cosine"] == 1.0
    assert config["photos"]["tuning"]["n"] == 0  # --no-escalate with the ort recipe: the plan needs no tuning photos


def test_calibration_and_gate_can_use_several_folders(tiny_run, synthetic_dir, tmp_path):
    from exporters.pipeline import load_inputs
    from training.data.layouts import assign_splits, read_dataset

    limits = dict(calib_limit=8, val_limit=12, tuning_limit=10)
    one = load_inputs(tiny_run.best_checkpoint, tmp_path, synthetic_dir, synthetic_dir, **limits).photos
    two = load_inputs(tiny_run.best_checkpoint, tmp_path, [synthetic_dir] * 2, [synthetic_dir] * 2, **limits).photos
    splits = [s.split for s in assign_splits(read_dataset(synthetic_dir))]
    expected = {"val": min(12, splits.count("val")), "calib": min(8, splits.count("calib")),
                "tuning": min(10, splits.count("train"))}
    assert min(expected.values()) > 0
    assert {k: len(getattr(one, k)) for k in expected} == expected and len(one.val_labels) == expected["val"]
    assert {k: len(getattr(two, k)) for k in expected} == {k: 2 * n for k, n in expected.items()}
    assert len(two.val_labels) == 2 * expected["val"]


@pytest.mark.slow  # ~45 s: PT2E QAT plus TFLite and CoreML conversions
def test_pt2e_formats_escalate_to_quantization_aware_fine_tuning(tiny_artifacts, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from compression.gate import GateThresholds
    from compression.qat import QATConfig
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    # An impossible threshold fails the post-training PT2E artifacts, then their sensitive modules in float; the
    # last retry is PT2E QAT.
    photos = replace(base.inputs.photos, tuning=base.inputs.photos.calib[:8])
    inputs = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds.profile("strict", min_logit_cosine=1.0), photos=photos)
    pipeline = ExportPipeline(inputs, replace(base.plan, qat=QATConfig(steps=2, batch_size=4)), base.reference)
    records = {fmt: pipeline.export(fmt, "int8") for fmt in ("tflite", "coreml")}
    for fmt, record in records.items():
        assert record.status == "ok", record.error
        assert [a.step for a in record.attempts] == ["as asked", "sensitive layers in float",
                                                     "quantization-aware fine-tuning (2 steps)"]
        manifest = _sidecar(record.path)
        assert manifest.quantization.recipe == "pt2e_qat" and manifest.gate.status == "failed"
        assert RUNTIME_FORMATS[fmt].read_embedded_manifest(record.path).gate == manifest.gate
        assert manifest.quantization.target == {"tflite": "litert_xnnpack", "coreml": "apple_ane"}[fmt]
    # Two PT2E calibrations (all integer, sensitive modules float) and one PT2E QAT, each converted by both formats.
    assert len(pipeline.graphs) == 3
    session = open_session(records["tflite"].path, allow_ungated=True)
    logits, _ = session.run(inputs.photos.val)
    assert records["tflite"].parity["agreement"] == _agreement(logits, base.reference.logits)
    interpreter = Interpreter(records["tflite"].path)
    assert [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8 and len(d["shape"]) == 4]
    assert records["tflite"].parity["cam_identity_error"] < 1e-3
    # CoreML on Linux: spec checked, gate judged on the converted QAT torch graph.
    assert records["coreml"].parity["int8_weight_ops"] > 0 and records["coreml"].parity["int8_activation_ops"] > 0


def test_fp16_faces_the_fidelity_gate_and_a_small_val_set_is_insufficient_evidence(tiny_artifacts, tmp_path):
    """FP16 is a reduced-precision artifact like INT8: after its parity check it is judged on referrals, at the
    parent's operating point, on the nuisance draws of the gate set; the fixture's 24 val photos are far below the
    default gate's minimum evidence (600 photos, 150 referable), and devices refuse it."""
    from compression.gate import GateThresholds
    from edge_runtime.backends import open_session
    from edge_runtime.errors import ArtifactError
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    strict = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds())
    record = ExportPipeline(strict, base.plan, base.reference).export("tflite", "fp16")
    assert record.status == "ok", record.error
    manifest = _sidecar(record.path)
    assert record.gate == manifest.gate.status == "insufficient_evidence"
    assert manifest.gate.metrics["n"] == len(base.inputs.photos.val)
    assert f"needs {600 - len(base.inputs.photos.val)} more graded val photos" in manifest.gate.failures[0]
    names = {c.name for c in manifest.gate.criteria}
    assert {"noise_floor", "excess_disagreement", "hard_flips", "score_shift", "sensitivity_difference"} <= names
    assert manifest.gate.metrics["draws"] == 16 and manifest.operating_point == base.inputs.meta.operating_point
    assert {k.split(":")[1] for k in manifest.gate.metrics if k.startswith("folder:")} == {base.inputs.photos.val_folders[0]}
    with pytest.raises(ArtifactError, match="insufficient_evidence"):
        open_session(record.path)
