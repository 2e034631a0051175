"""Two repairs around ONNX Runtime's static quantizer for convolution channels whose weights are (nearly) zero.

Folding batch norm into an EfficientNet's convolutions leaves channels whose gamma was trained to about zero with
weights of 1e-7 .. 1e-13 of the layer's largest, and some with exactly zero. The quantizer mishandles both:

* A nearly-zero channel gets a weight scale of the same size, and its bias, quantized to int32 at
  ``activation_scale * weight_scale``, overflows: ONNX Runtime warns "Quantized bias ... exceeds the range of a
  int32" and clips it, so that channel's output (its bias alone) is wrong. :func:`zero_negligible_channels` sets such
  channels to exactly zero in the float graph before quantizing; what they contributed was far below one 8-bit step.
* An all-zero channel gets weight scale 1 and zero point 0, while every other channel of a symmetric uint8 weight has
  zero point 128. Mixed per-channel zero points take MLAS's depthwise convolution off its fast path: a Lite0's
  U8U8 graph ran 7-9x slower than its FP32 twin on an AVX2 CPU (the whole slowdown in 5 of 13 depthwise convolutions).
  :func:`align_dead_channel_zero_points` gives such channels the tensor's common zero point; their quantized weights
  move with it, so they still dequantize to exactly zero and the outputs are unchanged bit for bit.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A channel whose largest |weight| is below this share of the tensor's largest is set to zero before quantizing.
# The channels it finds in a batch-norm-folded Lite0 sit at 1e-7 .. 1e-13; a channel that matters is within a few
# hundred-fold of the largest. Its 8-bit step is 1/127 of the tensor's largest weight, so 1e-5 of it is noise.
NEGLIGIBLE_CHANNEL_SHARE = 1e-5
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm")


def zero_negligible_channels(model_path: Path, share: float = NEGLIGIBLE_CHANNEL_SHARE) -> int:
    """Set every output channel of a Conv / Gemm weight initializer whose largest |weight| is below ``share`` of the
    tensor's largest to exactly zero, in place; returns how many channels were zeroed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    initializers = {init.name: init for init in model.graph.initializer}
    zeroed = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        tensor = initializers[node.input[1]]
        weights = numpy_helper.to_array(tensor)
        if weights.ndim < 2 or not np.issubdtype(weights.dtype, np.floating):
            continue
        # Gemm with transB = 0 keeps output channels on axis 1; Conv and transposed-B Gemm on axis 0.
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if node.op_type == "Gemm" and not trans_b else 0
        peak = np.abs(np.moveaxis(weights, axis, 0)).reshape(weights.shape[axis], -1).max(axis=1)
        negligible = (peak > 0) & (peak < share * peak.max())
        if not negligible.any():
            continue
        fixed = np.moveaxis(weights.copy(), axis, 0)
        fixed[negligible] = 0
        tensor.CopyFrom(numpy_helper.from_array(np.moveaxis(fixed, 0, axis), tensor.name))
        zeroed += int(negligible.sum())
    if zeroed:
        onnx.save(model, str(model_path))
        log.info("zeroed %d convolution channels below %.0e of their layer's largest weight before quantizing",
                 zeroed, share)
    return zeroed


def align_dead_channel_zero_points(model_path: Path) -> int:
    """In a QDQ graph, give every per-channel uint8 weight channel that dequantizes to all zeros (its quantized
    values all equal its zero point) the tensor's most common zero point, in place; returns how many channels moved.
    A channel with any non-zero weight is never touched."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    initializers = {init.name: init for init in model.graph.initializer}
    moved = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        values, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if values is None or zero_point is None:
            continue
        q, zp = numpy_helper.to_array(values), numpy_helper.to_array(zero_point)
        if q.dtype != np.uint8 or zp.ndim != 1 or zp.size < 2 or len(np.unique(zp)) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        channels = np.moveaxis(q, axis, 0).reshape(zp.size, -1)
        counts = np.bincount(zp, minlength=256)
        common = np.uint8(counts.argmax())
        dead = (zp != common) & (channels == zp[:, None]).all(axis=1)
        if not dead.any():
            continue
        channels = channels.copy()
        channels[dead] = common
        zp = zp.copy()
        zp[dead] = common
        shape = np.moveaxis(q, axis, 0).shape
        values.CopyFrom(numpy_helper.from_array(np.moveaxis(channels.reshape(shape), 0, axis), values.name))
        zero_point.CopyFrom(numpy_helper.from_array(zp, zero_point.name))
        moved += int(dead.sum())
    if moved:
        onnx.save(model, str(model_path))
        log.info("gave %d all-zero weight channels their tensor's common zero point", moved)
    return moved
