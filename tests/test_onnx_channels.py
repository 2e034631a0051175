"""Batch-norm-folded convolutions leave dead and nearly-dead channels; the ONNX INT8 recipe must keep their biases
exact and every weight tensor on one zero point (else the biases overflow int32 and depthwise kernels slow down)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compression.onnx_channels import align_dead_channel_zero_points, zero_negligible_channels
from compression.quantize import QuantRecipe, quantize_onnx

DEAD, NEARLY_DEAD = 2, 5


class FoldedConvs(torch.nn.Module):
    """A convolution and a depthwise one with a dead channel and a nearly-dead one (weights 1e-9 of the rest), both
    with sizeable biases, as batch-norm folding leaves them; outputs each channel's spatial mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        with torch.no_grad():
            for conv in (self.conv, self.depthwise):
                conv.weight[DEAD] = 0.0
                conv.weight[NEARLY_DEAD] *= 1e-9
                conv.bias[DEAD], conv.bias[NEARLY_DEAD] = 0.7, 1.3

    def forward(self, x):
        return self.depthwise(torch.relu(self.conv(x))).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("channels") / "fp32.onnx"
    torch.onnx.export(FoldedConvs().eval(), torch.rand(1, 3, 16, 16), str(path), input_names=["input"],
                      output_names=["out"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return path


def _initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("target", ["x86_avx2", "x86_vnni"])
def test_int8_keeps_dead_channels_exact_and_one_zero_point(fp32_model, tmp_path, target):
    rng = np.random.default_rng(0)
    calib, x = rng.random((16, 3, 16, 16), dtype=np.float32), rng.random((4, 3, 16, 16), dtype=np.float32)
    int8 = quantize_onnx(fp32_model, tmp_path / "int8.onnx", calib, QuantRecipe.for_target(target))
    values = _initializers(int8)
    biases = [v for v in values.values() if v.dtype == np.int32]
    assert biases and all(np.abs(b.astype(np.int64)).max() < 2**31 - 1 for b in biases), "an int32 bias saturated"
    for name, zp in values.items():
        if name.endswith("zero_point") and zp.ndim == 1 and zp.size > 1:
            assert len(np.unique(zp)) == 1, f"{name} mixes zero points {np.unique(zp)}"
    expected, got = _run(fp32_model, x), _run(int8, x)
    # the dead and nearly-dead channels output their biases; a clipped int32 bias would put them far off
    np.testing.assert_allclose(got[:, [DEAD, NEARLY_DEAD]], expected[:, [DEAD, NEARLY_DEAD]], atol=0.05)
    assert np.abs(got - expected).max() < 0.1


def test_zeroing_touches_only_negligible_channels(fp32_model, tmp_path):
    path = tmp_path / "copy.onnx"
    path.write_bytes(fp32_model.read_bytes())
    before = _initializers(path)
    assert zero_negligible_channels(path) == 2  # the nearly-dead channel of each convolution; dead ones stay zero
    after = _initializers(path)
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(changed) == 2
    for name in changed:
        assert np.all(after[name][NEARLY_DEAD] == 0)
        keep = [c for c in range(8) if c != NEARLY_DEAD]
        np.testing.assert_array_equal(after[name][keep], before[name][keep])
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(_run(path, x), _run(fp32_model, x), atol=1e-6)


def test_alignment_leaves_outputs_bit_identical(fp32_model, tmp_path):
    """Quantized without the alignment (as ONNX Runtime writes it), then aligned: identical outputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = np.random.default_rng(2).random((8, 3, 16, 16), dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"input": calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.items, None)

    raw = tmp_path / "raw.onnx"
    quantize_static(str(fp32_model), str(raw), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, per_channel=True,
                    extra_options={"WeightSymmetric": True})
    mixed = [zp for n, zp in _initializers(raw).items() if n.endswith("zero_point") and zp.size > 1]
    assert any(len(np.unique(zp)) > 1 for zp in mixed), "ONNX Runtime no longer mixes zero points: drop the repair"
    aligned = tmp_path / "aligned.onnx"
    aligned.write_bytes(raw.read_bytes())
    assert align_dead_channel_zero_points(aligned) == 2
    x = np.random.default_rng(3).random((4, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(_run(aligned, x), _run(raw, x))
