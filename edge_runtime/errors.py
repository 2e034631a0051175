"""Typed errors shared by every RetinaEdge package.

Each subclasses a built-in so callers can catch broadly, and each message says what was
expected, what was received and how to fix it.
"""
from __future__ import annotations


class RetinaEdgeError(Exception):
    """Base class of every error RetinaEdge raises on purpose."""


class ImageError(RetinaEdgeError, ValueError):
    """An input image could not be used."""


class UnreadableImageError(ImageError):
    """The bytes are not a decodable image (empty, truncated, wrong format, polyglot)."""


class ImageTooLargeError(ImageError):
    """The image exceeds the byte or pixel limit (decompression-bomb guard)."""


class NoFundusError(ImageError):
    """No circular fundus field of view was found in the image."""


class ManifestError(RetinaEdgeError, ValueError):
    """An artifact manifest is missing, malformed or inconsistent with its artifact."""


class ArtifactError(RetinaEdgeError, ValueError):
    """An artifact cannot be loaded (unknown format, checksum mismatch, failed gate)."""


class BackendUnavailableError(RetinaEdgeError, ImportError):
    """The runtime a backend needs is not installed or cannot run on this OS."""


class ManifestSignatureError(ManifestError):
    """A manifest is unsigned, signed by an untrusted key, or was altered after signing."""


class SigningUnavailableError(BackendUnavailableError):
    """A key is configured but the ``cryptography`` package that checks signatures is not installed."""


class ModelUpdateError(ArtifactError):
    """``update-model`` refused what the server offered (origin, size, deadline, gate, format); the current model stays."""


class OutboxError(RetinaEdgeError, RuntimeError):
    """The outbox database cannot be used; nothing already stored in it was deleted."""


class OutboxMissingError(OutboxError):
    """The outbox file does not exist or is empty where stored results were expected."""


class OutboxCorruptError(OutboxError):
    """The outbox file failed SQLite's integrity check or is not a database."""


class ConfigError(RetinaEdgeError, ValueError):
    """A configuration key or value is invalid."""


class DatasetError(RetinaEdgeError, ValueError):
    """A dataset layout cannot be read (missing files, bad grades, unknown layout)."""


class ExportParityError(RetinaEdgeError, ValueError):
    """An exported artifact's outputs disagree with the PyTorch model beyond tolerance."""


class GateFailedError(RetinaEdgeError, ValueError):
    """A quantized artifact failed the fidelity gate against its FP32 model."""
