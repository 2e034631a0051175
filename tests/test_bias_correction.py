"""Empirical output-bias correction of INT8 (compression.bias_correction): a constructed shift is measured and removed,
it is measured on the calib photos only, every INT8 format applies it and records it, and the gate's controls still
come out as they must when the candidate is corrected."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from compression.bias_correction import (
    BiasCorrectionError,
    correct_output_bias,
    corrected_model,
    measure_shift,
    photo_ids,
)
from compression.errors import QuantizationConfigError
from compression.quantize import QuantRecipe
from edge_runtime.backends.base import HeadOutputs
from edge_runtime.contract import ArtifactManifest, BiasCorrectionInfo, OperatingPoint, manifest_path_for


def _sidecar(path) -> ArtifactManifest:
    return ArtifactManifest.from_json(manifest_path_for(path).read_text())


def _torch_runner(model):
    import torch

    @torch.no_grad()
    def run(x: np.ndarray) -> HeadOutputs:
        return HeadOutputs(*(o.numpy() for o in model.eval().forward_outputs(torch.from_numpy(x).float())))

    return run


STEP = 0.02  # grid of the constructed quantizer
ZERO_POINT_ERROR = 5  # its zero point is off by this many steps: every feature reads 0.1 high


def offset_quantize(model):
    """A constructed quantizer with a known bias: the final feature map rounded onto a grid of STEP whose zero point
    is off by ZERO_POINT_ERROR steps, so every feature reads OFFSET high and logit k moves by OFFSET * sum_j W[k, j]
    (plus rounding noise): the systematic output error Nagel et al. correct, made known on purpose."""
    import torch

    quantized = copy.deepcopy(model).eval()
    features = quantized.backbone.forward_features
    quantized.backbone.forward_features = lambda x: (torch.round(features(x) / STEP) + ZERO_POINT_ERROR) * STEP
    return quantized, _torch_runner(quantized)


OFFSET = ZERO_POINT_ERROR * STEP


@pytest.fixture(scope="module")
def tiny_dme_model():
    import torch

    from training.models import create_model

    torch.manual_seed(0)
    return create_model("test_dr_tiny", heads=("grade", "dme")).eval()


def _photos(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 64, 64)).astype(np.float32)


# ---------------------------------------------------------------- the recipe option
def test_the_option_is_typed_named_and_kept_out_of_the_graph_cache_key():
    from exporters.formats import pt2e_recipe

    plain = QuantRecipe.for_target("x86_vnni")
    corrected = plain.with_bias_correction()
    assert not plain.bias_correction and corrected.bias_correction and corrected.bias_correction_passes == 1
    assert "output biases corrected on the calibration photos (1 pass)" in corrected.notes()
    assert plain.with_bias_correction(2).notes().endswith("(2 passes)")
    # One calibrated graph of one FP32 model serves both: the correction changes the model, not its quantization.
    assert corrected.quantization_key == plain.quantization_key
    assert pt2e_recipe(corrected, "litert_xnnpack").bias_correction  # TFLite and CoreML carry the option
    for bad in ({"bias_correction": "yes"}, {"bias_correction_passes": 0}, {"bias_correction_passes": 4},
                {"bias_correction_passes": True}):
        with pytest.raises(QuantizationConfigError, match="bias_correction"):
            QuantRecipe(**bad)


# ---------------------------------------------------------------- a constructed shift
@pytest.mark.parametrize("grade_head", ["softmax", "ordinal"])
def test_a_constructed_logit_shift_is_measured_on_calib_and_removed(grade_head):
    import torch

    from training.models import create_model

    torch.manual_seed(1)
    model = create_model("test_dr_tiny", heads=("grade", "dme"), grade_head=grade_head).eval()
    calib, held_out = _photos(48, 0), _photos(48, 1)
    fp32 = _torch_runner(model)
    expected = {"logits": OFFSET * model.head.weight.detach().numpy().sum(1),
                "dme_logit": OFFSET * model.dme_head.weight.detach().numpy().sum(1)}
    before = measure_shift(fp32(held_out), offset_quantize(model)[1](held_out))
    for name in expected:  # the constructed quantizer shifts every logit by its known amount
        np.testing.assert_allclose(before[name], expected[name], rtol=0.1, atol=2e-3)
    assert np.abs(before["logits"]).max() > 0.05  # a shift worth correcting

    done = correct_output_bias(model, offset_quantize, offset_quantize(model), fp32, calib, gate_photos=held_out,
                               fingerprint="calib-set")
    after = measure_shift(fp32(held_out), _torch_runner(done.artifact)(held_out))  # the quantized corrected model
    for name in expected:  # measured on calib, it removes >= 90% of the shift on other photos
        assert np.abs(after[name]).max() < 0.1 * np.abs(before[name]).max(), (name, before[name], after[name])
    info = done.info
    assert info.passes == 1 and info.split == "calib" and info.n == 48 and info.fingerprint == "calib-set"
    assert info.photo_ids == photo_ids(calib) and not set(info.photo_ids) & set(photo_ids(held_out))
    np.testing.assert_allclose(info.subtracted["logits"], info.measured[0]["logits"])
    np.testing.assert_allclose(info.subtracted["logits"], expected["logits"], rtol=0.1, atol=2e-3)
    assert max(abs(v) for v in info.residual["logits"]) < 0.1 * max(abs(v) for v in info.subtracted["logits"])
    # Only the biases moved: the CAMs (and so the CAM identity) are the FP32 model's.
    original, fixed = _torch_runner(model)(held_out), _torch_runner(done.model)(held_out)
    np.testing.assert_array_equal(original.cam, fixed.cam)
    np.testing.assert_allclose(fixed.logits - original.logits, -np.broadcast_to(info.subtracted["logits"], (48, 5)),
                               atol=1e-5)


def test_a_second_pass_measures_what_the_first_left(tiny_dme_model):
    calib = _photos(32, 2)
    fp32 = _torch_runner(tiny_dme_model)
    done = correct_output_bias(tiny_dme_model, offset_quantize, offset_quantize(tiny_dme_model), fp32, calib, passes=2)
    info = done.info
    assert info.passes == 2 and len(info.measured) == 2
    total = np.add(info.measured[0]["logits"], info.measured[1]["logits"])
    np.testing.assert_allclose(info.subtracted["logits"], total)
    assert np.abs(info.measured[1]["logits"]).max() < 0.1 * np.abs(info.measured[0]["logits"]).max()


def test_it_is_never_measured_on_the_gate_set(tiny_dme_model):
    calib, val = _photos(16, 3), _photos(16, 4)
    fp32 = _torch_runner(tiny_dme_model)
    first = offset_quantize(tiny_dme_model)
    with pytest.raises(BiasCorrectionError, match="2 of the 16 calibration photos are also gate photos"):
        correct_output_bias(tiny_dme_model, offset_quantize, first, fp32, calib, gate_photos=np.concatenate([val, calib[:2]]))
    with pytest.raises(BiasCorrectionError, match="none were given"):
        correct_output_bias(tiny_dme_model, offset_quantize, first, fp32, calib[:0])
    # Only the calib photos reach the runners.
    seen: list[tuple[str, ...]] = []

    def spying(quantize):
        def wrapped(model):
            artifact, run = quantize(model)
            return artifact, lambda x: (seen.append(photo_ids(x)), run(x))[1]
        return wrapped

    correct_output_bias(tiny_dme_model, spying(offset_quantize), spying(offset_quantize)(tiny_dme_model), fp32, calib,
                        gate_photos=val)
    assert seen and all(ids == photo_ids(calib) for ids in seen)


def test_a_missing_head_or_broken_output_is_an_error(tiny_dme_model):
    from training.models import create_model

    calib = _photos(4, 5)
    fp32 = _torch_runner(tiny_dme_model)(calib)
    with pytest.raises(BiasCorrectionError, match="no 'dme_logit'"):
        measure_shift(fp32, replace(fp32, dme_logit=None))
    with pytest.raises(BiasCorrectionError, match="non-finite"):
        measure_shift(fp32, replace(fp32, logits=fp32.logits * np.nan))
    with pytest.raises(BiasCorrectionError, match="no head for 'dme_logit'"):
        corrected_model(create_model("test_dr_tiny"), {"dme_logit": np.zeros(1)})


def test_the_manifest_record_round_trips_and_validates():
    from edge_runtime.contract import QuantizationInfo
    from edge_runtime.errors import ManifestError

    info = BiasCorrectionInfo(1, {"logits": [0.1] * 5}, ({"logits": [0.1] * 5},), {"logits": [0.0] * 5}, "calib", 2,
                              "abc", ("a", "b"))
    manifest = ArtifactManifest(model_name="m", model_version="v", format="onnx",
                                quantization=QuantizationInfo("int8", "ort", bias_correction=info))
    loaded = ArtifactManifest.from_json(manifest.to_json())
    assert loaded.quantization.bias_correction == info and loaded == manifest
    old = ArtifactManifest(model_name="m", model_version="v", format="onnx").to_dict()
    old["schema_version"], old["quantization"] = 4, {"precision": "int8", "recipe": "ort"}
    assert ArtifactManifest.from_dict(old).quantization.bias_correction is None  # older manifests still load
    with pytest.raises(ManifestError, match="2 measured shifts for 1 passes"):
        BiasCorrectionInfo(1, {}, ({}, {}), {})
    with pytest.raises(ManifestError, match="3 photo ids for n=2"):
        BiasCorrectionInfo(1, {}, ({},), {}, n=2, photo_ids=("a", "b", "c"))


# ---------------------------------------------------------------- the gate's controls, candidates corrected
def test_the_gates_controls_still_behave_when_the_candidate_is_corrected():
    """On constructed draws (tests/test_noise_floor_gate.py): the systematic upward shift the default student's
    TFLite and CoreML INT8 showed fails and, corrected on separate calib photos, passes; the FP32 re-export still
    passes, a collapsed INT8 (calibrated on black frames) and a threshold moved by 0.1 still fail."""
    from tests.test_noise_floor_gate import AT_HALF, failed, gate_inputs, logits_of, run_gate

    y, s, noise, gate_set = gate_inputs(seed=4)
    rng = np.random.default_rng(11)
    calib = np.where(rng.random(400) < 0.3, 1.5, -1.5) + rng.normal(0, 1.2, 400)  # other photos, same model

    def correct(int8_on_calib: np.ndarray, int8_on_gate: np.ndarray) -> np.ndarray:
        shift = measure_shift(HeadOutputs(logits_of(calib), None), HeadOutputs(logits_of(int8_on_calib), None))
        assert np.allclose(shift["logits"][[0, 1, 3, 4]], 0)  # only the referable logit of logits_of moves
        return int8_on_gate - shift["logits"][2]

    up = 0.6 * 0.3  # +0.6 sigma_W on every photo: it refers more
    shifted = s + up + rng.normal(0, 0.02, s.shape)
    assert "score_shift" in failed(run_gate(y, s, noise, gate_set, shifted))
    fixed = correct(calib + up + rng.normal(0, 0.02, calib.shape), shifted)
    gate = run_gate(y, s, noise, gate_set, fixed)
    assert gate.status == "passed", gate.failures

    reexport = s + rng.normal(0, 1e-4, s.shape)
    gate = run_gate(y, s, noise, gate_set, correct(calib + rng.normal(0, 1e-4, calib.shape), reexport), noise)
    assert gate.status == "passed", gate.failures

    def collapse(v):
        return 0.2 + 0.05 * v

    gate = run_gate(y, s, noise, gate_set, correct(collapse(calib), collapse(s)), 0.05 * noise)
    assert gate.status == "failed" and "excess_disagreement" in failed(gate)

    # The threshold control moves the point, not the logits: the correction measures nothing and it still fails.
    gate = run_gate(y, s, noise, gate_set, correct(calib, s), point=OperatingPoint(threshold=0.6), ref_point=AT_HALF)
    assert gate.status == "failed" and "excess_disagreement" in failed(gate)


# ---------------------------------------------------------------- every INT8 format, through the export pipeline
def _shift_on(photos, run_artifact, pipeline) -> dict[str, np.ndarray]:
    """Mean artifact - FP32 on ``photos``, FP32 as the pipeline runs it (the checkpoint, through ONNX Runtime)."""
    return measure_shift(pipeline._fp32_runner(photos), run_artifact(photos))


@pytest.mark.parametrize("fmt, target", [
    ("onnx", "x86_vnni"), ("onnx", "x86_avx2"),
    pytest.param("tflite", "x86_avx2", marks=pytest.mark.slow),  # ~60 s: two litert-torch conversions
])
def test_every_int8_format_is_corrected_on_the_calib_photos_and_says_so(tiny_artifacts, tmp_path, fmt, target):
    from edge_runtime.backends import open_session
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    inputs = replace(base.inputs, out_dir=tmp_path)
    photos = inputs.photos
    recipe = QuantRecipe.for_target(target)
    fixture = tiny_artifacts[0][(fmt, "int8")]  # the fixture's plan made the uncorrected artifact of its recipe
    plain = fixture if recipe == base.plan.recipe and [a.step for a in fixture.attempts] == ["as asked"] else \
        ExportPipeline(replace(inputs, name="plain"), replace(base.plan, recipe=recipe, escalate=False),
                       base.reference).export(fmt, "int8")
    pipeline = ExportPipeline(inputs, replace(base.plan, recipe=recipe.with_bias_correction(), escalate=False),
                              base.reference)
    record = pipeline.export(fmt, "int8")
    assert plain.status == record.status == "ok", record.error
    quantization = _sidecar(record.path).quantization
    info = quantization.bias_correction
    assert info is not None and "output biases corrected" in quantization.notes
    assert info.split == "calib" and info.n == len(photos.calib) and info.fingerprint == photos.digest("calib")
    assert info.photo_ids == photo_ids(photos.calib) and not set(info.photo_ids) & set(photo_ids(photos.val))
    assert set(info.subtracted) == {"logits"} and len(info.subtracted["logits"]) == 5
    assert _sidecar(plain.path).quantization.bias_correction is None
    # The first shift is the uncorrected artifact's on the calib photos; the residual is the standing artifact's.
    first = _shift_on(photos.calib, open_session(plain.path, allow_ungated=True).run_heads, pipeline)
    np.testing.assert_allclose(info.measured[0]["logits"], first["logits"], atol=1e-6)
    standing = open_session(record.path, allow_ungated=True).run_heads
    np.testing.assert_allclose(info.residual["logits"], _shift_on(photos.calib, standing, pipeline)["logits"],
                               atol=1e-6)
    # The correction is in the file: on the calib photos the corrected artifact sits lower by about what was taken off.
    moved = standing(photos.calib).logits.mean(0) - open_session(plain.path, allow_ungated=True).run_heads(
        photos.calib).logits.mean(0)
    np.testing.assert_allclose(moved, -np.asarray(info.subtracted["logits"]), atol=0.05 + 0.5 * np.abs(first["logits"]).max())
    assert np.abs(info.residual["logits"]).max() <= np.abs(first["logits"]).max() + 1e-3


@pytest.mark.slow  # ~25 s: two coremltools conversions and two twins
def test_coreml_w8a8_is_corrected_with_one_onnx_twin_per_export(tiny_artifacts, tmp_path, monkeypatch):
    """CoreML cannot run on Linux: the correction runs the quantized graph's ONNX twin, the one its exporter made,
    which the gate then judges too; one twin per CoreML INT8 export (two here: first and corrected)."""
    import exporters.coreml as coreml
    from exporters.pipeline import ExportPipeline

    twins: list[str] = []
    make_twin = coreml.simulated_runner

    def counted(quantized, example, twin_path):
        twins.append(twin_path.name)
        return make_twin(quantized, example, twin_path)

    monkeypatch.setattr(coreml, "simulated_runner", counted)
    base = tiny_artifacts[2]
    inputs = replace(base.inputs, out_dir=tmp_path)
    pipeline = ExportPipeline(inputs, replace(base.plan, recipe=base.plan.recipe.with_bias_correction(), escalate=False),
                              base.reference)
    record = pipeline.export("coreml", "int8")
    assert record.status == "ok", record.error
    assert len(twins) == 2, twins  # the first quantization and the corrected one; the gate made none of its own
    info = _sidecar(record.path).quantization.bias_correction
    assert info is not None and info.n == len(inputs.photos.calib)
    assert not set(info.photo_ids) & set(photo_ids(inputs.photos.val))
    run = pipeline.runners[("coreml", "int8")]  # the standing twin, for callers that run it again
    np.testing.assert_allclose(info.residual["logits"], _shift_on(inputs.photos.calib, run, pipeline)["logits"],
                               atol=1e-6)
    assert record.parity["agreement"] == float((run(inputs.photos.val).logits.argmax(1)
                                                == base.reference.logits.argmax(1)).mean())


def test_a_coreml_int8_export_makes_one_onnx_twin(tiny_artifacts, tmp_path, monkeypatch):
    """The exporter's twin gives the val outputs and runs the gate's nuisance draws: one export of it, not two."""
    import exporters.coreml as coreml
    from compression.gate import GateThresholds
    from compression.noise_floor import NuisanceModel
    from exporters.pipeline import ExportPipeline

    twins = []
    make_twin = coreml.simulated_runner
    monkeypatch.setattr(coreml, "simulated_runner", lambda *a: (twins.append(a[2].name), make_twin(*a))[1])
    base = tiny_artifacts[2]
    inputs = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds(min_draws=2))
    pipeline = ExportPipeline(inputs, replace(base.plan, escalate=False, nuisance=NuisanceModel(draws=2)),
                              base.reference)
    record = pipeline.export("coreml", "int8")
    assert record.status == "ok", record.error
    assert _sidecar(record.path).gate.metrics["draws"] == 2  # the gate ran the draws (on 24 photos: not enough)
    assert len(twins) == 1, twins
    assert ("coreml", "int8") in pipeline.runners
