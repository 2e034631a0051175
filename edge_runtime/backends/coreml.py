"""CoreML backend: coremltools prediction, which exists only on macOS."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ..contract import ArtifactManifest
from ..errors import BackendUnavailableError
from .base import HeadOutputs, SessionBase, SessionInfo, register_backend
from .options import DEFAULT_OPTIONS, RuntimeOptions


@register_backend("coreml")
class CoreMLSession(SessionBase):
    def __init__(self, path: Path, manifest: ArtifactManifest, options: RuntimeOptions = DEFAULT_OPTIONS):
        compute_units = options.compute_units
        if platform.system() != "Darwin":
            raise BackendUnavailableError(
                f"CoreML models run only on macOS/iOS (this is {platform.system()}); use the .onnx or .tflite artifact "
                "here, or embed the .mlpackage in an iOS app"
            )
        try:
            import coremltools as ct
        except ImportError as exc:
            raise BackendUnavailableError("coremltools is not installed: pip install 'retinaedge[export]'") from exc
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.info = SessionInfo("coreml", f"coreml/{compute_units}", manifest, path)

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        names = self.info.manifest.output_names
        outs = [self.model.predict({"input": batch[i:i + 1]}) for i in range(len(batch))]
        return HeadOutputs.from_named({name: np.concatenate([o[name] for o in outs]) for name in names})
