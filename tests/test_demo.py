"""`retinaedge demo --quick`: the whole pipeline end to end on synthetic data (about a minute on 2 cores)."""
import json
import subprocess
import sys

from .conftest import ROOT


def test_quick_demo_produces_every_output(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.html", "summary.json", "artifacts/index.json", "bench/report.json", "bench/report.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    formats = {(a["format"], a["precision"]) for a in summary["artifacts"] if a["status"] == "ok"}
    assert {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("coreml", "fp16")} <= formats
    assert summary["server"]["stored_on_server"] == len(summary["graded"]) > 0
    assert summary["server"]["outbox"]["acknowledged"] == len(summary["graded"])
    assert all(i["source"] in ("guideline", "gemini") for i in summary["server"]["insights"])
    assert any(g["overlay"] for g in summary["graded"])
    assert "does not diagnose" in (out / "report.html").read_text()
