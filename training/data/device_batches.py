"""Training batches that live on the accelerator: the uint8 crops are copied to the device once, and every
step shuffles, augments and normalises a whole batch there.

Why: on an H100 the per-photo DataLoader path (index a row, augment it on a CPU worker, pin, copy) fed B4 @380
at ~210 img/s while the model itself trains at ~600 img/s (bf16, channels_last). The shared photos are small
(3,200 crops at 380 px are 1.4 GB of uint8), so they fit on the device and the loader disappears from the step.

The augmentation draws from the same distribution as :meth:`FundusDataset.augment`: a uniformly random element
of the square's symmetry group (transpose, horizontal flip, vertical flip: 8 equally likely orientations, the
same set that flips plus a random multiple of 90 degrees reach) and the same brightness, contrast and per-channel
jitter. It is device-agnostic, so the CPU tests run the exact code the GPU runs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from edge_runtime.contract import PreprocessPolicy

# Same jitter ranges as FundusDataset.augment: +-20 % brightness and contrast, +-5 % per channel.
BRIGHTNESS, CONTRAST, CHANNEL = 0.4, 0.4, 0.1


def augment_batch(x: torch.Tensor, generator: torch.Generator, geometric: bool = True) -> torch.Tensor:
    """Augment a float N x 3 x S x S batch in [0, 1], each photo with its own draw; returns values in [0, 1]."""
    n = x.shape[0]
    device = x.device

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=device) < 0.5).view(n, 1, 1, 1)

    if geometric:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"batched orientation augmentation needs square crops, got {tuple(x.shape[-2:])}")
        x = torch.where(coin(), x.transpose(2, 3), x)
        x = torch.where(coin(), x.flip(3), x)
        x = torch.where(coin(), x.flip(2), x)
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=device) - 0.5) * BRIGHTNESS
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=device) - 0.5) * CONTRAST
    channel = 1 + (torch.rand(n, 3, 1, 1, generator=generator, device=device) - 0.5) * CHANNEL
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (((x - mean) * contrast + mean) * brightness * channel).clamp(0, 1)


class DeviceBatches:
    """An epoch iterator of ``(x, y, idx)`` like the training DataLoader, with x already augmented and
    normalised on ``device``; ``idx`` (CPU) indexes per-photo extra targets such as teacher logits.

    Under DDP each rank takes every ``world``-th photo of the epoch's shared permutation (trimmed to a multiple of
    ``world``), as DistributedSampler does.
    """

    def __init__(self, images: np.ndarray, grades: np.ndarray, policy: PreprocessPolicy, device: torch.device,
                 batch_size: int, seed: int = 0, geometric: bool = True, drop_last: bool = True,
                 rank: int = 0, world: int = 1, channels_last: bool = False):
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
            x = (augment_batch(x, self.generator, self.geometric) - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.grades[on_device], idx


def fits_on_device(images: np.ndarray, device: torch.device, share: float = 0.25) -> bool:
    """Whether the uint8 crops take at most ``share`` of the device's free memory (the rest is for training)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.nbytes <= share * free
