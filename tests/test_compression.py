import itertools

import numpy as np
import pytest

from compression.gate import GateThresholds, compare, judge
from compression.quantize import QuantRecipe
from edge_runtime.contract import OperatingPoint
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import clopper_pearson_lower


def test_compare_reports_known_fidelity_numbers():
    rng = np.random.default_rng(0)
    logits, cam = rng.normal(size=(50, 5)), rng.normal(size=(50, 5, 4, 4))
    same = compare(logits, cam, logits, cam)
    assert same == {"n": 50.0, "agreement": 1.0, "max_abs_logit_diff": 0.0,
                    "logit_cosine": pytest.approx(1.0), "cam_correlation": pytest.approx(1.0)}
    flipped = logits.copy()
    flipped[:5] = -flipped[:5]  # argmax(-x) = argmin(x): exactly 5 of 50 grades change, cosine -1 on those rows
    different = compare(logits, cam, flipped, cam)
    assert different["agreement"] == 0.9
    assert different["logit_cosine"] == pytest.approx((45 - 5) / 50)
    assert different["max_abs_logit_diff"] == pytest.approx(2 * np.abs(logits[:5]).max())


def test_strict_gate_on_50_photos_asks_for_99_more():
    rng = np.random.default_rng(0)
    logits, cam = rng.normal(size=(50, 5)), rng.normal(size=(50, 5, 4, 4))
    y = logits.argmax(1)
    same = judge(logits, cam, logits, cam, y, OperatingPoint(), GateThresholds.profile("strict"))
    assert same.status == "insufficient_evidence" and same.metrics["val_photos_needed"] == 149
    assert same.failures == (f"referral_agreement lower bound {0.05 ** (1 / 50):.4f} < 0.9800 (off by "
                             f"{0.98 - 0.05 ** (1 / 50):.4f}; value 1.0000, n=50): even perfect agreement needs "
                             "149 val photos; needs 99 more val photos",)


def test_recipe_presets_and_validation():
    assert QuantRecipe.for_target("x86_avx2").weight_type == "uint8"  # U8U8 on AVX2 without VNNI
    assert QuantRecipe.for_target("arm64").weight_type == "int8"
    fast = QuantRecipe.for_target("x86_avx2_fast")
    assert fast.weight_type == "int8" and fast.reduce_range and "reduce_range" in fast.info(8).notes
    with pytest.raises(ConfigError, match="known"):
        QuantRecipe("tensorrt")
    with pytest.raises(ConfigError):
        QuantRecipe(calibration="mse")
    assert QuantRecipe().with_exclusions(("conv_stem",)).info(8).notes


@pytest.mark.parametrize("recipe", ["ort", "nncf"])
def test_onnx_recipes_quantize_and_keep_exclusions(tiny_artifacts, tmp_path, recipe):
    import onnx

    from compression.quantize import quantize_onnx
    from exporters.onnx import export_onnx_fp32

    inputs = tiny_artifacts[2].inputs
    calib = inputs.photos.calib
    fp32 = export_onnx_fp32(inputs, tmp_path / "m.onnx")
    out = quantize_onnx(fp32, tmp_path / f"m_{recipe}.onnx", calib[:8], QuantRecipe(recipe))
    graph = onnx.load(str(out)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 5
    if recipe == "ort":  # the types read back from the graph are the recipe's (int32 biases are not reported)
        from exporters.onnx import qdq_types

        types = qdq_types(out)
        assert (types["activation_type"], types["weight_type"]) == ("uint8", "uint8")
        assert types["float_layers"] == () and types["weighted_layers"] > 0
        convs = sum(n.op_type == "Conv" for n in onnx.load(str(fp32)).graph.node)
        assert types["convolutions"] == types["integer_kernels"] == convs
        # U8S8: the constant bias after the CAM mean is quantized as uint8 too, but it is not a weight.
        u8s8 = quantize_onnx(fp32, tmp_path / "m_u8s8.onnx", calib[:8], QuantRecipe.for_target("x86_vnni"))
        assert (qdq_types(u8s8)["activation_type"], qdq_types(u8s8)["weight_type"]) == ("uint8", "int8")
    if recipe == "ort":
        excluded = quantize_onnx(fp32, tmp_path / "m_ex.onnx", calib[:8],
                                 QuantRecipe("ort", exclude=("conv_stem", "Conv_")))
        fewer = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(excluded)).graph.node)
        assert fewer < sum(n.op_type == "QuantizeLinear" for n in graph.node)
        from exporters.onnx import integer_convs

        assert integer_convs(excluded)[0] < integer_convs(out)[0] == integer_convs(out)[1]


@pytest.mark.slow  # NNCF accuracy control: ~40 s of ranking and retries
def test_accuracy_control_keeps_fp32_grades_on_the_tuning_photos(tiny_artifacts, tmp_path):
    import onnxruntime as ort

    from compression.quantize import AccuracyTarget, quantize_onnx
    from exporters.onnx import export_onnx_fp32, qdq_types

    inputs = tiny_artifacts[2].inputs
    calib, tuning = inputs.photos.calib, inputs.photos.val[:16]
    fp32 = export_onnx_fp32(inputs, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="train split"):
        quantize_onnx(fp32, tmp_path / "none.onnx", calib[:8], QuantRecipe("nncf_ac"))
    out = quantize_onnx(fp32, tmp_path / "ac.onnx", calib[:8], QuantRecipe("nncf_ac"), AccuracyTarget(tuning, 1.0))

    def grades(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"input": tuning})[0].argmax(1)

    assert (grades(out) == grades(fp32)).all()  # the restorer's promise, checked independently of NNCF
    types = qdq_types(out)  # what it left in float is named, and counted against every weighted layer
    assert 0 <= len(types["float_layers"]) <= types["weighted_layers"] and types["integer_kernels"] <= types["convolutions"]
    with pytest.raises(ConfigError, match="min_agreement"):
        AccuracyTarget(tuning, 1.5)


def test_accuracy_target_judges_referrals_at_the_operating_point_and_grades_without_one():
    from compression.quantize import AccuracyTarget
    from edge_runtime.contract import OperatingPoint

    reference = np.array([[4.0, 1.0, 0.0, 0.0, 0.0],    # grade 0, not referable
                          [0.0, 0.0, 4.0, 1.0, 0.0],    # grade 2, referable
                          [0.0, 4.0, 0.0, 0.0, 0.0]])   # grade 1, not referable
    moved = np.array([[1.0, 4.0, 0.0, 0.0, 0.0],        # 0 -> 1: the referral is kept
                      [0.0, 2.0, 4.0, 1.0, 0.0],        # still grade 2, a little less referable
                      [0.0, 0.0, 4.0, 0.0, 0.0]])       # 1 -> 2: now referred
    images = np.zeros((3, 3, 8, 8), np.float32)
    by_referral = AccuracyTarget(images, 0.99, OperatingPoint(rule="sensitivity", target=0.9, threshold=0.5))
    by_grade = AccuracyTarget(images, 0.99)
    assert (by_referral.judges, by_grade.judges) == ("referral", "grade")
    np.testing.assert_array_equal(np.round(by_referral.agreement(reference, moved)), [1, 1, 0])
    np.testing.assert_array_equal(np.round(by_grade.agreement(reference, moved)), [0, 1, 0])
    # The tie-breaker ranks a move of the referable probability lower without outweighing a changed decision.
    kept = by_referral.agreement(reference, moved)[1]
    assert 1.0 - 1e-4 < kept < 1.0
    assert by_referral.agreement(reference, reference).tolist() == [1.0, 1.0, 1.0]


def test_pt2e_quantizes_relu6_after_the_clamp():
    import torch

    from compression.pt2e import pt2e_quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(20)  # a pre-clamp range far wider than ReLU6's [0, 6]
    calib = np.random.default_rng(0).normal(size=(16, 3, 12, 12)).astype(np.float32)
    quantized, _ = pt2e_quantize(model, calib)
    clamp = next(n for n in quantized.graph.nodes if "hardtanh" in str(n.target))
    conv = clamp.args[0]
    assert not any("quantize_per_tensor" in str(u.target) for u in conv.users)  # conv -> clamp stays float inside
    (observer,) = [u for u in clamp.users if "quantize_per_tensor" in str(u.target)]
    assert observer.args[1] <= 6 / 255 * 1.01  # the clamp's [0, 6] range, not the conv's
    x = torch.from_numpy(calib)
    with torch.no_grad():  # the exported graph has batch size 1
        fp32, int8 = model(x), torch.cat([quantized(x[i:i + 1]) for i in range(len(x))])
    assert torch.nn.functional.cosine_similarity(fp32.flatten(), int8.flatten(), dim=0) > 0.999


def test_batch_norm_folding_keeps_outputs():
    import copy

    import torch

    from compression.qat import fold_batch_norms
    from training.models import ExportModule, create_model

    model = create_model("test_dr_tiny").eval()
    for m in model.modules():  # non-trivial statistics, or folding would be an identity either way
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    reference = ExportModule(model)
    folded = fold_batch_norms(copy.deepcopy(reference))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(reference(x), folded(x), strict=True):
            assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.slow  # every escalation step, QAT last: ~60 s
def test_qat_is_the_last_resort_after_mixed_precision(tiny_artifacts, tmp_path):
    from dataclasses import replace

    import onnx

    from compression.gate import GateThresholds
    from compression.qat import QATConfig
    from edge_runtime.contract import ArtifactManifest, manifest_path_for
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    # INT8 logits are never exactly FP32's, so a mean logit cosine of 1.0 is out of reach and every step of the
    # escalation runs:
    # all-INT8 -> sensitive layers in float -> accuracy-controlled mixed precision -> QAT.
    photos = replace(base.inputs.photos, tuning=base.inputs.photos.calib[:8])
    inputs = replace(base.inputs, out_dir=tmp_path, thresholds=GateThresholds.profile("strict", min_logit_cosine=1.0),
                     photos=photos)
    plan = replace(base.plan, qat=QATConfig(steps=2, batch_size=4))
    record = ExportPipeline(inputs, plan, base.reference).export("onnx", "int8")
    assert record.status == "ok"
    assert [a.step.split(" (")[0] for a in record.attempts] == [
        "as asked", "sensitive layers in float", "accuracy-controlled mixed precision", "quantization-aware fine-tuning"]
    assert [a.recipe for a in record.attempts][-1] == "qat" and record.gate_result == record.attempts[-1].gate
    manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
    assert manifest.quantization.recipe == "qat" and manifest.gate.status == "failed"
    assert "int8" in manifest.quantization.weight_type
    graph = onnx.load(record.path).graph
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops  # BN folded before fake quantization
    # Fake-quantized weights are stored as int8 (folded), not as float + QuantizeLinear.
    stored = {t.name for t in graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in stored for n in graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer)
    cosine = next(c for c in manifest.gate.criteria if c.name == "logit_cosine")
    assert cosine.value == record.parity["logit_cosine"] < 1.0 and cosine.passed is False
    assert cosine.margin == pytest.approx(cosine.value - 1.0)
    assert any(f.startswith("logit_cosine ") for f in manifest.gate.failures)
    grade = next(c for c in manifest.gate.criteria if c.name == "grade_agreement")  # reported with its exact bound
    n = len(base.inputs.photos.val)
    agreeing = round(record.parity["agreement"] * n)
    assert (grade.n, grade.value, grade.passed) == (n, agreeing / n, None)
    assert grade.bound == pytest.approx(clopper_pearson_lower(agreeing, n))
    assert record.parity["cam_identity_error"] < 1e-3


def test_fidelity_fine_tuning_pulls_a_perturbed_copy_back_to_fp32():
    import copy

    import torch

    from compression.qat import QATConfig, fine_tune_towards

    class CamNet(torch.nn.Module):  # inputs -> (logits, cam), like ExportModule
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.Conv2d(8, 5, 1))

        def forward(self, x):
            cam = self.features(x)
            return cam.mean((2, 3)), cam

    torch.manual_seed(0)
    reference = CamNet().eval()
    student = copy.deepcopy(reference)
    with torch.no_grad():  # stands in for quantization error: every weight off by about 20 %
        for p in student.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn_like(p))
    images = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    x = torch.from_numpy(images)

    def distance() -> float:
        with torch.no_grad():
            (a, cam_a), (b, cam_b) = reference(x), student(x)
        return float(((a - b) ** 2).mean() + ((cam_a - cam_b) ** 2).mean())

    before = distance()
    fine_tune_towards(reference, student, images, QATConfig(steps=60, batch_size=8, lr=3e-3), progress=False)
    assert distance() < 0.5 * before



def test_fidelity_fine_tuning_holds_a_dme_head_too():
    """A DME model's export module has four outputs: QAT unpacks them and pulls the DME logit back to FP32 as well."""
    import copy

    import torch

    from compression.qat import QATConfig, fine_tune_towards

    class DmeCamNet(torch.nn.Module):  # inputs -> (logits, cam, dme_logit, dme_cam), like ExportModule with a DME head
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.Conv2d(8, 6, 1))

        def forward(self, x):
            cam = self.features(x)
            return cam[:, :5].mean((2, 3)), cam[:, :5], cam[:, 5:].mean((2, 3)), cam[:, 5:]

    torch.manual_seed(0)
    reference = DmeCamNet().eval()
    student = copy.deepcopy(reference)
    with torch.no_grad():
        student.features[2].bias[5] += 2.0  # only the DME output is off
    images = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    x = torch.from_numpy(images)

    def dme_distance() -> float:
        with torch.no_grad():
            return float(((reference(x)[2] - student(x)[2]) ** 2).mean())

    before = dme_distance()
    cfg = QATConfig(steps=60, batch_size=8, lr=3e-3, margin_weight=1.0, referral_threshold=0.5, dme_threshold=0.4)
    fine_tune_towards(reference, student, images, cfg, progress=False)
    assert dme_distance() < 0.5 * before


@pytest.mark.slow  # torch.export + PT2E QAT preparation: ~30 s
def test_pt2e_qat_gives_a_fake_quantized_graph_for_any_batch():
    import torch

    from compression.pt2e import pt2e_qat
    from compression.qat import QATConfig
    from training.models import ExportModule, create_model

    torch.manual_seed(0)
    module = ExportModule(create_model("test_dr_tiny").eval())
    rng = np.random.default_rng(0)
    calib, train = (rng.normal(size=(n, 3, 48, 48)).astype(np.float32) for n in (8, 16))
    quantized, quantizer = pt2e_qat(module, calib, train, QATConfig(steps=2, batch_size=4), progress=False)
    targets = [str(n.target) for n in quantized.graph.nodes]
    assert any("quantize_per_tensor" in t for t in targets) and any("quantize_per_channel" in t for t in targets)
    assert not any("batch_norm" in t for t in targets)  # folded before fake quantization
    x = torch.from_numpy(calib[:3])
    with torch.no_grad():
        logits, cam = quantized(x)
        ref_logits, _ = module(x)
    assert logits.shape == (3, 5) and cam.shape[:2] == (3, 5)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0) > 0.99
    with pytest.raises(ConfigError, match="train split"):
        pt2e_qat(module, calib, train[:0], QATConfig(steps=2), progress=False)


def test_margin_aware_referral_loss_weights_photos_near_the_threshold():
    import torch

    from compression.errors import QuantizationConfigError
    from compression.qat import QATConfig, margin_aware_referral_loss, referable_log_odds

    cfg = QATConfig(margin_weight=1.0, referral_threshold=0.5)
    # Two photos: FP32 P(referable) = 0.5 (at the threshold) and ~0.999 (far from it); the same error in the
    # log-odds costs 10x more at the threshold.
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0, -100.0], [0.0, 0.0, 8.0, -100.0, -100.0]])
    near = torch.tensor([[0.0, 0.0, 0.5, 0.0, -100.0]])
    odds = referable_log_odds(ref, 1.0)
    assert odds[0].item() == pytest.approx(0.0, abs=1e-6) and odds[1].item() > 6
    loss_near = margin_aware_referral_loss(near, ref[:1], cfg)
    diff = (referable_log_odds(near, 1.0) - odds[:1]).item()
    assert loss_near.item() == pytest.approx(10 * diff ** 2, rel=1e-5)  # weight 1 + 9 at the threshold
    far_ref, far = ref[1:], ref[1:].clone()
    far[0, 2] += 1.0
    far_diff = (referable_log_odds(far, 1.0) - odds[1:]).item()
    far_weight = 1 + 9 * torch.exp(-odds[1].abs()).item()
    assert margin_aware_referral_loss(far, far_ref, cfg).item() == pytest.approx(far_weight * far_diff ** 2, rel=1e-4)
    assert far_weight < 1.02
    with pytest.raises(QuantizationConfigError, match="referral_threshold"):
        QATConfig(margin_weight=1.0)
    with pytest.raises(QuantizationConfigError, match="dme_threshold"):
        QATConfig(dme_threshold=1.0)


def test_qat_cosine_schedule_decays_the_rate_to_zero_and_margins_follow_the_operating_point():
    import torch
    from torch import nn

    from compression.errors import QuantizationConfigError
    from compression.qat import QATConfig, fine_tune_towards
    from edge_runtime.contract import OperatingPoint

    class TwoOutputs(nn.Module):  # (logits, cam) like ExportModule
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            cam = self.conv(x)
            return cam.mean((2, 3)), cam

    images = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)

    def step_sizes(schedule: str) -> list[float]:
        """The largest weight change of each of 4 Adam steps (Adam's steps are ~lr whatever the gradient)."""
        torch.manual_seed(0)
        reference, student = TwoOutputs(), TwoOutputs()
        snapshots: list[torch.Tensor] = []
        fine_tune_towards(reference, student, images, QATConfig(steps=4, batch_size=4, lr=1e-2, schedule=schedule),
                          progress=False, on_step=lambda _: snapshots.append(student.conv.weight.detach().clone()))
        snapshots.append(student.conv.weight.detach().clone())
        return [float((b - a).abs().max()) for a, b in itertools.pairwise(snapshots)]

    cosine, constant = step_sizes("cosine"), step_sizes("constant")
    assert cosine[0] == pytest.approx(constant[0]) and cosine[0] == pytest.approx(1e-2, rel=0.05)
    assert cosine[-1] < 0.3 * cosine[0] and constant[-1] > 0.5 * constant[0]
    with pytest.raises(QuantizationConfigError, match="schedule"):
        QATConfig(schedule="linear")
    point = OperatingPoint(threshold=0.3, temperature=0.8)
    cfg = QATConfig().holding_margins(2.0, point)
    assert (cfg.margin_weight, cfg.referral_threshold, cfg.referral_temperature, cfg.dme_threshold) == (2.0, 0.3, 0.8, None)
