"""Fundus-specific pretraining: a backbone trained on every labelled fundus folder, as an init for `retinaedge train`.

Three supervised heads share the backbone's pooled features:

* ``grade``: the 5 ICDR grades, class-weighted cross-entropy (``labelled_loss``) over every labelled folder;
* ``abnormal``: binary, grade >= 1 ("abnormal vs normal"). It overlaps the grade head on purpose: the grade head's
  softmax spreads the any-DR signal over four classes, a binary head gives the rare grade-1 photos a direct gradient;
* ``dme``: binary diabetic macular edema, only where a folder has it (Messidor-2 ``provenance.csv``
  ``adjudicated_dme``, or a ``dme`` column in a generic ``labels.csv``; see ``layouts.read_dme``).

A photo with no label for a task (``MISSING`` = -1) adds nothing to that task's loss, and a batch with none gives 0,
so a folder without DME never teaches the DME head "no edema". Only the train splits train (calib optionally, never
val/test); val reports per-head QWK/AUC and picks the epoch. What is written is ``backbone.pt``, the backbone's
timm-keyed state dict (what ``pretrained_file`` / ``init_from`` load; the heads are dropped, the downstream run
starts its own), and ``backbone.json`` with the config, data fingerprints and per-head val metrics.

No self-supervised objective on unlabelled photos (yet): the supervised heads are the part the issue's measurement
needs, and a contrastive/MAE objective would need its own augmentation pairs and a far longer schedule than a CPU run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from edge_runtime.contract import PreprocessPolicy, utcnow
from edge_runtime.errors import ConfigError

from .config import check_augment, path_tuple, save_config
from .data.dataset import FundusDataset, cache_images
from .data.layouts import (
    MISSING,
    Sample,
    assign_splits,
    detect_layout,
    fingerprint,
    read_dataset,
    read_dme,
    select,
)
from .metrics import quadratic_weighted_kappa, roc_auc
from .models import DRClassifier, create_model, get_model_cfg
from .train import (
    class_weights,
    git_sha,
    labelled_loss,
    masked_bce,
    positive_weight,
    progress_bar,
    resolve_device,
)

log = logging.getLogger(__name__)

TASKS = ("grade", "abnormal", "dme")


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised multi-task pretraining of a registered model's backbone on labelled fundus folders."""

    model: str = "tf_efficientnet_lite0"  # registered name; the backbone written fits this model only
    data: tuple[str, ...] = ()  # labelled fundus folders (any layout); at least one
    input_size: int | None = None  # None -> the model's native resolution
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    pretrained: bool = True  # start from ImageNet (False: random init, the offline case)
    augment: str = "basic"  # training.config.AUGMENTATIONS
    train_splits: tuple[str, ...] = ("train",)  # "calib" may join; "val" / "test" never (they judge downstream runs)
    val_split: str = "val"
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # grade, abnormal, dme
    # Wall-clock budget, checked every step: one pass over several folders can outlast a CPU budget, so the run
    # stops mid-epoch, validates and keeps that backbone if it is the best (train's budget waits for the epoch's end).
    max_minutes: float | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0
    seed: int = 0
    cache_dir: str = ".cache/retinaedge"
    out: str = "runs/pretrain"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.input_size is not None and not 32 <= self.input_size <= 1024:
            raise ConfigError(f"input_size must be in [32, 1024], got {self.input_size!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be > 0 (or None for no budget), got {self.max_minutes!r}")
        check_augment(self.augment)
        object.__setattr__(self, "data", path_tuple(self.data, "data"))
        if not self.data:
            raise ConfigError("pretraining needs at least one labelled fundus folder: --data FOLDER (repeatable)")
        splits = tuple(self.train_splits)
        leaked = sorted(set(splits) & {"val", "test", self.val_split})
        if leaked or not splits:
            # val/test judge the downstream runs this backbone initialises: training on them would leak.
            raise ConfigError(f"train_splits must be non-empty and exclude val/test, got {list(splits)}")
        object.__setattr__(self, "train_splits", splits)
        weights = tuple(float(w) for w in self.task_weights)
        if len(weights) != len(TASKS) or min(weights) < 0 or not sum(weights):
            raise ConfigError(f"task_weights are {len(TASKS)} non-negative weights ({', '.join(TASKS)}), "
                              f"not all 0; got {list(self.task_weights)}")
        object.__setattr__(self, "task_weights", weights)
        try:
            get_model_cfg(self.model)
        except Exception as exc:  # the registry's own error names the registered models
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class PretrainNet(nn.Module):
    """A registered DR model (backbone -> GAP -> 5-grade head) plus binary abnormal and DME heads."""

    def __init__(self, model: DRClassifier):
        super().__init__()
        self.model = model
        self.abnormal = nn.Linear(model.num_features, 1)
        self.dme = nn.Linear(model.num_features, 1)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.model.dropout(self.model.forward_features(x).mean(dim=(2, 3)))
        return {"grade": self.model.head(pooled), "abnormal": self.abnormal(pooled).squeeze(1),
                "dme": self.dme(pooled).squeeze(1)}


def multitask_loss(out: dict[str, torch.Tensor], grade: torch.Tensor, dme: torch.Tensor,
                   grade_weight: torch.Tensor | None = None, dme_pos_weight: torch.Tensor | None = None,
                   task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Per-task losses and their weighted ``total``; each task masks the rows that lack its label."""
    abnormal = torch.where(grade == MISSING, grade, (grade >= 1).long())
    losses = {"grade": labelled_loss(out["grade"], grade, grade_weight),
              "abnormal": masked_bce(out["abnormal"], abnormal),
              "dme": masked_bce(out["dme"], dme, dme_pos_weight)}
    losses["total"] = sum(w * losses[t] for t, w in zip(TASKS, task_weights, strict=True))
    return losses


class _MultiTaskDataset(torch.utils.data.Dataset):
    """``FundusDataset`` (crop + augmentation + grade) with the photo's DME label beside it."""

    def __init__(self, base: FundusDataset, dme: np.ndarray):
        self.base, self.dme = base, np.asarray(dme, np.int64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, y, int(self.dme[i])


@dataclass
class _Folder:
    root: str
    layout: str
    train: list[Sample]
    val: list[Sample]
    dme: dict[Path, int]  # empty when the folder has no DME labels


def load_folders(cfg: PretrainConfig) -> list[_Folder]:
    """Every folder's samples, split per patient as ``train`` splits them (same seed), with its DME labels."""
    folders = []
    for root in cfg.data:
        samples = assign_splits(read_dataset(root), seed=cfg.seed)
        folders.append(_Folder(root, detect_layout(root), select(samples, cfg.train_splits),
                               select(samples, cfg.val_split), read_dme(root)))
    return folders


def _arrays(folders: list[_Folder], split: str) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    samples = [s for f in folders for s in getattr(f, split)]
    dme = np.array([f.dme.get(s.path, MISSING) for f in folders for s in getattr(f, split)], np.int64)
    return samples, np.array([s.grade for s in samples], np.int64), dme


@torch.no_grad()
def _predict(net: PretrainNet, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    net.eval()
    outs: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    for x, *_ in loader:
        for task, value in net(x.to(device)).items():
            outs[task].append(value.float().cpu().numpy())
    return {t: np.concatenate(v) for t, v in outs.items()}


def head_metrics(pred: dict[str, np.ndarray], grade: np.ndarray, dme: np.ndarray) -> dict[str, float | int]:
    """Grade QWK, abnormal (grade >= 1) AUC, DME AUC on the photos that have DME labels (NaN when one class lacks)."""
    has_dme = dme != MISSING
    metrics = {"n": len(grade), "grade_qwk": quadratic_weighted_kappa(grade, pred["grade"].argmax(1)),
               "grade_accuracy": float((pred["grade"].argmax(1) == grade).mean()) if len(grade) else float("nan"),
               "abnormal_auc": roc_auc(grade >= 1, pred["abnormal"]), "n_dme": int(has_dme.sum()),
               "dme_auc": roc_auc(dme[has_dme], pred["dme"][has_dme]) if has_dme.any() else float("nan")}
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in metrics.items()}


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train the backbone on ``cfg.data``'s train splits; returns the path of the written ``backbone.pt``."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "pretrain_config.yaml")
    model_cfg = get_model_cfg(cfg.model)
    policy = PreprocessPolicy(input_size=cfg.input_size or model_cfg.input_size, mean=model_cfg.mean, std=model_cfg.std)

    folders = load_folders(cfg)
    train_samples, train_y, train_dme = _arrays(folders, "train")
    val_samples, val_y, val_dme = _arrays(folders, "val")
    if not train_samples or not val_samples:
        raise ValueError(f"need non-empty train {list(cfg.train_splits)} and val {cfg.val_split!r} splits; "
                         f"got {len(train_samples)} / {len(val_samples)} images")
    train_x = cache_images(train_samples, policy, cfg.cache_dir, progress)
    val_x = cache_images(val_samples, policy, cfg.cache_dir, progress)

    net = PretrainNet(create_model(cfg.model, pretrained=cfg.pretrained)).to(device)
    train_loader = DataLoader(
        _MultiTaskDataset(FundusDataset(train_x, train_y, policy, train=True, seed=cfg.seed, augment=cfg.augment),
                          train_dme),
        batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers, drop_last=len(train_y) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(_MultiTaskDataset(FundusDataset(val_x, val_y, policy), val_dme),
                            batch_size=cfg.batch_size * 2, num_workers=cfg.workers)
    grade_weight = class_weights(train_y).to(device)
    # DME is rare (Messidor-2 train: 68 of 926): weight positives by neg/pos, capped at 10 like class_weights.
    dme_pos_weight = positive_weight(train_dme).to(device)

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(train_loader))
    total, warmup = cfg.epochs * steps, int(cfg.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
                                                  0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    started, history, best, best_epoch = time.monotonic(), [], -float("inf"), 0

    def over_budget() -> bool:
        return bool(cfg.max_minutes) and (time.monotonic() - started) / 60 > cfg.max_minutes

    backbone_path = out_dir / "backbone.pt"
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task("pretraining", total=cfg.epochs * steps)
        for epoch in range(cfg.epochs):
            net.train()
            sums, seen = dict.fromkeys(("total", *TASKS), 0.0), 0
            for x, y, dme in train_loader:
                x, y, dme = x.to(device), y.to(device), dme.to(device)
                losses = multitask_loss(net(x), y, dme, grade_weight, dme_pos_weight, cfg.task_weights)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                scheduler.step()
                for k in sums:
                    sums[k] += float(losses[k].detach()) * len(y)
                seen += len(y)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}")
                if over_budget():
                    break
            val = head_metrics(_predict(net, val_loader, device), val_y, val_dme)
            history.append({"epoch": epoch + 1, "train_images": seen, **{f"train_{k}_loss": v / max(1, seen) for k, v in sums.items()},
                            **{f"val_{k}": v for k, v in val.items()}, "minutes": (time.monotonic() - started) / 60})
            log.info("pretrain epoch %d: loss %.4f val grade QWK %.4f abnormal AUC %.4f DME AUC %.4f", epoch + 1,
                     sums["total"] / max(1, seen), val["grade_qwk"], val["abnormal_auc"], val["dme_auc"])
            # Select on grade QWK, as `train` does: the backbone is for grading; the other heads are auxiliaries.
            if val["grade_qwk"] > best or not backbone_path.is_file():
                best, best_epoch, best_val = val["grade_qwk"], epoch + 1, val
                torch.save(net.backbone.state_dict(), backbone_path)
            if over_budget():
                log.info("stopping: time budget of %.1f min reached", cfg.max_minutes)
                break
    sidecar = {
        "kind": "retinaedge fundus backbone", "model": cfg.model, "timm_name": model_cfg.timm_name,
        "input_size": policy.input_size, "init": "ImageNet" if cfg.pretrained else "random",
        "self_supervised": None, "config": cfg.to_dict(),
        "data": [{"folder": f.root, "layout": f.layout, "train_fingerprint": fingerprint(f.train), "n_train": len(f.train),
                  "n_val": len(f.val), "dme_labels": bool(f.dme)} for f in folders],
        "best_epoch": best_epoch, "val": best_val, "history": history,
        "train_minutes": (time.monotonic() - started) / 60, "git_sha": git_sha(), "created_at": utcnow(),
    }
    backbone_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str))
    return backbone_path
