"""LiteRT (TFLite) backend: ai_edge_litert's interpreter, or tflite_runtime where that is all a device has."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..contract import HEADS, ArtifactManifest
from ..errors import BackendUnavailableError
from .base import HeadOutputs, SessionBase, SessionInfo, register_backend
from .options import DEFAULT_OPTIONS, RuntimeOptions


def _interpreter_module():
    """The interpreter module (it holds ``Interpreter`` and ``OpResolverType``) and its package's name."""
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:  # older devices; its last release needs numpy<2 and runs INT8 10-30x slower (TOOLCHAIN.md)
        from tflite_runtime import interpreter

        return interpreter, "tflite_runtime"
    except ImportError as exc:
        raise BackendUnavailableError(
            "no TFLite runtime: pip install 'retinaedge[edge]' (ai-edge-litert), or tflite-runtime on old devices"
        ) from exc


CHUNK = 32  # photos a call when a batch is large (the gate's draws, evaluation); the device screens one at a time


@register_backend("litert")
class LiteRtSession(SessionBase):
    def __init__(self, path: Path, manifest: ArtifactManifest, options: RuntimeOptions = DEFAULT_OPTIONS):
        module, package = _interpreter_module()
        kwargs = {}
        if not options.xnnpack:  # built-in kernels only; the default resolver applies XNNPACK
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        # num_threads sizes both the interpreter's and the XNNPACK delegate's thread pool.
        self._make_interpreter = lambda: module.Interpreter(model_path=str(path), num_threads=options.threads, **kwargs)
        self.interpreter = self._make_interpreter()
        self.input_detail = self.interpreter.get_input_details()[0]
        outputs = self.interpreter.get_output_details()
        # Output order and names are not kept by the converter: tell them apart by shape. Per head, the logits are
        # rank 2 and the CAM rank 4, both with the head's class count on axis 1 (5 grades, 1 for DME).
        self.output_details = {}
        for head in manifest.heads:
            spec = HEADS[head]
            for name, rank in zip(spec.outputs, (2, 4), strict=True):
                self.output_details[name] = next(o for o in outputs if len(o["shape"]) == rank
                                                 and int(o["shape"][1]) == spec.classes)
        self.batch = int(self.input_detail["shape"][0])
        self.interpreter.allocate_tensors()
        self._chunked = None  # a second interpreter resized to CHUNK photos, made on the first large batch
        self.info = SessionInfo("litert", f"{package}/{'XNNPACK' if options.xnnpack else 'builtin'}", manifest, path,
                                None, {"threads": options.threads, "input_dtype": str(self.input_detail["dtype"]),
                                       "options": asdict(options)})

    def _run_one(self, x: np.ndarray) -> HeadOutputs:
        self.interpreter.set_tensor(self.input_detail["index"], _quantize(x, self.input_detail))
        self.interpreter.invoke()
        return HeadOutputs.from_named({name: _dequantize(self.interpreter.get_tensor(detail["index"]), detail)
                                       for name, detail in self.output_details.items()})

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        if len(batch) == self.batch:
            return self._run_one(batch)
        if len(batch) >= CHUNK // 2 and self._chunk_interpreter() is not None:
            return self._run_chunked(batch)
        # Static batch in the converted graph: run item by item.
        return HeadOutputs.concatenate([self._run_one(batch[i:i + 1]) for i in range(len(batch))])

    def _chunk_interpreter(self):
        """The graph resized to CHUNK photos a call (XNNPACK amortises its per-call cost: 1.6x faster a photo for a
        Lite0), or None where the graph's shapes are fixed inside and cannot be resized."""
        if self._chunked is None:
            interpreter = self._make_interpreter()
            try:
                interpreter.resize_tensor_input(self.input_detail["index"], [CHUNK, *self.input_detail["shape"][1:]])
                interpreter.allocate_tensors()
            except (RuntimeError, ValueError):
                interpreter = False
            self._chunked = interpreter
        return self._chunked or None

    def _run_chunked(self, batch: np.ndarray) -> HeadOutputs:
        interpreter, parts = self._chunked, []
        by_index = {detail["index"]: name for name, detail in self.output_details.items()}
        details = {o["index"]: o for o in interpreter.get_output_details() if o["index"] in by_index}
        for start in range(0, len(batch), CHUNK):
            part = batch[start:start + CHUNK]
            padded = np.zeros((CHUNK, *part.shape[1:]), part.dtype)
            padded[:len(part)] = part
            interpreter.set_tensor(self.input_detail["index"], _quantize(padded, self.input_detail))
            interpreter.invoke()
            parts.append(HeadOutputs.from_named({by_index[i]: _dequantize(interpreter.get_tensor(i), d)[:len(part)]
                                                 for i, d in details.items()}))
        return HeadOutputs.concatenate(parts)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Full-integer models take int8/uint8 inputs: q = round(x / scale) + zero_point."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(q.dtype, np.floating):
        return q.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return (q.astype(np.float32) - zero_point) * scale
