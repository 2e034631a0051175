"""The training loop shared by fine-tuning and distillation; single process or DDP under torchrun."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from edge_runtime.calibration import choose_binary_operating_point, choose_operating_point
from edge_runtime.contract import OperatingPoint, PreprocessPolicy, utcnow
from edge_runtime.errors import ConfigError
from edge_runtime.preprocess import level_step

from .cam_augment import CamAugmenter
from .checkpoint import CheckpointMeta
from .config import TrainConfig, save_config
from .consistency import NuisanceConsistency, ReferralCentre
from .data.dataset import FundusDataset, cache_images
from .data.device_batches import DeviceBatches, fits_on_device
from .data.layouts import (
    MISSING,
    UNLABELLED,
    Sample,
    allowed_grade_mask,
    assign_splits,
    fingerprint,
    read_dme,
    read_partial_samples,
    select,
    source_draw_weights,
)
from .data.synthetic import write_synthetic_dataset
from .inference import predict
from .metrics import save_confusion_png, split_report
from .models import DRClassifier, create_model, get_model_cfg
from .referral import choose_folder_weighted_point

log = logging.getLogger(__name__)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def policy_for(cfg: TrainConfig) -> PreprocessPolicy:
    model_cfg = get_model_cfg(cfg.model)
    return PreprocessPolicy(input_size=cfg.input_size or model_cfg.input_size, mean=model_cfg.mean,
                            std=model_cfg.std, ben_graham=cfg.ben_graham)


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 (what oneDNN uses for bf16 convolutions); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, so stay in fp32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_samples(cfg: TrainConfig) -> list[Sample]:
    """All samples of every dataset folder, split per patient, each knowing its folder (``Sample.source``);
    synthetic data when none is given. Photos without a single grade stay in (``read_partial_samples``)."""
    roots = list(cfg.data)
    if not roots:
        synthetic_dir = Path(cfg.cache_dir) / f"synthetic_{cfg.synthetic_per_grade}_{cfg.synthetic_size}_{cfg.seed}"
        if not (synthetic_dir / "labels.csv").is_file():
            write_synthetic_dataset(synthetic_dir, cfg.synthetic_per_grade, cfg.synthetic_size, cfg.seed)
        roots = [str(synthetic_dir)]
    samples: list[Sample] = []
    for root in roots:
        samples += [dataclasses.replace(s, source=str(root))
                    for s in assign_splits(read_partial_samples(root), seed=cfg.seed)]
    return samples


def dme_labels(roots: Sequence[str | Path], samples: Sequence[Sample]) -> np.ndarray:
    """Each photo's DME label (0/1) from its folder among ``roots`` (``layouts.read_dme``: a labels.csv ``dme``
    column or Messidor-2's ``adjudicated_dme``); ``MISSING`` where the folder or the photo has none (e.g. EyePACS)."""
    labels: dict[Path, int] = {}
    for root in roots:
        labels.update(read_dme(root))
    return np.array([labels.get(s.path, MISSING) for s in samples], np.int64)


def class_weights(grades: np.ndarray, k: int = 5) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 and capped so a 10-image grade cannot dominate."""
    counts = np.bincount(grades, minlength=k).astype(float)
    weights = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    weights = np.minimum(weights, 10.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def stability_loss(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, noise_levels: float,
                   policy: PreprocessPolicy) -> torch.Tensor:
    """KL(clean || noisy) of the grade distributions, the noisy copy carrying Gaussian noise of ``noise_levels``
    8-bit levels of the photo; gradients flow through both."""
    level = torch.from_numpy(level_step(policy)).to(x.device, x.dtype).view(1, -1, 1, 1)
    noisy = model(x + torch.randn_like(x) * (noise_levels * level))
    noisy = noisy[0] if isinstance(noisy, tuple) else noisy
    return F.kl_div(F.log_softmax(noisy.float(), 1), F.log_softmax(logits, 1), log_target=True, reduction="batchmean")


def labelled_loss(logits, target, weight, focal_gamma: float | None = None, label_smoothing: float = 0.0,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy (or focal loss with ``focal_gamma``) over the rows that have a grade.

    ``UNLABELLED`` rows (photos only a teacher labels) add nothing, and a batch of them gives 0, not NaN.
    Masked by arithmetic rather than indexing, so a batch costs no host-device synchronisation.
    ``label_smoothing`` (cross-entropy only) matches ``F.cross_entropy(label_smoothing=)`` on the labelled rows.
    ``allowed`` ((n, 5) bool, ``layouts.allowed_grade_mask``): the grades each row's label allows, for batches
    that hold coarse labels; the loss is then ``marginal_grade_loss`` and ``target`` is not read.
    """
    if allowed is not None:
        return marginal_grade_loss(logits, allowed, weight, focal_gamma, label_smoothing)
    labelled = target != UNLABELLED
    safe_target = torch.where(labelled, target, torch.zeros_like(target))
    log_p = F.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, safe_target[:, None]).squeeze(1)
    row_weight = (weight[safe_target] if weight is not None else torch.ones_like(nll)) * labelled
    if focal_gamma is None:  # F.cross_entropy's weighted mean: sum(w_y * nll) / sum(w_y)
        row_loss = row_weight * nll
        if label_smoothing:  # skipped at 0 so unsmoothed runs keep their exact arithmetic
            # As in F.cross_entropy: the spread share is weighted per class (w_k), the mean still divides by sum(w_y).
            class_weight = weight if weight is not None else torch.ones_like(log_p[0])
            spread = -(log_p * class_weight).mean(dim=1) * labelled
            row_loss = (1 - label_smoothing) * row_loss + label_smoothing * spread
        return row_loss.sum() / row_weight.sum().clamp(min=1e-12)
    return ((1 - (-nll).exp()) ** focal_gamma * row_weight * nll).sum() / labelled.sum().clamp(min=1)


def marginal_grade_loss(logits: torch.Tensor, allowed: torch.Tensor, weight: torch.Tensor | None,
                        focal_gamma: float | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log of the probability mass on the grades each row's label allows, class-weighted: a known grade gives its
    cross-entropy term (as ``labelled_loss``), a coarse set such as NPDR = {1, 2, 3} the marginal
    -log(p1 + p2 + p3), weighted by the mean class weight of its grades. Rows allowing no grade (nothing known) or
    every grade (nothing learned) add nothing: the loss is masked there, never filled with a guessed grade."""
    informative = allowed.any(1) & ~allowed.all(1)
    # Uninformative rows get the full set (log 1 = 0) so that no row's logsumexp is over nothing (-inf, NaN grads).
    safe = torch.where(informative[:, None], allowed, torch.ones_like(allowed))
    log_p = F.log_softmax(logits, dim=1)
    nll = -torch.logsumexp(log_p.masked_fill(~safe, float("-inf")), dim=1)
    class_weight = weight if weight is not None else torch.ones_like(log_p[0])
    row_weight = (safe.float() @ class_weight) / safe.sum(1) * informative
    if focal_gamma is None:
        row_loss = row_weight * nll
        if label_smoothing:
            spread = -(log_p * class_weight).mean(dim=1) * informative
            row_loss = (1 - label_smoothing) * row_loss + label_smoothing * spread
        return row_loss.sum() / row_weight.sum().clamp(min=1e-12)
    return ((1 - (-nll).exp()) ** focal_gamma * row_weight * nll).sum() / informative.sum().clamp(min=1)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over the rows whose target is not ``MISSING``; 0 (not NaN) when none is.

    A folder without the label (EyePACS has no DME) must not teach the head "absent": its rows add nothing."""
    present = target != MISSING
    safe = torch.where(present, target, torch.zeros_like(target)).float()
    per_row = F.binary_cross_entropy_with_logits(logits, safe, pos_weight=pos_weight, reduction="none")
    return (per_row * present).sum() / present.sum().clamp(min=1)


def positive_weight(labels: np.ndarray, cap: float = 10.0) -> torch.Tensor:
    """BCE ``pos_weight`` for a rare binary finding: negatives / positives among the labelled rows, capped like
    ``class_weights`` (Messidor-2 train: 68 DME of 926); 1 without positives."""
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    return torch.tensor(min(cap, n_neg / n_pos) if n_pos else 1.0)


def choose_dme_point(labels: np.ndarray, dme_logits: np.ndarray, samples: list[Sample], rule: str,
                     target: float | None) -> OperatingPoint | None:
    """Temperature and "DME present" threshold chosen by ``rule``/``target`` on the photos that have a DME label;
    None (and a warning) when they lack a positive or a negative photo: the manifest then carries the default 0.5."""
    present = labels != MISSING
    try:
        return choose_binary_operating_point(labels[present], dme_logits[present], rule=rule, target=target,
                                             fingerprint=fingerprint([s for s, p in zip(samples, present, strict=True) if p]))
    except ValueError as exc:
        log.warning("DME operating point not chosen on val (%s); the default threshold 0.5 stands", exc)
        return None


def choose_referral_point(cfg: TrainConfig, y: np.ndarray, logits: np.ndarray, samples: list[Sample]) -> OperatingPoint:
    """Temperature and referral threshold chosen on the val photos for the configured rule and target."""
    return choose_operating_point(y, logits, rule=cfg.referral_rule, target=cfg.referral_target,
                                  band_fraction=cfg.uncertain_fraction, fingerprint=fingerprint(samples))


def choose_run_referral_point(cfg: TrainConfig, y: np.ndarray, logits: np.ndarray,
                              samples: list[Sample]) -> tuple[OperatingPoint, dict]:
    """The run's referral point and which photos chose it: the val photos with a grade, of ``referral_folders``
    (every data folder when empty), pooled or with each folder weighted equally (``referral_weighting``)."""
    names = [Path(s.source).name for s in samples]
    keep = (np.asarray(y) != MISSING) & np.array([not cfg.referral_folders or n in cfg.referral_folders
                                                  for n in names], bool)
    chosen = [s for s, k in zip(samples, keep, strict=True) if k]
    y, logits, folders = np.asarray(y)[keep], np.asarray(logits)[keep], np.array(names)[keep]
    if cfg.referral_weighting == "per_folder":
        return choose_folder_weighted_point(y, logits, folders, rule=cfg.referral_rule, target=cfg.referral_target,
                                            band_fraction=cfg.uncertain_fraction, fingerprint=fingerprint(chosen))
    point = choose_referral_point(cfg, y, logits, chosen)
    counts = {name: {"n": int((folders == name).sum()), "n_positive": int(((folders == name) & (y >= 2)).sum())}
              for name in np.unique(folders)}
    return point, {"weighting": "pooled", "val_fingerprint": point.val_fingerprint, "n": len(y), "folders": counts}


@dataclass
class RunResult:
    out_dir: Path
    best_checkpoint: Path
    metrics: dict


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass
class _Run:
    """Everything one training run carries from set-up through its epochs to the final checkpoint."""

    cfg: TrainConfig
    device: torch.device
    distributed: bool
    out_dir: Path
    policy: PreprocessPolicy
    model: DRClassifier
    train_model: torch.nn.Module
    train_loader: DataLoader | DeviceBatches
    sampler: DistributedSampler | DeviceBatches | None  # what set_epoch reshuffles
    val_loader: DataLoader
    val_y: np.ndarray
    val_x: np.ndarray
    samples: dict[str, list[Sample]]  # train / val / test
    data_fp: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    weight: torch.Tensor | None
    extra_loss: Callable | None
    extra_targets: dict[str, np.ndarray] | None
    show: bool
    ema: ModelEmaV3 | None  # moving average of ``model``'s weights (cfg.ema_decay); None when off
    cam_aug: CamAugmenter | None = None  # CAM-guided extra views (cfg.cam_augment); None when off
    train_dme: torch.Tensor | None = None  # DME label per training row on the device (MISSING: none); DME head only
    train_allowed: torch.Tensor | None = None  # (n, 5) grades each training row allows; only when coarse labels exist
    consistency: NuisanceConsistency | None = None  # the nuisance-consistency term (cfg.consistency); None when off
    val_dme: np.ndarray | None = None  # DME label per val photo
    dme_pos_weight: torch.Tensor | None = None
    start_epoch: int = 0
    best_qwk: float = -float("inf")
    stale: int = 0  # epochs since the best validation QWK
    last_validated: int = -1  # epoch index of the latest validation
    history: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def eval_model(self) -> DRClassifier:
        """The weights that are validated, selected, saved as best.pt and given the operating point: the EMA if on."""
        return self.ema.module if self.ema is not None else self.model

    def meta(self, metrics: dict, point: OperatingPoint | None = None, raw_weights: bool = False,
             dme_point: OperatingPoint | None = None, point_photos: dict | None = None) -> dict:
        """``raw_weights``: the checkpoint holds ``model``'s own weights (last.pt), not ``eval_model``'s."""
        return CheckpointMeta(
            model_name=self.cfg.model, preprocess=self.policy, operating_point=point or OperatingPoint(),
            heads=self.cfg.heads, grade_head=self.cfg.grade_head, dme_operating_point=dme_point,
            referral_point_photos=point_photos or {},
            data_fingerprint=self.data_fp, num_features=self.model.num_features, metrics=metrics,
            config=self.cfg.to_dict(), ema_weights=self.ema is not None and not raw_weights, git_sha=git_sha(),
            created_at=utcnow()).to_dict()


def fit(cfg: TrainConfig, extra_loss: Callable | None = None, extra_targets: dict[str, np.ndarray] | None = None,
        progress: bool = True, unlabelled: Sequence[Sample] = ()) -> RunResult:
    """Train ``cfg.model``; returns the run folder, best checkpoint and final metrics.

    ``extra_targets`` are per-training-image arrays (e.g. cached teacher logits) handed to
    ``extra_loss(logits, cam, targets, batch_extra) -> loss`` with the batch's rows: the labelled
    training photos, then ``unlabelled`` (their grades are ignored, so only ``extra_loss`` learns from them).
    """
    run = _set_up(cfg, extra_loss, extra_targets, progress, unlabelled)
    bar = progress_bar(run.show)
    with bar:
        task = bar.add_task("training", total=(cfg.epochs - run.start_epoch) * len(run.train_loader))
        for epoch in range(run.start_epoch, cfg.epochs):
            train_loss, images_per_s = _train_one_epoch(run, epoch, bar, task)
            due = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs or _over_budget(run)
            if due and _evaluate_and_checkpoint(run, epoch, train_loss, images_per_s):
                break
    return _finalise(run)


def _set_up(cfg: TrainConfig, extra_loss: Callable | None, extra_targets: dict[str, np.ndarray] | None,
            progress: bool, unlabelled: Sequence[Sample] = ()) -> _Run:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(cfg.out)
    if _is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    policy = policy_for(cfg)
    all_samples = load_samples(cfg)
    samples = {"train": select(all_samples, cfg.train_splits), "val": select(all_samples, cfg.val_split),
               "test": select(all_samples, cfg.test_split)}
    if not samples["train"] or not samples["val"]:
        raise ValueError(f"need non-empty train {cfg.train_splits} and val {cfg.val_split!r} splits; "
                         f"got {len(samples['train'])} / {len(samples['val'])} images")
    n_labelled = len(samples["train"])
    samples["train"] += [dataclasses.replace(s, grade=UNLABELLED, allowed_grades=None) for s in unlabelled]
    show = progress and _is_main()
    # Every rank needs the crops; rank 0 builds the cache first so the others only read it.
    if _is_main():
        train_x = cache_images(samples["train"], policy, cfg.cache_dir, show)
    if distributed:
        dist.barrier()
    if not _is_main():
        train_x = cache_images(samples["train"], policy, cfg.cache_dir, False)
    val_x = cache_images(samples["val"], policy, cfg.cache_dir, show)
    train_y = np.array([s.grade for s in samples["train"]])
    val_y = np.array([s.grade for s in samples["val"]])

    channels_last = cfg.channels_last and on_gpu
    # A fundus backbone (init_from) is a timm-keyed state dict like a local ImageNet file: the same loading path.
    model = create_model(cfg.model, pretrained=cfg.pretrained, pretrained_file=cfg.init_from or cfg.pretrained_file,
                         drop_path_rate=cfg.drop_path_rate, heads=cfg.heads, grade_head=cfg.grade_head).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # timm's ModelEmaV3 rather than torch's AveragedModel: it averages every floating state_dict entry (BatchNorm
    # running statistics included) and copies the integer ones, in place, and its .module keeps the model's own
    # state_dict keys, so best.pt loads with load_checkpoint unchanged. Built from the unwrapped model, before
    # DDP and torch.compile, so every rank averages the same plain weights.
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
    train_model: torch.nn.Module = model
    if distributed:
        if cfg.stability_weight > 0 or cfg.consistency:  # a second forward before one backward fires DDP's hooks twice
            raise ConfigError("stability_weight > 0 and the consistency terms run two forward passes per step, which "
                              "DistributedDataParallel does not support; train on one device (drop torchrun) or set "
                              "stability_weight, consistency_weight and consistency_margin_weight to 0")
        if cfg.source_weights:
            raise ConfigError("source_weights draws photos with replacement, which the DistributedSampler does not; "
                              "train on one device (drop torchrun) or leave source_weights empty")
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    # Teacher CAMs are per-pixel targets: flips and rotations would misalign them.
    geometric = cfg.cam_weight == 0
    world = dist.get_world_size() if distributed else 1
    train_loader: DataLoader | DeviceBatches
    if _augment_on_device(cfg, device, train_x):
        train_loader = DeviceBatches(train_x, train_y, policy, device, cfg.batch_size, seed=cfg.seed, geometric=geometric,
                                     drop_last=len(train_y) > cfg.batch_size, rank=rank, world=world,
                                     channels_last=channels_last, augment=cfg.augment, sensor_noise=cfg.sensor_noise)
        sampler = train_loader
    else:
        train_ds = _IndexedDataset(FundusDataset(train_x, train_y, policy, train=True, seed=cfg.seed + rank,
                                                 geometric=geometric, augment=cfg.augment,
                                                 sensor_noise=cfg.sensor_noise), np.arange(len(train_y)))
        sampler = DistributedSampler(train_ds, seed=cfg.seed) if distributed else None
        # Per-folder shares draw with replacement; the epoch keeps its length, so the LR schedule is unchanged.
        drawn = WeightedRandomSampler(source_draw_weights(samples["train"], cfg.source_weights), len(train_ds),
                                      generator=torch.Generator().manual_seed(cfg.seed)) if cfg.source_weights else None
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None and drawn is None,
                                  sampler=sampler or drawn,
                                  num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size,
                                  generator=torch.Generator().manual_seed(cfg.seed), pin_memory=on_gpu,
                                  persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(FundusDataset(val_x, val_y, policy), batch_size=cfg.batch_size * 2, num_workers=cfg.workers,
                            pin_memory=on_gpu)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    if ema is not None and cfg.ema_decay ** total > 0.05:
        log.warning("ema_decay %g averages over ~%d optimizer steps but this run takes %d: the starting weights "
                    "still hold %.0f%% of the EMA at the end; lower ema_decay or train longer", cfg.ema_decay,
                    round(1 / (1 - cfg.ema_decay)), total, 100 * cfg.ema_decay ** total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
                                                  0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    use_amp = (cfg.amp and on_gpu) or (cfg.cpu_amp and device.type == "cpu" and cpu_has_native_bf16())
    # bf16 has fp32's exponent range, so it needs no loss scaling; fp16 (pre-Ampere GPUs) does.
    amp_dtype = torch.bfloat16 if use_amp and (not on_gpu or torch.cuda.is_bf16_supported()) else torch.float16
    run = _Run(cfg=cfg, device=device, distributed=distributed, out_dir=out_dir, policy=policy, model=model,
               train_model=train_model, train_loader=train_loader, sampler=sampler, val_loader=val_loader,
               val_y=val_y, val_x=val_x, samples=samples, data_fp=fingerprint(samples["train"]),
               optimizer=optimizer, scheduler=scheduler,
               scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16),
               use_amp=use_amp, amp_dtype=amp_dtype, channels_last=channels_last,
               weight=class_weights(train_y[train_y != UNLABELLED]).to(device) if cfg.class_weighted else None,
               extra_loss=extra_loss, extra_targets=extra_targets, show=show, ema=ema)
    train_allowed = allowed_grade_mask(samples["train"])
    if (train_allowed.any(1) & (train_y == MISSING)).any():  # coarse labels: the marginal grade loss reads the sets
        run.train_allowed = torch.as_tensor(train_allowed, device=device)
        log.info("grades: %d training photos graded, %d with a coarse grade set, %d without grade information",
                 int((train_y != MISSING).sum()), int((train_allowed.any(1) & (train_y == MISSING)).sum()),
                 int((~train_allowed.any(1)).sum()))
    if cfg.consistency:
        run.consistency = NuisanceConsistency(policy, cfg.consistency_weight, cfg.consistency_target,
                                              cfg.consistency_margin_weight, seed=cfg.seed)
    if model.has_dme:
        # Unlabelled (teacher-only) photos and folders without DME get MISSING: masked out of the DME loss.
        train_dme = dme_labels(cfg.data, samples["train"])
        train_dme[n_labelled:] = MISSING  # a calib photo a teacher labels keeps its DME label out of training too
        run.train_dme, run.val_dme = torch.as_tensor(train_dme, device=device), dme_labels(cfg.data, samples["val"])
        run.dme_pos_weight = positive_weight(train_dme).to(device)
        log.info("DME labels: %d of %d training photos (%d present), %d of %d val photos",
                 int((train_dme != MISSING).sum()), len(train_dme), int((train_dme == 1).sum()),
                 int((run.val_dme != MISSING).sum()), len(run.val_dme))
    if cfg.resume and run.last_path.is_file():
        state = torch.load(run.last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model_state"])
        if ema is not None and state.get("ema_state") is not None:
            ema.module.load_state_dict(state["ema_state"])
        elif ema is not None:
            log.warning("%s holds no EMA (it was trained without ema_decay): the average starts from its weights",
                        run.last_path)
            ema.set(model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.best_qwk, run.stale, run.history = (state["epoch"] + 1, state["best_qwk"], state["stale"],
                                                                 state["history"])
        run.last_validated = state["epoch"]
        log.info("resumed from %s at epoch %d", run.last_path, run.start_epoch)
    if cfg.cam_augment != "off":
        # The views start from the unaugmented crops; the device path's own tensor is shared, not copied.
        images = train_loader.images if isinstance(train_loader, DeviceBatches) else train_x
        run.cam_aug = CamAugmenter(cfg, images, train_y, policy, device, geometric=geometric)
        if cfg.cam_augment_source == "teacher":
            run.cam_aug.load_teacher(samples["train"])
    return run


def _augment_on_device(cfg: TrainConfig, device: torch.device, train_x: np.ndarray) -> bool:
    """Device-resident batches on a GPU when the crops fit; the CPU keeps the per-photo DataLoader path."""
    if cfg.augment_on == "loader":
        return False
    if cfg.source_weights:  # the device path shuffles a permutation; weighted draws are the DataLoader's sampler
        if cfg.augment_on == "device":
            raise ConfigError("source_weights draws photos through the DataLoader's sampler; set augment_on: loader "
                              "(or auto) or leave source_weights empty")
        return False
    if cfg.augment_on == "device":
        return True
    if device.type != "cuda":
        return False
    if not fits_on_device(train_x, device):
        log.info("training crops (%.1f GB) do not fit beside the model on %s: augmenting in the DataLoader",
                 train_x.nbytes / 1e9, device)
        return False
    return True


def _over_budget(run: _Run) -> bool:
    return bool(run.cfg.max_minutes) and (time.monotonic() - run.started) / 60 > run.cfg.max_minutes


def _train_one_epoch(run: _Run, epoch: int, bar, task) -> tuple[float, float]:
    """One pass over the training photos; returns the mean training loss and the photos per second."""
    cfg, device = run.cfg, run.device
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    run.train_model.train()
    # Accumulated on the device: a float() per step would wait for the GPU every batch.
    running, seen = torch.zeros((), device=device), 0
    if run.cam_aug is not None and run.cam_aug.due(epoch):
        run.cam_aug.refresh(run.eval_model, amp=run.use_amp)
        run.train_model.train()
    started = time.perf_counter()
    for x, y, idx in run.train_loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        photos = len(y)  # throughput counts training photos, not the CAM views appended below
        if run.cam_aug is not None and run.cam_aug.ready:
            # Appended, not replacing: the originals keep the baseline's distribution and steps per epoch (so the
            # LR schedule is the same); the views add CAM-focused copies at twice the compute per step.
            x, y, idx = run.cam_aug.extend(x, y, idx)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            # One forward for every head, so DDP synchronises the DME head's gradients with the rest.
            logits, cam, dme_logit = run.train_model(x, return_cam=run.extra_loss is not None, heads=True)
            allowed = None if run.train_allowed is None else run.train_allowed[idx.to(device, non_blocking=True)]
            loss = labelled_loss(logits.float(), y, run.weight, cfg.focal_gamma if cfg.loss == "focal" else None,
                                 label_smoothing=cfg.label_smoothing, allowed=allowed)
            if run.extra_loss is not None:
                batch_extra = {k: torch.as_tensor(v[idx.numpy()]).to(device) for k, v in (run.extra_targets or {}).items()}
                loss = run.extra_loss(logits.float(), cam.float(), y, loss, batch_extra, x)
            if dme_logit is not None:
                dme = run.train_dme[idx.to(device, non_blocking=True)]
                loss = loss + cfg.dme_loss_weight * masked_bce(dme_logit.float(), dme, run.dme_pos_weight)
            if cfg.stability_weight > 0:
                loss = loss + cfg.stability_weight * stability_loss(run.train_model, x, logits.float(),
                                                                    cfg.stability_noise, run.policy)
            if run.consistency is not None:
                # Draw `epoch` of each photo, seeded by its training row: new every epoch, reproducible per run.
                moved = run.train_model(run.consistency.perturbed(x, idx.cpu().numpy(), epoch), heads=True)
                loss = loss + run.consistency.loss(logits, moved.logits, dme_logit, moved.dme_logit)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)  # a fixed decay (no warm-up), so ema_decay means the same in every run
        run.scheduler.step()
        running += loss.detach().float() * photos
        seen += photos
        bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}")
    mean_loss = float(running) / max(1, seen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images_per_s = seen / max(time.perf_counter() - started, 1e-9)
    bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.3f} ({images_per_s:.0f} img/s)")
    return mean_loss, images_per_s


def _evaluate_and_checkpoint(run: _Run, epoch: int, train_loss: float, images_per_s: float) -> bool:
    """Val metrics, best/last checkpoints; True when training should stop (patience or time budget)."""
    cfg = run.cfg
    # Model selection uses QWK, which needs no threshold: the operating points are chosen once, at the end.
    logits, dme_logits = predict(run.eval_model, run.val_loader, run.device, heads=True)
    val_metrics = split_report(OperatingPoint(), run.val_y, logits, auc_ci=False, dme_labels=run.val_dme,
                               dme_logits=dme_logits)
    if run.consistency is not None and run.consistency.margin_weight > 0:
        try:  # the margin term follows the point the run would choose now
            point, _ = choose_run_referral_point(cfg, run.val_y, logits, run.samples["val"])
            run.consistency.centre = ReferralCentre(point.threshold, point.temperature)
        except ValueError as exc:
            log.warning("margin term keeps its centre (%s): %s", run.consistency.centre, exc)
    run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_qwk": val_metrics["qwk"],
                        "val_accuracy": val_metrics["accuracy"], "train_images_per_s": images_per_s,
                        "minutes": (time.monotonic() - run.started) / 60,
                        **({"val_dme_auc": val_metrics["dme"]["auc"]} if "dme" in val_metrics else {})})
    improved = val_metrics["qwk"] > run.best_qwk
    epochs_since = epoch - run.last_validated
    run.last_validated = epoch
    run.best_qwk, run.stale = (val_metrics["qwk"], 0) if improved else (run.best_qwk, run.stale + epochs_since)
    if _is_main():
        log.info("epoch %d: loss %.4f val QWK %.4f acc %.3f", epoch + 1, train_loss, val_metrics["qwk"],
                 val_metrics["accuracy"])
        if improved:
            torch.save({"model_state": run.eval_model.state_dict(), "meta": run.meta({"val": val_metrics})},
                       run.best_path)
        # last.pt resumes training, so it keeps the raw weights, and the EMA beside them.
        torch.save({"model_state": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "epoch": epoch, "best_qwk": run.best_qwk,
                    "stale": run.stale, "history": run.history,
                    "ema_state": run.ema.module.state_dict() if run.ema is not None else None,
                    "meta": run.meta({"val": val_metrics}, raw_weights=True)}, run.last_path)
    if run.stale >= cfg.patience:
        log.info("early stopping: validation QWK has not improved for %d epochs", cfg.patience)
        return True
    if _over_budget(run):
        log.info("stopping: time budget of %.1f min reached", cfg.max_minutes)
        return True
    return False


def _finalise(run: _Run) -> RunResult:
    """Reload the best weights, choose the operating point on val, report val and test at it."""
    cfg = run.cfg
    if run.distributed:
        dist.barrier()
    metrics: dict = {"history": run.history}
    if _is_main():
        best = torch.load(run.best_path, map_location=run.device, weights_only=False)
        run.eval_model.load_state_dict(best["model_state"])
        val_logits, val_dme_logits = predict(run.eval_model, run.val_loader, run.device, heads=True)
        point, point_photos = choose_run_referral_point(cfg, run.val_y, val_logits, run.samples["val"])
        log.info("operating point (%s, %d val photos): %s", point_photos["weighting"], point_photos["n"],
                 point.describe())
        dme_point = None
        if val_dme_logits is not None:
            dme_point = choose_dme_point(run.val_dme, val_dme_logits, run.samples["val"], cfg.dme_rule, cfg.dme_target)
            log.info("DME operating point: %s", (dme_point or OperatingPoint()).describe())
        for split_name in ("val", "test"):
            split_samples = run.samples[split_name]
            if not split_samples:
                continue
            ys = np.array([s.grade for s in split_samples])
            if split_name == "val":
                logits, dme_logits = val_logits, val_dme_logits
            else:
                xs = cache_images(split_samples, run.policy, cfg.cache_dir, run.show)
                logits, dme_logits = predict(run.eval_model, DataLoader(FundusDataset(xs, ys, run.policy),
                                                                        batch_size=cfg.batch_size * 2), run.device,
                                             heads=True)
            dme = {}
            if dme_logits is not None:
                dme = dict(dme_labels=dme_labels(cfg.data, split_samples), dme_logits=dme_logits,
                           dme_point=dme_point or OperatingPoint())
            metrics[split_name] = split_report(point, ys, logits, **dme)
            save_confusion_png(metrics[split_name]["confusion_matrix"], str(run.out_dir / f"confusion_{split_name}.png"),
                               f"{cfg.model} - {split_name}")
        metrics["operating_point"] = dataclasses.asdict(point)
        metrics["referral_point_photos"] = point_photos
        if dme_point is not None:
            metrics["dme_operating_point"] = dataclasses.asdict(dme_point)
        metrics["train_minutes"] = (time.monotonic() - run.started) / 60
        metrics["backbone_init"] = cfg.backbone_init  # fundus | file | imagenet | random (config holds the path)
        metrics["device"] = str(run.device)  # where it trained, resolved (the config may say "auto")
        metrics["autocast"] = str(run.amp_dtype).removeprefix("torch.") if run.use_amp else "off"
        best["meta"] = run.meta({k: v for k, v in metrics.items() if k != "history"}, point, dme_point=dme_point,
                                point_photos=point_photos)
        torch.save(best, run.best_path)
        (run.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if run.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(run.out_dir, run.best_path, metrics)


class _IndexedDataset(torch.utils.data.Dataset):
    """Adds the row index so per-image extra targets (teacher logits, CAMs) can be looked up."""

    def __init__(self, base: FundusDataset, indices: np.ndarray):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[int(self.indices[i])]
        return x, y, int(self.indices[i])


def progress_bar(enabled: bool):
    """A rich progress bar on stderr, shown only on a terminal (training epochs, teacher passes)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # Off a terminal (logs, CI, nohup) a live bar would capture stderr until the end and hide the epoch logs.
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled or not console.is_terminal, transient=False)
