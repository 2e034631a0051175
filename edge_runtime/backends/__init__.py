"""Runtime backends; importing this package registers all of them (each imports its runtime lazily)."""
from . import coreml, litert, onnxruntime  # noqa: F401
from .base import Session, SessionInfo, load_manifest, open_session, register_backend

__all__ = ["Session", "SessionInfo", "load_manifest", "open_session", "register_backend"]
