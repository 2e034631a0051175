"""Evaluate a checkpoint on one split of a dataset folder (metrics JSON + confusion PNG)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from edge_runtime.calibration import calibration_report, choose_operating_point
from edge_runtime.contract import OperatingPoint
from edge_runtime.decision import decide_batch

from .data.dataset import FundusDataset, cache_images
from .data.layouts import MISSING, assign_splits, fingerprint, read_partial_samples, select
from .metrics import save_confusion_png, save_roc_png, split_report
from .models import load_checkpoint
from .referral import choose_folder_weighted_point
from .train import choose_dme_point, dme_labels, predict


def _scores(model, policy, samples, cache_dir: str):
    """(reference grades, grade logits, DME logits or None) of ``samples`` on the CPU, at the model's preprocessing."""
    y = np.array([s.grade for s in samples])
    images = cache_images(samples, policy, cache_dir, False)
    logits, dme_logits = predict(model, DataLoader(FundusDataset(images, y, policy), batch_size=32),
                                 torch.device("cpu"), heads=True)
    return y, logits, dme_logits


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", cache_dir: str = ".cache/retinaedge",
             out: str | Path | None = None, with_scores: bool = False) -> dict:
    """Metrics of a checkpoint on one split at its recorded operating point; JSON, confusion and ROC PNGs in ``out``.
    Photos without a single grade (a blank or coarse grade) count for DME only (``split_report``).

    ``with_scores`` adds each photo's calibrated referable probability (``referable_probability``, in the split's
    photo order) and reference grade (``grades``; -1 where a photo has no single grade), for paired comparisons of
    several checkpoints on the same photos."""
    model, meta = load_checkpoint(checkpoint)
    policy = meta.preprocess
    samples = select(assign_splits(read_partial_samples(data)), split)
    if not samples:
        raise ValueError(f"{data} has no {split!r} split")
    y, logits, dme_logits = _scores(model, policy, samples, cache_dir)
    graded = y != MISSING
    point = meta.operating_point
    dme = {}
    if dme_logits is not None:  # DME metrics on the photos this folder labels (none: only the referral count)
        dme = dict(dme_labels=dme_labels([data], samples), dme_logits=dme_logits, dme_point=meta.dme_point)
    metrics = split_report(point, y, logits, **dme)
    # Calibration measured on photos the temperature was not fitted on: ECE/Brier at T = 1 and at the point's T.
    metrics["calibration"] = calibration_report(logits[graded], y[graded], point.temperature)
    metrics.update(checkpoint=str(checkpoint), data=str(data), split=split, model=meta.model_name)
    if with_scores:
        metrics.update(referable_probability=decide_batch(logits, point).referable_probability.tolist(),
                       grades=y.tolist())
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"eval_{Path(data).name}_{split}"
        (out / f"{stem}.json").write_text(json.dumps(metrics, indent=2))
        title = f"{meta.model_name} {Path(data).name} {split}"
        save_confusion_png(metrics["confusion_matrix"], str(out / f"{stem}.png"), title)
        save_roc_png(y[graded], decide_batch(logits[graded], point).referable_probability, point,
                     str(out / f"{stem}_roc.png"), title)
        metrics["roc_png"] = str(out / f"{stem}_roc.png")
    return metrics


def choose_point_for_checkpoint(checkpoint: str | Path, data: list[str | Path], split: str = "val",
                                rule: str = "sensitivity", target: float = 0.90, band_fraction: float = 0.05,
                                cache_dir: str = ".cache/retinaedge", dme_rule: str | None = None,
                                dme_target: float | None = None, per_folder: bool = False
                                ) -> tuple[OperatingPoint, OperatingPoint | None]:
    """Re-choose a checkpoint's temperature and referral threshold on the ``split`` photos of ``data`` and save it:
    on the photos pooled, or with ``per_folder`` each folder (camera) weighted equally, as training's
    ``referral_weighting: per_folder`` chooses it.

    A model with a DME head also gets its DME temperature and threshold re-chosen, on those photos that have a DME
    label, by ``dme_rule``/``dme_target`` (default: the checkpoint's, ``CheckpointMeta.rule_and_target``), as
    training chose it. Returns (referral point, DME point); the DME point is None without a DME head, or when the
    photos lack a DME-present or a DME-absent label (the checkpoint's DME point is then kept, with a warning).
    """
    model, meta = load_checkpoint(checkpoint)
    policy = meta.preprocess
    per_root = [(Path(root).name, select(assign_splits(read_partial_samples(root)), split)) for root in data]
    samples = [s for _, chosen in per_root for s in chosen]
    sample_folders = np.array([name for name, chosen in per_root for _ in chosen])
    if not samples:
        raise ValueError(f"no {split!r} photos in {[str(d) for d in data]}")
    y, logits, dme_logits = _scores(model, policy, samples, cache_dir)
    graded = y != MISSING
    chosen_on = fingerprint([s for s, g in zip(samples, graded, strict=True) if g])
    if per_folder:
        folders = sample_folders[graded]
        point, _ = choose_folder_weighted_point(y[graded], logits[graded], folders, rule=rule, target=target,
                                                band_fraction=band_fraction, fingerprint=chosen_on)
    else:
        point = choose_operating_point(y[graded], logits[graded], rule=rule, target=target,
                                       band_fraction=band_fraction, fingerprint=chosen_on)
    dme_point = None
    if dme_logits is not None:
        trained_rule, trained_target = meta.rule_and_target("dme")
        if dme_target is None:  # the checkpoint's target for its own rule; training's default for another
            dme_target = trained_target if (dme_rule or trained_rule) == trained_rule else 0.90
        dme_point = choose_dme_point(dme_labels(data, samples), dme_logits, samples, dme_rule or trained_rule,
                                     dme_target)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["meta"]["operating_point"] = dataclasses.asdict(point)
    if dme_point is not None:
        state["meta"]["dme_operating_point"] = dataclasses.asdict(dme_point)
    torch.save(state, checkpoint)
    return point, dme_point
