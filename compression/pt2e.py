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


def module_source(node) -> tuple[str, str]:
    """(dotted path, class name) of the innermost module whose forward ran ``node`` (the root's path is "");
    ("", "") outside any."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    # The class is stored as a type or as its qualified name ("pkg.mod.DRClassifier" or "<class '...'>").
    return path, getattr(kind, "__name__", None) or str(kind).strip("<>'").rsplit(".", 1)[-1]


def runs_in(node, patterns: tuple[str, ...]) -> bool:
    """Whether ``node`` belongs to a module ``patterns`` name: a pattern is a substring of the module's dotted path
    (followed by a dot, so ".se." matches the squeeze-excite module itself) or the class name of the module
    whose own forward ran the op (``ExportModule``: the CAM head, which is no module of its own)."""
    path, kind = module_source(node)
    return any(p in path + "." or p == kind for p in patterns)


def keep_in_float(graph_module, patterns: tuple[str, ...]) -> list[str]:
    """Drop the quantization annotations of the ops that run in ``patterns``' modules, and of every op that shared
    an observer with them (a ReLU6 after an excluded conv), so those ops stay float between quantized neighbours.
    Returns the float ops' names."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    if not patterns:
        return []
    annotated = [n for n in graph_module.graph.nodes if n.meta.get("quantization_annotation") is not None]
    floated = {n for n in annotated if runs_in(n, patterns)}

    def shares_with_float(node) -> bool:
        annotation = node.meta["quantization_annotation"]
        for spec in [annotation.output_qspec, *annotation.input_qspec_map.values()]:
            if isinstance(spec, SharedQuantizationSpec):
                edge = spec.edge_or_node
                if any(part in floated for part in (edge if isinstance(edge, tuple) else (edge,))):
                    return True
        return False

    grown = True
    while grown:
        more = {n for n in annotated if n not in floated and shares_with_float(n)}
        floated |= more
        grown = bool(more)
    for node in floated:
        del node.meta["quantization_annotation"]
    return sorted(n.name for n in floated)


@lru_cache(maxsize=1)
def _quantizer_class():
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class ClampAwarePT2EQuantizer(PT2EQuantizer):
        """litert-torch's PT2E quantizer, observing conv+ReLU6 after the clamp and leaving the modules
        ``float_modules`` names unannotated (module docstring)."""

        float_modules: tuple[str, ...] = ()

        # QAT folds BatchNorms before export (pt2e_qat), so conv+BN patterns cannot match; and litert-torch
        # 0.10 builds them by passing a plain function to torch.export, which torch 2.14 rejects (ValueError).
        STATIC_QAT_ONLY_OPS: list[str] = []

        def annotate(self, model):
            model = super().annotate(model)
            keep_in_float(model, self.float_modules)  # first: an excluded conv then hands no observer to its clamp
            observe_after_clamp(model)
            return model

    return ClampAwarePT2EQuantizer


def _quantizer(per_channel: bool, is_qat: bool = False, float_modules: tuple[str, ...] = ()):
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    quantizer = _quantizer_class()()
    quantizer.float_modules = tuple(float_modules)
    return quantizer.set_global(get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat))


def pt2e_calibrate(model, calib: np.ndarray, per_channel: bool = True, float_modules: tuple[str, ...] = ()):
    """Export ``model`` with PT2E and observe activations on ``calib`` (N x C x S x S): returns (the calibrated,
    not yet converted, graph module, quantizer). The graph is specialised to batch 1, like the converted models.
    ``float_modules``: module patterns kept in float (``runs_in``)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    quantizer = _quantizer(per_channel, float_modules=float_modules)
    example = torch.from_numpy(calib[:1]).float()
    exported = torch.export.export(model.eval(), (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i:i + 1]).float())
    return prepared, quantizer


def pt2e_quantize(model, calib: np.ndarray, per_channel: bool = True, fold_quantize: bool = False):
    """PT2E W8A8 calibrated on ``calib`` (N x C x S x S): returns (quantized graph module, quantizer).

    ``fold_quantize=False`` keeps weights as float + quantize/dequantize so litert-torch can lower them
    (TOOLCHAIN.md); ``True`` stores int8 weights with only ``dequantize_per_channel``, which coremltools lowers.
    """
    prepared, quantizer = pt2e_calibrate(model, calib, per_channel)
    return convert_prepared(prepared, fold_quantize), quantizer


def pt2e_qat(model, calib: np.ndarray, train_images: np.ndarray, cfg=None, per_channel: bool = True,
             fold_quantize: bool = False, progress: bool = True):
    """PT2E quantization-aware fine-tuning towards FP32, the TFLite/CoreML counterpart of ``qat.fidelity_qat``.

    Returns (converted graph module, quantizer) like ``pt2e_quantize``; the graph takes any batch size.
    ``pt2e_qat_train`` and ``convert_prepared`` are its two halves, for converting one fine-tuned graph twice.
    """
    trained, quantizer = pt2e_qat_train(model, calib, train_images, cfg, per_channel, progress)
    return convert_prepared(trained, fold_quantize), quantizer


def pt2e_qat_train(model, calib: np.ndarray, train_images: np.ndarray, cfg=None, per_channel: bool = True,
                   progress: bool = True, float_modules: tuple[str, ...] = ()):
    """Fake-quantize ``model`` (inputs -> (logits, cam)) with PT2E and fine-tune it towards its FP32 outputs on
    ``train_images``; returns (the trained, not yet converted, graph module, quantizer).

    BatchNorms are folded first and the graph is exported in eval mode, so the fake-quantized copy has plain
    convolutions (what the converters lower) and no batch statistics to drift. Activation ranges start from
    ``calib`` (one batch: the moving-average observers then hold its min/max), follow the training photos
    for the first half of the steps and are frozen for the second, so the weights settle on fixed scales.
    """
    import copy

    import torch
    from torchao.quantization.pt2e import disable_observer
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from .qat import QATConfig, check_qat_inputs, fine_tune_towards, fold_batch_norms

    cfg = cfg or QATConfig()
    check_qat_inputs(calib, train_images)
    folded = fold_batch_norms(copy.deepcopy(model).eval())
    # Batch >= 2 in the example so export keeps the batch dimension symbolic (a 1 would be specialised).
    example = torch.from_numpy(np.concatenate([calib[:1]] * 2)).float()
    batch = torch.export.Dim("batch", min=1, max=max(1024, cfg.batch_size, len(calib)))
    exported = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = _quantizer(per_channel, is_qat=True, float_modules=float_modules)
    prepared = prepare_qat_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(torch.from_numpy(calib).float())

    def freeze_observers_half_way(step: int) -> None:
        if step == cfg.steps // 2:
            prepared.apply(disable_observer)

    fine_tune_towards(model, prepared, train_images, cfg, progress, on_step=freeze_observers_half_way)
    prepared.apply(disable_observer)
    return prepared, quantizer


def convert_prepared(prepared, fold_quantize: bool = False):
    """The quantized graph of a ``pt2e_calibrate`` or ``pt2e_qat_train`` result; ``prepared`` stays usable
    (conversion works on a copy), so one calibration or fine-tuning serves every converter."""
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(copy.deepcopy(prepared), fold_quantize=fold_quantize)
