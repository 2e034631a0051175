"""Server-side grading with the FP32 teacher and a full Grad-CAM (pytorch-grad-cam)."""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import torch

from edge_runtime.cam import cam_on_original, overlay_png
from edge_runtime.contract import PreprocessPolicy
from edge_runtime.preprocess import preprocess

_lock = threading.Lock()  # Grad-CAM hooks are per model: one request at a time per process


@lru_cache(maxsize=2)
def load_teacher(path: str):
    from training.models import load_checkpoint

    model, meta = load_checkpoint(path)
    policy = PreprocessPolicy.from_dict(meta["preprocess"])
    return model, meta, policy


def grade_with_gradcam(checkpoint: str, bgr: np.ndarray) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, meta, policy = load_teacher(checkpoint)
    pre = preprocess(bgr, policy)
    x = torch.from_numpy(pre.tensor)
    with _lock:
        with torch.no_grad():
            probs = model(x).softmax(1)[0].numpy().astype(float)
        grade = int(probs.argmax())
        target_layer = model.backbone.conv_head if hasattr(model.backbone, "conv_head") else list(model.backbone.children())[-1]
        with GradCAM(model=model, target_layers=[target_layer]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(grade)])[0]
    overlay = overlay_png(bgr, cam_on_original(heat.astype(np.float32), pre))
    return {"grade": grade, "probabilities": probs.tolist(), "confidence": float(probs[grade]), "overlay": overlay,
            "model_version": f"{meta['model_name']}-{meta.get('data_fingerprint', '')[:8]}-fp32",
            "referable_threshold": float(meta.get("referable_threshold", 0.5))}
