"""The artifact manifest: drafted from the checkpoint, finalised once after verification and the gate.

``finalise_manifest`` is the one place a manifest is written. What ``sha256`` covers: the artifact's final
bytes (every file of a directory artifact), i.e. *with* the embedded manifest in it. The embedded copy cannot
describe the file that contains it, so it is the sidecar with its file-bound fields (``sha256``, and a
signature once manifests are signed) set to null; everything else is identical (docs/reference/manifest.md).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.contract import (
    ArtifactManifest,
    GateResult,
    OperatingPoint,
    QuantizationInfo,
    manifest_path_for,
    output_names_for,
    sha256_file,
)
from edge_runtime.formats import embedded_manifest_json, runtime_format

from .base import ExportInputs, Reference
from .errors import ExportParityError


def draft_manifest(inputs: ExportInputs, reference: Reference, fmt: str, quantization: QuantizationInfo,
                   gate: GateResult, point: OperatingPoint | None = None,
                   dme_point: OperatingPoint | None = None) -> ArtifactManifest:
    """Everything but the file-bound fields; ``point`` and ``dme_point`` are the artifact's own referral and DME
    operating points (default: the checkpoint's)."""
    meta = inputs.meta
    return ArtifactManifest(
        model_name=meta.model_name, model_version=meta.model_version(quantization.precision),
        format=fmt, preprocess=inputs.policy, cam_shape=reference.cam_shape,
        operating_point=point or meta.operating_point, quantization=quantization, gate=gate,
        heads=meta.heads, output_names=output_names_for(meta.heads), dme_operating_point=dme_point or meta.dme_point,
        training_data_fingerprint=meta.data_fingerprint, git_sha=meta.git_sha,
        extra={"num_features": meta.num_features, "macs": reference.macs,
               "metrics": {k: v.get("qwk") for k, v in meta.metrics.items() if isinstance(v, dict)}},
    )


@dataclass(frozen=True)
class ArtifactEvidence:
    """What was measured on the artifact itself, for decisions taken when its manifest is finalised."""

    logits: np.ndarray | None  # the artifact's outputs on the val photos (or the converted torch graph's,
    cam: np.ndarray | None  # where its runtime cannot run here); None where neither could run
    labels: np.ndarray | None  # grades of the val photos; None when unlabelled
    reference: Reference  # FP32 PyTorch on the same photos


def finalise_manifest(path: Path, manifest: ArtifactManifest, evidence: ArtifactEvidence,
                      embed: Callable[[Path, str], None],
                      sign: Callable[[dict], dict] | None = None) -> ArtifactManifest:
    """Write ``manifest`` once: into the file (``embed``), then beside it; returns it with ``sha256`` set.

    The hook for what is decided last, in this order:
      1. Decisions that change grades go in *before* embedding, so the file carries them: e.g. the artifact's
         own operating point chosen on ``evidence`` (``manifest = manifest.replace(operating_point=...)``).
      2. Embed: the file's final bytes.
      3. ``sha256`` of those bytes.
      4. ``sign`` (e.g. ``functools.partial(edge_runtime.signing.sign_manifest, private_key=key)``) signs the
         sidecar's dict, ``sha256`` included; the signed dict is what is written.
      5. The sidecar, then a read-back: the embedded copy must equal the sidecar but for its file-bound fields.
    """
    embed(path, embedded_manifest_json(manifest))
    manifest = manifest.replace(sha256=sha256_file(path))
    sidecar = manifest.to_dict()
    if sign is not None:
        sidecar = sign(sidecar)
    manifest_path_for(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    embedded = runtime_format(manifest.format).read_embedded_manifest(path)
    if embedded is None or embedded_manifest_json(embedded) != embedded_manifest_json(manifest):
        raise ExportParityError(f"{path.name}: the manifest read back from the file differs from its sidecar")
    return manifest
