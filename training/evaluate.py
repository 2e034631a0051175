"""Evaluate a checkpoint on one split of a dataset folder (metrics JSON + confusion PNG)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.metrics import screening_metrics

from .data.dataset import FundusDataset, cache_images
from .data.layouts import assign_splits, read_dataset, select
from .metrics import save_confusion_png
from .models import load_checkpoint
from .train import predict


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", cache_dir: str = ".cache/retinaedge",
             out: str | Path | None = None) -> dict:
    model, meta = load_checkpoint(checkpoint)
    policy = PreprocessPolicy.from_dict(meta["preprocess"])
    samples = select(assign_splits(read_dataset(data)), split)
    if not samples:
        raise ValueError(f"{data} has no {split!r} split")
    images = cache_images(samples, policy, cache_dir, False)
    y = np.array([s.grade for s in samples])
    probs = predict(model, DataLoader(FundusDataset(images, y, policy), batch_size=32), torch.device("cpu"))
    metrics = screening_metrics(y, probs, float(meta.get("referable_threshold", 0.5)))
    metrics.update(checkpoint=str(checkpoint), data=str(data), split=split, model=meta["model_name"])
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"eval_{Path(data).name}_{split}"
        (out / f"{stem}.json").write_text(json.dumps(metrics, indent=2))
        save_confusion_png(metrics["confusion_matrix"], str(out / f"{stem}.png"), f"{meta['model_name']} {Path(data).name} {split}")
    return metrics
