"""What an artifact file says about itself, read without its runtime: the embedded manifest and the storage types
of its weights. Used at load time to cross-check the sidecar manifest.

ONNX and CoreML are protobuf: a 40-line wire-format reader walks only the fields needed (no ``onnx`` or
``coremltools`` on the device). TFLite is a flatbuffer read through LiteRT's generated schema when installed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArtifactError, ManifestError

EMBEDDED_MANIFEST_KEY = "retinaedge_manifest"
# An INT8 artifact stores most weights as 8-bit integers; float stems/heads (the "sensitive_float" escalation)
# keep a minority in float. An FP32 file relabelled INT8 has none, so any clear majority rule separates them.
INT8_MIN_WEIGHT_FRACTION = 0.5
MIN_WEIGHT_ELEMENTS = 16  # smaller constants are scales, zero points and shapes, not weights


@dataclass(frozen=True)
class WeightCounts:
    """Elements of constant tensors by storage class."""

    int8: int = 0  # int8/uint8
    fp16: int = 0  # float16/bfloat16
    fp32: int = 0  # float32/float64

    @property
    def precision(self) -> str | None:
        """What the weights are stored as (fp32 | fp16 | int8), None when the file has no weights to judge."""
        total = self.int8 + self.fp16 + self.fp32
        if total == 0:
            return None
        if self.int8 / total >= INT8_MIN_WEIGHT_FRACTION:
            return "int8"
        return "fp16" if self.fp16 >= self.fp32 else "fp32"


@dataclass(frozen=True)
class ArtifactFacts:
    embedded_manifest: dict | None  # None when the file carries none
    weights: WeightCounts | None = None  # None when this format's weights cannot be read cheaply
    readable: bool = True  # False when no reader for this format is installed
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- protobuf wire format
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: ints for varints, slices for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = 0, pos + 8
        elif wire == 5:
            value, pos = 0, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("length-delimited field runs past the end")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("field runs past the end")
        yield number, wire, value


def _string_map(buf: memoryview, number: int) -> dict[str, str]:
    """A ``map<string, string>`` / repeated key-value message at field ``number`` (key = 1, value = 2)."""
    out = {}
    for num, wire, entry in _fields(buf):
        if num == number and wire == 2:
            parts = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(entry) if w == 2}
            out[parts.get(1, "")] = parts.get(2, "")
    return out


_ONNX_INT8 = {2, 3}  # UINT8, INT8
_ONNX_FP16 = {10, 16}  # FLOAT16, BFLOAT16
_ONNX_FP32 = {1, 11}  # FLOAT, DOUBLE


def _onnx_tensor(buf: memoryview) -> tuple[int, int]:
    """(data_type, element count) of a TensorProto."""
    dims, dtype = [], 0
    for num, wire, value in _fields(buf):
        if num == 1 and wire == 0:
            dims.append(value)
        elif num == 1 and wire == 2:  # packed dims
            pos = 0
            while pos < len(value):
                dim, pos = _varint(value, pos)
                dims.append(dim)
        elif num == 2 and wire == 0:
            dtype = value
    return dtype, math.prod(dims)


def _count(counts: dict[str, int], dtype: int, elements: int) -> None:
    if elements < MIN_WEIGHT_ELEMENTS:
        return
    for name, types in (("int8", _ONNX_INT8), ("fp16", _ONNX_FP16), ("fp32", _ONNX_FP32)):
        if dtype in types:
            counts[name] += elements


def _inspect_onnx(path: Path) -> ArtifactFacts:
    buf = memoryview(path.read_bytes())
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    metadata: dict[str, str] = {}
    seen_graph = False
    for num, wire, value in _fields(buf):
        if num == 14 and wire == 2:  # ModelProto.metadata_props
            parts = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
            metadata[parts.get(1, "")] = parts.get(2, "")
        elif num == 7 and wire == 2:  # ModelProto.graph
            seen_graph = True
            for gnum, gwire, gvalue in _fields(value):
                if gnum == 5 and gwire == 2:  # GraphProto.initializer
                    _count(counts, *_onnx_tensor(gvalue))
                elif gnum == 1 and gwire == 2:  # GraphProto.node: weights stored in Constant nodes
                    node = list(_fields(gvalue))
                    if any(n == 4 and bytes(v) == b"Constant" for n, w, v in node if w == 2):
                        for attr in (v for n, w, v in node if n == 5 and w == 2):
                            for anum, awire, avalue in _fields(attr):
                                if anum == 5 and awire == 2:  # AttributeProto.t
                                    _count(counts, *_onnx_tensor(avalue))
    if not seen_graph:
        raise ValueError("no graph")
    return ArtifactFacts(_parse_embedded(metadata.get(EMBEDDED_MANIFEST_KEY), path), WeightCounts(**counts))


def _inspect_coreml(path: Path) -> ArtifactFacts:
    spec = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not spec.is_file():
        raise ValueError(f"no {spec.relative_to(path)} inside the package")
    metadata: dict[str, str] = {}
    for num, wire, value in _fields(memoryview(spec.read_bytes())):
        if num == 2 and wire == 2:  # Model.description
            for dnum, dwire, dvalue in _fields(value):
                if dnum == 100 and dwire == 2:  # ModelDescription.metadata
                    metadata.update(_string_map(dvalue, 100))  # Metadata.userDefined
    # ML-program weights live in weights/weight.bin behind constexpr ops: not cheap to classify here.
    return ArtifactFacts(_parse_embedded(metadata.get(EMBEDDED_MANIFEST_KEY), path), None,
                         notes=("CoreML weight types are checked by the exporter's spec checker, not at load",))


_TFLITE_INT8, _TFLITE_FP16, _TFLITE_FP32 = {3, 9}, {1, 16}, {0, 10}  # UINT8/INT8, FLOAT16/BFLOAT16, FLOAT32/FLOAT64


def _inspect_tflite(path: Path) -> ArtifactFacts:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return ArtifactFacts(None, None, readable=False,
                             notes=("ai-edge-litert is not installed: the embedded manifest and weight types of "
                                    "TFLite files cannot be read",))
    raw = bytearray(path.read_bytes())
    if raw[4:8] != b"TFL3":
        raise ValueError("no TFL3 file identifier")
    model = schema.Model.GetRootAs(raw, 0)
    embedded = None
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() is not None and meta.Name().decode() == EMBEDDED_MANIFEST_KEY:
            embedded = bytes(model.Buffers(meta.Buffer()).DataAsNumpy()).decode("utf-8", "replace")
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            buffer = model.Buffers(tensor.Buffer()) if 0 < tensor.Buffer() < model.BuffersLength() else None
            # Data inline, or (ai-edge-quantizer) after the flatbuffer at offset/size.
            if buffer is None or not (buffer.DataLength() or getattr(buffer, "Size", lambda: 0)() > 0):
                continue  # not a constant
            elements = math.prod(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else 1
            for name, types in (("int8", _TFLITE_INT8), ("fp16", _TFLITE_FP16), ("fp32", _TFLITE_FP32)):
                if tensor.Type() in types and elements >= MIN_WEIGHT_ELEMENTS:
                    counts[name] += elements
    return ArtifactFacts(_parse_embedded(embedded, path), WeightCounts(**counts))


_READERS = {"onnx": _inspect_onnx, "tflite": _inspect_tflite, "coreml": _inspect_coreml}


def _parse_embedded(text: str | None, path: Path) -> dict | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path.name}: the manifest embedded in the file is not valid JSON ({exc}); "
                            "re-export the artifact") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path.name}: the embedded manifest is not a JSON object; re-export the artifact")
    return data


def inspect_artifact(path: str | Path, fmt: str) -> ArtifactFacts:
    """Embedded manifest and weight storage types of an artifact of format ``fmt``.

    Raises:
        ArtifactError: the file is not a well-formed artifact of that format.
        ManifestError: the embedded manifest is not a JSON object.
    """
    path = Path(path)
    reader = _READERS.get(fmt)
    if reader is None:
        return ArtifactFacts(None, None, readable=False, notes=(f"no reader for format {fmt!r}",))
    try:
        return reader(path)
    except (ValueError, IndexError, OSError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ArtifactError(f"{path.name} is not a well-formed {fmt} artifact ({exc}); download or export it again") from exc
