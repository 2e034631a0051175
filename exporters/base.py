"""Export machinery shared by every format: registry, timing wrapper, manifest, numerical verification."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compression.gate import GateThresholds, compare, evaluate_gate
from compression.qat import QATConfig
from compression.quantize import AccuracyTarget, QuantRecipe
from edge_runtime.contract import (
    ArtifactManifest,
    GateResult,
    PreprocessPolicy,
    QuantizationInfo,
    manifest_path_for,
    operating_point_of,
    sha256_file,
)
from edge_runtime.errors import ConfigError, ExportParityError

from .formats import FORMATS, FormatSpec, get_format

log = logging.getLogger(__name__)


@dataclass
class ExportContext:
    """Everything an exporter needs; built once per checkpoint and shared by all formats."""

    model: torch.nn.Module  # DRClassifier in eval mode
    meta: dict  # checkpoint metadata
    out_dir: Path
    calib: np.ndarray  # normalised calibration batch N x C x S x S (real fundus photos)
    val: np.ndarray  # normalised validation batch for parity / gate
    val_labels: np.ndarray | None = None
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    name: str | None = None
    escalate: bool = True  # on a failed INT8 gate, retry as _fallback_retry describes
    qat: QATConfig | None = None  # last resort after mixed precision; needs tuning_images
    # Unlabelled train-split photos for accuracy-controlled mixed precision and QAT; never the calib or val photos.
    tuning_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 1, 1), np.float32))
    # (logits, cam) on ``val`` of the quantized graph a converter was given, for formats this OS cannot run.
    simulated: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Work several formats reuse (the PT2E QAT graph); contexts derived by dataclasses.replace share this dict.
    shared: dict = field(default_factory=dict)

    @property
    def policy(self) -> PreprocessPolicy:
        return PreprocessPolicy.from_dict(self.meta["preprocess"])

    @property
    def stem(self) -> str:
        return self.name or self.meta["model_name"]

    def accuracy_target(self) -> AccuracyTarget | None:
        """FP32 grades on the tuning photos, to be kept at the gate's agreement (recipe nncf_ac)."""
        if not len(self.tuning_images):
            return None
        return AccuracyTarget(self.tuning_images, min(self.thresholds.min_agreement, 1.0))

    def pt2e_int8(self, target: str, fold_quantize: bool = False):
        """W8A8 of the checkpoint through PT2E for the TFLite and CoreML converters: post-training, or
        quantization-aware fine-tuning towards FP32 when the recipe is ``qat`` (the gate's last resort).

        Returns (quantized graph module, quantizer, the recipe to record); ``target`` names the runtime kernels.
        """
        from compression.pt2e import convert_trained, pt2e_qat_train
        from compression.quantize import pt2e_quantize
        from training.models import ExportModule

        module = ExportModule(self.model)
        if not len(self.calib):
            raise ConfigError("INT8 calibrates activations on real fundus photos: pass --calib")
        if self.recipe.name == "qat":
            recipe = QuantRecipe("pt2e_qat", activation_type="int8", weight_type="int8", target=target)
            # TFLite and CoreML convert the same fine-tuned graph: train it once per QAT config and photos.
            key = ("pt2e_qat", self.qat, _digest(self.calib), _digest(self.tuning_images))
            if key not in self.shared:
                self.shared[key] = pt2e_qat_train(module, self.calib, self.tuning_images, self.qat)
            trained, quantizer = self.shared[key]
            quantized = convert_trained(trained, fold_quantize)
        else:
            recipe = QuantRecipe("pt2e", activation_type="int8", weight_type="int8", target=target)
            quantized, quantizer = pt2e_quantize(module, self.calib, recipe, fold_quantize)
        return quantized, quantizer, recipe

    def example(self) -> torch.Tensor:
        size = self.policy.input_size
        return torch.from_numpy(self.val[:1]).float() if len(self.val) else torch.randn(1, 3, size, size)

    def manifest(self, fmt: str, quantization: QuantizationInfo, cam_shape: tuple[int, int]) -> ArtifactManifest:
        return ArtifactManifest(
            model_name=self.meta["model_name"],
            model_version=f"{self.meta['model_name']}-{self.meta.get('data_fingerprint', 'nodata')[:8]}-{quantization.precision}",
            format=fmt, preprocess=self.policy, cam_shape=cam_shape,
            operating_point=operating_point_of(self.meta), quantization=quantization,
            training_data_fingerprint=self.meta.get("data_fingerprint"), git_sha=self.meta.get("git_sha"),
            extra={"num_features": self.meta.get("num_features"), "macs": self.macs(),
                   "metrics": {k: v.get("qwk") for k, v in self.meta.get("metrics", {}).items() if isinstance(v, dict)}},
        )

    def macs(self) -> int:
        if not hasattr(self, "_macs"):
            from training.models.profile import count_macs

            self._macs = count_macs(self.model, self.policy.input_size)
        return self._macs

    @torch.no_grad()
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """FP32 PyTorch (logits, cam) on the validation batch; computed once."""
        if not hasattr(self, "_reference"):
            self.model.eval()
            logits, cams = [], []
            for i in range(0, len(self.val), 16):
                lg, cm = self.model.forward_with_cam(torch.from_numpy(self.val[i:i + 16]).float())
                logits.append(lg.numpy())
                cams.append(cm.numpy())
            self._reference = (np.concatenate(logits), np.concatenate(cams))
        return self._reference


@dataclass
class ArtifactRecord:
    """One row of artifacts/index.json."""

    format: str
    precision: str
    status: str  # ok | failed
    path: str | None = None
    sha256: str | None = None
    size_mb: float | None = None
    export_seconds: float | None = None
    gate: str | None = None  # passed | failed | not_run | not_required
    parity: dict = field(default_factory=dict)
    verified: str | None = None  # how it was verified
    error: str | None = None


Exporter = Callable[[ExportContext, str], tuple[Path, QuantizationInfo]]
_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str):
    """Register ``fn(ctx, precision) -> (artifact path, quantization info)`` for a format in FORMATS."""
    get_format(name)

    def decorator(fn: Exporter) -> Exporter:
        _EXPORTERS[name] = fn
        return fn

    return decorator


def write_manifest(path: Path, manifest: ArtifactManifest) -> ArtifactManifest:
    manifest = manifest.replace(sha256=sha256_file(path))
    manifest_path_for(path).write_text(manifest.to_json())
    return manifest


def verify_artifact(ctx: ExportContext, spec: FormatSpec, path: Path, manifest: ArtifactManifest) -> tuple[GateResult, dict, str]:
    """Run the artifact on the validation batch and compare with PyTorch; INT8 goes through the gate."""
    from edge_runtime.backends import open_session

    ref_logits, ref_cam = ctx.reference()
    session = open_session(path, allow_ungated=True)
    logits, cam = session.run(ctx.val)
    if cam.shape != ref_cam.shape or logits.shape != ref_logits.shape:
        raise ExportParityError(f"{path.name}: output shapes logits {logits.shape} cam {cam.shape}, "
                                f"expected {ref_logits.shape} {ref_cam.shape}")
    metrics = compare(ref_logits, ref_cam, logits, cam, ctx.val_labels, manifest.operating_point.threshold)
    # The CAM identity every artifact must keep: logits - mean_hw(cam) is the (constant) classifier bias.
    bias = logits - cam.mean(axis=(2, 3))
    metrics["cam_identity_error"] = float(np.abs(bias - bias.mean(0, keepdims=True)).max())
    precision = manifest.quantization.precision
    if precision == "int8":
        gate = evaluate_gate(metrics, ctx.thresholds)
    else:
        atol = spec.atol_fp32 if precision == "fp32" else spec.atol_fp16
        scale = max(1.0, float(np.abs(ref_logits).max()))
        failures = []
        if metrics["max_abs_logit_diff"] > atol * scale:
            failures.append(f"max |delta logits| {metrics['max_abs_logit_diff']:.2e} > {atol * scale:.2e}")
        if metrics["cam_identity_error"] > 10 * atol * scale:
            failures.append(f"cam identity error {metrics['cam_identity_error']:.2e}")
        gate = GateResult("failed" if failures else "not_required", metrics, {"atol": atol * scale}, tuple(failures))
        if failures:
            raise ExportParityError(f"{path.name}: {'; '.join(failures)}")
    return gate, metrics, f"ran {session.info.backend}/{session.info.provider} on {len(ctx.val)} images"


def export_artifact(ctx: ExportContext, fmt: str, precision: str) -> ArtifactRecord:
    """Export one format x precision, write its manifest, verify it; never raises (errors become the row)."""
    spec = get_format(fmt)
    started = time.monotonic()
    try:
        if precision not in spec.precisions:
            raise ConfigError(f"{fmt} supports precisions {spec.precisions}, not {precision!r}")
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        path, quant = _EXPORTERS[fmt](ctx, precision)
        cam_shape = tuple(int(v) for v in ctx.reference()[1].shape[2:]) if len(ctx.val) else None
        manifest = write_manifest(path, ctx.manifest(fmt, quant, cam_shape))
        seconds = time.monotonic() - started
        if spec.runs_here and len(ctx.val):
            gate, metrics, how = verify_artifact(ctx, spec, path, manifest)
        else:
            checker = _SPEC_CHECKERS.get(fmt)
            metrics = checker(path, ctx, precision) if checker else {}
            how = f"spec checked only: {spec.runtime} cannot run on this OS ({', '.join(spec.runs_on)} only)"
            gate = GateResult("not_run", {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                              {}, ("predictions need " + "/".join(spec.runs_on),))
            simulated = ctx.simulated.pop(fmt, None)
            if simulated is not None and precision == "int8" and len(ctx.val):
                ref_logits, ref_cam = ctx.reference()
                fidelity = compare(ref_logits, ref_cam, *simulated, ctx.val_labels, manifest.operating_point.threshold)
                metrics = {**metrics, **fidelity}
                gate = evaluate_gate(fidelity, ctx.thresholds)
                how = (f"spec checked; INT8 gated on the quantized torch graph that was converted "
                       f"({len(ctx.val)} images); {spec.runtime} predictions need {'/'.join(spec.runs_on)}")
        if gate.status == "failed" and precision == "int8" and spec.int8_escalation:
            retried = _fallback_retry(ctx, fmt, gate)
            if retried is not None:
                return retried
        manifest = write_manifest(path, manifest.replace(gate=gate))
        log.info("%s %s export success %.1fs, saved as %s (%.2f MB), gate %s", fmt, precision, seconds, path,
                 _size_mb(path), gate.status)
        return ArtifactRecord(fmt, precision, "ok", str(path), manifest.sha256, _size_mb(path), round(seconds, 2),
                              gate.status, {k: v for k, v in metrics.items() if k != "n"}, how)
    except Exception as exc:  # noqa: BLE001 - one format failing must not stop the others; the row says why
        log.error("%s %s export failed: %s", fmt, precision, exc)
        log.debug(traceback.format_exc())
        return ArtifactRecord(fmt, precision, "failed", export_seconds=round(time.monotonic() - started, 2),
                              error=f"{type(exc).__name__}: {exc}")


def _fallback_retry(ctx: ExportContext, fmt: str, failed: GateResult) -> ArtifactRecord | None:
    """The escalation after a failed INT8 gate, each step only if the one before failed and only the steps the
    format's ``int8_escalation`` lists (ONNX all three; TFLite and CoreML, whose PT2E path has no mixed
    precision, QAT only):
    (1) keep stem, squeeze-excite gating, head and CAM head in float;
    (2) accuracy-controlled mixed precision (``nncf_ac``): layers go back to float in order of sensitivity
        until INT8 grades the tuning photos like FP32 (needs ``tuning_images``);
    (3) quantization-aware fine-tuning towards FP32 (NNCF for ONNX, PT2E for TFLite/CoreML), if ``ctx.qat``
        is configured.
    Returns None when no fallback applies (the failed artifact then stands, marked failed)."""
    from compression.quantize import CAM_HEAD_NODES, SENSITIVE_PATTERNS

    if not ctx.escalate:
        return None
    why, record = "; ".join(failed.failures), None
    allowed, post_training = get_format(fmt).int8_escalation, ctx.recipe.name in ("ort", "nncf")
    steps = []
    if "sensitive_float" in allowed and post_training and not ctx.recipe.exclude:
        steps.append(("sensitive layers in float", ctx.recipe.with_exclusions(SENSITIVE_PATTERNS + CAM_HEAD_NODES)))
    if "accuracy_control" in allowed and post_training and len(ctx.tuning_images):
        steps.append(("accuracy-controlled mixed precision", dataclasses.replace(ctx.recipe, name="nncf_ac", exclude=())))
    if ("qat" in allowed and ctx.recipe.name != "qat" and ctx.qat is not None and ctx.qat.steps
            and len(ctx.tuning_images)):
        steps.append((f"quantization-aware fine-tuning ({ctx.qat.steps} steps)",
                      dataclasses.replace(ctx.recipe, name="qat", exclude=())))
    for label, recipe in steps:
        log.warning("%s int8 failed its gate (%s); retrying: %s", fmt, why, label)
        # The escalation is driven from here, so the retry itself does not escalate.
        record = export_artifact(_derived(ctx, recipe=recipe, escalate=False), fmt, "int8")
        record.verified = f"{record.verified}; {label} after: {why}"
        if record.gate != "failed":
            return record
        why = f"{why}; {label}: {'; '.join(gate_failures(record))}"
    return record  # the last attempt's file and manifest are what is on disk


def _derived(ctx: ExportContext, **changes) -> ExportContext:
    """A copy of ``ctx`` with ``changes`` that keeps the cached FP32 reference outputs and MAC count."""
    derived = dataclasses.replace(ctx, **changes)
    derived.__dict__.update({k: v for k, v in ctx.__dict__.items() if k in ("_reference", "_macs")})
    return derived


def gate_failures(record: ArtifactRecord) -> list[str]:
    """Why a row failed: its export error, or the gate failures recorded in its manifest."""
    if not record.path:
        return [record.error or "export failed"]
    sidecar = manifest_path_for(record.path)
    return list(ArtifactManifest.from_json(sidecar.read_text()).gate.failures) if sidecar.is_file() else []


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def _size_mb(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 1e6, 3)


def write_index(out_dir: Path, records: list[ArtifactRecord], meta: dict) -> Path:
    index = {"schema_version": 1, "model_name": meta["model_name"], "data_fingerprint": meta.get("data_fingerprint"),
             "artifacts": [dataclasses.asdict(r) for r in records]}
    path = out_dir / "index.json"
    path.write_text(json.dumps(index, indent=2, default=float))
    return path


_SPEC_CHECKERS: dict[str, Callable] = {}


def register_spec_checker(fmt: str):
    def decorator(fn):
        _SPEC_CHECKERS[fmt] = fn
        return fn
    return decorator


def known_formats() -> list[str]:
    return [f for f in FORMATS if f in _EXPORTERS]
