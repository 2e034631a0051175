"""Code-made degradations of real fundus photos, for choosing and testing the quality gate's thresholds.

Each degradation takes a ``strength`` in [0, 1] (0 = the mildest level that should already be ungradable,
1 = severe) and sizes itself on the photo's field of view, not its pixel count, so a 512-px pre-cropped
Messidor-2 photo and a 1024-px raw EyePACS photo are degraded alike. ``degrade(img, name, rng)`` draws the
strength uniformly; ``STRENGTH_BINS`` names the thirds mild / moderate / severe for reports.

What phones produce (issue 20): defocus; motion blur at any angle; under- and over-exposure (also of photos
that are already bright or pre-cropped: ``overexpose`` is defined by where the result lands, ``overexpose_gain``
by +1 to +2 EV over a typical exposure); an off-centre field; veiling haze (cataract, a fogged or dirty lens),
uneven across the field; noise; partial eyelid occlusion from the top (a soft-edged, curved shadow with lashes); lens flare; heavy JPEG.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

STRENGTH_BINS = (("mild", 0.0, 1 / 3), ("moderate", 1 / 3, 2 / 3), ("severe", 2 / 3, 1.0001))


def _fov(img: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(bool mask, diameter, centre) of the bright field of view (black surround excluded)."""
    mask = img.max(axis=2) > 12
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        h, w = img.shape[:2]
        return mask, float(min(h, w)), (w / 2, h / 2)
    diameter = float(max(xs.max() - xs.min(), ys.max() - ys.min()))
    return mask, diameter, (float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2)


def _lerp(strength: float, mild: float, severe: float) -> float:
    return mild + (severe - mild) * float(np.clip(strength, 0, 1))


NORMAL_MEAN = 90.0  # a typical exposure: about the median field luminance of the val/calib originals (both folders)


def _field_mean(img: np.ndarray) -> float:
    """Mean luminance of the field of view (>= 1)."""
    mask, _, _ = _fov(img)
    luminance = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[mask]
    return max(float(luminance.mean()) if luminance.size else NORMAL_MEAN, 1.0)


def defocus(img, strength, rng):
    _, diameter, _ = _fov(img)
    sigma = diameter * _lerp(strength, 0.006, 0.014)
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img, strength, rng):
    """A line kernel at a random angle (0-180 degrees)."""
    _, diameter, _ = _fov(img)
    length = max(5, int(diameter * _lerp(strength, 0.025, 0.06)))
    size = length | 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, (size - length) // 2:(size - length) // 2 + length] = 1.0
    rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    return cv2.filter2D(img, -1, kernel / max(float(kernel.sum()), 1e-6))


def underexpose(img, strength, rng):
    """x0.28 (-1.8 EV) to x0.08 (-3.6 EV) under a typical exposure: a photo brighter than typical (``NORMAL_MEAN``)
    is first brought down to it, since x0.28 of an already-bright photo (mean luminance up to 224 on val/calib) is
    an ordinary exposure (the mirror image of ``overexpose_gain``)."""
    gain = _lerp(strength, 0.28, 0.08) * min(1.0, NORMAL_MEAN / _field_mean(img))
    return (img.astype(np.float32) * gain).astype(np.uint8)


def overexpose(img, strength, rng):
    """Scaled so the field's mean luminance lands at 165-235 whatever it was (already-bright photos included),
    plus a flat lift of the blacks; highlights clip as a sensor's would. The gain is solved for the clipped
    result (a few fixed-point steps): clipping alone used to leave mild copies of bright photos 1-10 levels short
    of the target."""
    mask, _, _ = _fov(img)
    field = img[mask].astype(np.float32)
    weights = np.array([0.114, 0.587, 0.299], np.float32)  # BGR luminance

    def mean_luminance(values: np.ndarray) -> float:
        return float((values @ weights).mean()) if values.size else 100.0

    current = max(mean_luminance(field), 1.0)
    target = _lerp(strength, 165, 235)
    lift = rng.uniform(5, 30)
    gain = max(1.0, (target - lift) / current)
    for _ in range(6):  # clipping lowers the mean: raise the gain until the clipped field lands on the target
        reached = mean_luminance(np.clip(field * gain + lift, 0, 255))
        if reached >= target - 0.5 or reached >= 254:
            break
        gain *= (target - lift) / max(reached - lift, 1.0)
    out = np.clip(img.astype(np.float32) * gain + lift, 0, 255)
    return np.where(mask[..., None], out, img).astype(np.uint8)


def overexpose_gain(img, strength, rng):
    """Camera over-exposure by exposure value: +1 EV (x2) to +2 EV (x4) over a typical exposure, on the whole
    frame, clipped as a sensor clips. A photo darker than typical (``NORMAL_MEAN``) is first brought up to it:
    +1 EV of an under-exposed photo only corrects it (on val/calib, x2 to x4 of the photos as taken left 30 of 381
    copies inside the originals' range, most of them from photos with a mean luminance of 40-70). Unlike
    ``overexpose`` nothing is lifted and the result's brightness is not fixed: red saturates and the disc blows
    out first, and a pre-cropped Messidor-2 photo lands where its own colours take it."""
    gain = 2.0 ** _lerp(strength, 1.0, 2.0) * max(1.0, NORMAL_MEAN / _field_mean(img))
    return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def off_centre(img, strength, rng):
    h, w = img.shape[:2]
    _, diameter, _ = _fov(img)
    shift = diameter * _lerp(strength, 0.22, 0.45)
    angle = rng.uniform(0, 2 * np.pi)
    return cv2.warpAffine(img, np.float32([[1, 0, shift * np.cos(angle)], [0, 1, shift * np.sin(angle)]]), (w, h))


def haze(img, strength, rng):
    """Veiling haze: blend toward a light grey-yellow veil, stronger on one side, plus softening."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    alpha_mean = _lerp(strength, 0.45, 0.85)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gradient = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / max(diameter, 1.0)  # -0.5..0.5
    alpha = np.clip(alpha_mean + 0.25 * alpha_mean * gradient, 0, 0.95)[..., None]
    veil = np.array([rng.uniform(140, 175), rng.uniform(160, 185), rng.uniform(170, 200)], np.float32)
    out = img.astype(np.float32) * (1 - alpha) + veil * alpha
    out = cv2.GaussianBlur(out, (0, 0), max(0.5, diameter * 0.003))
    return np.where(mask[..., None], out, img).astype(np.uint8)


def noise(img, strength, rng):
    sigma = _lerp(strength, 14, 30)
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def occlusion(img, strength, rng):
    """A partial eyelid from the top: a curved, soft-edged shadow over 22-50% of the field, with lashes."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    top = cy - diameter / 2
    depth = diameter * _lerp(strength, 0.22, 0.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sag = depth * 0.25 * (1 - ((xx - cx) / max(diameter / 2, 1)) ** 2)  # the lid margin is an arc
    edge = top + depth + sag - depth * 0.25
    lid = (yy < edge).astype(np.float32)
    for _ in range(int(25 + 40 * strength)):  # lashes: dark strokes hanging below the margin
        x0 = rng.uniform(cx - diameter / 2, cx + diameter / 2)
        y0 = float(top + depth + depth * 0.25 * (1 - ((x0 - cx) / max(diameter / 2, 1)) ** 2) - depth * 0.25)
        length = diameter * rng.uniform(0.03, 0.08)
        x1 = x0 + rng.uniform(-0.5, 0.5) * length
        cv2.line(lid, (int(x0), int(y0)), (int(x1), int(y0 + length)), 1.0, max(1, int(diameter * 0.004)))
    lid = cv2.GaussianBlur(lid, (0, 0), max(1.0, diameter * 0.01))[..., None]
    darkness = rng.uniform(0.04, 0.25)
    skin = np.array([20, 30, 60], np.float32) * rng.uniform(0.3, 1.0)  # dim, reddish-brown lid
    out = img.astype(np.float32) * (1 - lid) + (img.astype(np.float32) * darkness + skin * darkness) * lid
    return np.where(mask[..., None], out, img).astype(np.uint8)


def flare(img, strength, rng):
    """Lens flare: a bright, desaturated blob (or two) inside the field."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        r = diameter * _lerp(strength, 0.1, 0.22)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.3) * diameter
        fx, fy = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
        blob = np.exp(-((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * r ** 2))[..., None]
        out = out * (1 - 0.9 * blob) + 250 * 0.9 * blob
    return np.where(mask[..., None], np.clip(out, 0, 255), img).astype(np.uint8)


def heavy_jpeg(img, strength, rng):
    quality = int(round(_lerp(strength, 10, 3)))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else img


Degradation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
DEGRADATIONS: dict[str, Degradation] = {f.__name__: f for f in (
    defocus, motion_blur, underexpose, overexpose, off_centre, haze, noise, occlusion, flare, heavy_jpeg, overexpose_gain)}


def degrade(img: np.ndarray, name: str, rng: np.random.Generator, strength: float | None = None) -> tuple[np.ndarray, float]:
    """(degraded copy, strength used); the strength is drawn uniformly from [0, 1] unless given."""
    strength = float(rng.uniform(0, 1)) if strength is None else strength
    return DEGRADATIONS[name](img, strength, rng), strength


def strength_bin(strength: float) -> str:
    return next(name for name, low, high in STRENGTH_BINS if low <= strength < high)
