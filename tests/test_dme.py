"""Multi-label heads: the DME head beside the 5-grade head, from model and masked loss through training,
export, runtime decision and wire schema to the server. DR-only models, manifests and results keep working as before.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from edge_runtime.calibration import choose_binary_operating_point
from edge_runtime.contract import ArtifactManifest, OperatingPoint, output_names_for
from edge_runtime.decision import decide, decide_batch
from edge_runtime.errors import ConfigError, ManifestError
from edge_runtime.wire import QualityReport, ScreeningResult, encounter_decision
from training.config import TrainConfig
from training.data.layouts import MISSING
from training.models import create_model
from training.train import masked_bce

from .test_companion_api import auth, entry, server  # noqa: F401 - the server fixture (SQLite, and PostgreSQL)
from .test_pretrain import with_dme_column

DME_HEADS = ("grade", "dme")


def logits_for(probabilities) -> np.ndarray:
    return np.log(np.asarray(probabilities, float))


NOT_REFERABLE = logits_for([0.8, 0.1, 0.05, 0.03, 0.02])  # P(grade >= 2) = 0.10
REFERABLE = logits_for([0.1, 0.1, 0.6, 0.1, 0.1])  # P(grade >= 2) = 0.80
DME_POINT = OperatingPoint(rule="youden", threshold=0.4)


# ---------------------------------------------------------------- model and loss
def test_dme_cam_identity_is_exact_in_torch():
    torch.manual_seed(0)
    model = create_model("test_dr_tiny", heads=DME_HEADS).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        exported = model.forward_outputs(x)
        trained = model(x, heads=True)
    logits, cam, dme_logit, dme_cam = exported
    assert dme_logit.shape == (3, 1) and dme_cam.shape[:2] == (3, 1) and cam.shape[1] == 5
    torch.testing.assert_close(dme_logit, dme_cam.mean(dim=(2, 3)) + model.dme_head.bias, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, cam.mean(dim=(2, 3)) + model.head.bias, rtol=0, atol=1e-5)
    # The training path (pooled features -> linear) and the export path (mean of the CAM + bias) agree in eval mode.
    torch.testing.assert_close(trained.dme_logit, exported[2][:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.logits, exported[0], rtol=1e-5, atol=1e-5)
    assert trained.cam is None and trained.dme_logit.shape == (3,)


def test_dr_only_models_keep_their_state_dict_and_two_outputs():
    model = create_model("test_dr_tiny").eval()
    assert model.heads == ("grade",) and not any(k.startswith("dme_head") for k in model.state_dict())
    with torch.no_grad():
        outputs = model.forward_outputs(torch.randn(1, 3, 64, 64))
        logits, cam = model.forward_with_cam(torch.randn(1, 3, 64, 64))
    assert len(outputs) == 2 and model(torch.randn(2, 3, 64, 64), heads=True).dme_logit is None
    # A DR-only checkpoint's weights load into a DME model except for the new head (strict=False lists only it).
    missing, unexpected = create_model("test_dr_tiny", heads=DME_HEADS).load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == ["dme_head.bias", "dme_head.weight"] and not unexpected


def test_masked_bce_ignores_photos_without_a_dme_label():
    logits = torch.tensor([2.0, -1.0, 5.0, -4.0], requires_grad=True)
    target = torch.tensor([1, 0, MISSING, MISSING])
    loss = masked_bce(logits, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:2], target[:2].float())
    torch.testing.assert_close(loss, expected)  # unmasked, the MISSING rows would count as "no edema" (or -1)
    loss.backward()
    assert logits.grad[2:].abs().max() == 0 and logits.grad[:2].abs().min() > 0
    assert masked_bce(logits, torch.full((4,), MISSING)).item() == 0.0  # an EyePACS-only batch: 0, not NaN


def test_config_validates_heads():
    assert TrainConfig(heads=["grade", "dme"]).heads == DME_HEADS and TrainConfig().heads == ("grade",)
    for bad in (("dme",), ("dme", "grade"), ("grade", "grade"), ("grade", "dmee")):
        with pytest.raises(ConfigError, match="heads"):
            TrainConfig(heads=bad)
    with pytest.raises(ConfigError, match="dme_rule"):
        TrainConfig(heads=DME_HEADS, dme_rule="max")


# ---------------------------------------------------------------- decision, operating point, wire
def test_dme_present_refers_a_photo_whose_dr_is_not_referable():
    point = OperatingPoint(threshold=0.5)
    dme_only = decide(NOT_REFERABLE, None, point, dme_logit=np.array([1.0]), dme_point=DME_POINT)
    assert (dme_only.dr_referable, dme_only.dme.present, dme_only.referable) == (False, True, True)
    assert dme_only.referral_reason == "DME present" and dme_only.dme.probability == pytest.approx(1 / (1 + np.e ** -1))
    dr_only = decide(REFERABLE, None, point, dme_logit=np.array([-3.0]), dme_point=DME_POINT)
    assert (dr_only.referable, dr_only.referral_reason) == (True, "referable DR")
    both = decide(REFERABLE, None, point, dme_logit=np.array([3.0]), dme_point=DME_POINT)
    assert both.referral_reason == "referable DR and DME present"
    neither = decide(NOT_REFERABLE, None, point, dme_logit=np.array([-3.0]), dme_point=DME_POINT)
    assert neither.referable is False and neither.referral_reason is None
    # A DR-only decision is what it always was.
    plain = decide(NOT_REFERABLE, None, point)
    assert plain.dme is None and plain.referable is False and plain.dr_referable is False


def test_dme_temperature_and_batch_agree_with_single_decisions():
    rng = np.random.default_rng(1)
    z, d = rng.normal(size=(40, 5)) * 2, rng.normal(size=40) * 3
    point, dme_point = OperatingPoint(threshold=0.4), OperatingPoint(threshold=0.3, temperature=2.0)
    batch = decide_batch(z, point, d, dme_point)
    assert np.allclose(batch.dme_probability, 1 / (1 + np.exp(-d / 2.0)))
    assert (batch.referable == (batch.dr_referable | batch.dme_present)).all()
    for i in range(len(z)):
        one = decide(z[i], None, point, dme_logit=d[i:i + 1], dme_point=dme_point)
        assert one.referable == batch.referable[i] and one.dme.present == batch.dme_present[i]
    with pytest.raises(ValueError, match="DME logits and the DME operating point"):
        decide_batch(z, point, d, None)


def test_dme_cam_peak_comes_from_the_dme_map():
    cam, dme_cam = np.zeros((5, 4, 4), np.float32), np.zeros((1, 4, 8), np.float32)
    dme_cam[0, 2, 1] = 3.0
    d = decide(NOT_REFERABLE, cam, OperatingPoint(), dme_logit=np.array([2.0]), dme_cam=dme_cam, dme_point=DME_POINT)
    assert d.dme.cam_peak == (1.5 / 8, 2.5 / 4) and d.dme.cam.max() == 1.0


def test_binary_operating_point_reaches_its_target_with_wilson_intervals():
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.15
    logits = np.where(positive, 1.5, -1.5) + rng.normal(size=300)
    point = choose_binary_operating_point(positive.astype(int), logits, rule="sensitivity", target=0.9)
    assert point.sensitivity >= 0.9 and point.n_positive == positive.sum() and point.n_negative == (~positive).sum()
    low, high = point.sensitivity_ci
    assert low < point.sensitivity < high and 0.05 <= point.temperature <= 20
    assert decide_batch(np.zeros((300, 5)), OperatingPoint(), logits, point).dme_present[positive].mean() >= 0.9
    youden = choose_binary_operating_point(positive.astype(int), logits, rule="youden")
    assert youden.rule == "youden" and youden.target is None
    assert youden.sensitivity + youden.specificity >= point.sensitivity + point.specificity  # max Youden's J
    with pytest.raises(ValueError, match="0/1"):
        choose_binary_operating_point(np.array([1, 0, MISSING]), np.zeros(3))


def wire_result(**kw) -> ScreeningResult:
    probs = (0.8, 0.1, 0.05, 0.03, 0.02)
    base = dict(device_id="dev-a", model_version="v1", model_sha256="a" * 64, backend="onnxruntime",
                provider="CPUExecutionProvider", quality=QualityReport(True, 0.9, (), {"mean": 100.0}), grade=0,
                probabilities=probs, confidence=0.8, threshold=0.5, referable=False, cam_peak=(0.4, 0.5))
    return ScreeningResult(**{**base, **kw})


def test_wire_result_with_dme_is_validated_and_refers():
    r = wire_result(referable=True, dme_probability=0.7, dme_present=True, dme_threshold=0.4, dme_cam_peak=(0.5, 0.5))
    assert r.needs_referral and r.dr_referable is False and r.referral_reason == "DME present"
    assert ScreeningResult.from_dict(r.to_dict()) == r
    with pytest.raises(ValidationError, match="contradicts"):  # DME present must refer
        wire_result(referable=False, dme_probability=0.7, dme_present=True, dme_threshold=0.4)
    with pytest.raises(ValidationError, match="dme_present=False contradicts"):
        wire_result(dme_probability=0.7, dme_present=False, dme_threshold=0.4)
    with pytest.raises(ValidationError, match="missing dme_threshold"):
        wire_result(referable=True, dme_probability=0.7, dme_present=True)
    with pytest.raises(ValidationError, match="ungradable result carries no dme_present"):
        ScreeningResult(device_id="d", model_version="v", model_sha256="", backend="b", provider="p",
                        quality=QualityReport(False, 0.1), outcome="ungradable", dme_present=False)


def test_dr_only_results_serialise_exactly_as_before():
    r = wire_result()
    assert not any(k.startswith("dme") for k in r.to_dict()) and r.referral_reason is None
    # The canonical JSON (and hence the content hash a server stored before DME existed) has the pre-DME keys.
    assert set(json.loads(r.canonical_json())) == {
        "backend", "cam_peak", "captured_at", "confidence", "device_id", "disclaimer", "encounter_id", "eye", "grade",
        "grade_name", "image_name", "latency_ms", "model_sha256", "model_version", "outcome", "probabilities",
        "provider", "quality", "referable", "referable_probability", "result_id", "threshold"}


def test_an_encounter_with_dme_but_no_referable_dr_is_referred():
    t = datetime.now(timezone.utc) - timedelta(hours=1)
    dme = dict(dme_probability=0.2, dme_present=False, dme_threshold=0.4)
    left = wire_result(eye="left", encounter_id="v1", captured_at=t, **dme)
    right = wire_result(eye="right", encounter_id="v1", captured_at=t, referable=True,
                        **{**dme, "dme_probability": 0.9, "dme_present": True})
    assert encounter_decision([left, replace_eye(right, "right", present=False)]).decision == "no_referral"
    decision = encounter_decision([left, right])
    assert decision.decision == "refer" and decision.reason == "right eye referable (DME present)"


def replace_eye(r: ScreeningResult, eye: str, present: bool) -> ScreeningResult:
    return ScreeningResult.from_dict({**r.to_dict(), "eye": eye, "dme_present": present, "referable": present,
                                      "dme_probability": 0.9 if present else 0.1})


# ---------------------------------------------------------------- manifest
def test_manifest_lists_heads_and_old_manifests_are_dr_only():
    dme = ArtifactManifest(model_name="m", model_version="v", format="onnx", heads=DME_HEADS,
                           output_names=output_names_for(DME_HEADS), dme_operating_point=DME_POINT)
    assert dme.has_dme and ArtifactManifest.from_json(dme.to_json()) == dme
    old = json.loads(ArtifactManifest(model_name="m", model_version="v", format="onnx").to_json())
    for key in ("heads", "dme_operating_point"):
        old.pop(key)
    old["schema_version"] = 2
    loaded = ArtifactManifest.from_dict(old)
    assert loaded.heads == ("grade",) and not loaded.has_dme and loaded.output_names == ("logits", "cam")
    with pytest.raises(ManifestError, match="output_names"):
        ArtifactManifest(model_name="m", model_version="v", format="onnx", heads=DME_HEADS, dme_operating_point=DME_POINT)
    with pytest.raises(ManifestError, match="dme_operating_point"):
        ArtifactManifest(model_name="m", model_version="v", format="onnx", heads=DME_HEADS,
                         output_names=output_names_for(DME_HEADS))
    with pytest.raises(ManifestError, match="heads"):
        ArtifactManifest.from_dict({**old, "heads": ["dme"]})


# ---------------------------------------------------------------- end to end: train -> export -> screen -> server
@pytest.fixture(scope="module")
def dme_run(tmp_path_factory):
    """test_dr_tiny with a DME head, trained 3 epochs on synthetic photos with a ``dme`` column."""
    from training.data.synthetic import write_synthetic_dataset
    from training.train import fit

    root = tmp_path_factory.mktemp("dme")
    data = with_dme_column(write_synthetic_dataset(root / "data", n_per_grade=12, size=160, seed=5), blank_every=7)
    cfg = TrainConfig(model="test_dr_tiny", data=(str(data),), pretrained=False, input_size=64, epochs=3, batch_size=16,
                      lr=3e-3, heads=DME_HEADS, dme_rule="youden", out=str(root / "run"), cache_dir=str(root / "cache"))
    return fit(cfg, progress=False), data


def test_training_reports_dme_metrics_and_records_its_operating_point(dme_run):
    from training.models import load_checkpoint

    result, _ = dme_run
    model, meta = load_checkpoint(result.best_checkpoint)
    assert model.has_dme and meta.heads == DME_HEADS
    assert meta.dme_operating_point is not None and meta.dme_operating_point.rule == "youden"
    val = result.metrics["val"]["dme"]
    assert val["n"] + val["n_missing"] == result.metrics["val"]["n"] and val["n_missing"] > 0
    assert 0.0 <= val["auc"] <= 1.0 and len(val["sensitivity_ci"]) == 2 and len(val["auc_ci"]) == 2
    assert "val_dme_auc" in result.metrics["history"][-1]
    test = result.metrics["test"]
    assert test["dme"]["n"] > 0 and 0 <= test["referred"] <= test["n"]
    assert result.metrics["dme_operating_point"]["threshold"] == meta.dme_operating_point.threshold
    from training.evaluate import evaluate

    evaluated = evaluate(result.best_checkpoint, dme_run[1], "test", cache_dir=str(result.out_dir / "eval_cache"))
    assert evaluated["dme"]["n"] == test["dme"]["n"] and evaluated["dme"]["auc"] == pytest.approx(test["dme"]["auc"])


def test_operating_point_cli_rechooses_the_dme_point_too(dme_run, tmp_path):
    import subprocess
    import sys

    from training.checkpoint import CheckpointMeta
    from training.data.layouts import assign_splits, read_dataset, select
    from training.evaluate import choose_point_for_checkpoint
    from training.models import load_checkpoint
    from training.train import dme_labels, predict

    from .conftest import ROOT

    result, data = dme_run
    copy = tmp_path / "best.pt"
    copy.write_bytes(result.best_checkpoint.read_bytes())
    # The CLI: both points re-chosen, the DME one by the checkpoint's rule (youden) unless told otherwise.
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "operating-point", "--checkpoint", str(copy),
                           "--data", str(data), "--dme-rule", "sensitivity", "--dme-target", "0.8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DME point: threshold" in proc.stdout and "for sensitivity >= 0.80" in proc.stdout
    saved = CheckpointMeta.from_dict(torch.load(copy, weights_only=False)["meta"]).dme_operating_point
    assert (saved.rule, saved.target) == ("sensitivity", 0.8) and saved.sensitivity >= 0.8
    # The library call with the defaults: the checkpoint's DME rule, on the val photos with a DME label.
    point, dme_point = choose_point_for_checkpoint(copy, [data], "val", cache_dir=str(tmp_path / "c"))
    model, meta = load_checkpoint(copy)
    assert meta.dme_operating_point == dme_point and meta.operating_point == point
    samples = select(assign_splits(read_dataset(data)), "val")
    labels = dme_labels([data], samples)
    assert dme_point.rule == "sensitivity" and dme_point.target == 0.8  # the rule and target saved just before
    assert dme_point.n_positive + dme_point.n_negative == int((labels != MISSING).sum())
    from torch.utils.data import DataLoader

    from training.data.dataset import FundusDataset, cache_images

    images = cache_images(samples, meta.preprocess, str(tmp_path / "c"), False)
    _, dme_logits = predict(model, DataLoader(FundusDataset(images, np.array([s.grade for s in samples]),
                                                            meta.preprocess), batch_size=32),
                            torch.device("cpu"), heads=True)
    present = labels != MISSING
    expected = choose_binary_operating_point(labels[present], dme_logits[present], rule="sensitivity", target=0.8)
    assert dme_point.threshold == pytest.approx(expected.threshold) and dme_point.temperature == pytest.approx(
        expected.temperature)


@pytest.fixture(scope="module")
def dme_artifacts(dme_run, tmp_path_factory):
    from compression.gate import GateThresholds
    from exporters.pipeline import ExportPipeline, ExportPlan, export_all, load_inputs

    result, data = dme_run
    out = tmp_path_factory.mktemp("dme_artifacts")
    # A loose gate: the tiny model's INT8 only has to carry the DME outputs here (the gate has its own tests).
    loose = GateThresholds.profile("strict", min_referral_agreement=0.0, min_sensitivity_difference=-1.0,
                                   min_specificity_difference=-1.0, min_auc_ratio=0.0)
    inputs = load_inputs(result.best_checkpoint, out, data, data, thresholds=loose, calib_limit=8, val_limit=16)
    plan = ExportPlan(("onnx", "tflite"), ("fp32",))
    pipeline = ExportPipeline(inputs, plan)
    records = {r.format: r for r in export_all(inputs, plan, progress=False, pipeline=pipeline)}
    records["onnx_int8"] = pipeline.export("onnx", "int8")
    return records


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_exported_dme_head_keeps_its_cam_identity_and_parity(dme_artifacts, dme_run, fmt):
    from edge_runtime.backends import open_session
    from training.models import load_checkpoint

    record = dme_artifacts[fmt]
    assert record.status == "ok", record.error
    assert record.parity["max_abs_dme_logit_diff"] < 1e-3 and record.parity["dme_cam_identity_error"] < 1e-4
    session = open_session(record.path)
    manifest = session.info.manifest
    _, meta = load_checkpoint(dme_run[0].best_checkpoint)
    assert manifest.heads == DME_HEADS and manifest.output_names == ("logits", "cam", "dme_logit", "dme_cam")
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    out = session.run_heads(x)
    bias = out.dme_logit - out.dme_cam.mean(axis=(2, 3))  # the CAM identity, read from the artifact's outputs
    assert out.dme_logit.shape == (2, 1) and np.abs(bias - bias.mean()).max() < 1e-4
    assert session.run(x)[0].shape == (2, 5)  # the grade-only view is unchanged


@pytest.mark.parametrize("name", ["onnx", "tflite", "onnx_int8"])
def test_every_artifact_keeps_its_parents_dme_point(dme_artifacts, dme_run, name):
    """As the referral point: a converted artifact decides "DME present" where its parent was validated, so the
    gate judges the conversion at that point (never at a point re-chosen on the photos it is judged on)."""
    from edge_runtime.backends import open_session
    from training.models import load_checkpoint

    manifest = open_session(dme_artifacts[name].path, allow_ungated=True).info.manifest
    _, meta = load_checkpoint(dme_run[0].best_checkpoint)
    assert manifest.dme_operating_point == meta.dme_operating_point and manifest.operating_point == meta.operating_point


def test_int8_gate_of_a_dme_artifact_judges_the_dme_head(dme_artifacts):
    from edge_runtime.backends import open_session

    gate = open_session(dme_artifacts["onnx_int8"].path, allow_ungated=True).info.manifest.gate
    names = [c.name for c in gate.criteria]
    assert {"sensitivity_difference", "specificity_difference", "auc_ratio", "dme_sensitivity_difference",
            "dme_specificity_difference", "dme_auc_ratio", "referral_agreement", "dme_agreement"} <= set(names)
    dme_agreement, referral_agreement = (next(c for c in gate.criteria if c.name == name)
                                         for name in ("dme_agreement", "referral_agreement"))
    # Agreement on every val photo (it needs no label); the AUC ratio on the DME-labelled ones only.
    assert dme_agreement.n == referral_agreement.n and dme_agreement.interval is not None
    assert dme_agreement.threshold == 0.98 and gate.status != "passed"  # 5 val photos: far too few
    assert {"dme_agreement", "dme_auc", "dme_auc_fp32", "dme_n_positive"} <= set(gate.metrics)
    assert gate.thresholds["min_dme_auc_ratio"] == 0.99


def test_int8_artifact_carries_the_dme_outputs(dme_artifacts):
    from edge_runtime.backends import open_session

    record = dme_artifacts["onnx_int8"]
    assert record.status == "ok", record.error
    session = open_session(record.path, allow_ungated=True)
    assert session.info.manifest.heads == DME_HEADS and session.info.manifest.quantization.precision == "int8"
    out = session.run_heads(np.zeros((1, 3, 64, 64), np.float32))
    assert out.dme_logit.shape == (1, 1) and out.dme_cam.shape[:2] == (1, 1)
    assert "max_abs_dme_logit_diff" in record.parity  # reported beside the gate's figures


def test_bench_reports_the_dme_head_with_n_and_intervals(dme_artifacts, dme_run, tmp_path):
    from benchmarks.runner import BenchConfig, run_benchmark
    from compression.calibration import load_photos
    from edge_runtime.contract import ArtifactManifest, manifest_path_for
    from training.models import load_checkpoint

    result, data = dme_run
    art_dir = Path(dme_artifacts["onnx"].path).parent
    cfg = BenchConfig(runs=3, min_seconds=0.01, warmup=1, batch_sizes=(1,), split="test")
    report = run_benchmark(art_dir, tmp_path / "bench", data, None, [result.best_checkpoint], cfg, progress=False)
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert {r["format"] for r in ok} == {"torch", "onnx", "tflite"}
    _, meta = load_checkpoint(result.best_checkpoint)
    test = load_photos(data, meta.preprocess, "test")
    n_dme = int((test.dme != MISSING).sum())
    for r in ok:
        assert r["dme_n"] == n_dme and r["dme_n_missing"] == len(test.dme) - n_dme
        assert r["dme_n_positive"] + r["dme_n_negative"] == n_dme
        assert 0.0 <= r["dme_auc"] <= 1.0 and len(r["dme_auc_ci"]) == 2
        assert r["dme_sensitivity_ci"][0] <= r["dme_sensitivity"] <= r["dme_sensitivity_ci"][1]
        assert r["dme_specificity_ci"][0] <= r["dme_specificity"] <= r["dme_specificity_ci"][1]
        point = meta.dme_point if r["format"] == "torch" else ArtifactManifest.from_json(
            manifest_path_for(art_dir / r["name"]).read_text()).dme_operating_point
        assert r["dme_threshold"] == point.threshold  # each decides at its own DME point
        # DR or DME: every photo referred for DR, and every labelled photo flagged with DME, is among the referred.
        dr_referred = round(r["referable_sensitivity"] * r["n_positive"]
                            + (1 - r["referable_specificity"]) * r["n_negative"])
        dme_flagged = round(r["dme_sensitivity"] * r["dme_n_positive"] + (1 - r["dme_specificity"]) * r["dme_n_negative"])
        unlabelled_may_add = r["dme_n_missing"]  # DME-flagged photos without a label are not in dme_flagged
        assert max(dr_referred, dme_flagged) <= r["referred"] <= min(r["n_eval"],
                                                                     dr_referred + dme_flagged + unlabelled_may_add)
    onnx = next(r for r in ok if r["format"] == "onnx" and r["precision"] == "fp32")
    torch_row = next(r for r in ok if r["format"] == "torch")
    assert onnx["dme_auc"] == pytest.approx(torch_row["dme_auc"], abs=1e-3)
    markdown = (tmp_path / "bench" / "report.md").read_text()
    assert "DME AUC [95% CI] (n)" in markdown and f"(n={n_dme})" in markdown


def test_screener_reports_dme_from_the_artifact(dme_artifacts, fundus_bgr):
    from edge_runtime.screen import Screener

    screener = Screener.from_artifact(dme_artifacts["onnx"].path, device_id="dev-a")
    result = screener.screen_image(fundus_bgr).result
    point = screener.session.info.manifest.dme_operating_point
    assert result.has_dme and result.dme_threshold == point.threshold and result.dme_cam_peak is not None
    assert result.dme_present == (result.dme_probability >= point.threshold)
    assert result.referable == (result.dr_referable or result.dme_present)


def test_dr_only_artifacts_still_load_and_decide_as_before(tiny_run, tmp_path, fundus_bgr):
    """A DR-only export, its sidecar rewritten as a schema-2 manifest (no heads), screens without DME fields."""
    from edge_runtime.backends import open_session
    from edge_runtime.contract import manifest_path_for, sha256_file
    from edge_runtime.screen import Screener
    from exporters.onnx import embed_manifest
    from exporters.pipeline import ExportPipeline, ExportPlan, export_all, load_inputs
    from training.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_per_grade=4, size=128, seed=9)
    inputs = load_inputs(tiny_run.best_checkpoint, tmp_path / "art", data, data, calib_limit=4, val_limit=8)
    plan = ExportPlan(("onnx",), ("fp32",))
    (record,) = export_all(inputs, plan, progress=False, pipeline=ExportPipeline(inputs, plan))
    sidecar = manifest_path_for(record.path)
    manifest = json.loads(sidecar.read_text())
    assert manifest["heads"] == ["grade"] and manifest["dme_operating_point"] is None
    # What a pre-DME exporter wrote: no heads, schema 2, in the file and beside it (sha256 of the re-embedded file).
    old = {k: v for k, v in manifest.items() if k not in ("heads", "dme_operating_point")} | {"schema_version": 2}
    embed_manifest(record.path, json.dumps({**old, "sha256": None}, sort_keys=True))
    sidecar.write_text(json.dumps({**old, "sha256": sha256_file(record.path)}))
    session = open_session(record.path)
    assert session.info.manifest.heads == ("grade",) and session.run_heads(inputs.photos.val[:1]).dme_logit is None
    result = Screener(session, device_id="dev-a").screen_image(fundus_bgr).result
    assert not result.has_dme and not any(k.startswith("dme") for k in result.to_dict())
    logits, _ = session.run(inputs.photos.val)
    point = session.info.manifest.operating_point
    assert (decide_batch(logits, point).referable == (decide_batch(logits, point).referable_probability
                                                      >= point.threshold)).all()


def test_server_stores_and_returns_the_dme_finding(server):  # noqa: F811 - the imported fixture
    client, tokens, _ = server
    dme = wire_result(referable=True, dme_probability=0.72, dme_present=True, dme_threshold=0.4,
                      dme_cam_peak=(0.5, 0.45), encounter_id="visit-1", eye="left")
    plain = wire_result(encounter_id="visit-1", eye="right")
    statuses = client.post("/v1/sync", json={"results": [entry(dme), entry(plain)]}, headers=auth(tokens["dev-a"]))
    assert [i["status"] for i in statuses.json()["items"]] == ["stored", "stored"]
    one = client.get(f"/v1/results/{dme.result_id}", headers=auth(tokens["dev-a"])).json()
    assert (one["dme_present"], one["dme_probability"], one["referable"]) == (True, 0.72, True)
    assert one["referral_reason"] == "DME present" and one["result"]["dme_threshold"] == 0.4
    other = client.get(f"/v1/results/{plain.result_id}", headers=auth(tokens["dev-a"])).json()
    assert other["dme_present"] is None and other["referral_reason"] is None
    assert "dme_present" not in other["result"]
    # Replaying the same DME result is a duplicate, not a conflict (its content hash covers the DME fields).
    again = client.post("/v1/sync", json={"results": [entry(dme)]}, headers=auth(tokens["dev-a"])).json()
    assert again["items"][0]["status"] == "duplicate"
    found = client.get("/v1/history?dme=true", headers=auth(tokens["rev"])).json()
    assert [r["result_id"] for r in found["data"]] == [dme.result_id]
    visits = client.get("/v1/history?group=encounter", headers=auth(tokens["rev"])).json()["data"]
    assert visits[0]["decision"] == "refer" and visits[0]["reason"] == "left eye referable (DME present)"
    client.cookies.set("retinaedge_token", tokens["rev"])
    page = client.get("/review").text
    assert "DME PRESENT" in page and "<th>DME</th>" in page and "DME present</small>" in page
    assert "DME PRESENT" in client.get("/review?view=encounters").text


def test_migration_0003_adds_nullable_dme_columns(tmp_path):
    from alembic import command
    from sqlalchemy import inspect, text

    from .conftest import database_at_revision

    config, engine = database_at_revision(f"sqlite:///{tmp_path / 'old.db'}", "0002")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO results (result_id, device, content_hash, payload, outcome, grade, referable, "
                          "confidence, captured_at, received_at) VALUES ('r1', 'dev-a', :h, '{}', 'graded', 2, true, "
                          "0.8, :t, :t)"), {"h": "a" * 64, "t": datetime.now(timezone.utc)})
    command.upgrade(config, "head")
    columns = {c["name"] for c in inspect(engine).get_columns("results")}
    with engine.connect() as conn:
        row = conn.execute(text("SELECT grade, dme_present, dme_probability FROM results")).one()
    engine.dispose()
    assert {"dme_present", "dme_probability"} <= columns and tuple(row) == (2, None, None)
