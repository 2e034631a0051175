"""What a device needs to know about artifact formats: suffix -> backend, tensor names, and where the
manifest sits inside the file. Torch-free; ``exporters.formats`` extends each row with its export half.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from .contract import OUTPUT_NAMES, ArtifactManifest
from .errors import ArtifactError
from .registry import unknown_name

INPUT_NAME = "input"
# Key of the manifest in ONNX metadata_props, the TFLite Metadata table and CoreML user-defined metadata.
MANIFEST_METADATA_KEY = "retinaedge_manifest"
# Manifest fields that describe the final file (its hash, a signature over the sidecar), so the copy embedded in
# that file cannot hold them: the embedded manifest is the sidecar with these set to null
# (docs/reference/manifest.md).
FILE_BOUND_FIELDS = ("sha256", "signature")


@dataclass(frozen=True)
class RuntimeFormat:
    name: str  # key used on the command line, in manifests, index.json and benchmark rows
    suffix: str  # artifact file (or directory) suffix
    runtime: str  # the edge_runtime backend that runs it
    runs_on: tuple[str, ...]  # platform.system() values where the runtime can execute it
    is_directory: bool = False
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = OUTPUT_NAMES  # TFLite drops names: its outputs are told apart by rank
    max_batch: int | None = None  # largest batch one call runs (None: any); a static-shape export runs batch 1

    @property
    def runs_here(self) -> bool:
        return platform.system() in self.runs_on

    def read_embedded_manifest(self, path: str | Path) -> ArtifactManifest | None:
        """The manifest embedded in the artifact file, or None when it carries none (read without onnx,
        onnxruntime or coremltools: edge_runtime.backends._inspect parses the containers directly)."""
        from .backends._inspect import inspect_artifact

        embedded = inspect_artifact(path, self.name).embedded_manifest
        return None if embedded is None else ArtifactManifest.from_dict(embedded)


RUNTIME_FORMATS: dict[str, RuntimeFormat] = {
    spec.name: spec
    for spec in (
        RuntimeFormat("onnx", ".onnx", "onnxruntime", ("Linux", "Darwin", "Windows")),
        RuntimeFormat("tflite", ".tflite", "litert", ("Linux", "Darwin", "Windows"), max_batch=1),
        RuntimeFormat("coreml", ".mlpackage", "coreml", ("Darwin",), is_directory=True),
    )
}


def runtime_format(name: str) -> RuntimeFormat:
    if name not in RUNTIME_FORMATS:
        raise unknown_name("artifact format", name, RUNTIME_FORMATS)
    return RUNTIME_FORMATS[name]


def format_for_path(path: str | Path) -> RuntimeFormat:
    """The format of an artifact, from its suffix."""
    suffix = Path(path).suffix.lower()
    for spec in RUNTIME_FORMATS.values():
        if spec.suffix == suffix:
            return spec
    raise ArtifactError(f"{Path(path).name}: unknown artifact suffix {suffix!r}; "
                        f"known: {[s.suffix for s in RUNTIME_FORMATS.values()]}")


def embedded_manifest_json(manifest: ArtifactManifest) -> str:
    """What exporters embed inside the file: the manifest with its file-bound fields null (FILE_BOUND_FIELDS)."""
    data = manifest.to_dict()
    return json.dumps({**data, **{k: None for k in FILE_BOUND_FIELDS if k in data}}, sort_keys=True)
