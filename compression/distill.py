"""Knowledge distillation of the B4 teacher into an edge student, with optional CAM-attention transfer.

loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * class-weighted CE
       + cam_weight * || norm(student CAM) - norm(teacher CAM) ||^2   (teacher's predicted grade)
Teacher outputs are computed once per training image and cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from compression.gate import cam_correlation
from edge_runtime.contract import PreprocessPolicy
from training.config import TrainConfig
from training.data.dataset import FundusDataset, cache_images
from training.data.layouts import select
from training.metrics import report_at
from training.models import load_checkpoint
from training.train import RunResult, fit, load_samples, predict

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_outputs(teacher, images: np.ndarray, policy: PreprocessPolicy, batch_size: int = 16):
    loader = DataLoader(FundusDataset(images, np.zeros(len(images)), policy), batch_size=batch_size)
    device = next(teacher.parameters()).device
    logits, cams = [], []
    for x, _ in loader:
        lg, cm = teacher.forward_with_cam(x.to(device))
        logits.append(lg.float().cpu().numpy())
        cams.append(cm.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(cams)


def _positive_unit_cam(cam: torch.Tensor) -> torch.Tensor:
    """One CAM map per row (N x H x W), ReLU'd and scaled to unit L2 norm: where the evidence is, not its size."""
    flat = F.relu(cam).flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-6)


def distillation_loss(cfg: TrainConfig):
    temperature, alpha, cam_weight = cfg.temperature, cfg.alpha, cfg.cam_weight

    def loss_fn(logits, cam, y, ce_loss, extra, x):
        soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(extra["teacher_logits"] / temperature, 1),
                        reduction="batchmean") * temperature ** 2
        loss = alpha * soft + (1 - alpha) * ce_loss
        if cam_weight > 0:
            teacher_cam = extra["teacher_cam"]
            grade = extra["teacher_logits"].argmax(1)
            rows = torch.arange(len(grade), device=grade.device)
            target = F.adaptive_avg_pool2d(teacher_cam, cam.shape[-2:])[rows, grade]
            loss = loss + cam_weight * (_positive_unit_cam(cam[rows, grade]) - _positive_unit_cam(target)).pow(2).sum(1).mean()
        return loss

    return loss_fn


def distill(cfg: TrainConfig, progress: bool = True) -> tuple[RunResult, dict]:
    """Train ``cfg.model`` against ``cfg.teacher``; returns the run and a student-vs-teacher report."""
    if not cfg.teacher:
        raise ValueError("distillation needs --teacher CKPT (a checkpoint from `retinaedge train`)")
    teacher, teacher_meta = load_checkpoint(cfg.teacher)
    teacher_policy = teacher_meta.preprocess
    samples = load_samples(cfg)
    train_samples = select(samples, cfg.train_splits)
    key = hashlib.sha256((Path(cfg.teacher).resolve().as_posix() + str(Path(cfg.teacher).stat().st_mtime_ns)
                          + "".join(str(s.path) for s in train_samples)).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / f"teacher_{key}.npz"
    if cache.is_file():
        stored = np.load(cache)
        t_logits, t_cams = stored["logits"], stored["cams"]
    else:
        images = cache_images(train_samples, teacher_policy, cfg.cache_dir, progress)
        t_logits, t_cams = teacher_outputs(teacher, images, teacher_policy)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, logits=t_logits, cams=t_cams)
    run = fit(cfg, extra_loss=distillation_loss(cfg),
              extra_targets={"teacher_logits": t_logits.astype(np.float32), "teacher_cam": t_cams.astype(np.float32)},
              progress=progress)
    report = compare_with_teacher(run.best_checkpoint, cfg.teacher, samples, cfg)
    (run.out_dir / "distill_report.json").write_text(json.dumps(report, indent=2))
    return run, report


def compare_with_teacher(student_ckpt, teacher_ckpt, samples, cfg: TrainConfig, split: str | None = None) -> dict:
    """Student and teacher side by side on the same images: QWK, referable sens/spec, agreement, CAM correlation."""
    split = split or cfg.test_split
    chosen = select(samples, split) or select(samples, cfg.val_split)
    y = np.array([s.grade for s in chosen])
    out = {"split": split, "n": len(chosen)}
    outputs = {}
    for role, ckpt in (("student", student_ckpt), ("teacher", teacher_ckpt)):
        model, meta = load_checkpoint(ckpt)
        policy = meta.preprocess
        images = cache_images(chosen, policy, cfg.cache_dir, False)
        logits, cams = predict(model, DataLoader(FundusDataset(images, y, policy), batch_size=16), torch.device("cpu"), True)
        outputs[role] = (logits, cams)
        m = report_at(meta.operating_point, y, logits, auc_ci=False)
        out[role] = {k: m[k] for k in ("qwk", "accuracy", "referable_sensitivity", "referable_specificity", "referable_auc")}
    (sp, sc), (tp, tc) = outputs["student"], outputs["teacher"]
    out["agreement"] = float((sp.argmax(1) == tp.argmax(1)).mean())
    tc_resized = F.adaptive_avg_pool2d(torch.from_numpy(tc), sc.shape[-2:]).numpy()
    out["cam_correlation"] = cam_correlation(sc, tc_resized, tp.argmax(1))
    return out
