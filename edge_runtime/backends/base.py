"""One protocol for every runtime; one small class per backend, registered by artifact format."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from ..contract import ArtifactManifest, manifest_path_for, sha256_file
from ..errors import ArtifactError, ConfigError, ManifestError
from .options import RuntimeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionInfo:
    backend: str  # registered backend name, e.g. "onnxruntime"
    provider: str  # what actually executes, e.g. "CPUExecutionProvider" or "XNNPACK"
    manifest: ArtifactManifest
    path: Path
    fallback: str | None = None  # set when the requested provider was unavailable and fallback was allowed
    extra: dict = field(default_factory=dict)


class Session(Protocol):
    info: SessionInfo

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised N x C x S x S (or NHWC per manifest) float32 -> (logits N x 5, cam N x 5 x h x w)."""


_BACKENDS: dict[str, Callable[..., Session]] = {}


def register_backend(runtime: str):
    """Register a Session class under the runtime name used in exporters.formats.FORMATS."""

    def decorator(cls):
        _BACKENDS[runtime] = cls
        return cls

    return decorator


def load_manifest(path: str | Path) -> ArtifactManifest:
    sidecar = manifest_path_for(path)
    if not sidecar.is_file():
        raise ManifestError(
            f"{Path(path).name} has no manifest beside it ({sidecar.name}); RetinaEdge never guesses preprocessing, "
            "labels or thresholds. Re-export it with `retinaedge export`."
        )
    return ArtifactManifest.from_json(sidecar.read_text())


def resolve_options(options: RuntimeOptions | None = None, **overrides) -> RuntimeOptions:
    """``options`` (default: runtime defaults) with keyword overrides of its fields, e.g. ``threads=2``;
    an unknown name is a ConfigError, never silently dropped. ``None`` overrides keep the field as it is."""
    known = {f.name for f in fields(RuntimeOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown runtime option(s) {unknown}; RuntimeOptions has {sorted(known)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(options or RuntimeOptions(), **overrides)


def open_session(path: str | Path, allow_ungated: bool = False, verify_checksum: bool = True,
                 options: RuntimeOptions | None = None, **overrides) -> Session:
    """Open an artifact with the backend its format names, after checking manifest, checksum and gate.

    ``options`` (typed, validated) says how the runtime runs it; keyword ``overrides`` replace single fields
    (``threads=2``, ``providers=(...)``, ``allow_fallback=True``).

    Raises:
        ConfigError: an unknown or invalid runtime option.
        ArtifactError: missing file, unknown suffix, checksum mismatch, or a failed/unrun fidelity gate.
        ManifestError: missing or invalid manifest.
        BackendUnavailableError: the runtime is not installed or cannot run on this OS.
    """
    from exporters.formats import format_for_path

    options = resolve_options(options, **overrides)
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} not found")
    spec = format_for_path(path)
    manifest = load_manifest(path)
    if manifest.format != spec.name:
        raise ArtifactError(f"{path.name}: manifest says format {manifest.format!r} but the file is {spec.name!r}")
    if verify_checksum:
        actual = sha256_file(path)
        if manifest.sha256 != actual:
            raise ArtifactError(
                f"{path.name}: sha256 {actual[:12]}... does not match the manifest's {str(manifest.sha256)[:12]}...; "
                "the file is corrupt or was replaced. Download or export it again."
            )
    if not manifest.ready and not allow_ungated:
        raise ArtifactError(
            f"{path.name}: fidelity gate is {manifest.gate.status!r} ({'; '.join(manifest.gate.failures) or 'no details'}); "
            "refusing to screen with it. Pass --allow-ungated to override for testing only."
        )
    if spec.runtime not in _BACKENDS:
        raise ArtifactError(f"no backend registered for runtime {spec.runtime!r}")
    return _BACKENDS[spec.runtime](path, manifest, options)


def embedded_manifest_json(manifest: ArtifactManifest) -> str:
    """What exporters embed inside the file: the manifest without the file's own checksum (circular)."""
    return json.dumps({**manifest.to_dict(), "sha256": None}, sort_keys=True)
