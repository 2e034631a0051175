"""CoreML export: ML program .mlpackage, FP16, and INT8 weights (W8, FP16 compute).

Linux can convert but not run CoreML, so verification here reads the spec: op types, weight dtypes,
input/output names and shapes, metadata. INT8 *activations* need torch-side calibration before
conversion; that path is not wired yet, so INT8 here is weight-only and the manifest says so.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import torch

from edge_runtime.backends.base import embedded_manifest_json
from edge_runtime.contract import QuantizationInfo

from .base import ExportContext, register_exporter, register_spec_checker

log = logging.getLogger(__name__)


@register_exporter("coreml")
def export_coreml(ctx: ExportContext, precision: str) -> tuple[Path, QuantizationInfo]:
    import coremltools as ct

    from training.models import ExportModule

    path = ctx.out_dir / f"{ctx.stem}_{precision}.mlpackage"
    if path.exists():
        shutil.rmtree(path)
    example = ctx.example()
    traced = torch.jit.trace(ExportModule(ctx.model).eval(), example)
    model = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(example.shape))],
                       outputs=[ct.TensorType(name="logits"), ct.TensorType(name="cam")],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                       minimum_deployment_target=ct.target.iOS16)
    if precision == "int8":
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
        )

        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel"))
        model = linear_quantize_weights(model, config)
        quant = QuantizationInfo("int8", "coreml_w8", "float16", "int8", True, None, 0, "apple_ane",
                                 "weight-only INT8 (W8, FP16 activations); torch-side activation calibration not wired")
    else:
        quant = QuantizationInfo("fp16")
    cam_shape = tuple(int(v) for v in ctx.reference()[1].shape[2:]) if len(ctx.val) else None
    model.user_defined_metadata["retinaedge_manifest"] = embedded_manifest_json(ctx.manifest("coreml", quant, cam_shape))
    model.short_description = "RetinaEdge DR screening aid (ICDR 0-4 logits + CAM). Not a diagnosis."
    model.save(str(path))
    return path, quant


@register_spec_checker("coreml")
def check_coreml_spec(path: Path, ctx: ExportContext, precision: str) -> dict:
    """Read the saved spec back and check what Linux can check: I/O, op types, weight dtypes, metadata."""
    import coremltools as ct

    from edge_runtime.errors import ExportParityError

    spec = ct.utils.load_spec(str(path))
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    ops = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
    problems = []
    if list(inputs) != ["input"] or outputs != ["logits", "cam"]:
        problems.append(f"I/O names {list(inputs)} -> {outputs}, expected ['input'] -> ['logits', 'cam']")
    if inputs.get("input") != list(ctx.example().shape):
        problems.append(f"input shape {inputs.get('input')} != {list(ctx.example().shape)}")
    if precision == "int8" and not (ops["constexpr_affine_dequantize"] or ops["constexpr_blockwise_shift_scale"]):
        problems.append("no INT8 weight dequantize ops found")
    embedded = spec.description.metadata.userDefined.get("retinaedge_manifest")
    if not embedded or json.loads(embedded)["format"] != "coreml":
        problems.append("manifest missing from user-defined metadata")
    if problems:
        raise ExportParityError(f"{path.name}: " + "; ".join(problems))
    return {"ops": sum(ops.values()), "conv_ops": ops["conv"],
            "int8_weight_ops": ops["constexpr_affine_dequantize"] + ops["constexpr_blockwise_shift_scale"]}
