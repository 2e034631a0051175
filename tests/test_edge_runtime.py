import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from edge_runtime.backends import open_session
from edge_runtime.errors import ArtifactError, BackendUnavailableError, ImageError, ManifestError
from edge_runtime.outbox import Outbox
from edge_runtime.screen import Screener
from edge_runtime.sync import SyncClient

from .conftest import ROOT, encode


@pytest.fixture
def onnx_artifact(tiny_artifacts):
    return tiny_artifacts[0][("onnx", "fp32")].path


def test_edge_commands_do_not_import_torch(onnx_artifact, tmp_path, fundus_bgr):
    image = tmp_path / "eye.png"
    image.write_bytes(encode(fundus_bgr, ".png"))
    code = (
        "import sys, json\n"
        "from retinaedge.cli import app\n"
        "from edge_runtime.screen import Screener\n"
        "from edge_runtime.sync import SyncClient\n"
        "from edge_runtime.watch import watch_folder\n"
        f"s = Screener.from_artifact({onnx_artifact!r})\n"
        f"r = s.screen_file({str(image)!r}).result\n"
        "assert r.quality.gradable and r.outcome in ('graded', 'uncertain') and r.grade in range(5), r\n"
        "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_loading_refuses_missing_manifest_and_tampered_file(onnx_artifact, tmp_path):
    copy = tmp_path / "m.onnx"
    shutil.copy(onnx_artifact, copy)
    with pytest.raises(ManifestError, match="no manifest"):
        open_session(copy)
    shutil.copy(str(onnx_artifact) + ".manifest.json", str(copy) + ".manifest.json")
    assert open_session(copy).info.provider == "CPUExecutionProvider"
    with open(copy, "ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(ArtifactError, match="sha256"):
        open_session(copy)
    (tmp_path / "m.pt").write_bytes(b"torch pickle")
    with pytest.raises(ArtifactError, match="unknown artifact suffix"):
        open_session(tmp_path / "m.pt")


def test_unavailable_provider_is_explicit(onnx_artifact):
    with pytest.raises(BackendUnavailableError, match="Available|available"):
        open_session(onnx_artifact, providers=("TensorrtExecutionProvider", "CPUExecutionProvider"))
    session = open_session(onnx_artifact, providers=("CUDAExecutionProvider", "CPUExecutionProvider"), allow_fallback=True)
    assert session.info.fallback and session.info.provider == "CPUExecutionProvider"


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_screening_result_carries_everything(tiny_artifacts, fundus_bgr, tmp_path, fmt):
    path = tiny_artifacts[0][(fmt, "int8")].path
    box = Outbox(tmp_path / "outbox.db")
    screener = Screener.from_artifact(path, allow_ungated=True, device_id="dev-1", outbox=box)
    screening = screener.screen_bytes(encode(fundus_bgr), "eye.jpg")
    r = screening.result
    point = screener.session.info.manifest.operating_point
    assert point.rule == "sensitivity"  # chosen on val by the training run, carried by the manifest
    assert 0 <= r.grade <= 4 and abs(sum(r.probabilities) - 1) < 1e-4
    assert r.threshold == point.threshold and r.referable == (r.referable_probability >= point.threshold)
    band = point.uncertain_band
    assert r.outcome == ("uncertain" if band and band[0] <= r.referable_probability < band[1] else "graded")
    assert 0 <= r.cam_peak[0] <= 1 and 0 <= r.cam_peak[1] <= 1
    assert r.backend == ("onnxruntime" if fmt == "onnx" else "litert") and r.provider
    assert r.model_sha256 == tiny_artifacts[0][(fmt, "int8")].sha256
    assert set(r.latency_ms) == {"decode", "fov", "quality", "preprocess", "infer", "decide", "cam", "store"}
    assert screening.overlay_png[:8] == b"\x89PNG\r\n\x1a\n"
    stored, state = box.get(r.result_id)
    assert state == "pending" and stored.grade == r.grade


def test_ungradable_capture_is_stored_with_advice(onnx_artifact, fundus_bgr, tmp_path):
    import cv2

    box = Outbox(tmp_path / "o.db")
    screener = Screener.from_artifact(onnx_artifact, outbox=box)
    blurred = cv2.GaussianBlur(fundus_bgr, (0, 0), 8)
    r = screener.screen_bytes(encode(blurred), "blurry.jpg").result
    assert r.outcome == "ungradable" and r.grade is None and r.quality.reasons
    assert box.counts()["pending"] == 1
    with pytest.raises(ImageError):
        screener.screen_bytes(b"not an image")
    assert box.counts()["pending"] == 1  # bad input stores nothing and loses nothing


KILL_SCRIPT = """
import sys, time
from edge_runtime.outbox import Outbox
from edge_runtime.wire import QualityReport, ScreeningResult
box = Outbox(sys.argv[1])
for i in range(100000):
    r = ScreeningResult(device_id="d", model_version="v", model_sha256="", backend="b", provider="p",
                        quality=QualityReport(True, 1.0), grade=i % 5, image_name=f"{i}.jpg", threshold=0.5,
                        probabilities=tuple(0.8 if g == i % 5 else 0.05 for g in range(5)), referable=i % 5 >= 2)
    box.put(r, overlay=b"x" * 20000)
    print(r.result_id, flush=True)  # reported only after the commit returned
"""


def test_outbox_survives_sigkill_mid_write(tmp_path):
    db = tmp_path / "kill.db"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(db)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    reported = []
    deadline = time.time() + 60
    while len(reported) < 40 and time.time() < deadline:
        reported.append(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    reported += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    proc.wait()
    box = Outbox(db)
    rows = box.db.execute("SELECT result_id, payload, overlay FROM results").fetchall()
    stored = {r[0] for r in rows}
    assert set(reported) <= stored, "a result reported to the user was lost"
    assert all(json.loads(p)["result_id"] == rid and len(o) == 20000 for rid, p, o in rows), "half-written row"
    assert box.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class FakeServer:
    """Follows the sync contract in edge_runtime.sync; can rate-limit, fail, and forget to answer."""

    def __init__(self):
        self.stored, self.calls, self.script = {}, 0, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        assert request.headers["Authorization"] == "Bearer tok"
        action = self.script.pop(0) if self.script else "ok"
        if action == "429":
            return httpx.Response(429, headers={"Retry-After": "2"})
        if action == "500":
            return httpx.Response(500, text="boom")
        if action == "drop":
            raise httpx.ConnectError("connection reset")
        items = []
        for entry in json.loads(request.content)["results"]:
            rid = entry["result"]["result_id"]
            if rid in self.stored:
                status = "duplicate" if self.stored[rid] == entry["content_hash"] else "conflict"
            else:
                self.stored[rid], status = entry["content_hash"], "stored"
            items.append({"result_id": rid, "status": status})
        if action == "partial":
            items = items[:1]
        return httpx.Response(200, json={"items": items})


def _fill(box, n):
    from edge_runtime.wire import QualityReport, ScreeningResult

    for i in range(n):
        box.put(ScreeningResult(device_id="d", model_version="v", model_sha256="", backend="b", provider="p",
                                quality=QualityReport(True, 1.0), grade=i % 5, threshold=0.5, referable=i % 5 >= 2,
                                probabilities=tuple(0.8 if g == i % 5 else 0.05 for g in range(5))), overlay=b"png")


def test_sync_backoff_retry_after_and_partial_acks(tmp_path):
    box = Outbox(tmp_path / "s.db")
    _fill(box, 12)
    server, sleeps = FakeServer(), []
    server.script = ["429", "500", "drop", "partial"]
    client = SyncClient("http://server", "tok", box, batch_size=5, transport=httpx.MockTransport(server),
                        sleep=sleeps.append)
    report = client.run(max_rounds=20)
    assert box.counts() == {"pending": 0, "sent": 0, "acknowledged": 12, "rejected": 0}
    assert len(server.stored) == 12 and report.errors == 2
    assert sleeps[0] == 2.0  # Retry-After honoured
    assert 1.0 <= sleeps[1] <= 3.0 and 2.0 <= sleeps[2] <= 6.0  # exponential backoff with jitter


def test_sync_replay_is_idempotent_and_survives_restart(tmp_path):
    db = tmp_path / "r.db"
    box = Outbox(db)
    _fill(box, 6)
    server = FakeServer()
    transport = httpx.MockTransport(server)
    server.script = ["drop"] * 3
    SyncClient("http://s", "tok", box, batch_size=3, transport=transport, sleep=lambda s: None).run(max_rounds=2)
    box.close()
    box = Outbox(db)  # device restarted
    # Simulate a lost answer: the server stored the batch but the device never heard back.
    first = box.due(3)
    for item in first:
        server.stored[item.result.result_id] = item.content_hash
    SyncClient("http://s", "tok", box, batch_size=3, transport=transport, sleep=lambda s: None).run(max_rounds=10)
    assert box.counts()["acknowledged"] == 6 and len(server.stored) == 6


def test_watch_grades_each_image_once_across_restarts(onnx_artifact, fundus_bgr, tmp_path):
    from edge_runtime.watch import watch_folder

    captures = tmp_path / "captures"
    captures.mkdir()
    for i in range(3):
        (captures / f"eye{i}.jpg").write_bytes(encode(fundus_bgr))
    (captures / "broken.jpg").write_bytes(b"garbage")
    box = Outbox(tmp_path / "w.db")
    screener = Screener.from_artifact(onnx_artifact, outbox=box)
    assert watch_folder(captures, screener, box, once=True) == 3
    box.close()
    box = Outbox(tmp_path / "w.db")
    screener = Screener.from_artifact(onnx_artifact, outbox=box)
    assert watch_folder(captures, screener, box, once=True) == 0
    (captures / "eye9.jpg").write_bytes(encode(fundus_bgr))
    assert watch_folder(captures, screener, box, once=True) == 1
    assert sum(box.counts().values()) == 4


def test_cli_grade_json(onnx_artifact, fundus_bgr, tmp_path):
    image = tmp_path / "eye.jpg"
    image.write_bytes(encode(fundus_bgr))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "grade", str(image), str(tmp_path / "bad.jpg"),
                           "--artifact", onnx_artifact, "--json", "--save-overlay", str(tmp_path / "ov")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1  # one image failed
    good, bad = lines
    for key in ("grade", "grade_name", "probabilities", "confidence", "referable", "quality", "cam_peak", "overlay",
                "model_version", "model_sha256", "backend", "provider", "latency_ms"):
        assert key in good
    assert set(good["quality"]) == {"gradable", "score", "reasons", "metrics"}
    assert bad["error"] == "UnreadableImageError"
    # The gradable photo's CAM overlay is written where asked, as a PNG.
    assert good["overlay"] == str(tmp_path / "ov" / "eye_cam.png")
    assert (tmp_path / "ov" / "eye_cam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.realdata
def test_quality_gate_on_real_photos(shared_data):
    from benchmarks.quality_report import run

    result = run(shared_data / "eyepacs_full", "test", limit=30)
    assert result["false_reject_rate"] <= 0.1
    for name, rate in result["detection"].items():
        assert rate >= 0.7, (name, rate)


def test_cam_peak_maps_to_lesion_location(onnx_artifact):
    """The CAM machinery maps a peak from model-input space back to original-image coordinates."""
    from edge_runtime.cam import cam_peak
    from edge_runtime.contract import PreprocessPolicy
    from edge_runtime.preprocess import preprocess

    img = np.zeros((300, 600, 3), np.uint8)
    import cv2

    cv2.circle(img, (400, 150), 140, (40, 80, 160), -1)
    pre = preprocess(img, PreprocessPolicy(input_size=64))
    cam = np.zeros((8, 8), np.float32)
    cam[2, 6] = 1.0  # upper right of the fundus
    x, y = cam_peak(cam, pre)
    assert x > 400 / 600 and y < 0.5


def test_cli_grades_an_encounter_folder_and_refers_per_visit(onnx_artifact, fundus_bgr, tmp_path):
    """A folder per visit: eyes from the file names, one decision per visit by the per-visit rule."""
    import cv2

    visit = tmp_path / "V0042"
    visit.mkdir()
    (visit / "V0042_left.jpg").write_bytes(encode(fundus_bgr))
    (visit / "V0042_right.jpg").write_bytes(encode(cv2.GaussianBlur(fundus_bgr, (0, 0), 12)))  # ungradable retake
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "grade", str(visit), "--artifact", onnx_artifact,
                           "--json", "--outbox", str(tmp_path / "o.db")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *eyes, visit_line = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(e["eye"], e["encounter_id"]) for e in eyes} == {("left", "V0042"), ("right", "V0042")}
    right = next(e for e in eyes if e["eye"] == "right")
    assert right["outcome"] == "ungradable"
    # An ungradable eye refers the whole visit, whatever the other eye shows.
    assert visit_line["encounter"] == "V0042" and visit_line["decision"] == "refer"
    assert "right eye ungradable" in visit_line["reason"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_litert_large_batches_run_in_chunks_with_the_same_outputs(tiny_artifacts, precision):
    """A static-batch TFLite graph runs a large batch as resized chunks (the last one padded); every photo's
    outputs must be what it gets alone."""
    from edge_runtime.backends.litert import CHUNK

    session = open_session(tiny_artifacts[0][("tflite", precision)].path, allow_ungated=True)
    size = session.info.manifest.preprocess.input_size
    batch = np.random.default_rng(0).random((CHUNK + 5, 3, size, size), dtype=np.float32)
    together = session.run_heads(batch)
    assert session._chunked, "the graph was not resized: the batch ran photo by photo"
    alone = [session.run_heads(batch[i:i + 1]) for i in (0, CHUNK - 1, CHUNK, CHUNK + 4)]
    for i, out in zip((0, CHUNK - 1, CHUNK, CHUNK + 4), alone, strict=True):
        np.testing.assert_allclose(together.logits[i], out.logits[0], atol=1e-5)
        np.testing.assert_allclose(together.cam[i], out.cam[0], atol=1e-5)
    assert together.logits.shape[0] == CHUNK + 5
