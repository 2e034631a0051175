"""ONNX Runtime backend: explicit, ordered execution providers; the active one is recorded."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..contract import ArtifactManifest
from ..errors import BackendUnavailableError
from .base import SessionInfo, register_backend

log = logging.getLogger(__name__)
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


@register_backend("onnxruntime")
class OnnxRuntimeSession:
    def __init__(self, path: Path, manifest: ArtifactManifest, providers: tuple[str, ...] | None = None,
                 threads: int | None = None, allow_fallback: bool = False):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install 'retinaedge[edge]'") from exc
        requested = tuple(providers or DEFAULT_PROVIDERS)
        available = ort.get_available_providers()
        usable = [p for p in requested if p in available]
        fallback = None
        if len(usable) < len(requested):
            missing = [p for p in requested if p not in available]
            if not allow_fallback or not usable and "CPUExecutionProvider" not in available:
                raise BackendUnavailableError(
                    f"execution provider(s) {missing} unavailable; available: {available}. "
                    "Install onnxruntime-gpu (Jetson: NVIDIA's wheel) or pass allow_fallback=True."
                )
            usable = usable or ["CPUExecutionProvider"]
            fallback = f"requested {list(requested)}, using {usable}"
            log.warning("ONNX Runtime provider fallback: %s", fallback)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=usable)
        self.input_name = self.session.get_inputs()[0].name
        self.info = SessionInfo("onnxruntime", self.session.get_providers()[0], manifest, path, fallback,
                                {"providers": self.session.get_providers(), "ort_version": ort.__version__})

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = self.session.run(["logits", "cam"], {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return logits, cam
