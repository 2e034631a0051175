"""Code-made degradations of real fundus photos, for calibrating and testing the quality gate."""
from __future__ import annotations

import cv2
import numpy as np


def defocus(img, rng):
    k = int(img.shape[1] * rng.uniform(0.012, 0.02)) | 1
    return cv2.GaussianBlur(img, (k * 2 + 1, k * 2 + 1), 0)


def motion_blur(img, rng):
    length = max(5, int(img.shape[1] * rng.uniform(0.02, 0.035)))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2, length / 2), rng.uniform(0, 180), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))


def underexpose(img, rng):
    return (img.astype(np.float32) * rng.uniform(0.12, 0.22)).astype(np.uint8)


def overexpose(img, rng):
    return np.clip(img.astype(np.float32) * rng.uniform(2.6, 3.5) + 40, 0, 255).astype(np.uint8)


def off_centre(img, rng):
    h, w = img.shape[:2]
    dx, dy = rng.choice([-1, 1]) * w * rng.uniform(0.3, 0.4), rng.choice([-1, 1]) * h * rng.uniform(0.2, 0.3)
    return cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), (w, h))


def haze(img, rng):
    """Cataract-like veiling: contrast loss toward a grey-yellow haze, plus softening."""
    veil = np.array([150, 170, 180], np.float32)
    alpha = rng.uniform(0.8, 0.9)
    out = img.astype(np.float32) * (1 - alpha) + veil * alpha
    out = cv2.GaussianBlur(out, (0, 0), img.shape[1] * 0.004)
    mask = (img.max(axis=2) > 12)[..., None]
    return np.where(mask, out, img).astype(np.uint8)


def noise(img, rng):
    return np.clip(img.astype(np.float32) + rng.normal(0, rng.uniform(18, 28), img.shape), 0, 255).astype(np.uint8)


def occlusion(img, rng):
    """An eyelid or eyelash shadow across half of the field."""
    out = img.copy()
    h, w = img.shape[:2]
    top = rng.random() < 0.5
    edge = int(h * rng.uniform(0.5, 0.6))
    if top:
        out[:edge] = (out[:edge] * 0.05).astype(np.uint8)
    else:
        out[h - edge:] = (out[h - edge:] * 0.05).astype(np.uint8)
    return out


DEGRADATIONS = {f.__name__: f for f in (defocus, motion_blur, underexpose, overexpose, off_centre, haze, noise, occlusion)}
