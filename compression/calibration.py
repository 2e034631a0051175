"""Batches of real fundus photos, preprocessed by the one preprocessing function, for calibration and gates."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ImageError
from edge_runtime.preprocess import normalize, preprocess_file
from training.data.layouts import (
    IMAGE_SUFFIXES,
    MISSING,
    assign_splits,
    detect_layout,
    read_dataset,
    read_dme,
    select,
)
from training.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhotoBatch:
    """Preprocessed photos of one folder and what the folder says about them."""

    x: np.ndarray  # N x C x S x S, normalised
    grades: np.ndarray | None  # ICDR grades; None for a plain image folder
    dme: np.ndarray | None  # DME labels (0/1, MISSING where the photo has none); None for a plain image folder
    patients: np.ndarray | None = None  # patient id per photo (bootstrap clusters); None for a plain image folder


def load_batch(root: str | Path, policy: PreprocessPolicy, split: str | None = None, limit: int | None = None,
               seed: int = 0, strict_split: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised N x C x S x S images (and grades when labelled): ``load_photos`` without the DME labels."""
    batch = load_photos(root, policy, split, limit, seed, strict_split)
    return batch.x, batch.grades


def load_photos(root: str | Path, policy: PreprocessPolicy, split: str | None = None, limit: int | None = None,
                seed: int = 0, strict_split: bool = False) -> PhotoBatch:
    """Normalised N x C x S x S images, their grades and DME labels (``layouts.read_dme``) when labelled, from a
    dataset folder or a plain image folder.

    With a labelled layout, ``split`` selects rows (e.g. ``calib`` or ``val``); a plain folder of images
    gives every image and no labels. ``limit`` takes a class-stratified subset (every grade represented).
    ``strict_split`` refuses the fallback to every image when ``split`` is missing, for callers that must
    never see the photos they are later judged on (tuning sets); those get an empty batch instead.
    """
    root = Path(root)
    try:
        detect_layout(root)
        samples = assign_splits(read_dataset(root), seed=seed)
        if split:
            chosen = select(samples, split)
            if not chosen and strict_split:
                log.warning("%s has no %r split; using no images from it", root, split)
                return PhotoBatch(np.zeros((0, 3, policy.input_size, policy.input_size), np.float32),
                                  np.zeros(0, int), np.zeros(0, int))
            samples = chosen or samples
        paths, labels = [s.path for s in samples], np.array([s.grade for s in samples])
        patients = np.array([s.patient for s in samples])
    except DatasetError:
        if split and strict_split:  # an unlabelled folder has no splits to keep apart
            log.warning("%s is not a labelled dataset; no %r split to take images from", root, split)
            return PhotoBatch(np.zeros((0, 3, policy.input_size, policy.input_size), np.float32), None, None)
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = None
    if not paths:
        raise DatasetError(f"{root}: no images found for calibration/validation")
    dme = None
    if labels is not None:  # outside the try: a malformed DME column must raise, not make the folder unlabelled
        dme_by_path = read_dme(root)
        dme = np.array([dme_by_path.get(p, MISSING) for p in paths], int)
    order = np.arange(len(paths))
    if limit and len(paths) > limit:
        rng = np.random.default_rng(seed)
        if labels is not None:  # round-robin over grades so rare grades are never dropped
            by_grade = [list(rng.permutation(np.flatnonzero(labels == g))) for g in range(5)]
            picked: list[int] = []
            while len(picked) < limit:
                for bucket in by_grade:
                    if bucket and len(picked) < limit:
                        picked.append(int(bucket.pop()))
            order = np.array(sorted(picked))
        else:
            order = np.sort(rng.choice(len(paths), limit, replace=False))
    images, kept = [], []
    for i in order:
        try:
            images.append(preprocess_file(paths[i], policy).resized_rgb)
            kept.append(i)
        except ImageError as exc:
            log.warning("skipping %s: %s", paths[i].name, exc)
    x = normalize(np.stack(images), policy)
    return PhotoBatch(x, labels[kept] if labels is not None else None, dme[kept] if dme is not None else None,
                      patients[kept] if labels is not None else None)
