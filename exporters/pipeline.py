"""`retinaedge export`: one checkpoint -> every requested format x precision, plus artifacts/index.json.

Per artifact, in this order and nowhere else: export -> verify -> gate -> (escalate: the format's declarative
steps, each only if the one before failed) -> write the manifest once (``exporters.manifest``).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from compression.bias_correction import correct_output_bias
from compression.calibration import PhotoBatch, load_photos
from compression.gate import DmeOutputs, Draws, GateSet, GateThresholds, compare, judge
from compression.noise_floor import NuisanceModel
from compression.qat import QATConfig
from compression.quantize import QuantRecipe
from edge_runtime.backends.base import BACKENDS, HeadOutputs
from edge_runtime.calibration import choose_operating_point
from edge_runtime.contract import (
    GateResult,
    GateStatus,
    OperatingPoint,
    manifest_path_for,
    output_names_for,
)
from edge_runtime.formats import INPUT_NAME
from training.checkpoint import CheckpointMeta
from training.data.layouts import MISSING

from . import coreml, onnx, tflite  # noqa: F401 - registers the exporters
from .base import (
    EXPORTERS,
    ArtifactRecord,
    Attempt,
    ExportInputs,
    ExportPhotos,
    ExportRequest,
    ExportResult,
    ExportStatus,
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
    nuisance: NuisanceModel = field(default_factory=NuisanceModel)  # the re-capture draws of the gate's noise floor
    # Where converted artifacts refer: "parent" keeps the checkpoint's operating point (temperature, threshold,
    # band); "calib" re-chooses it on the artifact's outputs for the calib photos, disjoint from the gate set.
    operating_point: str = "parent"
    # QAT's margin-aware referral term, held around the checkpoint's own operating point (``for_checkpoint``).
    qat_margin_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "precisions", tuple(self.precisions))
        for fmt in self.formats:
            get_format(fmt)
        if self.operating_point not in ("parent", "calib"):
            raise ExportConfigError(f"operating_point must be 'parent' (the checkpoint's) or 'calib' (re-chosen on "
                                    f"the calib photos), got {self.operating_point!r}")

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
        spec = get_format(fmt)
        start = spec.int8_recipe(self.recipe)
        return [s for s in spec.int8_escalation if s.applies(start, has_tuning_images, qat_steps)]

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
                calib_limit: int = 64, val_limit: int | None = None, name: str | None = None,
                tuning_limit: int = 256) -> ExportInputs:
    """Load the checkpoint and the real photos every export of it needs.

    ``calib``'s ``calib`` split calibrates INT8 and its ``train`` split (up to ``tuning_limit`` photos,
    unlabelled) drives the gate's fallbacks; the ``val`` split of ``val`` is the gate set that parity and the gate
    judge (every graded val photo unless ``val_limit``), each photo with its folder and patient. Both take one
    folder or several; limits apply per folder.
    """
    from training.models import load_checkpoint
    from training.models.dr_classifier import freeze_dynamic_padding

    model, meta = load_checkpoint(checkpoint)
    policy = meta.preprocess
    freeze_dynamic_padding(model, policy.input_size)  # artifacts have a fixed input size (the manifest's)
    empty = np.zeros((0, 3, policy.input_size, policy.input_size), np.float32)

    def load(sources, split: str, limit: int | None, **kwargs) -> tuple[PhotoBatch, np.ndarray]:
        folders = _folders(sources)
        batches = [load_photos(source, policy, split, limit, **kwargs) for source in folders]
        if not batches:
            return PhotoBatch(empty, None, None), np.zeros(0, str)
        grades = None if any(b.grades is None for b in batches) else np.concatenate([b.grades for b in batches])
        # A folder without DME labels (EyePACS, plain images) contributes photos whose DME is MISSING.
        dme = np.concatenate([np.full(len(b.x), MISSING) if b.dme is None else b.dme for b in batches])
        names = _folder_names(folders)
        where = np.concatenate([np.full(len(b.x), names[i], dtype=object) for i, b in enumerate(batches)]).astype(str)
        # Patients are named within their folder; a plain image folder's photos are each their own patient.
        patients = np.concatenate([np.char.add(f"{names[i]}/", (b.patients if b.patients is not None else
                                                              np.arange(len(b.x))).astype(str))
                                   for i, b in enumerate(batches)])
        return PhotoBatch(np.concatenate([b.x for b in batches]), grades, dme, patients), where

    calib_batch, _ = load(calib, "calib", calib_limit)
    calib_x = calib_batch.x
    val_batch, val_folders = load(val, "val", val_limit) if _folders(val) else (PhotoBatch(calib_x, None, None), None)
    # The train split only: never the calib or val photos the result is judged on.
    tuning = load(calib, "train", tuning_limit, strict_split=True)[0].x if tuning_limit else empty
    photos = ExportPhotos(calib_x, val_batch.x, val_batch.grades, tuning,
                          val_dme=(val_batch.dme if val_batch.dme is not None else np.full(len(val_batch.x), MISSING))
                          if meta.has_dme else None, val_folders=val_folders, val_patients=val_batch.patients,
                          calib_labels=calib_batch.grades)
    return ExportInputs(Path(checkpoint), model.eval(), meta, photos, thresholds or GateThresholds(), Path(out_dir),
                        name)


def _folders(sources: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    return [sources] if isinstance(sources, (str, Path)) else list(sources or [])


def _folder_names(folders: list[str | Path]) -> list[str]:
    """Short, distinct names of the gate set's folders (their base names, else their full paths)."""
    names = [Path(f).name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


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
        reference_draws (optional): FP32's (K, n, 5) logits and (K, n) DME logits on this plan's nuisance draws of
            these val photos, computed by another pipeline (``reference_draws`` after its first gate).
        draw_images (optional): those draws as uint8 (K, n, S, S, 3) images (another pipeline's ``draw_images``).
    """

    def __init__(self, inputs: ExportInputs, plan: ExportPlan, reference: Reference | None = None,
                 sign: Callable[[dict], dict] | None = None,
                 reference_draws: tuple[np.ndarray, np.ndarray | None] | None = None,
                 draw_images: np.ndarray | None = None) -> None:
        self.inputs, self.plan, self.sign = inputs, plan, sign
        self.reference = reference or Reference.compute(inputs)
        if self.reference.val_sha1 != inputs.photos.digest("val"):
            raise ExportConfigError("the reference outputs given were computed on other val photos")
        self.graphs = TorchGraphs(inputs.model, inputs.photos, plan.qat)
        # FP32 on the nuisance draws of the gate set (computed on first use; pass them to share one computation)
        self.reference_draws = reference_draws
        # The draws themselves, uint8 (K, n, S, S, 3): made once, then every candidate runs on the same images.
        self.draw_images = draw_images
        self._fp32_session = None  # ONNX Runtime on the checkpoint's FP32 graph, made on first use
        # (format, precision) -> the runner of the standing artifact where its runtime cannot run here (CoreML's
        # ONNX twin, the one its exporter made and the gate ran), for callers that run it again (studies).
        self.runners: dict[tuple[str, str], Callable[[np.ndarray], HeadOutputs]] = {}

    def export(self, fmt: str, precision: str) -> ArtifactRecord:
        """Export one format x precision, verify, gate, escalate, write its manifest; never raises (errors
        become the row)."""
        spec = get_format(fmt)
        started = time.monotonic()
        try:
            if precision not in spec.precisions:
                raise ExportConfigError(f"{fmt} supports precisions {spec.precisions}, not {precision!r}")
            self.inputs.out_dir.mkdir(parents=True, exist_ok=True)
            result, verdict, attempts = self._export_and_escalate(spec, precision)
            if result.runner is not None:
                self.runners[(fmt, precision)] = result.runner
            seconds = time.monotonic() - started
            manifest = draft_manifest(self.inputs, self.reference, fmt, result.quantization, verdict.gate,
                                      verdict.point, verdict.dme_point)
            evidence = ArtifactEvidence(*(verdict.outputs or (None, None)), self.inputs.photos.val_labels,
                                        self.reference)
            manifest = finalise_manifest(result.path, manifest, evidence, EXPORTERS.get(fmt).embed_manifest, self.sign)
            log.info("%s %s export success %.1fs, saved as %s (%.2f MB), gate %s", fmt, precision, seconds,
                     result.path, size_mb(result.path), verdict.gate.status)
            return ArtifactRecord(fmt, precision, ExportStatus.OK, str(result.path), manifest.sha256,
                                  size_mb(result.path), round(seconds, 2), verdict.gate.status,
                                  {k: v for k, v in verdict.metrics.items() if k != "n"}, verdict.how,
                                  failures=list(verdict.gate.failures), attempts=attempts,
                                  operating_point=manifest.operating_point)
        except Exception as exc:  # noqa: BLE001 - one format failing must not stop the others; the row says why
            log.error("%s %s export failed: %s", fmt, precision, exc)
            log.debug(traceback.format_exc())
            return ArtifactRecord(fmt, precision, ExportStatus.FAILED,
                                  export_seconds=round(time.monotonic() - started, 2),
                                  error=f"{type(exc).__name__}: {exc}")

    def _export_and_escalate(self, spec: FormatSpec, precision: str) -> tuple[ExportResult, Verdict, list[Attempt]]:
        """The recipe as asked, then each escalation step while the INT8 gate fails; the last attempt stands."""
        path = self.inputs.out_dir / f"{self.inputs.stem}_{precision}{spec.suffix}"
        manifest_path_for(path).unlink(missing_ok=True)  # it described the file this export replaces
        recipe = self.plan.recipe
        result = self._attempt(spec, precision, recipe, path)
        verdict = self._verify(spec, result, precision)
        attempts = [Attempt("as asked", recipe.name if precision == "int8" else "-", verdict.gate)]
        if precision != "int8" or verdict.gate.status != GateStatus.FAILED:
            return result, verdict, attempts
        why = "; ".join(verdict.gate.failures)
        qat_steps = self.plan.qat.steps if self.plan.qat else 0
        for step in self.plan.escalation(spec.name, has_tuning_images=len(self.inputs.photos.tuning) > 0):
            label = step.describe(qat_steps)
            log.warning("%s int8 failed its gate (%s); retrying: %s", spec.name, why, label)
            retry = step.retry_recipe(spec.int8_recipe(recipe))
            result = self._attempt(spec, precision, retry, path)
            verdict = self._verify(spec, result, precision)
            attempts.append(Attempt(label, retry.name, verdict.gate))
            if verdict.gate.status != GateStatus.FAILED:
                break
            why = "; ".join(verdict.gate.failures)
        return result, verdict, attempts

    def _attempt(self, spec: FormatSpec, precision: str, recipe: QuantRecipe, path: Path) -> ExportResult:
        result = self._export_with(spec, precision, recipe, path, self.inputs, self.graphs)
        if precision != "int8" or not recipe.bias_correction:
            return result
        return self._bias_corrected(spec, precision, recipe, path, result)

    @staticmethod
    def _export_with(spec: FormatSpec, precision: str, recipe: QuantRecipe, path: Path, inputs: ExportInputs,
                     graphs: TorchGraphs) -> ExportResult:
        return EXPORTERS.get(spec.name).export(ExportRequest(inputs, precision, recipe, path, graphs))

    def _bias_corrected(self, spec: FormatSpec, precision: str, recipe: QuantRecipe, path: Path,
                        first: ExportResult) -> ExportResult:
        """The recipe's output-bias correction (``compression.bias_correction``): the mean (INT8 - FP32) head
        outputs on the calib photos, disjoint from the gate set, come off FP32's classifier biases, and the corrected
        model is exported again by the same exporter and recipe; the manifest records what was subtracted and on
        which photos. The gate still judges the artifact against the uncorrected FP32 model."""
        photos = self.inputs.photos

        def quantize(model) -> tuple[ExportResult, Callable[[np.ndarray], HeadOutputs]]:
            _remove(path)  # a new file, not the old one rewritten: a runtime may still map the old one
            inputs = replace(self.inputs, model=model)
            result = self._export_with(spec, precision, recipe, path, inputs, TorchGraphs(model, photos, self.plan.qat))
            return result, self._artifact_runner(spec, result)

        done = correct_output_bias(self.inputs.model, quantize, (first, self._artifact_runner(spec, first)),
                                   self._fp32_runner, photos.calib, recipe.bias_correction_passes,
                                   gate_photos=photos.val, fingerprint=photos.digest("calib"))
        result = done.artifact
        return replace(result, quantization=replace(result.quantization, bias_correction=done.info))

    def _artifact_session(self, spec: FormatSpec, result: ExportResult):
        """The export's file in its backend class directly: the manifest is written after verification, so
        open_session's manifest checks do not apply yet. The draft manifest only labels the session."""
        draft = draft_manifest(self.inputs, self.reference, spec.name, result.quantization, GateResult())
        return BACKENDS.get(spec.runtime)(result.path, draft)

    def _artifact_runner(self, spec: FormatSpec, result: ExportResult) -> Callable[[np.ndarray], HeadOutputs]:
        """Runs what an export made: the file in its backend where the runtime runs here, else the runner its
        exporter returned (CoreML's ONNX twin)."""
        if spec.runs_here:
            return self._artifact_session(spec, result).run_heads
        if result.runner is None:
            raise ExportConfigError(f"{spec.runtime} cannot run on this OS and the {spec.name} exporter returned no "
                                    f"runner for {result.path.name}; output-bias correction needs its outputs")
        return result.runner

    def _verify(self, spec: FormatSpec, result: ExportResult, precision: str) -> Verdict:
        """Run the artifact on the val photos (or judge what its exporter measured where it cannot run here)."""
        n = len(self.inputs.photos.val)
        if not n:
            return Verdict(GateResult("not_run", {}, {}, ("no val photos to verify on",)), "not verified: no val "
                           "photos", dict(result.spec_checks), None)
        if spec.runs_here:
            session = self._artifact_session(spec, result)
            outputs = session.run_heads(self.inputs.photos.val)
            how = f"ran {session.info.backend}/{session.info.provider} on {n} images"
            return self._judge(spec, result, precision, outputs, how,
                               self._dme_checks(result, outputs.dme_logit, outputs.dme_cam), session.run_heads)
        how = f"spec checked only: {spec.runtime} cannot run on this OS ({', '.join(spec.runs_on)} only)"
        if precision == "int8" and result.outputs is not None:
            how = (f"spec checked; INT8 gated on the quantized torch graph that was converted, run with integer "
                   f"kernels as its ONNX twin ({n} images); "
                   f"{spec.runtime} predictions need {'/'.join(spec.runs_on)}")
            return self._judge(spec, result, precision, result.outputs, how, run=result.runner)
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

    def _fp32_runner(self, x: np.ndarray) -> HeadOutputs:
        """FP32 on many images (the gate's ~10,000 nuisance draws; calibration photos): the checkpoint exported
        once to ONNX and run by ONNX Runtime, which folds batch norm and fuses kernels: 3-4x faster than eager
        PyTorch on a CPU, with the same outputs to float rounding (``tests/test_exporters.py``)."""
        if self._fp32_session is None:
            self._fp32_session = _onnx_fp32_session(self.inputs)
        names = output_names_for(self.inputs.meta.heads)
        parts = [self._fp32_session.run(list(names), {INPUT_NAME: np.ascontiguousarray(x[i:i + 64], np.float32)})
                 for i in range(0, len(x), 64)]
        outputs = {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}
        return HeadOutputs.from_named(outputs)

    def _draw_outputs(self, run: Callable[[np.ndarray], HeadOutputs]) -> tuple[np.ndarray, np.ndarray | None]:
        """(K, n, 5) logits and (K, n) DME logits (None without a DME head) of ``run`` on the nuisance draws of
        every gate photo; the draws are seeded per photo, so every model sees the same K images."""
        from compression.noise_floor import to_rgb8
        from edge_runtime.preprocess import normalize

        nuisance, val, policy = self.plan.nuisance, self.inputs.photos.val, self.inputs.policy
        if self.draw_images is None:
            rgb = to_rgb8(val, policy)
            self.draw_images = np.stack([np.stack([nuisance.perturb(img, i, k) for i, img in enumerate(rgb)])
                                         for k in range(nuisance.draws)])
        logits, dme = [], []
        for k in range(nuisance.draws):
            out = run(normalize(self.draw_images[k], policy))
            logits.append(np.asarray(out.logits, float))
            if out.dme_logit is not None:
                dme.append(np.asarray(out.dme_logit, float).reshape(-1))
        return np.stack(logits), (np.stack(dme) if dme else None)

    def draws_for(self, run: Callable[[np.ndarray], HeadOutputs]) -> Draws:
        """FP32's (computed once) and ``run``'s outputs on the same nuisance draws of the gate set."""
        if self.reference_draws is None:
            self.reference_draws = self._draw_outputs(self._fp32_runner)
        ref_logits, ref_dme = self.reference_draws
        test_logits, test_dme = self._draw_outputs(run)
        return Draws(ref_logits, test_logits, ref_dme, test_dme, self.plan.nuisance)

    def gate_set(self) -> GateSet:
        photos = self.inputs.photos
        return GateSet(photos.val_folders, photos.val_patients)

    def _judge(self, spec: FormatSpec, result: ExportResult, precision: str, outputs: HeadOutputs, how: str,
               dme_checks: dict[str, float] | None = None,
               run: Callable[[np.ndarray], HeadOutputs] | None = None) -> Verdict:
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
        point = self._operating_point(run)
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
            # FP32 refers at the parent's point; the candidate at its own (the parent's, unless re-chosen on the
            # calib photos, never on the gate set it is judged on).
            dme = None if ref.dme_logit is None else DmeOutputs(
                ref.dme_logit, outputs.dme_logit, self.inputs.photos.val_dme, dme_point, self.inputs.meta.dme_point)
            thresholds = self.inputs.thresholds
            draws = self.draws_for(run) if run is not None and thresholds.judges_noise_floor else None
            gate = judge(ref.logits, ref.cam, logits, cam, self.inputs.photos.val_labels, point, thresholds,
                         ref_operating_point=self.inputs.meta.operating_point, dme=dme, draws=draws,
                         gate_set=self.gate_set())
            metrics = {**metrics, **gate.metrics}
        return Verdict(gate, how, {**result.spec_checks, **metrics}, (logits, cam), point, dme_point)

    def _operating_point(self, run: Callable[[np.ndarray], HeadOutputs] | None) -> OperatingPoint:
        """Where this artifact refers. By default the parent's point (temperature, threshold, uncertainty band):
        the gate then asks whether the conversion changed the referrals at the point the parent was validated at.
        With ``ExportPlan.operating_point = "calib"`` it is re-chosen, by the checkpoint's rule and target, on the
        artifact's own outputs (``run``) for the calib photos, disjoint from the gate set; the point records their
        fingerprint."""
        trained = self.inputs.meta.operating_point
        photos = self.inputs.photos
        if self.plan.operating_point == "parent":
            return trained
        if run is None or photos.calib_labels is None or not len(photos.calib):
            log.warning("no labelled calib photos (or no way to run the artifact) to re-choose the operating point "
                        "on; keeping the parent's")
            return trained
        rule, target = self.inputs.meta.rule_and_target("grade")
        try:
            return choose_operating_point(photos.calib_labels, run(photos.calib).logits, rule=rule, target=target,
                                          band_fraction=float(self.inputs.meta.config.get("uncertain_fraction", 0.05)),
                                          fingerprint=photos.digest("calib"))
        except ValueError as exc:  # e.g. no referable calib photo: nothing to choose on
            log.warning("operating point not chosen on the calib photos (%s); keeping the parent's", exc)
            return trained

    def _dme_operating_point(self, dme_logit: np.ndarray | None) -> OperatingPoint | None:
        """The parent's DME point (the candidate keeps it; see ``_operating_point``). Without a DME head: None."""
        return None if dme_logit is None else self.inputs.meta.dme_point


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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _onnx_fp32_session(inputs: ExportInputs):
    """An ONNX Runtime session on the checkpoint's FP32 graph, exported to a scratch folder and held in memory."""
    import tempfile

    import onnxruntime as ort

    from .onnx import export_onnx_fp32

    with tempfile.TemporaryDirectory(prefix="retinaedge_fp32_") as scratch:
        model = export_onnx_fp32(inputs, Path(scratch) / "fp32.onnx").read_bytes()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


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
