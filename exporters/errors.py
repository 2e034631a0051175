"""Errors the exporters raise."""
from __future__ import annotations

from edge_runtime.errors import ConfigError, RetinaEdgeError


class ExportConfigError(ConfigError):
    """An export was asked for something its format or inputs cannot give (precision, calibration photos)."""


class ExportParityError(RetinaEdgeError, ValueError):
    """An exported artifact's outputs (or its spec, where it cannot run here) disagree with the PyTorch model."""
