"""Training batches that live on the accelerator: the uint8 crops are copied to the device once, and every
step shuffles, augments and normalises a whole batch there.

Why: on an H100 the per-photo DataLoader path (index a row, augment it on a CPU worker, pin, copy) fed B4 @380
at ~210 img/s while the model itself trains at ~600 img/s (bf16, channels_last). The shared photos are small
(3,200 crops at 380 px are 1.4 GB of uint8), so they fit on the device and the loader disappears from the step.

The augmentation draws from the same distribution as :meth:`FundusDataset.augment`: a uniformly random element
of the square's symmetry group (transpose, horizontal flip, vertical flip: 8 equally likely orientations, the
same set that flips plus a random multiple of 90 degrees reach) and the same brightness, contrast and per-channel
jitter. It is device-agnostic, so the CPU tests run the exact code the GPU runs.

``augment: phone`` first adds what phone ophthalmoscopes and handheld fundus cameras vary in (:func:`phone_capture_batch`):
framing (crop and zoom, any rotation), defocus, vignetting and tone curve. The per-photo path runs that same function
on a batch of one, so there is one implementation and one distribution.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.contract import PreprocessPolicy

from ..config import check_augment

# Same jitter ranges as FundusDataset.augment: +-20 % brightness and contrast, +-5 % per channel.
BRIGHTNESS, CONTRAST, CHANNEL = 0.4, 0.4, 0.1

# The `phone` recipe: each transform hits a photo with its own probability, at a strength drawn uniformly in bounds.
# Framing: a handheld camera is held off-centre and, through a small pupil, sees a narrower field than a desk camera.
# Keeping >= 80 % of the side (shifted at most to the image's edge) keeps most of the field of view, so peripheral
# lesions rarely leave the photo and the grade stays true.
CROP_PROBABILITY, CROP_SCALE = 0.5, (0.8, 1.0)
# Camera roll is continuous. +-45 degrees composed with the basic orientations (multiples of 90) reaches every angle;
# the field of view is a circle, so the corners that rotation fills with black were black background already.
ROTATION_PROBABILITY, ROTATION_DEGREES = 0.5, 45.0
# Defocus (handheld, no autofocus on the retina). Sigma in pixels at 224 px, scaled with the side so the blur covers
# the same share of the retina at every input size. Capped at 1.5 px and applied less often than the rest because
# stronger or more frequent blur erases microaneurysms (1-2 px at 224), the only lesion that makes a photo grade 1.
BLUR_PROBABILITY, BLUR_SIGMA_AT_224 = 0.3, (0.3, 1.5)
# Uneven illumination through a small pupil darkens the rim: gain 1 - strength * r^2, r = 1 on the field of view's
# circle, so the rim keeps at least half its brightness.
VIGNETTE_PROBABILITY, VIGNETTE_STRENGTH = 0.5, (0.0, 0.5)
# Phone image pipelines apply their own tone curves: x ** gamma, gamma log-uniform so that brightening (< 1) and
# darkening (> 1) are about equally likely.
GAMMA_PROBABILITY, GAMMA = 0.5, (0.7, 1.5)


def _check_square(x: torch.Tensor) -> None:
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"batched geometric augmentation needs square crops (fundus crops are), got "
                         f"{tuple(x.shape[-2:])}; crop with edge_runtime.preprocess.crop_and_resize first")


def augment_batch(x: torch.Tensor, generator: torch.Generator, geometric: bool = True,
                  augment: str = "basic", sensor_noise: float = 0.0) -> torch.Tensor:
    """Augment a float N x 3 x S x S batch in [0, 1], each photo with its own draw; returns values in [0, 1].

    ``augment`` is a recipe of ``training.config.AUGMENTATIONS``; ``geometric=False`` keeps every pixel in place;
    ``sensor_noise`` > 0 adds :func:`sensor_noise_batch` last.
    """
    check_augment(augment)
    if augment == "phone":
        x = phone_capture_batch(x, generator, geometric)
    n = x.shape[0]
    device = x.device

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=device) < 0.5).view(n, 1, 1, 1)

    if geometric:
        _check_square(x)
        x = torch.where(coin(), x.transpose(2, 3), x)
        x = torch.where(coin(), x.flip(3), x)
        x = torch.where(coin(), x.flip(2), x)
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=device) - 0.5) * BRIGHTNESS
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=device) - 0.5) * CONTRAST
    channel = 1 + (torch.rand(n, 3, 1, 1, generator=generator, device=device) - 0.5) * CHANNEL
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (((x - mean) * contrast + mean) * brightness * channel).clamp(0, 1)
    return sensor_noise_batch(x, generator, sensor_noise) if sensor_noise > 0 else x


def sensor_noise_batch(x: torch.Tensor, generator: torch.Generator, max_levels: float) -> torch.Tensor:
    """Per-pixel Gaussian noise of a float N x 3 x S x S batch in [0, 1], sigma drawn per photo uniformly in
    [0, ``max_levels``] 8-bit levels, then rounded to the 8-bit grid the device's input lies on; returns [0, 1].

    Camera sensors add such noise, and an 8-bit input (and INT8's rounding of it) differs from a resampled float
    photo by up to half a level: a model trained only on smooth inputs changes referrals under noise no one can see.
    """
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype) * (max_levels / 255.0)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).mul(255.0).round().clamp(0, 255).div(255.0)


def phone_capture_batch(x: torch.Tensor, generator: torch.Generator, geometric: bool = True) -> torch.Tensor:
    """Phone-ophthalmoscope variation of a float N x 3 x S x S batch in [0, 1], each photo with its own draws:
    crop and zoom plus rotation (only when ``geometric``), defocus blur, vignetting and gamma; returns [0, 1].

    Every draw is made for the whole batch whether a photo uses it or not, so the number of draws (and the
    generator's state afterwards) depends only on the batch size.
    """
    n = x.shape[0]

    def uniform(bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(n, *shape, generator=generator, device=x.device, dtype=x.dtype)

    def chance(probability: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device) < probability

    if geometric:
        _check_square(x)
        crop, rotate = chance(CROP_PROBABILITY), chance(ROTATION_PROBABILITY)
        scale = torch.where(crop, uniform(CROP_SCALE), 1.0)
        # In affine_grid's [-1, 1] coordinates the kept square has half-side `scale`: shifting its centre by at
        # most 1 - scale per axis keeps it inside the photo.
        shift = uniform((-1.0, 1.0), 2) * (1 - scale)[:, None]
        angle = torch.where(rotate, uniform((-ROTATION_DEGREES, ROTATION_DEGREES)), 0.0) * (math.pi / 180)
        x = _resample(x, scale, angle, shift, crop | rotate)
    sigma = torch.where(chance(BLUR_PROBABILITY), uniform(BLUR_SIGMA_AT_224), 0.0) * (x.shape[-1] / 224)
    x = _gaussian_blur(x, sigma, max_sigma=BLUR_SIGMA_AT_224[1] * x.shape[-1] / 224)
    strength = torch.where(chance(VIGNETTE_PROBABILITY), uniform(VIGNETTE_STRENGTH), 0.0)
    x = x * _vignette(strength, x.shape[-1], x.device, x.dtype)
    log_gamma = uniform((math.log(GAMMA[0]), math.log(GAMMA[1])))
    gamma = torch.where(chance(GAMMA_PROBABILITY), log_gamma.exp(), 1.0)
    # Bilinear and Gaussian weights sum to 1 only up to rounding: clamp before the power and after.
    return x.clamp(0, 1).pow(gamma.view(n, 1, 1, 1)).clamp(0, 1)


def _resample(x: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor,
              moved: torch.Tensor) -> torch.Tensor:
    """Crop (side ``scale``, centre ``shift``), rotate by ``angle`` (radians) and resize back, in one bilinear
    resample per batch; photos with ``moved`` False come back untouched rather than resampled (no needless blur)."""
    cos, sin = scale * angle.cos(), scale * angle.sin()
    # theta maps output coordinates to input coordinates: input = scale * R(angle) @ output + shift.
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zeros outside the photo: the black of a fundus photo's background.
    resampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(moved.view(-1, 1, 1, 1), resampled, x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-photo ``sigma`` (pixels; 0 = a unit impulse, the photo unchanged), as two
    depthwise convolutions with a kernel per photo and channel."""
    n, channels, height, width = x.shape
    radius = max(1, math.ceil(3 * max_sigma))  # 3 sigma holds 99.7 % of the kernel's weight
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    # A tiny floor instead of 0: offset 0 gets exp(0) = 1, every other offset exp(-huge) = 0.
    kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, None] ** 2).clamp_min(1e-12))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (N * C) x K
    flat = F.pad(x.reshape(1, n * channels, height, width), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def _vignette(strength: torch.Tensor, side: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-photo gain N x 1 x S x S: 1 at the centre, 1 - strength on the field of view's circle (r = 1)."""
    centres = (torch.arange(side, device=device, dtype=dtype) + 0.5) * (2 / side) - 1
    radius_squared = centres[None, :] ** 2 + centres[:, None] ** 2
    return (1 - strength.view(-1, 1, 1, 1) * radius_squared).clamp_min(0)


class DeviceBatches:
    """An epoch iterator of ``(x, y, idx)`` like the training DataLoader, with x already augmented and
    normalised on ``device``; ``idx`` (CPU) indexes per-photo extra targets such as teacher logits.

    Under DDP each rank takes every ``world``-th photo of the epoch's shared permutation (trimmed to a multiple of
    ``world``), as DistributedSampler does.
    """

    def __init__(self, images: np.ndarray, grades: np.ndarray, policy: PreprocessPolicy, device: torch.device,
                 batch_size: int, seed: int = 0, geometric: bool = True, drop_last: bool = True,
                 rank: int = 0, world: int = 1, channels_last: bool = False, augment: str = "basic",
                 sensor_noise: float = 0.0):
        check_augment(augment)
        self.augment, self.sensor_noise = augment, sensor_noise
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # N x S x S x 3 uint8
        self.grades = torch.as_tensor(np.asarray(grades, np.int64), device=device)
        self.mean = torch.tensor(policy.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(policy.std, device=device).view(1, 3, 1, 1)
        self.bgr = policy.color_order == "BGR"
        self.device, self.batch_size, self.seed, self.geometric = device, batch_size, seed, geometric
        self.drop_last, self.rank, self.world, self.channels_last = drop_last, rank, world, channels_last
        self.epoch = 0
        self.generator = torch.Generator(device=device).manual_seed(seed + rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        # The permutation is drawn on the CPU from (seed, epoch) so every rank agrees on it.
        order = torch.randperm(len(self.grades), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        # Every rank must run the same number of steps or DDP's all-reduce waits forever: trim to a multiple.
        return order[:self._per_rank() * self.world][self.rank::self.world]

    def _per_rank(self) -> int:
        return len(self.grades) // self.world

    def __len__(self) -> int:
        per_rank = self._per_rank()
        if self.drop_last and per_rank >= self.batch_size:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        order = self._indices()
        self.epoch += 1  # a loop that never calls set_epoch still gets a new order each pass
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            on_device = idx.to(self.device, non_blocking=True)
            x = self.images[on_device].permute(0, 3, 1, 2).float().div_(255.0)
            if self.bgr:
                x = x.flip(1)
            x = augment_batch(x, self.generator, self.geometric, self.augment, self.sensor_noise)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.grades[on_device], idx


def fits_on_device(images: np.ndarray, device: torch.device, share: float = 0.25) -> bool:
    """Whether the uint8 crops take at most ``share`` of the device's free memory (the rest is for training)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.nbytes <= share * free
