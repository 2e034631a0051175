"""ONNX Runtime backend: explicit, ordered execution providers; the active one and the session options are recorded."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..contract import ArtifactManifest
from ..errors import BackendUnavailableError
from .base import HeadOutputs, SessionBase, SessionInfo, register_backend
from .options import DEFAULT_OPTIONS, RuntimeOptions

log = logging.getLogger(__name__)
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def session_options(options: RuntimeOptions):
    """``onnxruntime.SessionOptions`` from the typed options."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[options.graph_optimization]
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    if options.threads:
        so.intra_op_num_threads = options.threads
    if options.inter_op_threads:
        so.inter_op_num_threads = options.inter_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin_wait else "0")
    return so


@register_backend("onnxruntime")
class OnnxRuntimeSession(SessionBase):
    def __init__(self, path: Path, manifest: ArtifactManifest, options: RuntimeOptions = DEFAULT_OPTIONS):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install 'retinaedge[edge]'") from exc
        requested = tuple(options.providers or DEFAULT_PROVIDERS)
        available = ort.get_available_providers()
        usable = [p for p in requested if p in available]
        fallback = None
        if len(usable) < len(requested):
            missing = [p for p in requested if p not in available]
            if not options.allow_fallback or not usable and "CPUExecutionProvider" not in available:
                raise BackendUnavailableError(
                    f"execution provider(s) {missing} unavailable; available: {available}. "
                    "Install onnxruntime-gpu (Jetson: NVIDIA's wheel) or pass allow_fallback=True."
                )
            usable = usable or ["CPUExecutionProvider"]
            fallback = f"requested {list(requested)}, using {usable}"
            log.warning("ONNX Runtime provider fallback: %s", fallback)
        self.session = ort.InferenceSession(str(path), session_options(options), providers=usable)
        self.input_name = self.session.get_inputs()[0].name
        self.info = SessionInfo("onnxruntime", self.session.get_providers()[0], manifest, path, fallback,
                                {"providers": self.session.get_providers(), "ort_version": ort.__version__,
                                 "options": asdict(options)})

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        names = list(self.info.manifest.output_names)
        arrays = self.session.run(names, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return HeadOutputs.from_named(dict(zip(names, arrays, strict=True)))
