"""CoreML export: ML program .mlpackage, FP16 and W8A8 INT8.

Linux can convert but not run CoreML, and coremltools' own activation calibration needs macOS. So INT8 is
calibrated on the torch side: the PT2E quantizer (the TFLite path's recipe) with int8 weights folded, then
``torch.export`` -> coremltools, which lowers the quantize/dequantize pairs to MIL ``quantize``/``dequantize``
and the weights to ``constexpr_affine_dequantize``. Verification here reads the spec (op types, weight and
activation quantization, I/O names and shapes, metadata) and gates the INT8 numerics on the quantized torch
graph that was converted; on macOS the backend runs predictions.
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
    outputs = [ct.TensorType(name="logits"), ct.TensorType(name="cam")]
    if precision == "int8":
        model, quant = _convert_w8a8(ctx, example, outputs)
    else:
        traced = torch.jit.trace(ExportModule(ctx.model).eval(), example)
        model = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(example.shape))], outputs=outputs,
                           convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                           minimum_deployment_target=ct.target.iOS16)
        quant = QuantizationInfo("fp16")
    cam_shape = tuple(int(v) for v in ctx.reference()[1].shape[2:]) if len(ctx.val) else None
    model.user_defined_metadata["retinaedge_manifest"] = embedded_manifest_json(ctx.manifest("coreml", quant, cam_shape))
    model.short_description = "RetinaEdge DR screening aid (ICDR 0-4 logits + CAM). Not a diagnosis."
    model.save(str(path))
    return path, quant


def _convert_w8a8(ctx: ExportContext, example: torch.Tensor, outputs: list):
    """PT2E W8A8 (calibrated, or QAT when the recipe is ``qat``) -> ML program (iOS 17: activation
    quantize/dequantize ops)."""
    import coremltools as ct

    quantized, _, recipe = ctx.pt2e_int8("apple_ane", fold_quantize=True)
    # What CoreML will compute, measured where CoreML cannot run: the gate judges these outputs.
    with torch.no_grad():
        # Run one photo at a time: the post-training graph is specialised to batch 1, like the CoreML model.
        pairs = [quantized(torch.from_numpy(ctx.val[i:i + 1]).float()) for i in range(len(ctx.val))]
    ctx.simulated["coreml"] = (torch.cat([p[0] for p in pairs]).numpy(), torch.cat([p[1] for p in pairs]).numpy())
    program = torch.export.export(quantized, (example,)).run_decompositions({})
    model = ct.convert(program, inputs=[ct.TensorType(name="input", shape=tuple(example.shape))], outputs=outputs,
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    return model, recipe.info(len(ctx.calib))


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
    if precision == "int8" and not ops["quantize"]:
        problems.append("no INT8 activation quantize ops found")
    embedded = spec.description.metadata.userDefined.get("retinaedge_manifest")
    if not embedded or json.loads(embedded)["format"] != "coreml":
        problems.append("manifest missing from user-defined metadata")
    if problems:
        raise ExportParityError(f"{path.name}: " + "; ".join(problems))
    return {"ops": sum(ops.values()), "conv_ops": ops["conv"],
            "int8_weight_ops": ops["constexpr_affine_dequantize"] + ops["constexpr_blockwise_shift_scale"],
            "int8_activation_ops": ops["quantize"]}
