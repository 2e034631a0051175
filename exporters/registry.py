"""Importing this module registers every exporter (each imports its converter lazily or at module level)."""
from . import coreml, onnx, tflite  # noqa: F401
from .base import ArtifactRecord, ExportContext, export_artifact, known_formats, write_index

__all__ = ["ArtifactRecord", "ExportContext", "export_artifact", "known_formats", "write_index"]
