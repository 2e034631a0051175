"""Server-side grading with the FP32 teacher and a full Grad-CAM (pytorch-grad-cam)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from edge_runtime.cam import cam_on_original, overlay_png
from edge_runtime.contract import OperatingPoint
from edge_runtime.decision import Decision, decide
from edge_runtime.preprocess import preprocess

_lock = threading.Lock()  # Grad-CAM hooks are per model: one request at a time per process


@lru_cache(maxsize=2)
def load_teacher(path: str):
    from training.models import load_checkpoint

    model, meta = load_checkpoint(path)
    return model, meta, meta.preprocess


@dataclass(frozen=True)
class ServerGrading:
    """The teacher's decision at its recorded operating point, with a full Grad-CAM overlay."""

    decision: Decision
    overlay: bytes
    model_version: str
    point: OperatingPoint


def grade_with_gradcam(checkpoint: str, bgr: np.ndarray) -> ServerGrading:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, meta, policy = load_teacher(checkpoint)
    pre = preprocess(bgr, policy)
    x = torch.from_numpy(pre.tensor)
    with _lock:
        with torch.no_grad():
            out = model(x, heads=True)
        point = meta.operating_point
        dme = {}
        if out.dme_logit is not None:  # a teacher with a DME head: referral is referable DR or DME present
            dme = dict(dme_logit=out.dme_logit[0].numpy(), dme_point=meta.dme_point)
        decision = decide(out.logits[0].numpy(), None, point, **dme)
        target_layer = model.backbone.conv_head if hasattr(model.backbone, "conv_head") else list(model.backbone.children())[-1]
        with GradCAM(model=model, target_layers=[target_layer]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(decision.grade)])[0]
    overlay = overlay_png(bgr, cam_on_original(heat.astype(np.float32), pre))
    return ServerGrading(decision, overlay, meta.model_version("fp32"), point)
