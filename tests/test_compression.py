import numpy as np
import pytest

from compression.gate import compare, evaluate_gate
from compression.quantize import QuantRecipe
from edge_runtime.errors import ConfigError


def test_gate_passes_identical_and_reports_how_far_off():
    rng = np.random.default_rng(0)
    logits, cam = rng.normal(size=(50, 5)), rng.normal(size=(50, 5, 4, 4))
    y = logits.argmax(1)
    same = evaluate_gate(compare(logits, cam, logits, cam, y))
    assert same.status == "passed" and same.metrics["agreement"] == 1.0
    flipped = logits.copy()
    flipped[:5] = -flipped[:5]
    result = evaluate_gate(compare(logits, cam, flipped, cam, y))
    assert result.status == "failed"
    assert any(f.startswith("agreement 0.9") and "off by" in f for f in result.failures)


def test_recipe_presets_and_validation():
    assert QuantRecipe.for_target("x86_avx2").weight_type == "uint8"  # U8U8 on AVX2 without VNNI
    assert QuantRecipe.for_target("arm64").weight_type == "int8"
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

    _, _, ctx = tiny_artifacts
    fp32 = export_onnx_fp32(ctx, tmp_path / "m.onnx")
    out = quantize_onnx(fp32, tmp_path / f"m_{recipe}.onnx", ctx.calib[:8], QuantRecipe(recipe))
    graph = onnx.load(str(out)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 5
    if recipe == "ort":
        excluded = quantize_onnx(fp32, tmp_path / "m_ex.onnx", ctx.calib[:8],
                                 QuantRecipe("ort", exclude=("conv_stem", "Conv_")))
        fewer = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(excluded)).graph.node)
        assert fewer < sum(n.op_type == "QuantizeLinear" for n in graph.node)


def test_distillation_reports_student_vs_teacher(tiny_run, synthetic_dir, tmp_path):
    from compression.distill import distill
    from training.config import TrainConfig

    cfg = TrainConfig(model="test_dr_tiny", teacher=str(tiny_run.best_checkpoint), data=(str(synthetic_dir),),
                      pretrained=False, input_size=48, epochs=2, batch_size=16, cam_weight=0.5,
                      out=str(tmp_path / "student"), cache_dir=str(tmp_path / "cache"))
    run, report = distill(cfg, progress=False)
    assert run.best_checkpoint.is_file() and (run.out_dir / "distill_report.json").is_file()
    assert set(report) >= {"student", "teacher", "agreement", "cam_correlation"}
    assert -1 <= report["cam_correlation"] <= 1 and 0 <= report["agreement"] <= 1
