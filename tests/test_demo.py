"""`retinaedge demo`: the whole pipeline end to end on synthetic data; its plan, console and operating point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._demo_run import quick_demo
from .conftest import ROOT


def test_quick_demo_produces_every_output():
    run = quick_demo()
    assert run.returncode == 0, run.console[-3000:]
    out = run.out
    for name in ("report.html", "summary.json", "demo.log", "artifacts/index.json", "bench/report.json", "bench/report.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    formats = {(a["format"], a["precision"]) for a in summary["artifacts"] if a["status"] == "ok"}
    assert {("onnx", "fp32"), ("onnx", "int8"), ("coreml", "fp16")} <= formats
    assert summary["server"]["stored_on_server"] == summary["server"]["synced"] > 0
    assert summary["server"]["outbox"]["acknowledged"] == summary["server"]["synced"]
    assert all(i["source"] in ("guideline", "gemini") for i in summary["server"]["insights"])
    assert any(g["overlay"] for g in summary["graded"])
    # Every step timed (wall and CPU), the evaluation carries n and intervals for each model.
    assert set(summary["timings_s"]) == set(summary["cpu_s"]) >= {"teacher", "export + INT8 gate", "benchmark", "report"}
    roles = {(m["role"], m["precision"]) for m in summary["evaluation"]["models"]}
    assert {("teacher", "fp32"), ("student", "fp32"), ("student", "int8")} <= roles
    for m in summary["evaluation"]["models"]:
        assert m["n"] == len(m["labels"]) == len(m["referable_probability"]) > 0
        assert m["sensitivity"]["n"] + m["specificity"]["n"] == m["n"]
        assert m["accuracy"]["ci"][0] <= m["accuracy"]["value"] <= m["accuracy"]["ci"][1]
    # The INT8 gate is the product's default; the quick gate set (100 synthetic val photos) is below its minimum
    # evidence, which the report's criteria table says.
    onnx_int8 = next(a for a in summary["artifacts"] if a["format"] == "onnx" and a["precision"] == "int8")
    gate = summary["gates"][Path(onnx_int8["path"]).name]
    assert gate["status"] == onnx_int8["gate"] == "insufficient_evidence"
    assert any("needs 500 more graded val photos" in f for f in gate["failures"])
    assert {"excess_disagreement", "hard_flips", "sensitivity_difference"} <= {c["name"] for c in gate["criteria"]}
    assert summary["screening_artifact"]["precision"] == "fp32"  # an INT8 that did not pass is not screened with
    page = (out / "report.html").read_text()
    assert "does not diagnose" in page and "<pre" not in page and "<table" in page
    assert "criterion by criterion" in page and "student vs an EfficientNet-B4" in page
    assert page.count("data:image/png;base64,") >= 5  # ROC, confusion x2, latency vs size, stages, CAMs


def test_quick_demo_console_is_quiet_and_the_log_has_the_rest():
    run = quick_demo()
    assert run.returncode == 0, run.console[-3000:]
    lines = run.console.splitlines()
    assert len(lines) <= 200, run.console
    assert "RetinaEdge demo (quick)" in run.console and "does not diagnose" in run.console
    for noise in ("Quantized bias", "coremltools", "Warning", "WARNING", "LiteRT-Torch Convert", "epoch 1"):
        assert noise not in run.console, noise
    log = (run.out / "demo.log").read_text()
    assert "== teacher" in log and "epoch 1:" in log  # the details are kept, only moved


@pytest.mark.slow
def test_full_demo_runs_every_format_with_a_competent_teacher(tmp_path):
    """The default `make demo` (minutes on 2 cores): the teacher learns the synthetic photos, the student keeps it."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "demo", "--out", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(proc.stdout.splitlines()) <= 200
    summary = json.loads((out / "summary.json").read_text())
    formats = {(a["format"], a["precision"]) for a in summary["artifacts"] if a["status"] == "ok"}
    assert {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8"), ("coreml", "fp16")} <= formats
    models = {(m["role"], m["precision"]): m for m in summary["evaluation"]["models"]}
    assert models[("teacher", "fp32")]["qwk"]["value"] >= 0.8, models[("teacher", "fp32")]["qwk"]
    # The student keeps the teacher's grading quality (QWK); grade-for-grade agreement is lower (about 0.6 here):
    # at these sizes the two confuse different neighbouring grades.
    teacher_qwk = models[("teacher", "fp32")]["qwk"]["value"]
    assert models[("student", "fp32")]["qwk"]["value"] >= teacher_qwk - 0.1, models[("student", "fp32")]["qwk"]


def test_demo_plan_rejects_unknown_keys(tmp_path):
    from edge_runtime.errors import ConfigError
    from retinaedge.demo import DemoPlan

    full = DemoPlan.load("full")
    assert full.jobs("tflite") == ["fp32", "int8"] and full.jobs("onnx") == ["fp32", "int8"]
    bad = tmp_path / "demo.yaml"
    bad.write_text("full:\n  synthetic_per_grad: 3\n")
    with pytest.raises(ConfigError, match="synthetic_per_grade"):
        DemoPlan.load("full", bad)
    with pytest.raises(ConfigError, match="no 'quick' plan"):
        DemoPlan.load("quick", bad)


def test_quiet_output_moves_fd_level_output_to_the_log(tmp_path, capfd):
    import logging
    import warnings

    from retinaedge.console import quiet_output

    log_path = tmp_path / "run.log"
    with quiet_output(log_path) as where:
        os.write(1, b"C-level stdout\n")
        os.write(2, b"C-level stderr\n")
        print("python print")
        warnings.warn("a third-party warning", UserWarning, stacklevel=1)
        logging.getLogger("nncf").warning("ranking layers")
        where.console.print("for the user")
    captured = capfd.readouterr()
    text = log_path.read_text()
    for line in ("C-level stdout", "C-level stderr", "python print", "a third-party warning", "ranking layers"):
        assert line in text and line not in captured.out + captured.err, line
    assert "for the user" in captured.err and "for the user" not in text
    os.write(2, b"after\n")  # descriptors are restored
    assert "after" in capfd.readouterr().err
