"""The one fundus preprocessing implementation: training, calibration, runtime and server all call it.

numpy + OpenCV only. Steps: decode (with byte and pixel limits) -> 8-bit 3-channel -> field-of-view
detection -> crop to it -> pad to square -> resize (INTER_AREA) -> optional Ben Graham local-contrast
normalisation -> scale to 0-1 and normalise with the manifest's mean/std.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .contract import PreprocessPolicy
from .errors import ImageTooLargeError, NoFundusError, UnreadableImageError

MAX_IMAGE_BYTES = 40 * 1024 * 1024  # a 24 MP camera JPEG is ~10 MB
MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard, checked from the header before decoding
MIN_FOV_FRACTION = 0.05  # below this share of bright pixels there is no fundus to grade


@dataclass(frozen=True)
class FieldOfView:
    """The circular fundus field of view found in an image (pixel coordinates of that image)."""

    x: int
    y: int
    w: int
    h: int
    center: tuple[float, float]
    radius: float
    fraction: float  # share of image pixels inside the field of view
    mask: np.ndarray  # uint8 0/255, same size as the image


@dataclass(frozen=True)
class Preprocessed:
    """A model input plus what is needed to map model coordinates back to the original photo."""

    tensor: np.ndarray  # float32, 1 x C x S x S (NCHW) or 1 x S x S x C (NHWC)
    resized_rgb: np.ndarray  # uint8 S x S x 3, before normalisation (for overlays and caching)
    crop_box: tuple[int, int, int, int]  # x, y, w, h of the crop in the original image
    pad: tuple[int, int]  # (left, top) padding added to make the crop square
    square_side: int
    original_size: tuple[int, int]  # (width, height)

    def to_original(self, u: float, v: float) -> tuple[float, float]:
        """Map normalised model-input coordinates (0-1) to normalised original-image coordinates (0-1)."""
        x = u * self.square_side - self.pad[0] + self.crop_box[0]
        y = v * self.square_side - self.pad[1] + self.crop_box[1]
        w, h = self.original_size
        return float(np.clip(x / w, 0, 1)), float(np.clip(y / h, 0, 1))


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding pixels; None if not recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + seg_len
    return None


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode bytes to an 8-bit BGR image, honouring EXIF orientation.

    Grayscale is expanded to 3 channels, 16-bit is scaled to 8-bit, alpha is composited on black
    (a fundus photo's surround is black).

    Raises:
        UnreadableImageError: empty, truncated or non-image bytes.
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
    """
    if not data:
        raise UnreadableImageError("image is empty (0 bytes); re-capture or check the file")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit")
    size = image_size_from_header(data)
    if size and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(
            f"image is {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit; "
            "downscale it before grading"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    # ANYDEPTH|ANYCOLOR keeps 16-bit depth and still applies EXIF orientation (IMREAD_UNCHANGED would not).
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None or img.size == 0:
        raise UnreadableImageError(
            f"bytes are not a decodable image ({len(data)} bytes, starts {data[:8]!r}); expected JPEG, PNG, TIFF, BMP or WebP"
        )
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageTooLargeError(f"decoded image is {img.shape[1]}x{img.shape[0]}, over the {max_pixels / 1e6:.0f} MP limit")
    if img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / np.iinfo(img.dtype).max
        img = (img[:, :, :3].astype(np.float32) * alpha).astype(img.dtype)
    return to_bgr8(img)


def to_bgr8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV image (gray/BGR, 8/16-bit/float) -> uint8 BGR."""
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if img.max() <= 1.0 else 1.0
        img = np.clip(img * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise UnreadableImageError(f"unsupported pixel type {img.dtype}; expected 8- or 16-bit")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def read_image(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a file to uint8 BGR with the same limits and errors as :func:`decode_image`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableImageError(f"cannot read {path}: {exc.strerror}") from exc
    if size > max_bytes:
        raise ImageTooLargeError(f"{path.name} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit")
    return decode_image(path.read_bytes(), max_bytes, max_pixels)


def detect_fov(bgr: np.ndarray, threshold: int = 12) -> FieldOfView:
    """Find the fundus field of view: the largest bright connected region (its surround is black)."""
    small_scale = min(1.0, 512 / max(bgr.shape[:2]))
    small = cv2.resize(bgr, None, fx=small_scale, fy=small_scale, interpolation=cv2.INTER_AREA) if small_scale < 1 else bgr
    gray = small.max(axis=2)
    mask = (gray > threshold).astype(np.uint8) * 255
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        raise NoFundusError("no fundus field of view found (the image is dark everywhere); check the camera and re-capture")
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = np.where(labels == biggest, 255, 0).astype(np.uint8)
    fraction = float(stats[biggest, cv2.CC_STAT_AREA]) / mask.size
    if fraction < MIN_FOV_FRACTION:
        raise NoFundusError(
            f"the bright region covers only {fraction:.1%} of the image (need >= {MIN_FOV_FRACTION:.0%}); no fundus to grade"
        )
    if small_scale < 1:
        mask = cv2.resize(mask, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_NEAREST)
    x, y, w, h = cv2.boundingRect(mask)
    (cx, cy), radius = cv2.minEnclosingCircle(cv2.findNonZero(mask))
    # The visible field is often clipped top and bottom by the sensor; the radius is half the larger side.
    radius = max(w, h) / 2.0
    return FieldOfView(x, y, w, h, (float(x + w / 2), float(y + h / 2)), float(radius), fraction, mask)


def ben_graham(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Local-contrast normalisation (Graham, Kaggle DR 2015): 4*img - 4*GaussianBlur(img) + 128."""
    return cv2.addWeighted(rgb, 4.0, cv2.GaussianBlur(rgb, (0, 0), sigma), -4.0, 128)


def crop_and_resize(bgr: np.ndarray, policy: PreprocessPolicy,
                    fov: FieldOfView | None = None) -> tuple[np.ndarray, tuple, tuple, int]:
    """Crop to the field of view (``fov`` if already detected), pad to square, resize:
    returns (uint8 RGB S x S, crop_box, pad, side)."""
    h_img, w_img = bgr.shape[:2]
    if policy.crop_to_fundus:
        fov = fov or detect_fov(bgr, policy.fov_threshold)
        x, y, w, h = fov.x, fov.y, fov.w, fov.h
    else:
        x, y, w, h = 0, 0, w_img, h_img
    crop = bgr[y:y + h, x:x + w]
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    square = cv2.copyMakeBorder(crop, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0)
    size = policy.input_size
    interp = getattr(cv2, policy.resize_interpolation)
    resized = cv2.resize(square, (size, size), interpolation=interp if side > size else cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    if policy.ben_graham:
        rgb = ben_graham(rgb, sigma=max(1.0, size * policy.ben_graham_sigma_fraction))
    return rgb, (x, y, w, h), (left, top), side


def normalize(rgb: np.ndarray, policy: PreprocessPolicy) -> np.ndarray:
    """uint8 S x S x 3 RGB (or batch N x S x S x 3) -> float32 normalised, layout per policy."""
    arr = rgb.astype(np.float32) / 255.0
    if policy.color_order == "BGR":
        arr = arr[..., ::-1]
    arr = (arr - np.asarray(policy.mean, np.float32)) / np.asarray(policy.std, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if policy.layout == "NCHW":
        arr = arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess(bgr: np.ndarray, policy: PreprocessPolicy, fov: FieldOfView | None = None) -> Preprocessed:
    """Raw uint8 BGR fundus photo -> normalised model input plus the geometry to map back."""
    bgr = to_bgr8(bgr)
    rgb, crop_box, pad, side = crop_and_resize(bgr, policy, fov)
    return Preprocessed(normalize(rgb, policy), rgb, crop_box, pad, side, (bgr.shape[1], bgr.shape[0]))


def preprocess_file(path: str | Path, policy: PreprocessPolicy) -> Preprocessed:
    return preprocess(read_image(path), policy)
