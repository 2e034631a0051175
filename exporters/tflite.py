"""TFLite/LiteRT export through litert-torch (FP32, and full-integer W8A8 through the PT2E quantizer, with float
input and output so every LiteRT runtime loads it: LiteRT.js refuses int8 model inputs)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from edge_runtime.contract import QuantizationInfo
from edge_runtime.formats import MANIFEST_METADATA_KEY

from .base import ExportRequest, ExportResult, register_exporter
from .formats import get_format

log = logging.getLogger(__name__)


def embed_manifest(path: Path, manifest_json: str) -> None:
    """Add the manifest as a TFLite metadata buffer (the flatbuffer's Metadata table)."""
    from ai_edge_litert import schema_py_generated as schema

    model = _unpack(path)
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != MANIFEST_METADATA_KEY]
    buffer = schema.BufferT()
    buffer.data = list(manifest_json.encode())
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = MANIFEST_METADATA_KEY, len(model.buffers) - 1
    model.metadata.append(entry)
    _pack(model, path)


def _unpack(path: Path):
    """The flatbuffer as ai-edge-litert's object API tree, every buffer inline."""
    from ai_edge_litert import schema_py_generated as schema

    raw = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    # Some writers (ai-edge-quantizer) keep tensor data after the flatbuffer, addressed by offset/size; re-packing
    # would drop that tail, so pull such buffers inline first (fine below the 2 GB flatbuffer limit).
    for buffer in model.buffers or []:
        if getattr(buffer, "offset", 0) > 1 and getattr(buffer, "size", 0) > 0:
            buffer.data = list(raw[buffer.offset:buffer.offset + buffer.size])
            buffer.offset, buffer.size = 0, 0
    return model


def _pack(model, path: Path) -> None:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def float_io(path: Path) -> int:
    """Give a full-integer model float inputs and outputs: a QUANTIZE op in front of each int8/uint8 input and a
    DEQUANTIZE op behind each such output, with the tensor's own scale and zero point. The integer graph is
    unchanged and edge_runtime's LiteRT backend computed the same q = round(x / scale) + zero point outside the
    file; the point is runtimes that take only float tensors (LiteRT.js: "Element type INT8 is not supported").
    Returns how many tensors were wrapped."""
    from ai_edge_litert import schema_py_generated as schema

    model = _unpack(path)
    integer = (schema.TensorType.INT8, schema.TensorType.UINT8)

    def opcode(builtin: int) -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(graph, index: int) -> int:
        """A float tensor of the same shape and name; the integer one is renamed."""
        old = graph.tensors[index]
        twin = schema.TensorT()
        twin.shape, twin.shapeSignature, twin.type, twin.name = old.shape, old.shapeSignature, schema.TensorType.FLOAT32, old.name
        old.name = (old.name or b"") + b"_int"
        model.buffers.append(schema.BufferT())
        twin.buffer = len(model.buffers) - 1
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int]):
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, inputs, outputs
        return o

    remap: dict[tuple[int, int], int] = {}
    for g, graph in enumerate(model.subgraphs):
        front, back = [], []
        for k, index in enumerate(graph.inputs):
            if graph.tensors[index].type in integer:
                twin = float_twin(graph, index)
                front.append(op(opcode(schema.BuiltinOperator.QUANTIZE), [twin], [index]))
                graph.inputs[k] = remap[(g, index)] = twin
        for k, index in enumerate(graph.outputs):
            if graph.tensors[index].type in integer:
                twin = float_twin(graph, index)
                back.append(op(opcode(schema.BuiltinOperator.DEQUANTIZE), [index], [twin]))
                graph.outputs[k] = remap[(g, index)] = twin
        graph.operators = front + list(graph.operators or []) + back
    for signature in model.signatureDefs or []:
        for entry in list(signature.inputs or []) + list(signature.outputs or []):
            entry.tensorIndex = remap.get((signature.subgraphIndex, entry.tensorIndex), entry.tensorIndex)
    if remap:
        _pack(model, path)
    return len(remap)


def cast_weights_to_fp16(fp32_path: Path, out_path: Path) -> Path:
    """FP16 weights for conv/depthwise/fully-connected layers through ai-edge-quantizer's float casting."""
    from ai_edge_quantizer import qtyping, quantizer

    q = quantizer.Quantizer(str(fp32_path))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
    for op in (qtyping.TFLOperationName.CONV_2D, qtyping.TFLOperationName.DEPTHWISE_CONV_2D,
               qtyping.TFLOperationName.FULLY_CONNECTED):
        q.update_quantization_recipe(regex=".*", algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING, operation_name=op,
                                     op_config=config)
    out_path.write_bytes(q.quantize().quantized_model)
    return out_path


def integer_ops(path: Path) -> dict:
    """What a TFLite file really runs, read back from it for an honest manifest: weighted ops (convolutions and
    fully-connected), the output tensors of those whose weights stayed float, and the convolutions that take int8
    inputs (integer kernels)."""
    from ai_edge_litert import schema_py_generated as schema

    model = _unpack(path)
    ops = schema.BuiltinOperator
    convs, weighted = (ops.CONV_2D, ops.DEPTHWISE_CONV_2D), (ops.CONV_2D, ops.DEPTHWISE_CONV_2D, ops.FULLY_CONNECTED)
    counts = {"weighted_layers": 0, "convolutions": 0, "integer_kernels": 0}
    float_layers = []
    for graph in model.subgraphs:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            if builtin not in weighted:
                continue
            counts["weighted_layers"] += 1
            if graph.tensors[op.inputs[1]].type == schema.TensorType.FLOAT32:
                float_layers.append((graph.tensors[op.outputs[0]].name or b"").decode())
            if builtin in convs:
                counts["convolutions"] += 1
                counts["integer_kernels"] += graph.tensors[op.inputs[0]].type == schema.TensorType.INT8
    return {**counts, "float_layers": tuple(float_layers)}


@register_exporter("tflite", embed_manifest)
def export_tflite(request: ExportRequest) -> ExportResult:
    import litert_torch

    from training.models import ExportModule

    inputs, path = request.inputs, request.path
    module = ExportModule(inputs.model).eval()
    example = (inputs.example(),)
    if request.precision == "fp32":
        litert_torch.convert(module, example).export(str(path))
        return ExportResult(path, QuantizationInfo("fp32"))
    if request.precision == "fp16":
        fp32 = path.with_name(path.stem + ".fp32.tmp.tflite")
        litert_torch.convert(module, example).export(str(fp32))
        cast_weights_to_fp16(fp32, path)
        fp32.unlink(missing_ok=True)
        return ExportResult(path, QuantizationInfo(
            "fp16", "float_casting", "float32", "float16",
            notes="FP16 weights with explicit DEQUANTIZE; compute stays FP32 on CPU (XNNPACK), FP16 on GPU delegates"))
    from litert_torch.quantize.quant_config import QuantConfig

    # target: the LiteRT CPU kernels, not the ONNX recipe's CPU class
    recipe = get_format("tflite").int8_recipe(request.recipe)
    graph = request.graphs.quantize(recipe)
    litert_torch.convert(graph.convert(fold_quantize=False), example,
                         quant_config=QuantConfig(pt2e_quantizer=graph.quantizer)).export(str(path))
    wrapped = float_io(path)
    info = recipe.info(len(inputs.photos.calib), **integer_ops(path))
    note = f"float I/O: {wrapped} int8 input/output tensors wrapped in QUANTIZE/DEQUANTIZE"
    return ExportResult(path, dataclasses.replace(info, notes="; ".join(n for n in (info.notes, note) if n)))
