"""Errors the compression package raises."""
from __future__ import annotations

from edge_runtime.errors import ConfigError


class QuantizationConfigError(ConfigError):
    """A quantization recipe or QAT configuration is invalid, or the photos it needs are missing."""


class DistillationConfigError(ConfigError):
    """Distillation cannot start: no teacher, a teacher checkpoint that is missing, or unlabelled photos that
    would leak the labelled data's val/test photos into training."""
