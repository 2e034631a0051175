"""The fidelity gate: an INT8 artifact must grade like the FP32 model it came from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.contract import GateResult
from training.metrics import quadratic_weighted_kappa, referable_probability


@dataclass(frozen=True)
class GateThresholds:
    min_agreement: float = 0.995  # share of images with the same grade as FP32
    min_qwk_ratio: float = 0.995  # QWK(int8 vs truth) / QWK(fp32 vs truth)
    max_sensitivity_drop: float = 0.01  # referable sensitivity, absolute (1 point)
    min_logit_cosine: float | None = None  # informative unless set
    min_cam_correlation: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def cam_correlation(cam_a: np.ndarray, cam_b: np.ndarray, grades: np.ndarray) -> float:
    """Mean Pearson correlation of the predicted grade's CAM between two models (same resolution)."""
    rows = np.arange(len(grades))
    a = cam_a[rows, grades].reshape(len(grades), -1)
    b = cam_b[rows, grades].reshape(len(grades), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    corr = np.where(den > 1e-12, (a * b).sum(1) / np.maximum(den, 1e-12), 1.0)
    return float(corr.mean())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sensitivity(y_true: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    positives = y_true >= 2
    if not positives.any():
        return float("nan")
    return float((referable_probability(probs)[positives] >= threshold).mean())


def compare(ref_logits, ref_cam, test_logits, test_cam, y_true=None, threshold: float = 0.5) -> dict[str, float]:
    """Fidelity of ``test`` outputs against ``ref`` (FP32) outputs on the same images."""
    ref_grade, test_grade = ref_logits.argmax(1), test_logits.argmax(1)
    metrics = {
        "n": float(len(ref_grade)),
        "agreement": float((ref_grade == test_grade).mean()),
        "max_abs_logit_diff": float(np.abs(ref_logits - test_logits).max()),
        "logit_cosine": _cosine(ref_logits, test_logits),
        "cam_correlation": cam_correlation(ref_cam, test_cam, ref_grade),
    }
    if y_true is not None and len(y_true):
        y_true = np.asarray(y_true)
        qwk_ref, qwk_test = quadratic_weighted_kappa(y_true, ref_grade), quadratic_weighted_kappa(y_true, test_grade)
        metrics.update({
            "qwk_fp32": qwk_ref, "qwk": qwk_test,
            "qwk_ratio": qwk_test / qwk_ref if qwk_ref > 0 else float("nan"),
            "sensitivity_fp32": sensitivity(y_true, _softmax(ref_logits), threshold),
            "sensitivity": sensitivity(y_true, _softmax(test_logits), threshold),
        })
        metrics["sensitivity_drop"] = metrics["sensitivity_fp32"] - metrics["sensitivity"]
    return metrics


def evaluate_gate(metrics: dict[str, float], thresholds: GateThresholds = GateThresholds()) -> GateResult:
    """Apply thresholds; every failure names the threshold and by how much it was missed."""
    failures = []

    def check(name: str, value: float | None, limit: float | None, higher_is_better: bool) -> None:
        if limit is None or value is None or np.isnan(value):
            return
        ok = value >= limit if higher_is_better else value <= limit
        if not ok:
            failures.append(f"{name} {value:.4f} {'<' if higher_is_better else '>'} {limit:.4f} "
                            f"(off by {abs(value - limit):.4f})")

    check("agreement", metrics.get("agreement"), thresholds.min_agreement, True)
    check("qwk_ratio", metrics.get("qwk_ratio"), thresholds.min_qwk_ratio, True)
    check("sensitivity_drop", metrics.get("sensitivity_drop"), thresholds.max_sensitivity_drop, False)
    check("logit_cosine", metrics.get("logit_cosine"), thresholds.min_logit_cosine, True)
    check("cam_correlation", metrics.get("cam_correlation"), thresholds.min_cam_correlation, True)
    clean = {k: float(v) for k, v in metrics.items() if v is not None and not np.isnan(v)}
    return GateResult("failed" if failures else "passed", clean, thresholds.as_dict(), tuple(failures))
