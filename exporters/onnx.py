"""ONNX export: FP32 (opset 18) and INT8 QDQ through a compression recipe; manifest in metadata_props."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from compression.quantize import quantize_onnx
from edge_runtime.backends.base import embedded_manifest_json
from edge_runtime.contract import QuantizationInfo

from .base import ExportContext, register_exporter

log = logging.getLogger(__name__)
OPSET = 18


def export_onnx_fp32(ctx: ExportContext, path: Path) -> Path:
    from training.models import ExportModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: 1-4 s instead of 6-17 s and it also exports NNCF-stripped models (TOOLCHAIN.md).
        torch.onnx.export(ExportModule(ctx.model), (ctx.example(),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits", "cam"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "cam": {0: "batch"}})
    return path


def embed_metadata(path: Path, manifest_json: str) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "retinaedge_manifest", manifest_json
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def read_embedded_manifest(path: str | Path) -> str | None:
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == "retinaedge_manifest"), None)


@register_exporter("onnx")
def export_onnx(ctx: ExportContext, precision: str) -> tuple[Path, QuantizationInfo]:
    path = ctx.out_dir / f"{ctx.stem}_{precision}.onnx"
    if precision == "fp32":
        export_onnx_fp32(ctx, path)
        quant = QuantizationInfo("fp32")
    else:
        fp32 = ctx.out_dir / f"{ctx.stem}_fp32.tmp.onnx"
        export_onnx_fp32(ctx, fp32)
        quantize_onnx(fp32, path, ctx.calib, ctx.recipe)
        fp32.unlink(missing_ok=True)
        quant = ctx.recipe.info(len(ctx.calib))
    cam_shape = tuple(int(v) for v in ctx.reference()[1].shape[2:]) if len(ctx.val) else None
    embed_metadata(path, embedded_manifest_json(ctx.manifest("onnx", quant, cam_shape)))
    return path, quant
