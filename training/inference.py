"""Batched forward passes of a classifier over a loader: what training's evaluation, distillation and CAM
augmentation all read."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from .models import DRClassifier


@torch.no_grad()
def predict(model: DRClassifier, loader: DataLoader, device: torch.device, with_cam: bool = False,
            heads: bool = False):
    """Raw logits (and CAMs) for every batch of a loader, in order; probabilities come from ``decide_batch``.

    ``heads``: (grade logits (n, 5), DME logits (n,) or None without a DME head) instead."""
    model.eval()
    logits_all, cams, dme = [], [], []
    for x, *_ in loader:
        x = x.to(device)
        if heads:
            out = model(x, heads=True)
            logits = out.logits
            if out.dme_logit is not None:
                dme.append(out.dme_logit.float().cpu().numpy())
        elif with_cam:
            logits, cam = model.forward_with_cam(x)
            cams.append(cam.float().cpu().numpy())
        else:
            logits = model(x)
        logits_all.append(logits.float().cpu().numpy())
    logits = np.concatenate(logits_all) if logits_all else np.zeros((0, 5), np.float32)
    if heads:
        return logits, (np.concatenate(dme) if dme else np.zeros(0, np.float32)) if model.has_dme else None
    return (logits, np.concatenate(cams)) if with_cam else logits
