"""One protocol for every runtime; one small class per backend, registered by artifact format."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..contract import ArtifactManifest, manifest_path_for, sha256_file
from ..errors import ArtifactError, ManifestError
from ..formats import format_for_path
from ..registry import Registry

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


BACKENDS: Registry[type] = Registry("runtime backend")  # runtime name -> Session class


def register_backend(runtime: str):
    """Register a Session class under the runtime name used in edge_runtime.formats.RUNTIME_FORMATS."""
    return BACKENDS.decorator(runtime)


def load_manifest(path: str | Path) -> ArtifactManifest:
    sidecar = manifest_path_for(path)
    if not sidecar.is_file():
        raise ManifestError(
            f"{Path(path).name} has no manifest beside it ({sidecar.name}); RetinaEdge never guesses preprocessing, "
            "labels or thresholds. Re-export it with `retinaedge export`."
        )
    return ArtifactManifest.from_json(sidecar.read_text())


def open_session(path: str | Path, allow_ungated: bool = False, verify_checksum: bool = True, **options) -> Session:
    """Open an artifact with the backend its format names, after checking manifest, checksum and gate.

    Raises:
        ArtifactError: missing file, unknown suffix, checksum mismatch, or a failed/unrun fidelity gate.
        ManifestError: missing or invalid manifest.
        BackendUnavailableError: the runtime is not installed or cannot run on this OS.
    """
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
    return BACKENDS.get(spec.runtime)(path, manifest, **options)
