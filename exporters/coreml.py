"""CoreML export: ML program .mlpackage, FP16 and W8A8 INT8.

Linux can convert but not run CoreML, and coremltools' own activation calibration needs macOS. So INT8 is
calibrated on the torch side: the PT2E quantizer (the TFLite path's recipe) with int8 weights folded, then
``torch.export`` -> coremltools, which lowers the quantize/dequantize pairs to MIL ``quantize``/``dequantize``
and the weights to ``constexpr_affine_dequantize``. Verification here reads the spec (op types, weight and
activation quantization, I/O names and shapes) and gates the INT8 numerics on the quantized torch
graph that was converted, executed with integer kernels as its ONNX twin (``simulated_runner``); on macOS the
backend runs predictions.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from edge_runtime.backends.base import HeadOutputs
from edge_runtime.contract import QuantizationInfo, output_names_for
from edge_runtime.formats import INPUT_NAME, MANIFEST_METADATA_KEY

from .base import ExportRequest, ExportResult, register_exporter
from .errors import ExportParityError
from .formats import get_format

log = logging.getLogger(__name__)


def simulated_runner(quantized: torch.nn.Module, example: torch.Tensor, twin_path: Path):
    """``quantized`` (a converted PT2E graph, batch 1) as a function of N x C x S x S photos, run as its ONNX twin:
    every quantize/dequantize pair becomes a QuantizeLinear/DequantizeLinear pair with the same scales and zero
    points, which ONNX Runtime fuses into integer convolutions. Eager PyTorch runs the same graph in emulated
    (float) arithmetic at about 6 s a photo for Lite0 on 2 cores, which cannot judge the gate's ~10,000 nuisance
    draws; the twin runs it in milliseconds. The twin is a temporary file next to the artifact and is removed."""
    import onnxruntime as ort

    with torch.no_grad():
        program = torch.onnx.export(quantized, (example,), dynamo=True, input_names=[INPUT_NAME], verbose=False)
    program.save(str(twin_path))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(twin_path), options, providers=["CPUExecutionProvider"])
    finally:
        twin_path.unlink(missing_ok=True)
    input_name = session.get_inputs()[0].name

    def run(x):
        rows = [session.run(None, {input_name: x[i:i + 1].astype("float32")}) for i in range(len(x))]
        return HeadOutputs(*(np.concatenate([r[k] for r in rows]) for k in range(len(rows[0]))))

    return run


def _spec_file(path: Path) -> Path:
    """The model spec (protobuf) inside an .mlpackage, as its Manifest.json names it."""
    info = json.loads((path / "Manifest.json").read_text())
    return path / "Data" / info["itemInfoEntries"][info["rootModelIdentifier"]]["path"]


def embed_manifest(path: Path, manifest_json: str) -> None:
    """The manifest in the spec's user-defined metadata, written into the saved package (weights untouched)."""
    from coremltools.proto import Model_pb2

    spec_file = _spec_file(path)
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec.description.metadata.userDefined[MANIFEST_METADATA_KEY] = manifest_json
    spec_file.write_bytes(spec.SerializeToString())


@register_exporter("coreml", embed_manifest)
def export_coreml(request: ExportRequest) -> ExportResult:
    import coremltools as ct

    from training.models import ExportModule

    path = request.path
    if path.exists():
        shutil.rmtree(path)
    example = request.inputs.example()
    names = output_names_for(request.inputs.meta.heads)
    outputs = [ct.TensorType(name=name) for name in names]
    simulated = runner = None
    if request.precision == "int8":
        model, quant, simulated, runner = _convert_w8a8(request, example, outputs)
    else:
        traced = torch.jit.trace(ExportModule(request.inputs.model).eval(), example)
        model = ct.convert(traced, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))], outputs=outputs,
                           convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                           minimum_deployment_target=ct.target.iOS16)
        quant = QuantizationInfo("fp16")
    model.short_description = "RetinaEdge DR screening aid (ICDR 0-4 logits + CAM). Not a diagnosis."
    model.save(str(path))
    return ExportResult(path, quant, simulated, check_coreml_spec(path, tuple(example.shape), request.precision, names),
                        runner)


def _convert_w8a8(request: ExportRequest, example: torch.Tensor, outputs: list):
    """PT2E W8A8 (calibrated, or QAT when the recipe is ``qat``) -> ML program (iOS 17: activation
    quantize/dequantize ops). Also returns the converted graph's outputs (every head) on the val photos and its
    runner (the ONNX twin, made once: the gate's draws and the output-bias correction run it too)."""
    import coremltools as ct

    recipe = get_format("coreml").int8_recipe(request.recipe)
    quantized = request.graphs.quantize(recipe).convert(fold_quantize=True)
    val = request.inputs.photos.val
    # What CoreML will compute, measured where CoreML cannot run: the gate judges these outputs.
    runner = simulated_runner(quantized, example, request.path.with_suffix(".twin.onnx"))
    simulated = runner(val) if len(val) else None
    program = torch.export.export(quantized, (example,)).run_decompositions({})
    model = ct.convert(program, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))], outputs=outputs,
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    return model, recipe.info(len(request.inputs.photos.calib), **_weight_kinds(model.get_spec())), simulated, runner


def _weight_kinds(spec) -> dict:
    """Convolutions (and linear layers) of an ML program whose weights stay float (not produced by an int8
    dequantize), read back from the spec for an honest manifest; CoreML's kernels cannot be inspected here."""
    weighted, float_layers = 0, []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            producers = {out.name: op.type for op in block.operations for out in op.outputs}
            for op in block.operations:
                if op.type not in ("conv", "linear"):
                    continue
                weighted += 1
                weight = op.inputs["weight"].arguments[0].name if op.inputs["weight"].arguments else ""
                if not producers.get(weight, "").startswith("constexpr_"):
                    float_layers.append(op.outputs[0].name)
    return {"weighted_layers": weighted, "float_layers": tuple(float_layers)}


def check_coreml_spec(path: Path, input_shape: tuple[int, ...], precision: str,
                      output_names: tuple[str, ...] = ("logits", "cam")) -> dict[str, float]:
    """Read the saved spec back and check what Linux can check: I/O names and shape, op types, weight dtypes."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    ops = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
    problems = []
    expected_outputs = list(output_names)
    if list(inputs) != [INPUT_NAME] or outputs != expected_outputs:
        problems.append(f"I/O names {list(inputs)} -> {outputs}, expected [{INPUT_NAME!r}] -> {expected_outputs}")
    if inputs.get(INPUT_NAME) != list(input_shape):
        problems.append(f"input shape {inputs.get(INPUT_NAME)} != {list(input_shape)}")
    if precision == "int8" and not (ops["constexpr_affine_dequantize"] or ops["constexpr_blockwise_shift_scale"]):
        problems.append("no INT8 weight dequantize ops found")
    if precision == "int8" and not ops["quantize"]:
        problems.append("no INT8 activation quantize ops found")
    if problems:
        raise ExportParityError(f"{path.name}: " + "; ".join(problems))
    return {"ops": sum(ops.values()), "conv_ops": ops["conv"],
            "int8_weight_ops": ops["constexpr_affine_dequantize"] + ops["constexpr_blockwise_shift_scale"],
            "int8_activation_ops": ops["quantize"]}
