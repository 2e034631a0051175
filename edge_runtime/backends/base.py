"""One protocol for every runtime; one small class per backend, registered by artifact format."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np

from ..contract import ArtifactManifest, manifest_path_for, sha256_file
from ..errors import ArtifactError, ConfigError, ManifestError
from ..formats import format_for_path
from ..registry import Registry
from ._inspect import inspect_artifact
from .options import RuntimeOptions

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionInfo:
    backend: str  # registered backend name, e.g. "onnxruntime"
    provider: str  # what actually executes, e.g. "CPUExecutionProvider" or "XNNPACK"
    manifest: ArtifactManifest
    path: Path
    fallback: str | None = None  # set when the requested provider was unavailable and fallback was allowed
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HeadOutputs:
    """Every output of one run, by head (``ArtifactManifest.heads``); the DME pair is None without a DME head."""

    logits: np.ndarray  # N x 5
    cam: np.ndarray  # N x 5 x h x w
    dme_logit: np.ndarray | None = None  # N x 1
    dme_cam: np.ndarray | None = None  # N x 1 x h x w

    @classmethod
    def from_named(cls, outputs: dict[str, np.ndarray]) -> HeadOutputs:
        """From the graph's outputs by name (``contract.output_names_for``)."""
        return cls(outputs["logits"], outputs["cam"], outputs.get("dme_logit"), outputs.get("dme_cam"))

    @classmethod
    def concatenate(cls, parts: list[HeadOutputs]) -> HeadOutputs:
        """Outputs of several runs (e.g. one per photo on a static-batch graph), in order."""
        def join(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return cls(*(join(f.name) for f in fields(cls)))


class Session(Protocol):
    info: SessionInfo

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised N x C x S x S (or NHWC per manifest) float32 -> (logits N x 5, cam N x 5 x h x w)."""

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        """The same batch -> every head's outputs (the DME head's too, when the manifest lists it)."""


class SessionBase:
    """What every backend shares: ``run`` is the grade head of ``run_heads``."""

    info: SessionInfo

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.run_heads(batch)
        return outputs.logits, outputs.cam


BACKENDS: Registry[type] = Registry("runtime backend")  # runtime name -> Session class


def register_backend(runtime: str):
    """Register a Session class under the runtime name used in edge_runtime.formats.RUNTIME_FORMATS."""
    return BACKENDS.decorator(runtime)


def load_manifest_dict(path: str | Path) -> dict:
    """The sidecar manifest of ``path`` as the JSON object on disk (signature included)."""
    sidecar = manifest_path_for(path)
    if not sidecar.is_file():
        raise ManifestError(
            f"{Path(path).name} has no manifest beside it ({sidecar.name}); RetinaEdge never guesses preprocessing, "
            "labels or thresholds. Re-export it with `retinaedge export`."
        )
    try:
        data = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ManifestError(f"{sidecar.name} is not valid JSON (or nested too deeply): {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{sidecar.name} must hold a JSON object, got {type(data).__name__}")
    return data


def load_manifest(path: str | Path) -> ArtifactManifest:
    """The sidecar manifest, parsed but not checked against the file (see ``check_artifact``)."""
    return ArtifactManifest.from_dict(load_manifest_dict(path))


TrustedKey = Union[str, Path, bytes, "Ed25519PublicKey", None]


def resolve_trusted_key(trusted_key: TrustedKey) -> Ed25519PublicKey | None:
    """The publisher key to enforce: the one given, else $RETINAEDGE_TRUSTED_KEY, else None (no signature check)."""
    from .. import signing

    if trusted_key is None:
        return signing.trusted_key_from_env()
    return signing.load_public_key(trusted_key)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-ready dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):  # NaN metrics equal themselves here
            out.append(f"{prefix}{key}")
    return out


def check_embedded_manifest(name: str, sidecar: dict, embedded: dict) -> None:
    """Refuse a sidecar that disagrees with the manifest inside the file (sha256 and signature aside)."""
    try:
        side = ArtifactManifest.from_dict({k: v for k, v in sidecar.items() if k != "signature"}).to_dict()
        inner = ArtifactManifest.from_dict({k: v for k, v in embedded.items() if k != "signature"}).to_dict()
    except ManifestError as exc:
        raise ManifestError(f"{name}: the manifest embedded in the file is invalid ({exc}); re-export it") from exc
    ignored = {"sha256", "signature"}  # the file-bound fields: null inside the file (edge_runtime.formats)
    differing = [k for k in _differences(side, inner) if k.split(".")[0] not in ignored]
    if differing:
        raise ManifestError(
            f"{name}: the sidecar manifest disagrees with the one embedded in the file on {', '.join(differing[:8])}; "
            "the sidecar was edited or belongs to another file. Restore the published sidecar or download the model again."
        )


def check_artifact(path: str | Path, allow_ungated: bool = False, verify_checksum: bool = True,
                    trusted_key: TrustedKey = None) -> ArtifactManifest:
    """Every check that precedes screening with ``path``; returns its manifest.

    Order: sidecar exists and parses; signature (when a publisher key is trusted, via ``trusted_key`` or
    $RETINAEDGE_TRUSTED_KEY); format; sha256 of the file; sidecar == embedded manifest; fidelity gate; stored
    weight types == the manifest's precision (a warning only with ``allow_ungated``).

    Raises:
        ArtifactError: missing file, unknown suffix, checksum mismatch, weights of another precision, failed gate.
        ManifestError: missing, invalid or edited manifest (ManifestSignatureError: unsigned or altered when a key
            is trusted).
    """
    from ..signing import verify_manifest

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} not found")
    spec = format_for_path(path)
    raw = load_manifest_dict(path)
    key = resolve_trusted_key(trusted_key)
    if key is not None:
        verify_manifest(raw, key, what=f"{path.name}: sidecar manifest")
    manifest = ArtifactManifest.from_dict(raw)
    if manifest.format != spec.name:
        raise ArtifactError(f"{path.name}: manifest says format {manifest.format!r} but the file is {spec.name!r}")
    if verify_checksum:
        actual = sha256_file(path)
        if manifest.sha256 != actual:
            raise ArtifactError(
                f"{path.name}: sha256 {actual[:12]}... does not match the manifest's {str(manifest.sha256)[:12]}...; "
                "the file is corrupt or was replaced. Download or export it again."
            )
    facts = inspect_artifact(path, spec.name)
    if not facts.readable:
        log.warning("%s: %s; sidecar not cross-checked", path.name, "; ".join(facts.notes))
    elif facts.embedded_manifest is None:
        raise ManifestError(f"{path.name} carries no embedded manifest to check its sidecar against; "
                            "re-export it with `retinaedge export`")
    else:
        # No separate signature check inside: the sidecar's signature covers sha256, so it binds every byte of the
        # file, the embedded copy included.
        check_embedded_manifest(path.name, raw, facts.embedded_manifest)
    if not manifest.ready and not allow_ungated:
        raise ArtifactError(
            f"{path.name}: fidelity gate is {str(manifest.gate.status)!r} ({'; '.join(manifest.gate.failures) or 'no details'}); "
            "refusing to screen with it. Pass --allow-ungated to override for testing only."
        )
    stored = facts.weights.precision if facts.weights else None
    if stored is not None and stored != manifest.quantization.precision:
        problem = (f"{path.name}: the manifest says {manifest.quantization.precision} but the file stores {stored} "
                   f"weights ({facts.weights})")
        # The precision is part of what a ready artifact vouches for. --allow-ungated (testing, and the exporter's
        # own numerical verification, where e.g. accuracy control may have reverted every layer) only warns.
        if not allow_ungated:
            raise ArtifactError(f"{problem}; it was replaced or mislabelled. Download or export it again.")
        log.warning("%s; allowed only because the gate is overridden", problem)
    return manifest


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
                 trusted_key: TrustedKey = None, options: RuntimeOptions | None = None, **overrides) -> Session:
    """Open an artifact with the backend its format names, after ``check_artifact``'s checks.

    ``trusted_key``: the publisher's Ed25519 public key (PEM path or text, raw base64); default
    $RETINAEDGE_TRUSTED_KEY. With a key, unsigned or altered manifests are refused. ``options`` (typed, validated)
    says how the runtime runs it; keyword ``overrides`` replace single fields (``threads=2``, ``providers=(...)``).

    Raises:
        ArtifactError: missing file, unknown suffix, checksum mismatch, mislabelled weights, failed/unrun gate.
        ManifestError: missing, invalid, edited or (with a key) unsigned manifest.
        BackendUnavailableError: the runtime is not installed or cannot run on this OS.
    """
    options = resolve_options(options, **overrides)
    path = Path(path)
    manifest = check_artifact(path, allow_ungated, verify_checksum, trusted_key)
    spec = format_for_path(path)
    return BACKENDS.get(spec.runtime)(path, manifest, options)
