"""The one fundus preprocessing implementation: training, calibration, runtime and server all call it.

numpy + OpenCV only. Steps: decode (with byte and pixel limits) -> 8-bit 3-channel -> field-of-view
detection -> crop to it -> resize (INTER_AREA) -> pad to square -> optional Ben Graham local-contrast
normalisation -> scale to 0-1 and normalise with the manifest's mean/std.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .contract import PreprocessPolicy
from .errors import (
    ImageError,
    ImageTooLargeError,
    NoFundusError,
    UnreadableImageError,
    UnsupportedImageFormatError,
)

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
    mask: np.ndarray  # uint8 0/255 of the detection copy: ``mask_scale`` times the image's size
    mask_scale: float = 1.0
    # the detection copy itself (uint8 BGR, the mask's size), kept so the quality gate reads the field's colours
    # without resizing the photo again; None where the field was built without it
    detection_copy: np.ndarray | None = field(default=None, repr=False, compare=False)


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


# The formats a fundus camera or phone hands over, by Pillow's format name: JPEG (MPO is a multi-picture JPEG),
# PNG and WebP. Everything else OpenCV could decode (TIFF, HDR, JPEG 2000, GIF, PFM, ...) is refused before any
# pixel is decoded: those decoders allocate the full image before a size check can run.
ACCEPTED_IMAGE_FORMATS = {"JPEG": (".jpg", ".jpeg"), "MPO": (), "PNG": (".png",), "WEBP": (".webp",)}
IMAGE_SUFFIXES = tuple(suffix for suffixes in ACCEPTED_IMAGE_FORMATS.values() for suffix in suffixes)
# Magic bytes of the accepted formats (WebP: "RIFF" then "WEBP" at byte 8): bytes that start like one but whose
# header Pillow cannot read are a broken photo of an accepted format, not another format.
_ACCEPTED_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding pixels."""

    format: str  # Pillow's name: JPEG, MPO, PNG or WEBP
    size: tuple[int, int]  # (width, height) as stored (before EXIF rotation)

    @property
    def is_jpeg(self) -> bool:
        return self.format in ("JPEG", "MPO")


def read_image_header(data: bytes) -> ImageHeader:
    """Format and (width, height) from the header with Pillow's lazy ``Image.open`` (a maintained parser: it skips
    ``FF`` fill bytes in JPEG marker streams, checks PNG chunk CRCs), restricted to :data:`ACCEPTED_IMAGE_FORMATS`.

    Raises:
        UnsupportedImageFormatError: not a JPEG, PNG or WebP (including formats OpenCV would decode).
        UnreadableImageError: an accepted format whose header is broken.
        ImageTooLargeError: Pillow's own decompression-bomb limit was crossed while reading the header.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller compares with its own limit
            with Image.open(io.BytesIO(data), formats=[f for f in ACCEPTED_IMAGE_FORMATS if f != "MPO"]) as image:
                return ImageHeader(str(image.format), (int(image.size[0]), int(image.size[1])))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image header declares too many pixels ({exc}); downscale it before grading") from exc
    except UnidentifiedImageError as exc:
        if data.startswith(_ACCEPTED_SIGNATURES) or data[8:12] == b"WEBP":
            raise UnreadableImageError("a truncated or corrupt JPEG, PNG or WebP image: its header cannot be read; "
                                       "re-capture or re-export the photo") from exc
        raise UnsupportedImageFormatError(
            f"not a JPEG, PNG or WebP image ({len(data)} bytes, starts {data[:8]!r}); fundus photos are accepted in "
            "those formats only: export or convert the photo to JPEG or PNG") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise UnreadableImageError(f"the image header is broken ({type(exc).__name__}); re-capture or re-export "
                                   "the photo") from exc


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an accepted image's header without decoding pixels; None if not an accepted image."""
    try:
        return read_image_header(data).size
    except ImageError:
        return None


# libjpeg decodes at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients: cheaper than decoding every pixel and
# then averaging them away (what INTER_AREA to the model input does anyway).
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_reduction(size: tuple[int, int] | None, min_side: int | None) -> int:
    """The largest JPEG decode reduction (1, 2, 4 or 8) that keeps the image's shorter side >= ``min_side``."""
    if not size or not min_side:
        return 1
    return next((factor for factor, _ in _REDUCED_FLAGS if min(size) // factor >= min_side), 1)


def check_image_header(data: bytes, max_bytes: int = MAX_IMAGE_BYTES,
                       max_pixels: int = MAX_IMAGE_PIXELS) -> ImageHeader:
    """The checks that precede any decode: bytes, accepted format, and width x height from the header.

    Raises:
        UnreadableImageError: empty bytes or a broken header (UnsupportedImageFormatError: not JPEG, PNG or WebP).
        ImageTooLargeError: over ``max_bytes``, or the header declares more than ``max_pixels``.
    """
    if not data:
        raise UnreadableImageError("image is empty (0 bytes); re-capture or check the file")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit")
    header = read_image_header(data)
    width, height = header.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit; "
            "downscale it before grading"
        )
    return header


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int | None = None) -> np.ndarray:
    """Decode bytes to an 8-bit BGR image, honouring EXIF orientation.

    Only JPEG, PNG and WebP are accepted, and their header's width x height is checked against ``max_pixels``
    before any pixel is decoded (:func:`check_image_header`). Grayscale is expanded to 3 channels, 16-bit is
    scaled to 8-bit, alpha is composited on black (a fundus photo's surround is black). With ``min_side``, a JPEG
    much larger than needed is decoded at a reduced scale (1/2, 1/4, 1/8) whose shorter side is still >=
    ``min_side`` pixels.

    Raises:
        UnreadableImageError: empty, truncated or non-image bytes (UnsupportedImageFormatError: another format).
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
    """
    header = check_image_header(data, max_bytes, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    factor = jpeg_reduction(header.size, min_side) if header.is_jpeg else 1
    if factor > 1:  # 8-bit colour JPEG; reduced decoding still applies EXIF orientation
        img = cv2.imdecode(buf, dict(_REDUCED_FLAGS)[factor])
    else:
        # ANYDEPTH|ANYCOLOR keeps 16-bit depth and still applies EXIF orientation (IMREAD_UNCHANGED would not).
        img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None or img.size == 0:
        raise UnreadableImageError(
            f"bytes are not a decodable {header.format} image ({len(data)} bytes); re-capture or re-export the photo"
        )
    # OpenCV picks its decoder from the same signature; a decode larger than the header said is refused all the same.
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


FOV_DETECTION_SIDE = 256  # the field of view is found on a copy this large: 4 px granularity on a 1024-px photo
_OPEN_KERNEL = np.ones((5, 5), np.uint8)  # removes specks and text burnt into the black surround


def _refine_box(bgr: np.ndarray, x0: float, y0: float, x1: float, y1: float, threshold: int,
                margin: int) -> tuple[int, int, int, int]:
    """The small copy's box edges, each moved to the first/last full-resolution row or column (within ``margin``
    of it) where >= 2 pixels are brighter than ``threshold``: the crop then does not depend on the decode scale."""
    h_img, w_img = bgr.shape[:2]
    left, top = max(0, int(np.floor(x0)) - margin), max(0, int(np.floor(y0)) - margin)
    right, bottom = min(w_img, int(np.ceil(x1)) + margin), min(h_img, int(np.ceil(y1)) + margin)

    def bright(region: np.ndarray, axis: int) -> np.ndarray:
        return (region.max(axis=2) > threshold).sum(axis=axis) >= 2

    def first(flags: np.ndarray, default: int) -> int:
        hits = np.flatnonzero(flags)
        return int(hits[0]) if hits.size else default

    def last(flags: np.ndarray, default: int) -> int:
        hits = np.flatnonzero(flags)
        return int(hits[-1]) + 1 if hits.size else default

    band = 2 * margin
    x = left + first(bright(bgr[top:bottom, left:left + band], 0), 0)
    x_end = right - band + last(bright(bgr[top:bottom, right - band:right], 0), band)
    y = top + first(bright(bgr[top:top + band, left:right], 1), 0)
    y_end = bottom - band + last(bright(bgr[bottom - band:bottom, left:right], 1), band)
    return x, y, max(1, x_end - x), max(1, y_end - y)


def detect_fov(bgr: np.ndarray, threshold: int = 12) -> FieldOfView:
    """Find the fundus field of view: the largest bright connected region (its surround is black).

    Works on one small copy (longer side ``FOV_DETECTION_SIDE``); geometry is returned in ``bgr``'s pixels and the
    mask at the small copy's scale (``mask_scale``), so callers never pay for a full-resolution mask.
    """
    scale = min(1.0, FOV_DETECTION_SIDE / max(bgr.shape[:2]))
    small = cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else bgr
    # Brightest channel > threshold, i.e. not black in any channel (a fundus is red, its surround black).
    mask = cv2.threshold(cv2.max(cv2.max(small[:, :, 0], small[:, :, 1]), small[:, :, 2]), threshold, 255,
                         cv2.THRESH_BINARY)[1]
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _OPEN_KERNEL)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        raise NoFundusError("no fundus field of view found (the image is dark everywhere); check the camera and re-capture")
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    fraction = float(stats[biggest, cv2.CC_STAT_AREA]) / mask.size
    if fraction < MIN_FOV_FRACTION:
        raise NoFundusError(
            f"the bright region covers only {fraction:.1%} of the image (need >= {MIN_FOV_FRACTION:.0%}); no fundus to grade"
        )
    mask = ((labels == biggest) * 255).astype(np.uint8) if count > 2 else mask
    sx, sy, sw, sh = (int(v) for v in stats[biggest, :4])
    x, y, w, h = _refine_box(bgr, sx / scale, sy / scale, (sx + sw) / scale, (sy + sh) / scale, threshold,
                             margin=int(np.ceil(1 / scale)) + 1)
    # The visible field is often clipped top and bottom by the sensor; the radius is half the larger side.
    radius = max(w, h) / 2.0
    return FieldOfView(x, y, w, h, (float(x + w / 2), float(y + h / 2)), float(radius), fraction, mask, scale, small)


def ben_graham(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Local-contrast normalisation (Graham, Kaggle DR 2015): 4*img - 4*GaussianBlur(img) + 128."""
    return cv2.addWeighted(rgb, 4.0, cv2.GaussianBlur(rgb, (0, 0), sigma), -4.0, 128)


def crop_and_resize(bgr: np.ndarray, policy: PreprocessPolicy, fov: FieldOfView | None = None,
                    channel_order: str = "RGB") -> tuple[np.ndarray, tuple, tuple, int]:
    """Crop to the field of view (``fov`` if already detected), resize, pad to square: returns
    (uint8 S x S x 3 in ``channel_order``, crop_box, pad, side) where pad and side are in original pixels.

    The crop is resized first and padded after, so no full-resolution square copy is ever made.
    """
    h_img, w_img = bgr.shape[:2]
    if policy.crop_to_fundus:
        fov = fov or detect_fov(bgr, policy.fov_threshold)
        x, y, w, h = fov.x, fov.y, fov.w, fov.h
    else:
        x, y, w, h = 0, 0, w_img, h_img
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    size = policy.input_size
    scale = size / side
    # Content box inside the S x S output, from the same square geometry as the crop (so to_original holds).
    c_left, c_top = int(round(left * scale)), int(round(top * scale))
    c_w, c_h = max(1, min(size - c_left, int(round(w * scale)))), max(1, min(size - c_top, int(round(h * scale))))
    interp = getattr(cv2, policy.resize_interpolation) if side > size else cv2.INTER_LINEAR
    content = cv2.resize(bgr[y:y + h, x:x + w], (c_w, c_h), interpolation=interp)
    if channel_order == "RGB":
        content = cv2.cvtColor(content, cv2.COLOR_BGR2RGB)
    out = cv2.copyMakeBorder(content, c_top, size - c_h - c_top, c_left, size - c_w - c_left, cv2.BORDER_CONSTANT, value=0)
    if policy.ben_graham:
        out = ben_graham(out, sigma=max(1.0, size * policy.ben_graham_sigma_fraction))
    return out, (x, y, w, h), (left, top), side


@lru_cache(maxsize=16)
def _affine(policy: PreprocessPolicy) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per RGB channel: (x / 255 - mean) / std == x * scale + offset, computed once per policy."""
    std = np.asarray(policy.std, np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-np.asarray(policy.mean, np.float32) / std).astype(np.float32)


def level_step(policy: PreprocessPolicy) -> np.ndarray:
    """Per RGB channel, how far one 8-bit level of the photo moves the normalised input: 1 / (255 std)."""
    return _affine(policy)[0].copy()


def normalize(rgb: np.ndarray, policy: PreprocessPolicy) -> np.ndarray:
    """uint8 S x S x 3 RGB (or batch N x S x S x 3) -> float32 normalised, layout per policy."""
    scale, offset = _affine(policy)
    batch = rgb if rgb.ndim == 4 else rgb[None]
    if policy.color_order == "BGR":
        batch, scale, offset = batch[..., ::-1], scale[::-1], offset[::-1]
    if policy.layout == "NCHW":
        out = np.empty((batch.shape[0], 3, batch.shape[1], batch.shape[2]), np.float32)
        for c in range(3):  # one pass per channel straight into the output: no float copy of the whole image
            np.multiply(batch[..., c], scale[c], out=out[:, c], dtype=np.float32)
            out[:, c] += offset[c]
        return out
    out = np.multiply(batch, scale, dtype=np.float32)
    out += offset
    return np.ascontiguousarray(out)


def preprocess(bgr: np.ndarray, policy: PreprocessPolicy, fov: FieldOfView | None = None) -> Preprocessed:
    """Raw uint8 BGR fundus photo -> normalised model input plus the geometry to map back."""
    bgr = to_bgr8(bgr)
    rgb, crop_box, pad, side = crop_and_resize(bgr, policy, fov)
    return Preprocessed(normalize(rgb, policy), rgb, crop_box, pad, side, (bgr.shape[1], bgr.shape[0]))


def preprocess_file(path: str | Path, policy: PreprocessPolicy) -> Preprocessed:
    return preprocess(read_image(path), policy)
