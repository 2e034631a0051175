"""The one table of format facts, read by the exporters, the edge runtime, the benchmarks and the tests.

Torch-free: the edge runtime picks its backend from ``suffix`` here.
"""
from __future__ import annotations

import difflib
import platform
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import ArtifactError, ConfigError


@dataclass(frozen=True)
class FormatSpec:
    name: str  # key used on the command line, in index.json and in benchmark rows
    suffix: str  # artifact file (or directory) suffix
    precisions: tuple[str, ...]  # what the exporter can produce
    runtime: str  # the edge_runtime backend that runs it
    runs_on: tuple[str, ...]  # platform.system() values where the runtime can execute it
    atol_fp32: float  # max |delta logits| vs PyTorch for fp32 artifacts
    atol_fp16: float  # same for fp16
    # What a failed INT8 gate retries, in order (exporters.base._fallback_retry): "sensitive_float" (stem, SE,
    # head and CAM head in float), "accuracy_control" (nncf_ac), "qat" (quantization-aware fine-tuning).
    int8_escalation: tuple[str, ...] = ()
    is_directory: bool = False
    notes: str = ""

    @property
    def runs_here(self) -> bool:
        return platform.system() in self.runs_on


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("onnx", ".onnx", ("fp32", "int8"), "onnxruntime", ("Linux", "Darwin", "Windows"), 1e-3, 5e-2,
                   int8_escalation=("sensitive_float", "accuracy_control", "qat"), notes="INT8 as QDQ; opset 18"),
        FormatSpec("tflite", ".tflite", ("fp32", "fp16", "int8"), "litert", ("Linux", "Darwin", "Windows"), 1e-3, 5e-2,
                   int8_escalation=("qat",),
                   notes="litert-torch; FP16 weights via ai-edge-quantizer float casting; INT8 through the PT2E "
                         "quantizer (W8A8, per-channel weights), PT2E QAT when the gate fails"),
        FormatSpec("coreml", ".mlpackage", ("fp16", "int8"), "coreml", ("Darwin",), 1e-3, 5e-2,
                   int8_escalation=("qat",), is_directory=True,
                   notes="ML program; prediction needs macOS, Linux verifies the spec only"),
    )
}


def get_format(name: str) -> FormatSpec:
    if name not in FORMATS:
        close = difflib.get_close_matches(name, list(FORMATS), n=2)
        raise ConfigError(f"unknown format {name!r}; known: {sorted(FORMATS)}" + (f"; did you mean {close}?" if close else ""))
    return FORMATS[name]


def format_for_path(path: str | Path) -> FormatSpec:
    """The format of an artifact, from its suffix."""
    suffix = Path(path).suffix.lower()
    for spec in FORMATS.values():
        if spec.suffix == suffix:
            return spec
    raise ArtifactError(f"{Path(path).name}: unknown artifact suffix {suffix!r}; known: {[s.suffix for s in FORMATS.values()]}")
