"""`retinaedge export`: one checkpoint -> every requested format x precision, plus artifacts/index.json."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compression.calibration import load_batch
from compression.gate import GateThresholds
from compression.qat import QATConfig
from compression.quantize import QuantRecipe
from edge_runtime.contract import PreprocessPolicy

from .registry import ArtifactRecord, ExportContext, export_artifact, write_index

log = logging.getLogger(__name__)


def build_context(checkpoint: str | Path, out_dir: str | Path, calib: str | Path | Sequence[str | Path] | None,
                  val: str | Path | Sequence[str | Path] | None,
                  recipe: QuantRecipe | None = None, thresholds: GateThresholds | None = None,
                  calib_limit: int = 64, val_limit: int = 128, name: str | None = None, qat: QATConfig | None = None,
                  tuning_limit: int = 256, escalate: bool = True) -> ExportContext:
    """Load the checkpoint and the real photos every export of it needs.

    ``calib``'s ``calib`` split calibrates INT8 and its ``train`` split (up to ``tuning_limit`` photos,
    unlabelled) drives the gate's fallbacks; the ``val`` split of ``val`` is what parity and the gate judge.
    Both take one folder or several; limits apply per folder.
    """
    from training.models import load_checkpoint
    from training.models.dr_classifier import freeze_dynamic_padding

    model, meta = load_checkpoint(checkpoint)
    policy = PreprocessPolicy.from_dict(meta["preprocess"])
    freeze_dynamic_padding(model, policy.input_size)  # artifacts have a fixed input size (the manifest's)
    empty = np.zeros((0, 3, policy.input_size, policy.input_size), np.float32)

    def load(sources, split: str, limit: int, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
        batches = [load_batch(source, policy, split, limit, **kwargs) for source in _folders(sources)]
        if not batches:
            return empty, None
        labels = None if any(y is None for _, y in batches) else np.concatenate([y for _, y in batches])
        return np.concatenate([x for x, _ in batches]), labels

    calib_x = load(calib, "calib", calib_limit)[0]
    val_x, val_y = load(val, "val", val_limit) if _folders(val) else (calib_x, None)
    ctx = ExportContext(model, meta, Path(out_dir), calib_x, val_x, val_y, recipe or QuantRecipe(),
                        thresholds or GateThresholds(), name, qat=qat, escalate=escalate)
    if tuning_limit:  # the train split only: never the calib or val photos the result is judged on
        ctx.tuning_images = load(calib, "train", tuning_limit, strict_split=True)[0]
    return ctx


def _folders(sources: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    return [sources] if isinstance(sources, (str, Path)) else list(sources or [])


def export_all(ctx: ExportContext, formats: list[str], precisions: list[str], progress: bool = True) -> list[ArtifactRecord]:
    from rich.progress import Progress

    from exporters.formats import get_format

    jobs = [(f, p) for f in formats for p in precisions if p in get_format(f).precisions]
    skipped = [(f, p) for f in formats for p in precisions if p not in get_format(f).precisions]
    records: list[ArtifactRecord] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("exporting", total=len(jobs))
        for fmt, precision in jobs:
            bar.update(task, description=f"{fmt} {precision}")
            records.append(export_artifact(ctx, fmt, precision))
            bar.advance(task)
    for fmt, precision in skipped:
        log.info("%s has no %s export; skipped", fmt, precision)
    write_index(ctx.out_dir, records, ctx.meta)
    return records
