"""ONNX export: FP32 (opset 18) and INT8 QDQ through a compression recipe; manifest in metadata_props."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from compression.quantize import quantize_onnx
from edge_runtime.contract import QuantizationInfo, output_names_for
from edge_runtime.formats import INPUT_NAME, MANIFEST_METADATA_KEY

from .base import ExportInputs, ExportRequest, ExportResult, register_exporter

log = logging.getLogger(__name__)
OPSET = 18


def export_onnx_fp32(inputs: ExportInputs, path: Path, module: torch.nn.Module | None = None) -> Path:
    """Write ``module`` (default: the checkpoint's inputs -> (logits, cam[, dme_logit, dme_cam])) as ONNX."""
    from training.models import ExportModule

    names = output_names_for(inputs.meta.heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: 1-4 s instead of 6-17 s and it also exports NNCF-stripped models (TOOLCHAIN.md).
        torch.onnx.export(module or ExportModule(inputs.model), (inputs.example(),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=[INPUT_NAME], output_names=list(names),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)})
    return path


def embed_manifest(path: Path, manifest_json: str) -> None:
    """The manifest as the model's only ``metadata_props`` entry; the graph is checked before it is saved."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_METADATA_KEY, manifest_json
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _constants(graph) -> tuple[dict, Callable[[str], str]]:
    """Stored tensors by name (initializers and Constant nodes), and a resolver through the Identity aliases
    torch's exporter adds between them and their users."""
    stored = {t.name: t for t in graph.initializer}
    stored.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute})
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    return stored, resolve


def integer_convs(path: Path) -> tuple[int, int]:
    """(convolutions ONNX Runtime runs as integer kernels, all convolutions) in the graph the CPU provider builds from
    a QDQ file: a Conv counts only where ORT fused DequantizeLinear -> Conv -> QuantizeLinear, which a weight stored
    as int8 alone does not make (e.g. a per-channel activation scale, or no QuantizeLinear after the Conv, keeps it
    float)."""
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no hardware-specific layouts
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    integer = ops["QLinearConv"] + ops["ConvInteger"]
    return integer, integer + ops["Conv"] + ops["FusedConv"]


def qdq_types(path: Path) -> dict:
    """The integer types a QDQ graph really uses (read from its zero points), which weighted layers it leaves in
    float, and how many convolutions ONNX Runtime then runs as integers, for an honest manifest."""
    graph = onnx.load(str(path), load_external_data=False).graph
    stored, resolve = _constants(graph)
    names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    weight_inputs = {resolve(n.input[1]) for n in weighted}
    dequantized = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weights: set[str] = set()
    activations: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero_point = stored.get(resolve(node.input[2]))
        if zero_point is None:
            continue
        kind = names.get(zero_point.data_type)
        if kind is None:  # int32 biases: their type follows from the weights and inputs, not a choice
            continue
        # Fed by a stored tensor: a constant (float for Q as fake-quant exports write it; integer for a DQ of
        # pre-quantized data). A weight only if it ends up as a Conv/Gemm/MatMul weight: ORT also quantizes
        # other constants, such as the bias added after the CAM mean, with the activation type.
        if resolve(node.input[0]) in stored:
            output = node.output[0] if node.op_type == "DequantizeLinear" else dequantized.get(node.output[0])
            if output in weight_inputs:
                weights.add(kind)
        elif node.op_type == "QuantizeLinear":
            activations.add(kind)
    producers = {n.output[0]: n.op_type for n in graph.node}
    in_float = [n.name for n in weighted if producers.get(resolve(n.input[1])) != "DequantizeLinear"]
    integer, convs = integer_convs(path)
    return {"activation_type": "+".join(sorted(activations)) or "float",
            "weight_type": "+".join(sorted(weights)) or "float",
            "weighted_layers": len(weighted), "float_layers": tuple(in_float),
            "convolutions": convs, "integer_kernels": integer}


def fold_weight_quantizers(path: Path) -> int:
    """Store fake-quantized weights as integers: ``QuantizeLinear(float weight)`` becomes the integer tensor it
    computes, feeding the ``DequantizeLinear`` directly (what ORT's own quantizer writes). torch's exporter
    writes QAT models with float weights, so the file would otherwise stay FP32-sized. Returns how many folded."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    stored, resolve = _constants(graph)

    def array(name: str):
        tensor = stored.get(resolve(name))
        return None if tensor is None else numpy_helper.to_array(tensor)

    dropped = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        weight, scale, zero_point = (array(name) for name in node.input[:3])
        if weight is None or scale is None or zero_point is None or weight.dtype.kind != "f":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis % weight.ndim] = -1
        info = np.iinfo(zero_point.dtype)
        # np.rint rounds half to even, as QuantizeLinear does.
        integers = np.clip(np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64),
                           info.min, info.max).astype(zero_point.dtype)
        graph.initializer.append(numpy_helper.from_array(integers, node.output[0]))
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))
    return len(dropped)


@register_exporter("onnx", embed_manifest)
def export_onnx(request: ExportRequest) -> ExportResult:
    inputs, recipe, path = request.inputs, request.recipe, request.path
    if request.precision == "fp32":
        return ExportResult(export_onnx_fp32(inputs, path), QuantizationInfo("fp32"))
    if recipe.name == "qat":  # the torch-graph recipe (NNCF QAT): fake-quantized module -> QDQ ONNX
        export_onnx_fp32(inputs, path, request.graphs.quantize(recipe).convert())
        log.info("stored %d fake-quantized weights as integers", fold_weight_quantizers(path))
    else:  # an ONNX-graph recipe
        fp32 = path.with_name(f"{inputs.stem}_fp32.tmp.onnx")
        export_onnx_fp32(inputs, fp32)
        quantize_onnx(fp32, path, inputs.photos.calib, recipe, inputs.accuracy_target())
        fp32.unlink(missing_ok=True)
    return ExportResult(path, recipe.info(len(inputs.photos.calib), **qdq_types(path)))
