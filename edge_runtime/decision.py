"""The one referral decision: logits and CAM of one photo + the manifest's operating point -> a Decision.

The Screener, the server's /predict, the fidelity gate, evaluation and the benchmarks all decide through
``decide``/``decide_batch``, so a threshold, temperature or uncertainty band means the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import OperatingPoint
from .metrics import referable_probability


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable for large logits)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Decision:
    """What one photo's outputs mean at an operating point."""

    probabilities: tuple[float, ...]  # calibrated (temperature-scaled)
    grade: int  # most probable ICDR grade
    confidence: float  # probability of that grade
    referable_probability: float
    referable: bool  # referable_probability >= threshold
    uncertain: bool  # inside the operating point's uncertainty band: refer or get a second read
    threshold: float
    cam: np.ndarray | None  # the grade's CAM after ReLU, scaled to 0..1 (CAM grid)
    cam_peak: tuple[float, float] | None  # (x, y) of the CAM maximum on the CAM grid, 0..1

    @property
    def outcome(self) -> str:
        return "uncertain" if self.uncertain else "graded"


@dataclass(frozen=True)
class BatchDecision:
    """``decide`` over many photos at once, as arrays (evaluation, gate, benchmarks)."""

    probabilities: np.ndarray  # (n, 5) calibrated
    grades: np.ndarray  # (n,)
    referable_probability: np.ndarray  # (n,)
    referable: np.ndarray  # (n,) bool
    uncertain: np.ndarray  # (n,) bool


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


def _in_band(score: np.ndarray, point: OperatingPoint) -> np.ndarray:
    if point.uncertain_band is None:
        return np.zeros(np.shape(score), bool)
    low, high = point.uncertain_band
    return (score >= low) & (score < high)


def decide_batch(logits: np.ndarray, point: OperatingPoint) -> BatchDecision:
    """Decisions for a batch of logits (n, 5) at one operating point."""
    probs = softmax(np.asarray(logits).reshape(len(logits), -1), point.temperature)
    score = referable_probability(probs)
    return BatchDecision(probs, probs.argmax(axis=1), score, score >= point.threshold, _in_band(score, point))


def decide(logits: np.ndarray, cam: np.ndarray | None, point: OperatingPoint) -> Decision:
    """The decision for one photo: ``logits`` (5,), ``cam`` (5, h, w) or None."""
    batch = decide_batch(np.asarray(logits).reshape(1, -1), point)
    grade = int(batch.grades[0])
    probs = batch.probabilities[0]
    heat = peak = None
    if cam is not None:
        heat = normalise_cam(np.asarray(cam)[grade])
        peak = cam_grid_peak(heat)
    return Decision(
        probabilities=tuple(round(float(p), 6) for p in probs), grade=grade, confidence=round(float(probs[grade]), 6),
        referable_probability=float(batch.referable_probability[0]), referable=bool(batch.referable[0]),
        uncertain=bool(batch.uncertain[0]), threshold=point.threshold, cam=heat, cam_peak=peak,
    )
