"""The frozen re-capture nuisance model: a second photo of the same eye that a grader would call the same photo.

One implementation, read by the fidelity gate's noise floor (``compression.noise_floor``), by the export pipeline's
gate draws and by training's consistency option (``training.consistency``), so the perturbation a model is trained to
ignore is the very one it is judged on. Torch-free (numpy and OpenCV), so training and compression both import it
without importing each other. docs/reference/fidelity_gate.md gives each default's reason.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .contract import PreprocessPolicy
from .errors import ConfigError
from .preprocess import level_step, normalize


@dataclass(frozen=True, kw_only=True)
class NuisanceModel:
    """A re-capture a grader would call the same photo, applied to the model's S x S input crop (uint8 RGB).

    Order: framing (shift, rotation), then exposure and white balance (gains), sensor noise, rounding to 8 bits,
    and a JPEG re-encode. Every draw is seeded by (seed, photo key, draw), so FP32 and the candidate see the very
    same K images of each photo, and a run is reproducible."""

    sensor_noise_levels: float = 1.0  # Gaussian sensor noise, SD in 8-bit levels
    exposure: float = 0.03  # one gain for all channels, uniform in [1 - exposure, 1 + exposure]
    white_balance: float = 0.02  # one gain per channel, uniform in [1 - white_balance, 1 + white_balance]
    max_shift_px: float = 2.0  # framing shift, uniform in [-max, max] px on each axis of the S-px crop
    max_rotation_deg: float = 1.0  # rotation about the crop centre, uniform in [-max, max] degrees
    jpeg_quality: tuple[int, int] = (90, 95)  # re-encode quality, uniform integer in [low, high]
    draws: int = 16  # K perturbations per photo
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "jpeg_quality", tuple(int(q) for q in self.jpeg_quality))
        for name in ("sensor_noise_levels", "exposure", "white_balance", "max_shift_px", "max_rotation_deg"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"NuisanceModel.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.exposure >= 1 or self.white_balance >= 1:
            raise ConfigError("NuisanceModel.exposure and white_balance are relative gains and must be < 1")
        low, high = self.jpeg_quality if len(self.jpeg_quality) == 2 else (0, -1)
        if not 1 <= low <= high <= 100:
            raise ConfigError(f"NuisanceModel.jpeg_quality must be (low, high) with 1 <= low <= high <= 100, got "
                              f"{self.jpeg_quality!r}")
        if self.draws < 2:
            raise ConfigError(f"NuisanceModel.draws must be >= 2 (a noise floor needs repeats), got {self.draws}")

    def as_dict(self) -> dict:
        return asdict(self)

    def perturb(self, rgb: np.ndarray, key: int, draw: int) -> np.ndarray:
        """One draw of one photo: uint8 S x S x 3 RGB in, uint8 S x S x 3 RGB out."""
        import cv2

        rng = np.random.default_rng([self.seed, int(key), int(draw)])
        size_y, size_x = rgb.shape[:2]
        shift = rng.uniform(-self.max_shift_px, self.max_shift_px, 2)
        angle = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)
        matrix = cv2.getRotationMatrix2D(((size_x - 1) / 2, (size_y - 1) / 2), angle, 1.0)
        matrix[:, 2] += shift
        # Black beyond the edge, as beyond the fundus field of view the preprocessing pads with.
        moved = cv2.warpAffine(rgb, matrix, (size_x, size_y), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=(0, 0, 0)).astype(np.float32)
        gain = rng.uniform(1 - self.exposure, 1 + self.exposure) * rng.uniform(
            1 - self.white_balance, 1 + self.white_balance, 3)
        moved *= gain.astype(np.float32)
        moved += rng.normal(0.0, self.sensor_noise_levels, moved.shape).astype(np.float32)
        captured = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        ok, encoded = cv2.imencode(".jpg", captured[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise RuntimeError("JPEG re-encode failed")
        return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]

    def perturb_batch(self, x: np.ndarray, policy: PreprocessPolicy, draw: int, keys: np.ndarray | None = None
                      ) -> np.ndarray:
        """Draw ``draw`` of every photo of a normalised batch (the export's val photos): the same layout out."""
        rgb = to_rgb8(x, policy)
        keys = np.arange(len(x)) if keys is None else np.asarray(keys)
        return normalize(np.stack([self.perturb(img, k, draw) for img, k in zip(rgb, keys, strict=True)]), policy)

    def perturb_rgb8(self, rgb: np.ndarray, keys: np.ndarray, draw: int) -> np.ndarray:
        """Draw ``draw`` of every photo of a uint8 N x S x S x 3 RGB batch, photo i seeded by ``keys[i]``: the
        batch form training's consistency term uses on its crops, with no normalise/de-normalise round trip."""
        keys = np.asarray(keys)
        if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8 or len(keys) != len(rgb):
            raise ValueError(f"need a uint8 N x S x S x 3 RGB batch and one key per photo, got {rgb.dtype} "
                             f"{rgb.shape} and {len(keys)} keys")
        return np.stack([self.perturb(img, k, draw) for img, k in zip(rgb, keys, strict=True)])


def to_rgb8(x: np.ndarray, policy: PreprocessPolicy) -> np.ndarray:
    """Normalised batch (``edge_runtime.preprocess.normalize``) -> the uint8 N x S x S x 3 RGB it was made from."""
    # normalize is per channel x * scale + offset: read both back from two constant images.
    offset = normalize(np.zeros((1, 1, 1, 3), np.uint8), policy).reshape(3)
    scale = level_step(policy)
    if policy.color_order == "BGR":
        scale = scale[::-1]
    nhwc = np.moveaxis(x, 1, -1) if policy.layout == "NCHW" else x
    rgb = np.clip(np.rint((nhwc - offset) / scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1] if policy.color_order == "BGR" else rgb)
