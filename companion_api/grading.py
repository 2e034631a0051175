"""Server-side grading: the device's Screener path on the FP32 teacher.

``/v1/predict`` runs exactly what a device runs (``edge_runtime.screen.Screener``: decode at the Screener's scale,
quality gate, preprocessing, ``decide()``, the model's own CAM overlay); only the session differs: the teacher in
PyTorch instead of an exported artifact. A photo therefore gets the same quality verdict and the same decision
rule on the server as on a device. For a linear head over pooled features the CAM equals Grad-CAM on the last
feature map (the gradient of a class logit is that class's weights, constant over the map), so no hooks are needed.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edge_runtime.backends.base import HeadOutputs, SessionBase, SessionInfo
from edge_runtime.contract import ArtifactManifest, output_names_for
from edge_runtime.screen import Screener, Screening


class TeacherSession(SessionBase):
    """A PyTorch checkpoint behind the runtime's Session protocol (``run_heads``), for the Screener."""

    def __init__(self, checkpoint: str | Path):
        from training.models import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        self.model = model.with_linear_heads()  # every head as a 1x1 convolution: logits = mean(CAM) + bias
        manifest = ArtifactManifest(
            model_name=meta.model_name, model_version=meta.model_version("fp32"), format="pytorch",
            preprocess=meta.preprocess, operating_point=meta.operating_point, heads=meta.heads,
            output_names=output_names_for(meta.heads), dme_operating_point=meta.dme_point,
            training_data_fingerprint=meta.data_fingerprint, git_sha=meta.git_sha)
        self.info = SessionInfo(backend="pytorch", provider="cpu", manifest=manifest, path=Path(checkpoint))

    def run_heads(self, batch: np.ndarray) -> HeadOutputs:
        with torch.inference_mode():
            outputs = [t.float().numpy() for t in self.model.forward_outputs(torch.from_numpy(np.ascontiguousarray(batch)))]
        return HeadOutputs(*outputs)


@lru_cache(maxsize=2)
def teacher_session(checkpoint: str) -> TeacherSession:
    return TeacherSession(checkpoint)


def screen_upload(checkpoint: str, data: bytes, device: str, max_bytes: int, max_pixels: int) -> Screening:
    """One uploaded photo through the device's Screener with the teacher; the overlay is rendered (display size).

    Raises:
        edge_runtime.errors.ImageError: not an accepted image, over the byte or pixel limit, undecodable.
    """
    screener = Screener(teacher_session(checkpoint), device_id=device, max_bytes=max_bytes, max_pixels=max_pixels,
                        store_overlays=True)
    return screener.screen_bytes(data)
