"""Extending the toolkit touches its registries only (docs/reference/extending.md): a new INT8 recipe and a new
runtime backend are registered and used by the unchanged export pipeline and Screener."""
from __future__ import annotations

import dataclasses

import numpy as np

from compression.quantize import ONNX_RECIPES, QuantRecipe
from edge_runtime.backends.base import BACKENDS
from edge_runtime.backends.onnxruntime import OnnxRuntimeSession
from edge_runtime.contract import ArtifactManifest, manifest_path_for
from edge_runtime.screen import Screener


def test_a_new_int8_recipe_is_one_registration(tiny_artifacts, tmp_path, monkeypatch):
    from exporters.pipeline import ExportPipeline, ExportPlan

    calibrated_on: list[int] = []

    def weight_only(fp32_path, out_path, calib, recipe, target=None):
        """Toy recipe: ONNX Runtime's dynamic (weight-only) INT8, no activation calibration."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        calibrated_on.append(len(calib))
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QUInt8)
        return out_path

    monkeypatch.setitem(ONNX_RECIPES._entries, "toy_weight_only", weight_only)
    _, _, pipeline = tiny_artifacts
    inputs = dataclasses.replace(pipeline.inputs, out_dir=tmp_path, name="toy")
    plan = ExportPlan(("onnx",), ("int8",), QuantRecipe(name="toy_weight_only"), escalate=False)
    record = ExportPipeline(inputs, plan, reference=pipeline.reference).export("onnx", "int8")

    assert record.status == "ok", record.error
    assert calibrated_on and calibrated_on[0] > 0  # the pipeline handed it the calibration photos
    manifest = ArtifactManifest.from_json(manifest_path_for(record.path).read_text())
    assert manifest.quantization.recipe == "toy_weight_only" and manifest.quantization.precision == "int8"
    assert manifest.gate.status in ("passed", "failed", "insufficient_evidence")  # judged like any INT8 artifact


def test_a_new_backend_is_one_registration(tiny_artifacts, fundus_bgr, monkeypatch):
    class CountingSession(OnnxRuntimeSession):
        """Toy backend: ONNX Runtime that counts the batches it runs."""

        batches = 0

        def run_heads(self, batch: np.ndarray):
            type(self).batches += 1
            return super().run_heads(batch)

    monkeypatch.setitem(BACKENDS._entries, "onnxruntime", CountingSession)
    artifact = tiny_artifacts[0][("onnx", "fp32")].path
    screener = Screener.from_artifact(artifact)
    screening = screener.screen_image(fundus_bgr, "eye.png")

    assert isinstance(screener.session, CountingSession)
    assert CountingSession.batches == (0 if screening.result.outcome == "ungradable" else 1)
    assert screening.result.backend == "onnxruntime"
