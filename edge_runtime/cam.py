"""Class activation maps from the model's own ``cam`` output: upsampling, overlay and peak location."""
from __future__ import annotations

import cv2
import numpy as np

from .preprocess import Preprocessed


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """One grade's map (h x w) -> 0..1 after ReLU (only evidence *for* the grade is shown)."""
    cam = np.maximum(cam.astype(np.float32), 0)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def cam_on_original(cam: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """Map a normalised CAM (h x w, model-input geometry) onto the original photo (H x W float 0..1)."""
    side = pre.square_side
    square = cv2.resize(cam, (side, side), interpolation=cv2.INTER_CUBIC)
    x, y, w, h = pre.crop_box
    left, top = pre.pad
    width, height = pre.original_size
    full = np.zeros((height, width), np.float32)
    full[y:y + h, x:x + w] = square[top:top + h, left:left + w]
    return np.clip(full, 0, 1)


def cam_peak(cam: np.ndarray, pre: Preprocessed) -> tuple[float, float]:
    """(x, y) of the CAM maximum, normalised to the original image (0..1)."""
    h, w = cam.shape
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return pre.to_original((col + 0.5) / w, (row + 0.5) / h)


def overlay_png(bgr: np.ndarray, heat: np.ndarray, max_side: int = 768, alpha: float = 0.45) -> bytes:
    """JET heat map blended over the photo, downscaled to ``max_side``; PNG bytes."""
    scale = min(1.0, max_side / max(bgr.shape[:2]))
    if scale < 1:
        size = (int(bgr.shape[1] * scale), int(bgr.shape[0] * scale))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * heat)[..., None]
    blended = (bgr.astype(np.float32) * (1 - weight) + colour.astype(np.float32) * weight).astype(np.uint8)
    ok, png = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("PNG encoding of the overlay failed")
    return png.tobytes()
