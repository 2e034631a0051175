"""Runtime backends; importing this package registers all of them (each imports its runtime lazily)."""
from . import coreml, litert, onnxruntime  # noqa: F401
from .base import (
           HeadOutputs,
           Session,
           SessionBase,
           SessionInfo,
           load_manifest,
           open_session,
           register_backend,
           resolve_options,
)
from .options import CpuFeatures, RuntimeOptions, cpu_features, int8_target

__all__ = ["CpuFeatures", "HeadOutputs", "RuntimeOptions", "Session", "SessionBase", "SessionInfo", "cpu_features", "int8_target", "load_manifest",
           "open_session", "register_backend", "resolve_options"]
