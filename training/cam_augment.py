"""CAM-guided augmentation: extra training views built from where a model looks.

Each training photo gets one class activation map: the CAM of its grade (the predicted grade for unlabelled
rows), ReLU'd and scaled to a maximum of 1, on the model's low-resolution grid (h x w, e.g. 4 x 4 at 128 px).
From it, every training step builds one extra view per photo and appends it to the batch (same grade, same row
index):

- ``crop``: a square crop of ``cam_crop_scale`` of the side, centred on a CAM cell drawn in proportion to the CAM
  (the peak when one cell holds all of it), resized back to the input size: the lesions at higher magnification.
- ``erase``: the photo faded towards the channel mean where the CAM is low (mask = floor + (1 - floor) * CAM,
  bilinearly upsampled): the background is damped, the evidence kept.
- ``both``: each view is a crop or an erase, by a fair coin per photo (one change per view, so every view stays
  close to a real photo).

The views start from the *unaugmented* cached crop, because the CAM was computed on it: the batch the loader yields
is already flipped and rotated, so a CAM cannot be laid over it. After the crop or erase, the view goes through the
run's ordinary augmentation (``augment_batch``: orientation, colour jitter, ``phone``), so views are as varied as
the originals. All of it is batched torch code, so the device-resident GPU path runs the same operations.

CAM sources: ``self`` (the run's own validated weights, EMA when on, refreshed every ``cam_augment_every`` epochs;
the first refresh comes after epoch 1, since a freshly initialised head's CAMs are noise) or ``teacher`` (a
checkpoint's CAMs, computed once at set-up with the teacher's own preprocessing; the grids cover the same fundus
crop, so a teacher at another resolution still points at the same places).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ConfigError

from .config import TrainConfig
from .data.dataset import FundusDataset, cache_images
from .data.device_batches import augment_batch
from .data.layouts import UNLABELLED, Sample
from .inference import predict

log = logging.getLogger(__name__)


def grade_cams(logits: np.ndarray, cams: np.ndarray, grades: np.ndarray) -> torch.Tensor:
    """One map per photo (N x h x w): the CAM of its grade, or of the predicted grade where it has none,
    ReLU'd and divided by its maximum (an all-negative map stays 0, which later reads as 'no preference')."""
    grades = np.where(grades == UNLABELLED, logits.argmax(1), grades)
    chosen = torch.from_numpy(np.ascontiguousarray(cams[np.arange(len(grades)), grades], np.float32)).relu()
    peak = chosen.flatten(1).amax(1).clamp(min=1e-12)
    return chosen / peak[:, None, None]


def cam_crop(x: torch.Tensor, cam: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None = None):
    """Square crops of ``scale`` (N) times the side, centred on a CAM cell drawn in proportion to the CAM, resized
    back to S x S (bilinear ``grid_sample``); a centre too near the edge is moved in so the crop stays inside."""
    n, _, side, _ = x.shape
    h, w = cam.shape[-2:]
    weights = cam.flatten(1).float()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    cell = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    # Cell centres in grid_sample's normalised coordinates (-1 .. 1 across the image, align_corners=False).
    cx = ((cell % w).to(x.dtype) + 0.5) / w * 2 - 1
    cy = ((cell // w).to(x.dtype) + 0.5) / h * 2 - 1
    scale = scale.to(x.dtype)
    cx, cy = cx.clamp(-(1 - scale), 1 - scale), cy.clamp(-(1 - scale), 1 - scale)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, cx, cy
    grid = F.affine_grid(theta, [n, x.shape[1], side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cam_erase(x: torch.Tensor, cam: torch.Tensor, floor: float, fill: torch.Tensor) -> torch.Tensor:
    """Fade each photo towards ``fill`` (the channel mean, 1 x 3 x 1 x 1) where its CAM is low: pixels keep
    ``floor + (1 - floor) * CAM`` of their contrast, so the high-activation region is unchanged."""
    up = F.interpolate(cam[:, None].to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    mask = floor + (1 - floor) * up
    return fill + mask * (x - fill)


def _read_only_tensor(images: np.ndarray) -> torch.Tensor:
    """The cached crops are a read-only memory map; the views only index them, so torch's warning about
    non-writable arrays does not apply, and copying the crops (1.4 GB at 380 px) would cost memory for nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(images))


class CamAugmenter:
    """Per-photo CAMs of one run and the views built from them; ``extend`` appends the views to a batch."""

    def __init__(self, cfg: TrainConfig, images: np.ndarray | torch.Tensor, grades: np.ndarray,
                 policy: PreprocessPolicy, device: torch.device, geometric: bool = True):
        self.cfg, self.policy, self.device, self.geometric = cfg, policy, device, geometric
        self.images_np = images if isinstance(images, np.ndarray) else None
        # N x S x S x 3 uint8; the device-resident path hands over its own tensor, so nothing is copied twice.
        self.images = images if isinstance(images, torch.Tensor) else _read_only_tensor(images)
        self.grades = np.asarray(grades)
        self.mean = torch.tensor(policy.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(policy.std, device=device).view(1, 3, 1, 1)
        self.bgr = policy.color_order == "BGR"
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 18)
        self.cams: torch.Tensor | None = None  # N x h x w on ``device``; None until the first refresh
        self.refreshes = 0

    @property
    def ready(self) -> bool:
        return self.cams is not None

    def due(self, epoch: int) -> bool:
        """Whether the self-CAMs are refreshed before 0-based ``epoch``: after epoch 1, then every
        ``cam_augment_every`` epochs (and at once when a resumed run has none yet)."""
        if self.cfg.cam_augment_source != "self" or epoch < 1:
            return False
        return self.cams is None or (epoch - 1) % self.cfg.cam_augment_every == 0

    def set_cams(self, logits: np.ndarray, cams: np.ndarray) -> None:
        self.cams = grade_cams(logits, cams, self.grades).to(self.device)
        self.refreshes += 1

    def refresh(self, model, amp: bool = False) -> None:
        """Recompute the CAMs with ``model`` on the unaugmented training crops (eval mode, one batched pass)."""

        loader = DataLoader(FundusDataset(self._numpy_images(), self.grades, self.policy),
                            batch_size=2 * self.cfg.batch_size)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            logits, cams = predict(model, loader, self.device, with_cam=True)
        self.set_cams(logits, cams)
        log.info("CAM augmentation: %d self-CAMs (%s grid) refreshed", len(cams), "x".join(map(str, cams.shape[-2:])))

    def load_teacher(self, samples: list[Sample]) -> None:
        """The teacher checkpoint's CAMs on the training photos, with the teacher's own preprocessing."""
        from .models import load_checkpoint

        path = Path(self.cfg.cam_augment_teacher or "")
        if not path.is_file():
            raise ConfigError(f"cam_augment_teacher {str(path)!r} not found; give the best.pt of a `retinaedge train` "
                              "run, or use cam_augment_source: self")
        model, meta = load_checkpoint(path)
        images = cache_images(samples, meta.preprocess, self.cfg.cache_dir, False)
        loader = DataLoader(FundusDataset(images, self.grades, meta.preprocess), batch_size=2 * self.cfg.batch_size)
        try:
            logits, cams = predict(model.to(self.device), loader, self.device, with_cam=True)
        finally:
            model.to("cpu")
        self.set_cams(logits, cams)
        log.info("CAM augmentation: %d teacher CAMs from %s", len(cams), path)

    def _numpy_images(self) -> np.ndarray:
        return self.images_np if self.images_np is not None else self.images.cpu().numpy()

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        """One augmented, normalised view (N x 3 x S x S on ``device``) of each photo ``idx`` indexes."""
        rows = idx.to(self.images.device)
        x = self.images[rows].to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if self.bgr:
            x = x.flip(1)
        cam = self.cams[idx.to(self.device)]
        n, mode = len(x), self.cfg.cam_augment
        use_crop = torch.full((n,), mode == "crop", device=self.device)
        if mode == "both":
            use_crop = torch.rand(n, generator=self.generator, device=self.device) < 0.5
        out = x
        if mode in ("crop", "both"):
            low, high = self.cfg.cam_crop_scale
            scale = low + (high - low) * torch.rand(n, generator=self.generator, device=self.device)
            out = torch.where(use_crop[:, None, None, None], cam_crop(x, cam, scale, self.generator), out)
        if mode in ("erase", "both"):
            erased = cam_erase(x, cam, self.cfg.cam_erase_floor, self.mean)
            out = torch.where(use_crop[:, None, None, None], out, erased)
        out = augment_batch(out, self.generator, self.geometric, self.cfg.augment, self.cfg.sensor_noise)
        return (out - self.mean) / self.std

    def extend(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """The batch followed by one view per photo: x doubles, y and idx repeat (per-row extra targets follow)."""
        views = self.views(idx).to(x.device, x.dtype)
        return torch.cat([x, views]), torch.cat([y, y]), torch.cat([idx, idx])
