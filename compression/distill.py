"""Knowledge distillation of a teacher, or an ensemble of teachers, into an edge student, with optional CAM transfer.

loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * class-weighted CE (labelled photos)
       + cam_weight * || norm(student CAM) - norm(teacher CAM) ||^2   (teacher's predicted grade)

The teacher is the mean of its members' *calibrated* outputs: each member's logits and CAMs divided by the
temperature of its own operating point, so a member that is over-confident on its val photos does not dominate.
Each member reads the photos with its own preprocessing; its outputs are computed once, on the training device,
and cached on disk (keyed by the checkpoint's bytes, the photo list and the preprocessing).

Photos: the labelled training split, plus photos the teachers label: every photo of the ``unlabelled`` folders
and, with ``distill_on_calib``, the labelled folders' calib split. Their grades are never used (no CE term), and
nothing that is, or looks like, one of the labelled data's val/test photos joins them (``distillation_photos``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from compression.errors import DistillationConfigError
from compression.gate import cam_correlation
from edge_runtime.contract import OperatingPoint, PreprocessPolicy
from edge_runtime.decision import decide_batch
from training.checkpoint import CheckpointMeta
from training.config import TrainConfig
from training.data.dataset import FundusDataset, cache_images, photos_key
from training.data.layouts import Sample, assign_splits, read_dataset, read_unlabelled, select
from training.metrics import report_at
from training.models import DRClassifier, load_checkpoint
from training.train import (
    RunResult,
    choose_run_referral_point,
    fit,
    load_samples,
    predict,
    progress_bar,
    resolve_device,
)

log = logging.getLogger(__name__)

REPORTED = ("qwk", "accuracy", "referable_sensitivity", "referable_specificity", "referable_auc")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: a checkpoint's identity survives a move and changes when it is re-trained in place."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inference_dtype(device: torch.device, amp: bool) -> torch.dtype:
    """Mixed precision on CUDA only. bf16 where the GPU has it: fp32's range, so un-normalised CAMs cannot
    overflow as they can in fp16, and its ~3 significant digits are far finer than a KL at T >= 1 can use."""
    if not amp or device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _precision(device: torch.device, amp: bool) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[_inference_dtype(device, amp)]


def _advancing(batches: Iterable, bar, task) -> Iterator:
    for batch in batches:
        yield batch
        bar.advance(task)


def model_outputs(model: DRClassifier, images: np.ndarray, policy: PreprocessPolicy, device: torch.device,
                  batch_size: int, amp: bool = True, progress: bool = False, label: str = "model"):
    """Raw logits (N x 5) and CAMs (N x 5 x h x w) of ``model`` on ``device``, without gradients, under autocast
    on CUDA. The model goes back to the CPU afterwards, so a teacher does not hold device memory the student needs."""
    loader = DataLoader(FundusDataset(images, np.zeros(len(images)), policy), batch_size=batch_size,
                        pin_memory=device.type == "cuda")
    model.to(device)
    try:
        dtype = _inference_dtype(device, amp)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), progress_bar(progress) as bar:
            task = bar.add_task(f"{label}: {len(images)} photos on {device} ({_precision(device, amp)})", total=len(loader))
            return predict(model, _advancing(loader, bar, task), device, with_cam=True)
    finally:
        model.to("cpu")


@dataclass(frozen=True)
class Teacher:
    """One ensemble member: its checkpoint, the digest of its bytes (its identity in caches and reports), its model."""

    checkpoint: Path
    digest: str
    model: DRClassifier
    meta: CheckpointMeta

    @classmethod
    def load(cls, path: str | Path) -> Teacher:
        path = Path(path)
        if not path.is_file():
            raise DistillationConfigError(f"teacher checkpoint {path} not found; pass the best.pt of a "
                                          "`retinaedge train` run (--teacher CKPT, repeatable for an ensemble)")
        model, meta = load_checkpoint(path)
        return cls(path, file_digest(path), model, meta)

    @property
    def temperature(self) -> float:
        """The member's calibration temperature, chosen on its val photos (operating point)."""
        return self.meta.operating_point.temperature

    def record(self) -> dict:
        """What a report or a distilled checkpoint says about this member."""
        return {"checkpoint": str(self.checkpoint), "sha256": self.digest, "model": self.meta.model_name,
                "input_size": self.meta.input_size, "temperature": self.temperature,
                "operating_point_rule": self.meta.operating_point.rule}

    def outputs(self, samples: list[Sample], cfg: TrainConfig, device: torch.device, progress: bool = False):
        """Raw logits and CAMs on ``samples`` with this member's preprocessing; computed once, then read from
        ``cfg.cache_dir``. The key holds the checkpoint's bytes, the photos, the preprocessing and the precision."""
        policy = self.meta.preprocess
        precision = _precision(device, cfg.amp)
        key = hashlib.sha256(json.dumps([self.digest, photos_key(samples, policy), precision]).encode()).hexdigest()[:20]
        cache = Path(cfg.cache_dir) / f"teacher_{key}.npz"
        if cache.is_file():
            stored = np.load(cache)
            return stored["logits"], stored["cams"]
        images = cache_images(samples, policy, cfg.cache_dir, progress)
        logits, cams = model_outputs(self.model, images, policy, device, cfg.teacher_batch, cfg.amp, progress,
                                     f"teacher {self.meta.model_name}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Written under a per-process name and renamed: an interrupted run must not leave a truncated cache behind.
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, logits=logits, cams=cams)
        os.replace(tmp, cache)
        return logits, cams


def load_teachers(paths: Sequence[str | Path]) -> list[Teacher]:
    """Every member, checked before any photo is read: a missing checkpoint fails now, not after hours of outputs."""
    if not paths:
        raise DistillationConfigError("distillation needs at least one teacher: --teacher CKPT (repeat it for an "
                                      "ensemble) or `teacher: [a.pt, b.pt]` in the YAML")
    return [Teacher.load(p) for p in paths]


def ensemble(outputs: Sequence[tuple[np.ndarray, np.ndarray]], temperatures: Sequence[float]):
    """Mean calibrated logits and CAMs of the members: each member's divided by its temperature (a CAM's spatial
    mean is its logit minus the bias, so both stay in the same units), CAMs on the finest member's grid."""
    # The finest grid: the loss area-averages the teacher CAM to the student's grid, whatever the student is,
    # so averaging on a coarser grid first would blur the sharper member's localisation for nothing.
    grid = max((cams.shape[-2:] for _, cams in outputs), key=lambda hw: hw[0] * hw[1])
    logits = np.zeros_like(outputs[0][0], dtype=np.float32)
    cams = np.zeros((*outputs[0][1].shape[:2], *grid), np.float32)
    for (member_logits, member_cams), temperature in zip(outputs, temperatures, strict=True):
        logits += member_logits / temperature
        resized = torch.from_numpy(np.ascontiguousarray(member_cams, np.float32))
        if tuple(resized.shape[-2:]) != tuple(grid):
            resized = F.interpolate(resized, size=tuple(grid), mode="bilinear", align_corners=False)
        cams += resized.numpy() / temperature
    return logits / len(outputs), cams / len(outputs)


def teacher_targets(teachers: Sequence[Teacher], samples: list[Sample], cfg: TrainConfig, device: torch.device,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """The per-photo targets ``distillation_loss`` reads: the ensemble's calibrated logits and CAMs."""
    logits, cams = ensemble([t.outputs(samples, cfg, device, progress) for t in teachers],
                            [t.temperature for t in teachers])
    return {"teacher_logits": logits, "teacher_cam": cams}


@dataclass(frozen=True)
class DistillationPhotos:
    """The photos a student is distilled on, in the order of ``fit``'s training rows."""

    labelled: list[Sample]  # the train split(s) of the labelled data, with grades
    unlabelled: list[Sample]  # photos the teachers label: calib split (distill_on_calib), unlabelled folders
    sources: dict[str, int]  # unlabelled photos per source ("calib split" or the folder)
    excluded: dict[str, int]  # unlabelled candidates dropped as (possible copies of) val/test photos, per reason

    @property
    def all(self) -> list[Sample]:
        return self.labelled + self.unlabelled

    def counts(self) -> dict:
        return {"labelled": len(self.labelled), "unlabelled": len(self.unlabelled), "unlabelled_sources": self.sources,
                "excluded_as_val_test": self.excluded}


def _check_folders_apart(cfg: TrainConfig) -> None:
    """An unlabelled folder may not be, contain or lie inside a labelled data folder: that folder's train photos
    already train with their grades, its calib photos join through ``distill_on_calib``, and its val/test photos
    judge the student, so they must never train it."""
    for folder in cfg.unlabelled:
        unlabelled = Path(folder).resolve()
        for data in cfg.data:
            labelled = Path(data).resolve()
            if unlabelled == labelled or labelled in unlabelled.parents or unlabelled in labelled.parents:
                raise DistillationConfigError(
                    f"unlabelled folder {folder} overlaps the labelled data folder {data}; its val/test photos would "
                    "train the student. Drop it from unlabelled (its calib photos join with distill_on_calib: true) "
                    "or pass a folder of photos that are not in the labelled data")


class _HeldOut:
    """Recognises the labelled data's val/test photos among candidates, conservatively: the same file stem, the
    same patient id (another eye, or a re-processed copy, as eyepacs_256 holds of eyepacs_full) or the same bytes."""

    def __init__(self, held_out: list[Sample]):
        self.stems = {s.path.stem for s in held_out}
        self.patients = {s.patient for s in held_out}
        self.by_size: dict[int, list[Path]] = defaultdict(list)
        for s in held_out:
            self.by_size[s.path.stat().st_size].append(s.path)
        self._digests: dict[Path, str] = {}

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def reason(self, sample: Sample) -> str | None:
        if sample.path.stem in self.stems:
            return "same file name"
        if sample.patient in self.patients:
            return "same patient"
        same_size = self.by_size.get(sample.path.stat().st_size, [])  # hash only where the sizes already match
        if same_size and self._digest(sample.path) in {self._digest(p) for p in same_size}:
            return "same bytes"
        return None


def distillation_photos(cfg: TrainConfig, samples: list[Sample]) -> DistillationPhotos:
    """The labelled training photos and the unlabelled ones the teachers label, never a val/test photo."""
    _check_folders_apart(cfg)
    labelled = select(samples, cfg.train_splits)
    if not labelled:
        raise DistillationConfigError(f"no labelled photos in the train split(s) {cfg.train_splits} of {list(cfg.data)}; "
                                      "distillation needs some (class weights, the CE term, model selection)")
    candidates: list[tuple[str, Sample]] = []
    if cfg.distill_on_calib and "calib" not in cfg.train_splits:
        candidates += [("calib split", s) for s in select(samples, "calib")]
    for folder in cfg.unlabelled:
        candidates += [(folder, s) for s in read_unlabelled(folder)]
    held_out = _HeldOut(select(samples, (cfg.val_split, cfg.test_split)))
    unlabelled, seen = [], {s.path.resolve() for s in labelled}
    sources: dict[str, int] = defaultdict(int)
    excluded: dict[str, int] = defaultdict(int)
    for source, sample in candidates:
        if sample.path.resolve() in seen:  # nested unlabelled folders, or a calib photo also given as a folder
            continue
        seen.add(sample.path.resolve())
        reason = held_out.reason(sample)
        if reason:
            excluded[reason] += 1
            continue
        unlabelled.append(sample)
        sources[source] += 1
    if excluded:
        log.warning("left out %d unlabelled photo(s) that may be val/test photos of the labelled data: %s",
                    sum(excluded.values()), dict(excluded))
    log.info("distilling on %d labelled and %d unlabelled photos %s", len(labelled), len(unlabelled), dict(sources))
    return DistillationPhotos(labelled, unlabelled, dict(sources), dict(excluded))


def _positive_unit_cam(cam: torch.Tensor) -> torch.Tensor:
    """One CAM map per row (N x H x W), ReLU'd and scaled to unit L2 norm: where the evidence is, not its size."""
    flat = F.relu(cam).flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-6)


def distillation_loss(cfg: TrainConfig):
    temperature, alpha, cam_weight = cfg.temperature, cfg.alpha, cfg.cam_weight

    def loss_fn(logits, cam, y, ce_loss, extra, x):
        # ce_loss covers the labelled rows only (training.train.labelled_loss); KL and CAM terms cover every row.
        soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(extra["teacher_logits"] / temperature, 1),
                        reduction="batchmean") * temperature ** 2
        loss = alpha * soft + (1 - alpha) * ce_loss
        if cam_weight > 0:
            teacher_cam = extra["teacher_cam"]
            grade = extra["teacher_logits"].argmax(1)
            rows = torch.arange(len(grade), device=grade.device)
            target = F.adaptive_avg_pool2d(teacher_cam, cam.shape[-2:])[rows, grade]
            loss = loss + cam_weight * (_positive_unit_cam(cam[rows, grade]) - _positive_unit_cam(target)).pow(2).sum(1).mean()
        return loss

    return loss_fn


def _record_in_checkpoint(path: Path, record: dict) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["meta"]["distillation"] = record
    torch.save(checkpoint, path)


def distill(cfg: TrainConfig, progress: bool = True) -> tuple[RunResult, dict]:
    """Train ``cfg.model`` against the ``cfg.teacher`` ensemble; returns the run and a student-vs-teacher report.

    The teachers' outputs are computed on the device ``fit`` trains on; the distilled checkpoint's
    ``meta.distillation`` and ``distill_report.json`` record the members (path, sha256, temperature) and the photos.
    """
    teachers = load_teachers(cfg.teacher)
    samples = load_samples(cfg)
    photos = distillation_photos(cfg, samples)
    device = resolve_device(cfg.device)
    targets = teacher_targets(teachers, photos.all, cfg, device, progress)
    run = fit(cfg, extra_loss=distillation_loss(cfg), extra_targets=targets, progress=progress,
              unlabelled=photos.unlabelled)
    record = {"teachers": [t.record() for t in teachers], "photos": photos.counts(), "device": str(device),
              "precision": _precision(device, cfg.amp)}
    _record_in_checkpoint(run.best_checkpoint, record)
    report = {**compare_with_teacher(run.best_checkpoint, teachers, samples, cfg, progress=progress),
              "photos": record["photos"], "device": record["device"]}
    (run.out_dir / "distill_report.json").write_text(json.dumps(report, indent=2))
    return run, report


def _ensemble_point(teachers: Sequence[Teacher], samples: list[Sample], cfg: TrainConfig,
                    device: torch.device) -> OperatingPoint:
    """Where the ensemble refers. Its logits are already calibrated (temperature 1): one member keeps its own
    threshold; several get one chosen on the val photos by the run's rule, as ``fit`` chooses every model's."""
    if len(teachers) == 1:
        return dataclasses.replace(teachers[0].meta.operating_point, temperature=1.0)
    val = select(samples, cfg.val_split)
    logits, _ = ensemble([t.outputs(val, cfg, device) for t in teachers], [t.temperature for t in teachers])
    # The run's own chooser: photos without a grade (mexico_dme's DME-only rows) are left out, and a per-folder
    # referral point is weighted per folder as the student's is.
    point, _ = choose_run_referral_point(cfg, np.array([s.grade for s in val]), logits, val)
    return point


def compare_with_teacher(student_ckpt, teachers: Sequence[Teacher], samples: list[Sample], cfg: TrainConfig,
                         split: str | None = None, progress: bool = False) -> dict:
    """Student and teacher ensemble side by side on the same photos, on the training device: QWK, referable
    sens/spec, grade agreement, CAM correlation; ``teachers`` lists each member's own numbers."""
    split = split or cfg.test_split
    chosen = select(samples, split)
    if not chosen:  # no test photos (a small folder): say that the numbers are on val
        split, chosen = cfg.val_split, select(samples, cfg.val_split)
    y = np.array([s.grade for s in chosen])
    device = resolve_device(cfg.device)
    student, meta = load_checkpoint(student_ckpt)
    images = cache_images(chosen, meta.preprocess, cfg.cache_dir, False)
    student_logits, student_cams = model_outputs(student, images, meta.preprocess, device, cfg.teacher_batch,
                                                 cfg.amp, progress, "student")
    student_grades = student_logits.argmax(1)
    out: dict = {"split": split, "n": len(chosen), "student": _summary(meta.operating_point, y, student_logits)}
    members = [t.outputs(chosen, cfg, device, progress) for t in teachers]
    out["teachers"] = [{**t.record(), **_summary(t.meta.operating_point, y, logits),
                        "agreement": float((student_grades == logits.argmax(1)).mean())}
                       for t, (logits, _) in zip(teachers, members, strict=True)]
    teacher_logits, teacher_cams = ensemble(members, [t.temperature for t in teachers])
    out["teacher"] = _summary(_ensemble_point(teachers, samples, cfg, device), y, teacher_logits)
    out["agreement"] = float((student_grades == teacher_logits.argmax(1)).mean())
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(teacher_cams), student_cams.shape[-2:]).numpy()
    out["cam_correlation"] = cam_correlation(student_cams, pooled, teacher_logits.argmax(1))
    return out


def evaluate_ensemble(paths: Sequence[str | Path], data: str | Path, val_data: Sequence[str | Path],
                      split: str = "test", cache_dir: str = ".cache/retinaedge") -> dict:
    """The teachers' ensemble as a model of its own, scored like ``training.evaluate.evaluate(with_scores=True)``:
    the mean of the members' calibrated logits on ``data``'s ``split`` photos, at a referral point the ensemble
    chooses on the ``val`` photos of ``val_data`` by the first member's rule and target (a single member keeps its
    own point), as ``distill`` does before it compares a student with its teachers. On the CPU."""
    teachers = load_teachers(paths)
    rule, target = teachers[0].meta.rule_and_target("grade")
    cfg = TrainConfig(data=tuple(str(d) for d in val_data), cache_dir=cache_dir, referral_rule=rule,
                      referral_target=target)
    device = torch.device("cpu")
    point = _ensemble_point(teachers, load_samples(cfg), cfg, device)
    samples = select(assign_splits(read_dataset(data)), split)
    if not samples:
        raise ValueError(f"{data} has no {split!r} split")
    logits, _ = ensemble([t.outputs(samples, cfg, device) for t in teachers], [t.temperature for t in teachers])
    y = np.array([s.grade for s in samples])
    metrics = report_at(point, y, logits)
    metrics.update(members=[t.record() for t in teachers], data=str(data), split=split, model="ensemble",
                   referable_probability=decide_batch(logits, point).referable_probability.tolist(), grades=y.tolist())
    return metrics


def _summary(point: OperatingPoint, y: np.ndarray, logits: np.ndarray) -> dict:
    metrics = report_at(point, y, logits, auc_ci=False)
    return {k: metrics[k] for k in REPORTED}
