"""TFLite/LiteRT export through litert-torch (FP32, and full-integer W8A8 through the PT2E quantizer)."""
from __future__ import annotations

import logging
from pathlib import Path

from edge_runtime.contract import QuantizationInfo
from edge_runtime.formats import MANIFEST_METADATA_KEY

from .base import ExportRequest, ExportResult, pt2e_recipe, register_exporter

log = logging.getLogger(__name__)


def embed_manifest(path: Path, manifest_json: str) -> None:
    """Add the manifest as a TFLite metadata buffer (the flatbuffer's Metadata table)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    raw = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    # Some writers (ai-edge-quantizer) keep tensor data after the flatbuffer, addressed by offset/size; re-packing
    # would drop that tail, so pull such buffers inline first (fine below the 2 GB flatbuffer limit).
    for buffer in model.buffers or []:
        if getattr(buffer, "offset", 0) > 1 and getattr(buffer, "size", 0) > 0:
            buffer.data = list(raw[buffer.offset:buffer.offset + buffer.size])
            buffer.offset, buffer.size = 0, 0
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != MANIFEST_METADATA_KEY]
    buffer = schema.BufferT()
    buffer.data = list(manifest_json.encode())
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = MANIFEST_METADATA_KEY, len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


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
    recipe = pt2e_recipe(request.recipe, "litert_xnnpack")
    graph = request.graphs.quantize(recipe)
    litert_torch.convert(graph.convert(fold_quantize=False), example,
                         quant_config=QuantConfig(pt2e_quantizer=graph.quantizer)).export(str(path))
    return ExportResult(path, recipe.info(len(inputs.photos.calib)))
