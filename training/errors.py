"""Errors the training package raises (configuration errors derive from ``edge_runtime.errors.ConfigError``)."""
from __future__ import annotations

from edge_runtime.errors import RetinaEdgeError


class CheckpointError(RetinaEdgeError, ValueError):
    """A checkpoint file or its metadata is not what `retinaedge train` writes."""


class DatasetError(RetinaEdgeError, ValueError):
    """A dataset layout cannot be read (missing files, bad grades, unknown layout)."""
