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


def build_context(checkpoint: str | Path, out_dir: str | Path, calib: str | Path | None,
                  val: str | Path | Sequence[str | Path] | None,
                  recipe: QuantRecipe | None = None, thresholds: GateThresholds | None = None,
                  calib_limit: int = 64, val_limit: int = 128, name: str | None = None, qat: QATConfig | None = None,
                  tuning_limit: int = 256, escalate: bool = True) -> ExportContext:
    """Load the checkpoint and the real photos every export of it needs.

    ``calib``'s ``calib`` split calibrates INT8 and its ``train`` split (up to ``tuning_limit`` photos,
    unlabelled) drives the gate's fallbacks; the ``val`` split of ``val`` (one folder or several) is what
    parity and the gate judge.
    """
    from training.models import load_checkpoint
    from training.models.dr_classifier import freeze_dynamic_padding

    model, meta = load_checkpoint(checkpoint)
    policy = PreprocessPolicy.from_dict(meta["preprocess"])
    freeze_dynamic_padding(model, policy.input_size)  # artifacts have a fixed input size (the manifest's)
    calib_x = load_batch(calib, policy, "calib", calib_limit)[0] if calib else np.zeros((0, 3, policy.input_size, policy.input_size), np.float32)
    sources = [val] if isinstance(val, (str, Path)) else list(val or [])
    if sources:  # several folders: the gate judges their val splits together (up to val_limit photos each)
        batches = [load_batch(source, policy, "val", val_limit) for source in sources]
        val_x = np.concatenate([x for x, _ in batches])
        val_y = None if any(y is None for _, y in batches) else np.concatenate([y for _, y in batches])
    else:
        val_x, val_y = calib_x, None
    ctx = ExportContext(model, meta, Path(out_dir), calib_x, val_x, val_y, recipe or QuantRecipe(),
                        thresholds or GateThresholds(), name, qat=qat, escalate=escalate)
    if calib and tuning_limit:  # the train split only: never the calib or val photos the result is judged on
        ctx.tuning_images = load_batch(calib, policy, "train", tuning_limit, strict_split=True)[0]
    return ctx


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
