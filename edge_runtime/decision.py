"""The one referral decision: logits and CAM of one photo + the manifest's operating point -> a Decision.

The Screener, the server's /predict, the fidelity gate, evaluation and the benchmarks all decide through
``decide``/``decide_batch``, so a threshold, temperature or uncertainty band means the same thing everywhere.

Models with a DME head (``ArtifactManifest.heads``) add one binary finding: DME is present when
``sigmoid(dme_logit / T) >= threshold`` at the manifest's ``dme_operating_point``. Clinical referral rules refer
for referable DR (moderate NPDR or worse) *or* any DME, so ``referable`` is the OR of the two and
``referral_reason`` says which.

The grade shown agrees with the referral: a photo referred for DR shows the most probable referable grade (2-4),
one that is not shows the most probable non-referable grade (0-1). An argmax of 4 below the threshold would
otherwise read "4 - Proliferative DR ... not referable" on one screen; the threshold, chosen on validation
photos, is the decision, so the grade follows it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import REFERABLE_MIN_GRADE, OperatingPoint
from .metrics import referable_probability


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Element-wise logistic of ``logits / temperature`` in float64 (no overflow for large logits)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable for large logits)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decide_gradability(ungradable_logit: float, point: OperatingPoint) -> tuple[float, bool]:
    """The quality gate's learned score at its operating point: (P(ungradable) = sigmoid(logit / T), whether it
    is >= the point's threshold, i.e. the photo is ungradable by the learned score)."""
    probability = float(sigmoid(np.asarray(ungradable_logit), point.temperature))
    return probability, probability >= point.threshold


@dataclass(frozen=True)
class DmeDecision:
    """The DME head's finding for one photo at the manifest's ``dme_operating_point``."""

    probability: float  # sigmoid(dme_logit / temperature)
    present: bool  # probability >= threshold
    threshold: float
    cam: np.ndarray | None  # the DME CAM after ReLU, scaled to 0..1 (CAM grid)
    cam_peak: tuple[float, float] | None  # (x, y) of its maximum on the CAM grid, 0..1


def referral_reason(dr_referable: bool, dme_present: bool | None) -> str | None:
    """Why a graded photo is referred ("referable DR", "DME present" or both); None when it is not."""
    reasons = (["referable DR"] if dr_referable else []) + (["DME present"] if dme_present else [])
    return " and ".join(reasons) or None


@dataclass(frozen=True)
class Decision:
    """What one photo's outputs mean at an operating point."""

    probabilities: tuple[float, ...]  # calibrated (temperature-scaled)
    grade: int  # most probable ICDR grade on the side of the referral decision (consistent_grades)
    confidence: float  # probability of that grade
    referable_probability: float
    referable: bool  # dr_referable, or DME present (models with a DME head)
    uncertain: bool  # inside the operating point's uncertainty band: refer or get a second read
    threshold: float
    cam: np.ndarray | None  # the grade's CAM after ReLU, scaled to 0..1 (CAM grid)
    cam_peak: tuple[float, float] | None  # (x, y) of the CAM maximum on the CAM grid, 0..1
    dr_referable: bool | None = None  # referable_probability >= threshold (None only in hand-built Decisions)
    dme: DmeDecision | None = None  # None for models without a DME head

    def __post_init__(self) -> None:
        if self.dr_referable is None:
            object.__setattr__(self, "dr_referable", self.referable)

    @property
    def outcome(self) -> str:
        return "uncertain" if self.uncertain else "graded"

    @property
    def referral_reason(self) -> str | None:
        return referral_reason(bool(self.dr_referable), self.dme.present if self.dme else None)


@dataclass(frozen=True)
class BatchDecision:
    """``decide`` over many photos at once, as arrays (evaluation, gate, benchmarks)."""

    probabilities: np.ndarray  # (n, 5) calibrated
    grades: np.ndarray  # (n,) consistent with dr_referable (consistent_grades)
    referable_probability: np.ndarray  # (n,)
    referable: np.ndarray  # (n,) bool: referable DR, or DME present when DME logits were given
    uncertain: np.ndarray  # (n,) bool
    dr_referable: np.ndarray | None = None  # (n,) bool: referable_probability >= threshold
    dme_probability: np.ndarray | None = None  # (n,) sigmoid(dme_logit / T); None without a DME head
    dme_present: np.ndarray | None = None  # (n,) bool

    def __post_init__(self) -> None:
        if self.dr_referable is None:
            object.__setattr__(self, "dr_referable", self.referable)


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """One grade's map (h x w) -> 0..1 after ReLU (only evidence *for* the grade is shown)."""
    cam = np.maximum(np.asarray(cam, np.float32), 0)
    peak = float(cam.max()) if cam.size else 0.0
    return cam / peak if peak > 0 else cam


def cam_grid_peak(cam: np.ndarray) -> tuple[float, float]:
    """(x, y) of a map's maximum cell centre on its own grid, normalised 0..1."""
    h, w = cam.shape
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return (col + 0.5) / w, (row + 0.5) / h


def consistent_grades(probabilities: np.ndarray, dr_referable: np.ndarray) -> np.ndarray:
    """Per photo, the most probable grade among those the referral decision allows: 2-4 when referred for DR,
    0-1 when not (ties to the lower grade, as argmax does)."""
    probs = np.asarray(probabilities).reshape(len(probabilities), -1)
    referable_side = probs[:, REFERABLE_MIN_GRADE:].argmax(axis=1) + REFERABLE_MIN_GRADE
    clean_side = probs[:, :REFERABLE_MIN_GRADE].argmax(axis=1)
    return np.where(np.asarray(dr_referable, bool), referable_side, clean_side)


def _in_band(score: np.ndarray, point: OperatingPoint) -> np.ndarray:
    if point.uncertain_band is None:
        return np.zeros(np.shape(score), bool)
    low, high = point.uncertain_band
    return (score >= low) & (score < high)


def _check_dme(dme_logits: np.ndarray | None, dme_point: OperatingPoint | None, n: int) -> np.ndarray | None:
    if (dme_logits is None) != (dme_point is None):
        raise ValueError("DME logits and the DME operating point come together (manifest.dme_operating_point); "
                         f"got logits {'None' if dme_logits is None else 'given'}, point {dme_point!r}")
    if dme_logits is None:
        return None
    dme_logits = np.asarray(dme_logits, np.float64).reshape(-1)
    if len(dme_logits) != n:
        raise ValueError(f"one DME logit per photo expected ({n}), got {len(dme_logits)}")
    return dme_logits


def decide_batch(logits: np.ndarray, point: OperatingPoint, dme_logits: np.ndarray | None = None,
                 dme_point: OperatingPoint | None = None) -> BatchDecision:
    """Decisions for a batch of logits (n, 5) at one operating point; with the DME head's logits (n,) or (n, 1)
    and its operating point, ``referable`` is referable DR or DME present."""
    probs = softmax(np.asarray(logits).reshape(len(logits), -1), point.temperature)
    score = referable_probability(probs)
    dr_referable = score >= point.threshold
    dme_logits = _check_dme(dme_logits, dme_point, len(probs))
    grades = consistent_grades(probs, dr_referable)
    if dme_logits is None:
        return BatchDecision(probs, grades, score, dr_referable, _in_band(score, point))
    dme_probability = sigmoid(dme_logits, dme_point.temperature)
    dme_present = dme_probability >= dme_point.threshold
    return BatchDecision(probs, grades, score, dr_referable | dme_present, _in_band(score, point),
                         dr_referable, dme_probability, dme_present)


def _heat(cam: np.ndarray | None, index: int) -> tuple[np.ndarray | None, tuple[float, float] | None]:
    if cam is None:
        return None, None
    heat = normalise_cam(np.asarray(cam)[index])
    return heat, cam_grid_peak(heat)


def decide(logits: np.ndarray, cam: np.ndarray | None, point: OperatingPoint, dme_logit: np.ndarray | None = None,
           dme_cam: np.ndarray | None = None, dme_point: OperatingPoint | None = None) -> Decision:
    """The decision for one photo: ``logits`` (5,), ``cam`` (5, h, w) or None; for a model with a DME head also
    ``dme_logit`` (1,), ``dme_cam`` (1, h, w) or None, and the manifest's ``dme_point``."""
    batch = decide_batch(np.asarray(logits).reshape(1, -1), point,
                         None if dme_logit is None else np.asarray(dme_logit).reshape(1), dme_point)
    grade = int(batch.grades[0])
    probs = batch.probabilities[0]
    heat, peak = _heat(cam, grade)
    dme = None
    if batch.dme_probability is not None:
        dme_heat, dme_peak = _heat(dme_cam, 0)
        dme = DmeDecision(probability=float(batch.dme_probability[0]), present=bool(batch.dme_present[0]),
                          threshold=dme_point.threshold, cam=dme_heat, cam_peak=dme_peak)
    return Decision(
        probabilities=tuple(round(float(p), 6) for p in probs), grade=grade, confidence=round(float(probs[grade]), 6),
        referable_probability=float(batch.referable_probability[0]), referable=bool(batch.referable[0]),
        uncertain=bool(batch.uncertain[0]), threshold=point.threshold, cam=heat, cam_peak=peak,
        dr_referable=bool(batch.dr_referable[0]), dme=dme,
    )
