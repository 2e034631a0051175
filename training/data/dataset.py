"""Torch dataset over preprocessed fundus crops, with an on-disk cache and fundus-appropriate augmentation."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import NoFundusError
from edge_runtime.preprocess import crop_and_resize, read_image

from ..config import check_augment
from .device_batches import phone_capture_batch, sensor_noise_batch
from .layouts import Sample

log = logging.getLogger(__name__)


def photos_key(samples: list[Sample], policy: PreprocessPolicy) -> str:
    """Which photos (path, modification time, order) through which preprocessing: the key of per-photo caches."""
    return hashlib.sha256(json.dumps(
        [[str(s.path), s.path.stat().st_mtime_ns] for s in samples] + [repr(policy)]).encode()).hexdigest()[:20]


def cache_images(samples: list[Sample], policy: PreprocessPolicy, cache_dir: str | Path | None,
                 progress: bool = True) -> np.ndarray:
    """Preprocess every image once (crop, pad, resize) into a uint8 N x S x S x 3 RGB array, cached on disk.

    Decoding a 1024-px JPEG costs more than a Lite0 forward pass on a CPU, so epochs read the cache.
    """
    cache_file = Path(cache_dir) / f"crops_{policy.input_size}_{photos_key(samples, policy)}.npy" if cache_dir else None
    if cache_file and cache_file.is_file():
        return np.load(cache_file, mmap_mode="r")
    out = np.empty((len(samples), policy.input_size, policy.input_size, 3), np.uint8)
    iterator = range(len(samples))
    if progress:
        from rich.console import Console
        from rich.progress import track

        console = Console(stderr=True)
        iterator = track(iterator, description=f"preprocessing {len(samples)} images @{policy.input_size}px",
                         console=console, disable=not console.is_terminal)
    uncropped = []
    whole_image = dataclasses.replace(policy, crop_to_fundus=False)
    for i in iterator:
        image = read_image(samples[i].path)
        try:
            out[i] = crop_and_resize(image, policy)[0]
        except NoFundusError:
            # Very dark photos keep their label: train on the whole frame rather than drop a rare grade.
            out[i] = crop_and_resize(image, whole_image)[0]
            uncropped.append(samples[i].path.name)
    if uncropped:
        log.warning("%d image(s) had no detectable field of view and were used uncropped: %s", len(uncropped), uncropped[:10])
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temp name: torchrun ranks may build the same cache at once; each rename is
        # atomic and the contents are identical, so whichever lands last wins harmlessly.
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, cache_file)
    return out


class FundusDataset(Dataset):
    """uint8 RGB crops -> normalised float tensors; augmentation only when ``train``."""

    def __init__(self, images: np.ndarray, grades: np.ndarray, policy: PreprocessPolicy, train: bool = False,
                 seed: int = 0, geometric: bool = True, augment: str = "basic", sensor_noise: float = 0.0):
        check_augment(augment)
        self.augment_recipe = augment  # training.config.AUGMENTATIONS
        self.sensor_noise = sensor_noise  # TrainConfig.sensor_noise: max sigma in 8-bit levels (0: off)
        self.images, self.grades, self.policy, self.train = images, np.asarray(grades, np.int64), policy, train
        self.geometric = geometric  # off when per-pixel targets (teacher CAMs) must stay aligned
        self.mean = torch.tensor(policy.mean).view(3, 1, 1)
        self.std = torch.tensor(policy.std).view(3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.grades)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Fundus photos have no canonical orientation (left/right eyes, camera roll): flips and
        rotations are label-preserving; colour and exposure jitter mimic camera variation."""
        g = self.generator
        if self.augment_recipe == "phone":
            # The batched transforms of the device path on a batch of one: one implementation, one distribution.
            x = phone_capture_batch(x[None], g, self.geometric)[0]
        if self.geometric:
            if torch.rand(1, generator=g) < 0.5:
                x = x.flip(2)
            if torch.rand(1, generator=g) < 0.5:
                x = x.flip(1)
            x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), dims=(1, 2))
        brightness = 1 + (torch.rand(1, generator=g) - 0.5) * 0.4
        contrast = 1 + (torch.rand(1, generator=g) - 0.5) * 0.4
        channel = 1 + (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.1
        mean = x.mean()
        return ((x - mean) * contrast + mean) * brightness * channel

    def __getitem__(self, index: int):
        x = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1).float() / 255.0
        if self.policy.color_order == "BGR":
            x = x.flip(0)
        if self.train:
            x = self.augment(x).clamp(0, 1)
            if self.sensor_noise > 0:  # the device path's function on a batch of one, as for `phone`
                x = sensor_noise_batch(x[None], self.generator, self.sensor_noise)[0]
        return (x - self.mean) / self.std, int(self.grades[index])
