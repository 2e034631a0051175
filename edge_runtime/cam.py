"""Class activation maps from the model's own ``cam`` output: upsampling, overlay and peak location."""
from __future__ import annotations

import cv2
import numpy as np

from .decision import cam_grid_peak
from .preprocess import Preprocessed


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
    return pre.to_original(*cam_grid_peak(cam))


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


DISPLAY_SIDE = 512  # overlays are for a phone screen or a review page, never the full sensor resolution


def render_overlay(bgr: np.ndarray, heat: np.ndarray, pre: Preprocessed, max_side: int = DISPLAY_SIDE,
                   alpha: float = 0.45) -> bytes:
    """PNG of the CAM (h x w grid, 0..1) over the photo, rendered at display size only.

    The photo is downscaled first and the CAM grid is upsampled straight to the displayed crop, so no
    full-resolution heat map or blend is ever computed.
    """
    scale = min(1.0, max_side / max(bgr.shape[:2]))
    shown = cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else bgr.copy()
    side = max(1, round(pre.square_side * scale))
    square = np.clip(cv2.resize(heat.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC), 0, 1)
    x, y, w, h = (round(v * scale) for v in pre.crop_box)
    left, top = round(pre.pad[0] * scale), round(pre.pad[1] * scale)
    h = min(h, shown.shape[0] - y, side - top)
    w = min(w, shown.shape[1] - x, side - left)
    region_heat = square[top:top + h, left:left + w]
    region = shown[y:y + h, x:x + w]
    colour = cv2.applyColorMap((region_heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * region_heat)[..., None]
    region[:] = (region * (1 - weight) + colour * weight).astype(np.uint8)
    # zlib level 1 with run-length matching: 3-4x faster than the defaults here, files within 5%.
    ok, png = cv2.imencode(".png", shown, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise RuntimeError("PNG encoding of the overlay failed")
    return png.tobytes()
