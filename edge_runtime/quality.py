"""Image-quality gate for fundus photos: is this capture gradable?

Indicators from the smartphone-ophthalmoscopy quality literature, computed inside the field of view at a
fixed working resolution (so thresholds do not depend on the camera's pixel count):
statistical (mean, std, entropy, dynamic range), gradient (variance of Laplacian, Tenengrad), wavelet
(high-frequency energy ratio over two Haar levels), field of view (mask fraction, centring),
exposure (under/over-exposed fractions) and glare. Default thresholds were calibrated on real EyePACS
photos and code-degraded copies (``benchmarks/quality_report.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .contract import QualityReport
from .errors import NoFundusError
from .preprocess import FieldOfView, detect_fov

WORK_SIZE = 512  # field of view resized to this side before measuring


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of a gradable photo. Each failing limit adds a reason; any failure makes it ungradable."""

    min_fov_fraction: float = 0.38  # share of the frame covered by the fundus
    max_decentering: float = 0.06  # fundus centre offset from the frame centre, as a share of the frame diagonal
    min_mean: float = 25.0  # mean 8-bit luminance inside the field of view
    max_mean: float = 200.0
    min_std: float = 7.0
    min_entropy: float = 4.3  # bits
    min_dynamic_range: float = 35.0  # p99 - p1 luminance
    min_laplacian_var: float = 5.0  # focus; measured on the green channel at WORK_SIZE
    min_tenengrad: float = 60.0
    min_wavelet_hf_ratio: float = 0.004  # detail / total energy over two Haar levels
    max_underexposed: float = 0.15  # share of fundus pixels darker than 15
    max_overexposed: float = 0.03  # share of fundus pixels brighter than 245
    max_glare: float = 0.03  # share of near-white, low-saturation blobs
    max_noise: float = 4.0  # robust noise sigma of the green channel (median absolute deviation of a high-pass)


DEFAULT_THRESHOLDS = QualityThresholds()


def _haar_hf_ratio(gray: np.ndarray, levels: int = 2) -> float:
    x = gray.astype(np.float64)
    detail = 0.0
    for _ in range(levels):
        h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
        x = x[:h, :w]
        a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
        detail += (((a - b + c - d) / 2) ** 2).sum() + (((a + b - c - d) / 2) ** 2).sum() + (((a - b - c + d) / 2) ** 2).sum()
        x = (a + b + c + d) / 2
    total = detail + (x - x.mean()).__pow__(2).sum()
    return float(detail / total) if total > 0 else 0.0


def quality_metrics(bgr: np.ndarray, fov: FieldOfView | None = None) -> dict[str, float]:
    """All indicators for one uint8 BGR photo. Raises NoFundusError when no field of view exists."""
    fov = fov or detect_fov(bgr)
    h_img, w_img = bgr.shape[:2]
    crop = bgr[fov.y:fov.y + fov.h, fov.x:fov.x + fov.w]
    mask = fov.mask[fov.y:fov.y + fov.h, fov.x:fov.x + fov.w]
    scale = WORK_SIZE / max(crop.shape[:2])
    size = (max(8, int(round(crop.shape[1] * scale))), max(8, int(round(crop.shape[0] * scale))))
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    inner = cv2.erode(mask, np.ones((15, 15), np.uint8)) > 0  # avoid the rim's artificial edge
    if inner.sum() < 100:
        raise NoFundusError("field of view too small to assess quality")
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    green = crop[:, :, 1]
    values = gray[inner].astype(np.float64)
    hist = np.bincount(gray[inner], minlength=256) / inner.sum()
    nonzero = hist[hist > 0]
    lap = cv2.Laplacian(green, cv2.CV_64F)
    gx, gy = cv2.Sobel(green, cv2.CV_64F, 1, 0), cv2.Sobel(green, cv2.CV_64F, 0, 1)
    hsv = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)
    glare = (hsv[:, :, 2] > 235) & (hsv[:, :, 1] < 40) & inner
    bbox = cv2.boundingRect(inner.astype(np.uint8))
    masked_green = np.where(inner, green, 0).astype(np.uint8)
    box = masked_green[bbox[1]:bbox[1] + bbox[3], bbox[0]:bbox[0] + bbox[2]]
    high_pass = green.astype(np.float64) - cv2.medianBlur(green, 3).astype(np.float64)
    noise = 1.4826 * np.median(np.abs(high_pass[inner] - np.median(high_pass[inner])))
    diagonal = float(np.hypot(w_img, h_img))
    return {
        "fov_fraction": float(fov.mask.mean() / 255.0),
        "decentering": float(np.hypot(fov.center[0] - w_img / 2, fov.center[1] - h_img / 2) / diagonal),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "entropy": float(-(nonzero * np.log2(nonzero)).sum()),
        "dynamic_range": float(np.percentile(values, 99) - np.percentile(values, 1)),
        "laplacian_var": float(lap[inner].var()),
        "tenengrad": float((gx[inner] ** 2 + gy[inner] ** 2).mean()),
        "wavelet_hf_ratio": _haar_hf_ratio(box),
        "underexposed": float((values < 15).mean()),
        "overexposed": float((values > 245).mean()),
        "glare": float(glare.sum() / inner.sum()),
        "noise": float(noise),
    }


# metric -> (threshold field, comparison, human-readable reason)
_RULES = (
    ("fov_fraction", "min_fov_fraction", ">=", "fundus fills too little of the frame: move closer / centre the pupil"),
    ("decentering", "max_decentering", "<=", "fundus is off-centre: re-align the camera with the pupil"),
    ("mean", "min_mean", ">=", "too dark: increase illumination or dilate the pupil"),
    ("mean", "max_mean", "<=", "too bright: reduce illumination"),
    ("std", "min_std", ">=", "very low contrast (haze or cataract?): clean the lens, re-capture"),
    ("entropy", "min_entropy", ">=", "little image information: check focus and exposure"),
    ("dynamic_range", "min_dynamic_range", ">=", "flat exposure, low dynamic range"),
    ("laplacian_var", "min_laplacian_var", ">=", "blurred (defocus or motion): hold still and refocus"),
    ("tenengrad", "min_tenengrad", ">=", "edges are soft: refocus"),
    ("wavelet_hf_ratio", "min_wavelet_hf_ratio", ">=", "no fine detail (vessels not resolved): refocus"),
    ("underexposed", "max_underexposed", "<=", "large under-exposed areas"),
    ("overexposed", "max_overexposed", "<=", "large over-exposed (washed-out) areas"),
    ("glare", "max_glare", "<=", "glare or reflections: adjust the angle of the light"),
    ("noise", "max_noise", "<=", "sensor noise too high: more light, lower gain"),
)


def assess(bgr: np.ndarray, thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
           fov: FieldOfView | None = None) -> QualityReport:
    """Gradable / ungradable verdict with a 0-1 score and the reasons that failed."""
    try:
        metrics = quality_metrics(bgr, fov)
    except NoFundusError as exc:
        return QualityReport(False, 0.0, (f"no fundus found: {exc}",), {})
    reasons, margins = [], []
    for metric, field_name, op, reason in _RULES:
        limit = getattr(thresholds, field_name)
        value = metrics[metric]
        ok = value >= limit if op == ">=" else value <= limit
        # Margin in units of the limit, clipped: 0 at the limit, 1 comfortably inside.
        margin = (value - limit) / (abs(limit) + 1e-9) if op == ">=" else (limit - value) / (abs(limit) + 1e-9)
        margins.append(float(np.clip(margin + 0.5, 0, 1)))
        if not ok:
            reasons.append(f"{reason} ({metric} {value:.4g} vs limit {limit:.4g})")
    score = float(np.clip(min(margins) if reasons else 0.5 + 0.5 * float(np.mean(margins)), 0, 1))
    return QualityReport(not reasons, round(score, 4), tuple(reasons), {k: round(v, 6) for k, v in metrics.items()})
