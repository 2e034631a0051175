"""PT2E W8A8 for the TFLite and CoreML exporters, with ReLU6 observed where TFLite fuses it.

litert-torch's ``PT2EQuantizer`` (like XNNPACK's) annotates conv+ReLU as one partition but treats ``hardtanh``
(ReLU6, what EfficientNet-Lite and MobileNet use) as an op that shares the conv's observer: the clamped tensor
is then quantized over the conv's *pre-clamp* range, often [-40, 30] instead of [0, 6], so ReLU6 networks lose
most of their activation resolution. ONNX Runtime's QDQ quantizer and TFLite's fused RELU6 both quantize after
the clamp. ``ClampAwarePT2EQuantizer`` does the same: a conv whose only user is a non-negative clamp gives its
output observer to the clamp.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

HARDTANH_OPS = ("aten.hardtanh.default", "aten.hardtanh_.default")
CONV_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.convolution.default")


def observe_after_clamp(graph_module) -> int:
    """Move each conv's output observer to the ReLU6-style clamp that alone consumes it; returns how many moved."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    moved = 0
    for clamp in graph_module.graph.nodes:
        if clamp.op != "call_function" or str(clamp.target) not in HARDTANH_OPS:
            continue
        conv = clamp.args[0]
        lower = clamp.args[1] if len(clamp.args) > 1 else clamp.kwargs.get("min_val", -1.0)
        annotation = getattr(conv, "meta", {}).get("quantization_annotation")
        if (str(getattr(conv, "target", "")) not in CONV_OPS or len(conv.users) != 1 or lower < 0
                or annotation is None or annotation.output_qspec is None):
            continue
        clamp.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=annotation.output_qspec,
                                                                       _annotated=True)
        annotation.output_qspec = None  # conv -> clamp stays one float partition, as in conv+ReLU
        moved += 1
    return moved


@lru_cache(maxsize=1)
def _quantizer_class():
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class ClampAwarePT2EQuantizer(PT2EQuantizer):
        """litert-torch's PT2E quantizer, observing conv+ReLU6 after the clamp (module docstring)."""

        def annotate(self, model):
            model = super().annotate(model)
            observe_after_clamp(model)
            return model

    return ClampAwarePT2EQuantizer


def pt2e_quantize(model, calib: np.ndarray, per_channel: bool = True, fold_quantize: bool = False):
    """PT2E W8A8 calibrated on ``calib`` (N x C x S x S): returns (quantized graph module, quantizer).

    ``fold_quantize=False`` keeps weights as float + quantize/dequantize so litert-torch can lower them
    (TOOLCHAIN.md); ``True`` stores int8 weights with only ``dequantize_per_channel``, which coremltools lowers.
    """
    import torch
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _quantizer_class()().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    example = torch.from_numpy(calib[:1]).float()
    exported = torch.export.export(model.eval(), (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i:i + 1]).float())
    return convert_pt2e(prepared, fold_quantize=fold_quantize), quantizer
