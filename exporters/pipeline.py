"""`retinaedge export`: one checkpoint -> every requested format x precision, plus artifacts/index.json.

Per artifact, in this order and nowhere else: export -> verify -> gate -> (escalate: the format's declarative
steps, each only if the one before failed) -> write the manifest once (``exporters.manifest``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from compression.calibration import PhotoBatch, load_photos
from compression.gate import DmeOutputs, GateThresholds, compare, judge
from compression.qat import QATConfig
from compression.quantize import QuantRecipe
from edge_runtime.backends.base import BACKENDS, HeadOutputs
from edge_runtime.calibration import choose_binary_operating_point, choose_operating_point
from edge_runtime.contract import (
    GateResult,
    OperatingPoint,
    manifest_path_for,
)
from training.checkpoint import CheckpointMeta
from training.data.layouts import MISSING

from . import coreml, onnx, tflite  # noqa: F401 - registers the exporters
from .base import (
    EXPORTERS,
    ArtifactRecord,
    ExportInputs,
    ExportPhotos,
    ExportRequest,
    ExportResult,
    Reference,
    TorchGraphs,
    size_mb,
    write_index,
)
from .errors import ExportConfigError, ExportParityError
from .formats import EscalationStep, FormatSpec, get_format
from .manifest import ArtifactEvidence, draft_manifest, finalise_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportPlan:
    """What to make and how INT8 is quantized and escalated; the CLI asks it, it does not re-derive the rules."""

    formats: tuple[str, ...]
    precisions: tuple[str, ...]
    recipe: QuantRecipe = field(default_factory=QuantRecipe)  # the CPU-class preset INT8 starts from
    qat: QATConfig | None = None  # QAT settings; steps > 0 lets a failed gate escalate to QAT
    escalate: bool = True  # on a failed INT8 gate, retry with the format's int8_escalation steps
    # QAT's margin-aware referral term, held around the checkpoint's own operating point (``for_checkpoint``).
    qat_margin_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "precisions", tuple(self.precisions))
        for fmt in self.formats:
            get_format(fmt)

    @property
    def jobs(self) -> list[tuple[str, str]]:
        return [(f, p) for f in self.formats for p in self.precisions if p in get_format(f).precisions]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(f, p) for f in self.formats for p in self.precisions if p not in get_format(f).precisions]

    def escalation(self, fmt: str, has_tuning_images: bool) -> list[EscalationStep]:
        """The retries a failed INT8 gate of ``fmt`` gets, in order."""
        if not self.escalate:
            return []
        qat_steps = self.qat.steps if self.qat else 0
        return [s for s in get_format(fmt).int8_escalation if s.applies(self.recipe, has_tuning_images, qat_steps)]

    @property
    def needs_tuning_images(self) -> bool:
        """Whether any INT8 job can use the unlabelled tuning photos (recipe nncf_ac or qat, or an escalation
        step): loading them is skipped otherwise."""
        int8 = [f for f, p in self.jobs if p == "int8"]
        return bool(int8) and (self.recipe.name in ("nncf_ac", "qat") or any(
            s.needs_tuning_images for f in int8 for s in self.escalation(f, has_tuning_images=True)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_checkpoint(self, meta: CheckpointMeta) -> ExportPlan:
        """The plan with what only the checkpoint knows: QAT's margin term holds the referable (and DME) log-odds
        around the operating point the gate judges referrals at."""
        if self.qat is None or self.qat_margin_weight <= 0:
            return self
        return replace(self, qat=self.qat.holding_margins(self.qat_margin_weight, meta.operating_point, meta.dme_point))


def load_inputs(checkpoint: str | Path, out_dir: str | Path, calib: str | Path | Sequence[str | Path] | None,
                val: str | Path | Sequence[str | Path] | None, thresholds: GateThresholds | None = None,
                calib_limit: int = 64, val_limit: int = 128, name: str | None = None,
                tuning_limit: int = 256) -> ExportInputs:
    """Load the checkpoint and the real photos every export of it needs.

    ``calib``'s ``calib`` split calibrates INT8 and its ``train`` split (up to ``tuning_limit`` photos,
    unlabelled) drives the gate's fallbacks; the ``val`` split of ``val`` is what parity and the gate judge.
    Both take one folder or several; limits apply per folder.
    """
    from training.models import load_checkpoint
    from training.models.dr_classifier import freeze_dynamic_padding

    model, meta = load_checkpoint(checkpoint)
    policy = meta.preprocess
    freeze_dynamic_padding(model, policy.input_size)  # artifacts have a fixed input size (the manifest's)
    empty = np.zeros((0, 3, policy.input_size, policy.input_size), np.float32)

    def load(sources, split: str, limit: int, **kwargs) -> PhotoBatch:
        batches = [load_photos(source, policy, split, limit, **kwargs) for source in _folders(sources)]
        if not batches:
            return PhotoBatch(empty, None, None)
        grades = None if any(b.grades is None for b in batches) else np.concatenate([b.grades for b in batches])
        # A folder without DME labels (EyePACS, plain images) contributes photos whose DME is MISSING.
        dme = np.concatenate([np.full(len(b.x), MISSING) if b.dme is None else b.dme for b in batches])
        return PhotoBatch(np.concatenate([b.x for b in batches]), grades, dme)

    calib_x = load(calib, "calib", calib_limit).x
    val_batch = load(val, "val", val_limit) if _folders(val) else PhotoBatch(calib_x, None, None)
    # The train split only: never the calib or val photos the result is judged on.
    tuning = load(calib, "train", tuning_limit, strict_split=True).x if tuning_limit else empty
    photos = ExportPhotos(calib_x, val_batch.x, val_batch.grades, tuning,
                          val_dme=(val_batch.dme if val_batch.dme is not None else np.full(len(val_batch.x), MISSING))
                          if meta.has_dme else None)
    return ExportInputs(Path(checkpoint), model.eval(), meta, photos, thresholds or GateThresholds(), Path(out_dir),
                        name)


def _folders(sources: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    return [sources] if isinstance(sources, (str, Path)) else list(sources or [])


@dataclass(frozen=True)
class Verdict:
    """Verification and gate of one export attempt."""

    gate: GateResult
    how: str  # how it was verified, for the index row
    metrics: dict[str, float]  # parity / fidelity figures and spec checks, for the index row
    outputs: tuple[np.ndarray, np.ndarray] | None  # what was judged: the artifact's outputs on the val photos
    point: OperatingPoint | None = None  # the artifact's own operating point, chosen on those outputs
    dme_point: OperatingPoint | None = None  # its own DME point, chosen on its DME outputs (DME head only)


class ExportPipeline:
    """Exports one checkpoint's artifacts; the FP32 reference and shared torch graphs are computed once.

    Args:
        inputs (`ExportInputs`): the checkpoint, photos and gate thresholds.
        plan (`ExportPlan`): formats, precisions, INT8 recipe and escalation.
        reference (`Reference`, optional): FP32 outputs already computed for these inputs' model and val photos.
        sign (`Callable[[dict], dict]`, optional): signs each sidecar manifest (``exporters.manifest.finalise_manifest``).
    """

    def __init__(self, inputs: ExportInputs, plan: ExportPlan, reference: Reference | None = None,
                 sign: Callable[[dict], dict] | None = None) -> None:
        self.inputs, self.plan, self.sign = inputs, plan, sign
        self.reference = reference or Reference.compute(inputs)
        if self.reference.val_sha1 != inputs.photos.digest("val"):
            raise ExportConfigError("the reference outputs given were computed on other val photos")
        self.graphs = TorchGraphs(inputs.model, inputs.photos, plan.qat)

    def export(self, fmt: str, precision: str) -> ArtifactRecord:
        """Export one format x precision, verify, gate, escalate, write its manifest; never raises (errors
        become the row)."""
        spec = get_format(fmt)
        started = time.monotonic()
        try:
            if precision not in spec.precisions:
                raise ExportConfigError(f"{fmt} supports precisions {spec.precisions}, not {precision!r}")
            self.inputs.out_dir.mkdir(parents=True, exist_ok=True)
            result, verdict, how = self._export_and_escalate(spec, precision)
            seconds = time.monotonic() - started
            manifest = draft_manifest(self.inputs, self.reference, fmt, result.quantization, verdict.gate,
                                      verdict.point, verdict.dme_point)
            evidence = ArtifactEvidence(*(verdict.outputs or (None, None)), self.inputs.photos.val_labels,
                                        self.reference)
            manifest = finalise_manifest(result.path, manifest, evidence, EXPORTERS.get(fmt).embed_manifest, self.sign)
            log.info("%s %s export success %.1fs, saved as %s (%.2f MB), gate %s", fmt, precision, seconds,
                     result.path, size_mb(result.path), verdict.gate.status)
            return ArtifactRecord(fmt, precision, "ok", str(result.path), manifest.sha256, size_mb(result.path),
                                  round(seconds, 2), verdict.gate.status,
                                  {k: v for k, v in verdict.metrics.items() if k != "n"}, how,
                                  failures=list(verdict.gate.failures))
        except Exception as exc:  # noqa: BLE001 - one format failing must not stop the others; the row says why
            log.error("%s %s export failed: %s", fmt, precision, exc)
            log.debug(traceback.format_exc())
            return ArtifactRecord(fmt, precision, "failed", export_seconds=round(time.monotonic() - started, 2),
                                  error=f"{type(exc).__name__}: {exc}")

    def _export_and_escalate(self, spec: FormatSpec, precision: str) -> tuple[ExportResult, Verdict, str]:
        """The recipe as asked, then each escalation step while the INT8 gate fails; the last attempt stands."""
        path = self.inputs.out_dir / f"{self.inputs.stem}_{precision}{spec.suffix}"
        manifest_path_for(path).unlink(missing_ok=True)  # it described the file this export replaces
        recipe = self.plan.recipe
        result = self._attempt(spec, precision, recipe, path)
        verdict = self._verify(spec, result, precision)
        how = verdict.how
        if precision != "int8" or verdict.gate.status != "failed":
            return result, verdict, how
        why = "; ".join(verdict.gate.failures)
        qat_steps = self.plan.qat.steps if self.plan.qat else 0
        for step in self.plan.escalation(spec.name, has_tuning_images=len(self.inputs.photos.tuning) > 0):
            label = step.describe(qat_steps)
            log.warning("%s int8 failed its gate (%s); retrying: %s", spec.name, why, label)
            result = self._attempt(spec, precision, step.retry_recipe(recipe), path)
            verdict = self._verify(spec, result, precision)
            how = f"{verdict.how}; {label} after: {why}"
            if verdict.gate.status != "failed":
                break
            why = f"{why}; {label}: {'; '.join(verdict.gate.failures)}"
        return result, verdict, how

    def _attempt(self, spec: FormatSpec, precision: str, recipe: QuantRecipe, path: Path) -> ExportResult:
        request = ExportRequest(self.inputs, precision, recipe, path, self.graphs)
        return EXPORTERS.get(spec.name).export(request)

    def _verify(self, spec: FormatSpec, result: ExportResult, precision: str) -> Verdict:
        """Run the artifact on the val photos (or judge what its exporter measured where it cannot run here)."""
        n = len(self.inputs.photos.val)
        if not n:
            return Verdict(GateResult("not_run", {}, {}, ("no val photos to verify on",)), "not verified: no val "
                           "photos", dict(result.spec_checks), None)
        if spec.runs_here:
            # The backend class directly: the manifest is written after verification, so open_session's
            # manifest checks do not apply yet. The draft manifest only labels the session.
            draft = draft_manifest(self.inputs, self.reference, spec.name, result.quantization, GateResult())
            session = BACKENDS.get(spec.runtime)(result.path, draft)
            outputs = session.run_heads(self.inputs.photos.val)
            how = f"ran {session.info.backend}/{session.info.provider} on {n} images"
            return self._judge(spec, result, precision, outputs, how,
                               self._dme_checks(result, outputs.dme_logit, outputs.dme_cam))
        how = f"spec checked only: {spec.runtime} cannot run on this OS ({', '.join(spec.runs_on)} only)"
        if precision == "int8" and result.outputs is not None:
            how = (f"spec checked; INT8 gated on the quantized torch graph that was converted ({n} images); "
                   f"{spec.runtime} predictions need {'/'.join(spec.runs_on)}")
            return self._judge(spec, result, precision, result.outputs, how)
        gate = GateResult("not_run", _finite(result.spec_checks), {},
                          ("predictions need " + "/".join(spec.runs_on),))
        return Verdict(gate, how, dict(result.spec_checks), None)

    def _dme_checks(self, result: ExportResult, dme_logit: np.ndarray | None,
                    dme_cam: np.ndarray | None) -> dict[str, float]:
        """The DME head's parity with PyTorch and its CAM identity (empty without a DME head)."""
        ref = self.reference
        if ref.dme_logit is None:
            return {}
        if dme_logit is None or dme_cam is None or dme_logit.shape != ref.dme_logit.shape \
                or dme_cam.shape != ref.dme_cam.shape:
            raise ExportParityError(f"{result.path.name}: DME outputs {None if dme_logit is None else dme_logit.shape} "
                                    f"{None if dme_cam is None else dme_cam.shape}, expected {ref.dme_logit.shape} "
                                    f"{ref.dme_cam.shape}; the manifest lists the dme head")
        bias = dme_logit - dme_cam.mean(axis=(2, 3))
        return {"max_abs_dme_logit_diff": float(np.abs(dme_logit - ref.dme_logit).max()),
                "max_abs_dme_cam_diff": float(np.abs(dme_cam - ref.dme_cam).max()),
                "dme_cam_identity_error": float(np.abs(bias - bias.mean(0, keepdims=True)).max())}

    def _judge(self, spec: FormatSpec, result: ExportResult, precision: str, outputs: HeadOutputs, how: str,
               dme_checks: dict[str, float] | None = None) -> Verdict:
        ref = self.reference
        logits, cam = outputs.logits, outputs.cam
        if cam.shape != ref.cam.shape or logits.shape != ref.logits.shape:
            raise ExportParityError(f"{result.path.name}: output shapes logits {logits.shape} cam {cam.shape}, "
                                    f"expected {ref.logits.shape} {ref.cam.shape}")
        if ref.dme_logit is not None and (outputs.dme_logit is None or outputs.dme_logit.shape != ref.dme_logit.shape):
            raise ExportParityError(f"{result.path.name}: DME logits "
                                    f"{None if outputs.dme_logit is None else outputs.dme_logit.shape}, expected "
                                    f"{ref.dme_logit.shape}; the manifest lists the dme head")
        metrics = {**compare(ref.logits, ref.cam, logits, cam), **(dme_checks or {})}
        point = self._operating_point(logits)
        dme_point = self._dme_operating_point(outputs.dme_logit)
        if spec.runs_here:
            # The CAM identity every artifact must keep: logits - mean_hw(cam) is the (constant) classifier bias.
            bias = logits - cam.mean(axis=(2, 3))
            metrics["cam_identity_error"] = float(np.abs(bias - bias.mean(0, keepdims=True)).max())
        if precision == "fp32":
            gate = _parity(spec, result.path, precision, metrics, ref)
        else:
            if precision == "fp16":  # an FP16 export must first be numerically the same model (else it is a bug)
                _parity(spec, result.path, precision, metrics, ref)
            # The fidelity gate: the one place a reduced-precision artifact is judged (its own decisions at its own
            # operating points vs FP32's decisions at FP32's points, on the same val photos; referral is DR or DME).
            dme = None if ref.dme_logit is None else DmeOutputs(
                ref.dme_logit, outputs.dme_logit, self.inputs.photos.val_dme, dme_point,
                self._dme_operating_point(ref.dme_logit))
            gate = judge(ref.logits, ref.cam, logits, cam, self.inputs.photos.val_labels, point,
                         self.inputs.thresholds, ref_operating_point=self._operating_point(ref.logits), dme=dme)
            metrics = {**metrics, **gate.metrics}
        return Verdict(gate, how, {**result.spec_checks, **metrics}, (logits, cam), point, dme_point)

    def _operating_point(self, logits: np.ndarray) -> OperatingPoint:
        """Referral point chosen on these outputs for the val photos, by the checkpoint's rule and target.

        Every artifact decides at a threshold chosen on its own outputs: INT8 shifts probabilities, and a threshold
        chosen on FP32 would silently move its sensitivity. Without labels (or a class) the checkpoint's point stands.
        """
        trained = self.inputs.meta.operating_point
        labels = self.inputs.photos.val_labels
        if labels is None or len(labels) == 0:
            return trained
        rule, target = self.inputs.meta.rule_and_target("grade")
        try:
            return choose_operating_point(labels, logits, rule=rule, target=target,
                                          band_fraction=float(self.inputs.meta.config.get(
                                              "uncertain_fraction", 0.05)),
                                          fingerprint=self.inputs.photos.digest("val"))
        except ValueError as exc:  # e.g. no referable val photo: nothing to choose on
            log.warning("operating point not chosen on the export's val photos (%s); keeping the checkpoint's", exc)
            return trained

    def _dme_operating_point(self, dme_logit: np.ndarray | None) -> OperatingPoint | None:
        """DME point chosen on these DME outputs for the val photos with a DME label, by the checkpoint's DME rule
        and target, for the same reason as the referral point. Without a DME head: None; without DME labels (or
        without a DME-present or a DME-absent photo) the checkpoint's point stands."""
        trained = self.inputs.meta.dme_point
        labels = self.inputs.photos.val_dme
        if trained is None or dme_logit is None or labels is None:
            return trained
        present = labels != MISSING
        rule, target = self.inputs.meta.rule_and_target("dme")
        try:
            return choose_binary_operating_point(labels[present], np.asarray(dme_logit).reshape(-1)[present],
                                                 rule=rule, target=target, fingerprint=self.inputs.photos.digest("val"))
        except ValueError as exc:
            log.warning("DME point not chosen on the export's val photos (%s); keeping the checkpoint's", exc)
            return trained


def _parity(spec: FormatSpec, path: Path, precision: str, metrics: dict[str, float], ref: Reference) -> GateResult:
    """FP32/FP16 artifacts must match PyTorch within the format's tolerance, or the export fails. FP32 needs no
    more (it is the reference); FP16 then faces the fidelity gate like INT8."""
    atol = spec.atol_fp32 if precision == "fp32" else spec.atol_fp16
    limit = atol * max(1.0, float(np.abs(ref.logits).max()))
    failures = []
    if metrics["max_abs_logit_diff"] > limit:
        failures.append(f"max |delta logits| {metrics['max_abs_logit_diff']:.2e} > {limit:.2e}")
    if metrics.get("cam_identity_error", 0.0) > 10 * limit:
        failures.append(f"cam identity error {metrics['cam_identity_error']:.2e}")
    if ref.dme_logit is not None:  # the DME head is held to the same tolerance, scaled by its own logits
        dme_limit = atol * max(1.0, float(np.abs(ref.dme_logit).max()))
        if metrics["max_abs_dme_logit_diff"] > dme_limit:
            failures.append(f"max |delta DME logit| {metrics['max_abs_dme_logit_diff']:.2e} > {dme_limit:.2e}")
        if metrics["dme_cam_identity_error"] > 10 * dme_limit:
            failures.append(f"DME cam identity error {metrics['dme_cam_identity_error']:.2e}")
    if failures:
        raise ExportParityError(f"{path.name}: {'; '.join(failures)}")
    return GateResult("not_required", _finite(metrics), {"atol": limit})


def _finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def export_all(inputs: ExportInputs, plan: ExportPlan, progress: bool = True,
               pipeline: ExportPipeline | None = None) -> list[ArtifactRecord]:
    """Every job of ``plan``; writes index.json and the resolved configuration (<stem>.export_config.yaml)."""
    from rich.progress import Progress

    plan = plan.for_checkpoint(inputs.meta)
    pipeline = pipeline or ExportPipeline(inputs, plan)
    records: list[ArtifactRecord] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("exporting", total=len(plan.jobs))
        for fmt, precision in plan.jobs:
            bar.update(task, description=f"{fmt} {precision}")
            records.append(pipeline.export(fmt, precision))
            bar.advance(task)
    for fmt, precision in plan.skipped:
        log.info("%s has no %s export; skipped", fmt, precision)
    write_index(inputs.out_dir, records, inputs.meta)
    save_export_config(inputs, plan)
    return records


def save_export_config(inputs: ExportInputs, plan: ExportPlan) -> Path:
    """The resolved configuration beside the artifacts, as training writes config.yaml beside its checkpoints."""
    config = {"checkpoint": str(inputs.checkpoint), "model_name": inputs.meta.model_name, "stem": inputs.stem,
              "plan": plan.to_dict(), "thresholds": dataclasses.asdict(inputs.thresholds),
              "photos": inputs.photos.summary(), "out_dir": str(inputs.out_dir)}
    path = inputs.out_dir / f"{inputs.stem}.export_config.yaml"
    path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(value):
    """Tuples as lists, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
