"""Typed errors of the edge runtime, and the bases every RetinaEdge package's errors derive from.

Each subclasses a built-in so callers can catch broadly, and each message says what was
expected, what was received and how to fix it. Errors live with the package that raises them:
training's in ``training/errors.py``, quantization's in ``compression/errors.py``, export's in
``exporters/errors.py``.
"""
from __future__ import annotations


class RetinaEdgeError(Exception):
    """Base class of every error RetinaEdge raises on purpose."""


class ImageError(RetinaEdgeError, ValueError):
    """An input image could not be used."""


class UnreadableImageError(ImageError):
    """The bytes are not a decodable image (empty, truncated, wrong format, polyglot)."""


class UnsupportedImageFormatError(UnreadableImageError):
    """The bytes are an image format the product does not accept (only JPEG, PNG and WebP are)."""


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
    """A configuration key or value is invalid (the base of every package's configuration errors)."""


class UnknownNameError(ConfigError):
    """A registry or table has no entry of that name; the message lists the known names and close matches."""
