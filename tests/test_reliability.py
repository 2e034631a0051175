"""Reliability and security suite: injected faults, hostile inputs, API fuzzing. Writes reports/reliability.md.

`make reliability` runs it with --runslow (more results, PostgreSQL restart); the default run is bounded for CI.
"""
from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import text

from companion_api.core.config import Settings
from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
from companion_api.crud import create_principal
from edge_runtime.outbox import Outbox

from .conftest import POSTGRES_URL as POSTGRES
from .conftest import ROOT, encode, postgres_available, reset_postgres
from .faults import FaultyProxy, ServerProcess

REPORT: dict[str, list] = {"faults": [], "hostile": [], "fuzz": []}


@pytest.fixture(scope="module", autouse=True)
def write_report():
    yield
    lines = ["# RetinaEdge reliability report", "", "## Faults injected", "",
             "| scenario | results | faults injected | lost | duplicated | acknowledged |", "|---|---|---|---|---|---|"]
    for f in REPORT["faults"]:
        lines.append(f"| {f['scenario']} | {f['results']} | {f['faults']} | {f['lost']} | {f['duplicated']} | {f['acknowledged']} |")
    total_lost = sum(f["lost"] for f in REPORT["faults"])
    total_dup = sum(f["duplicated"] for f in REPORT["faults"])
    lines += ["", f"lost: {total_lost}", f"duplicated: {total_dup}", "", "## Hostile inputs", "",
              "| input | `retinaedge grade` | POST /v1/predict | POST /v1/sync |", "|---|---|---|---|"]
    lines += [f"| {h['name']} | {h['grade']} | {h['predict']} | {h['sync']} |" for h in REPORT["hostile"]]
    lines += ["", "## API fuzzing (schemathesis)", "", "| operation | cases | server errors (5xx) |", "|---|---|---|"]
    lines += [f"| {f['operation']} | {f['cases']} | {f['errors']} |" for f in REPORT["fuzz"]]
    out = ROOT / "reports" / "reliability.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def _fresh_database(tmp_path: Path) -> str:
    if postgres_available():
        reset_postgres()
        return POSTGRES
    return f"sqlite:///{tmp_path / 'server.db'}"


PRODUCER = """
import sys, uuid, datetime
import cv2, numpy as np
from edge_runtime.outbox import Outbox
PNG = cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
from edge_runtime.wire import QualityReport, ScreeningResult
box, n = Outbox(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    key = f"capture-{i}"
    if box.has_capture(key):
        continue
    # Device clocks drift: every 50th capture is stamped hours ahead (inside the server's +1 day window) or
    # more than a year back.
    skew = datetime.timedelta(hours=(20 if i % 100 == 0 else -400 * 24)) if i % 50 == 0 else datetime.timedelta()
    at = (datetime.datetime.now(datetime.timezone.utc) + skew).isoformat()
    probs = [0.05] * 5
    probs[i % 5] = 0.8
    r = ScreeningResult(result_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"retinaedge/{i}")), device_id="edge-1",
                        model_version="v", model_sha256="a" * 64, backend="onnxruntime", provider="CPU",
                        quality=QualityReport(True, 0.9), grade=i % 5, probabilities=tuple(probs), confidence=0.8,
                        referable=i % 5 >= 2, threshold=0.5, captured_at=at)
    box.put(r, overlay=PNG, capture_key=key)
    print(r.result_id, flush=True)
"""

SYNCER = """
import sys
from edge_runtime.outbox import Outbox
from edge_runtime.sync import SyncClient
box = Outbox(sys.argv[1])
client = SyncClient(sys.argv[2], sys.argv[3], box, batch_size=10, timeout=3.0, base_delay=0.05, max_delay=0.5)
client.run(max_rounds=5000)
print("drained", box.counts(), flush=True)
"""


def _run_producer(db: Path, n: int, kill_after: int | None) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(db), str(n)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    reported = []
    if kill_after is not None:
        while len(reported) < kill_after:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(line.strip())
        proc.kill()
    reported += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    proc.wait()
    return reported


def _server_state(url: str) -> dict[str, str]:
    engine = make_engine(Settings(DATABASE_URL=url).DATABASE_URL)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT result_id, content_hash FROM results")).fetchall()
    engine.dispose()
    return {r[0]: r[1] for r in rows}


def test_faults_lose_nothing_and_store_nothing_twice(tmp_path, request):
    slow = request.config.getoption("--runslow")
    n = 3000 if slow else 1000
    url = _fresh_database(tmp_path)
    settings_url = Settings(DATABASE_URL=url).DATABASE_URL
    run_migrations(settings_url)
    with make_sessionmaker(make_engine(settings_url))() as session:
        token = create_principal(session=session, name="edge-1", role="device")
    server = ServerProcess(url, cwd=str(ROOT))
    server.start()
    proxy = FaultyProxy(server.port)
    db = tmp_path / "edge.db"
    faults = {"edge SIGKILL mid-write": 0, "edge SIGKILL mid-sync": 0, "server SIGKILL mid-batch": 0,
              "network delay": 0, "network cut": 0, "network reset": 0, "PostgreSQL restart": 0,
              "duplicate replay": 0, "clock skew (results)": 0}
    try:
        reported = []
        for kill_after in (n // 4, n // 2):  # killed twice mid-write, then run to completion
            reported += _run_producer(db, n, kill_after)
            faults["edge SIGKILL mid-write"] += 1
        reported += _run_producer(db, n, None)
        faults["clock skew (results)"] = sum(1 for i in range(n) if i % 50 == 0)
        rng = random.Random(7)
        syncer = None
        deadline = time.time() + (600 if slow else 240)
        round_no = 0
        while time.time() < deadline:
            if syncer is None or syncer.poll() is not None:
                if Outbox(db).counts()["pending"] + Outbox(db).counts()["sent"] == 0:
                    break
                syncer = subprocess.Popen([sys.executable, "-c", SYNCER, str(db), f"http://127.0.0.1:{proxy.port}", token],
                                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.1, 0.3))
            round_no += 1
            action = ("delay", "cut", "kill_sync", "reset", "kill_server", "pass", "pg")[round_no % 7]
            if action in ("delay", "cut", "reset"):
                proxy.inject(action)
            elif action == "kill_sync" and syncer.poll() is None:
                syncer.kill()
                syncer.wait()
                faults["edge SIGKILL mid-sync"] += 1
            elif action == "kill_server":
                server.kill()
                faults["server SIGKILL mid-batch"] += 1
                server.start()
            elif action == "pg" and slow and url == POSTGRES and faults["PostgreSQL restart"] < 2:
                import glob

                version = sorted(glob.glob("/etc/postgresql/*"))[-1].rsplit("/", 1)[1]
                if subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                                  capture_output=True, timeout=120).returncode == 0:
                    faults["PostgreSQL restart"] += 1
        if syncer and syncer.poll() is None:
            syncer.wait(timeout=120)
        faults["network delay"], faults["network cut"], faults["network reset"] = (
            proxy.faults["delay"], proxy.faults["cut"], proxy.faults["reset"])
        # Duplicate replay: pretend 200 acknowledged results were never confirmed and send them again.
        box = Outbox(db)
        with box.transaction() as conn:
            conn.execute("UPDATE results SET state = 'pending' WHERE rowid IN (SELECT rowid FROM results LIMIT 200)")
        faults["duplicate replay"] = 200
        from edge_runtime.sync import SyncClient

        SyncClient(f"http://127.0.0.1:{server.port}", token, box, batch_size=100).run(max_rounds=50)
        stored = _server_state(url)
        local = dict(box.db.execute("SELECT result_id, content_hash FROM results").fetchall())
        counts = box.counts()
    finally:
        proxy.close()
        server.stop()
    lost_on_device = len(set(reported) - set(local))
    lost_on_server = len(set(local) - set(stored))
    mismatched = sum(1 for rid, h in local.items() if rid in stored and stored[rid] != h)
    engine = make_engine(settings_url)
    with engine.connect() as conn:
        total_rows = conn.execute(text("SELECT COUNT(*) FROM results")).scalar()
    duplicated = total_rows - len(set(stored)) + mismatched
    REPORT["faults"].append({"scenario": f"{n} results, {'PostgreSQL' if url == POSTGRES else 'SQLite'}",
                             "results": len(local), "faults": ", ".join(f"{k} x{v}" for k, v in faults.items() if v),
                             "lost": lost_on_device + lost_on_server, "duplicated": duplicated,
                             "acknowledged": counts["acknowledged"]})
    assert len(local) == n and lost_on_device == 0 and lost_on_server == 0
    assert duplicated == 0 and counts["acknowledged"] == n and len(stored) == n


def _hostile_files(fundus: np.ndarray) -> dict[str, bytes]:
    jpg, png = encode(fundus), encode(fundus, ".png")
    big = np.zeros((100, 100, 3), np.uint8)
    ok, tiny_png = cv2.imencode(".png", big)

    def png_bomb(w: int, h: int) -> bytes:
        raw = zlib.compress(b"\x00" * (1 + w * 3) * 64)  # only 64 rows of data: the header claims far more
        ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
        chunk = lambda t, d: len(d).to_bytes(4, "big") + t + d + zlib.crc32(t + d).to_bytes(4, "big")  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")

    import io

    from PIL import Image

    def pil(mode: str, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image = Image.fromarray(cv2.cvtColor(fundus, cv2.COLOR_BGR2RGB))
        image.convert(mode).save(buf, format=fmt, **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x010E] = "x" * 60000  # ImageDescription: a ~60 kB EXIF block
    return {
        "truncated JPEG": jpg[: len(jpg) // 3], "truncated PNG": png[: len(png) // 3], "empty file": b"",
        "random bytes": np.random.default_rng(1).bytes(20000), "decompression bomb (PNG 30000x30000)": png_bomb(30000, 30000),
        "100-megapixel header": png_bomb(10000, 10000), "CMYK JPEG": pil("CMYK", "JPEG"),
        "16-bit PNG": encode((fundus.astype(np.uint16) * 257), ".png"), "RGBA PNG": pil("RGBA", "PNG"),
        "grayscale JPEG": pil("L", "JPEG"), "HTML polyglot": b"<html><script>alert(1)</script></html>" + jpg[:100],
        "SVG": b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'><rect width='10' height='10'/></svg>",
        "huge EXIF block": pil("RGB", "JPEG", exif=exif.tobytes()), "JPEG named .png (wrong extension)": jpg,
        "GIF": pil("P", "GIF"), "black frame (no fundus)": encode(np.zeros((300, 300, 3), np.uint8)),
        "1x1 pixel": encode(np.full((1, 1, 3), 128, np.uint8)), "all-white frame": encode(np.full((200, 200, 3), 255, np.uint8)),
        "PDF header": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj", "zip archive": b"PK\x03\x04" + bytes(100),
        "JPEG with trailing garbage": jpg + np.random.default_rng(2).bytes(5000), "tiny PNG": tiny_png.tobytes(),
    }


def test_hostile_inputs_get_typed_errors(tmp_path, tiny_artifacts, tiny_run, fundus_bgr):
    from fastapi.testclient import TestClient

    from companion_api.main import create_app
    from edge_runtime.errors import ImageError
    from edge_runtime.screen import Screener

    files = _hostile_files(fundus_bgr)
    assert len(files) >= 20
    artifact = tiny_artifacts[0][("onnx", "fp32")].path
    box = Outbox(tmp_path / "edge.db")
    screener = Screener.from_artifact(artifact, outbox=box)
    screener.screen_bytes(encode(fundus_bgr), "good.jpg")  # something already stored that must survive
    settings = Settings(DATABASE_URL=f"sqlite:///{tmp_path / 's.db'}", TEACHER_CHECKPOINT=str(tiny_run.best_checkpoint),
                        RATE_LIMIT="100000/minute", MAX_BODY_BYTES=5_000_000, MAX_IMAGE_BYTES=2_000_000)
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        token = create_principal(session=session, name="edge-1", role="device")
    headers = {"Authorization": f"Bearer {token}"}
    from edge_runtime.wire import QualityReport, ScreeningResult

    with TestClient(app, raise_server_exceptions=False) as client:
        seed = ScreeningResult(device_id="edge-1", model_version="v", model_sha256="a" * 64, backend="b", provider="p",
                               quality=QualityReport(True, 1.0), grade=1, probabilities=(0.1, 0.8, 0.05, 0.03, 0.02),
                               confidence=0.8, referable=False, threshold=0.5)
        client.post("/v1/sync", headers=headers, json={"results": [{"result": seed.to_dict(), "content_hash": seed.content_hash()}]})
        for name, data in files.items():
            try:
                outcome = screener.screen_bytes(data, name).result.outcome
            except ImageError as exc:
                outcome = type(exc).__name__
            r = client.post("/v1/predict", headers=headers, files={"file": (name, data, "application/octet-stream")})
            assert r.status_code < 500, (name, r.status_code, r.text)
            predict = f"{r.status_code}" + (f" {r.json().get('outcome')}" if r.status_code == 200 else "")
            r2 = ScreeningResult(device_id="edge-1", model_version="v", model_sha256="a" * 64, backend="b", provider="p",
                                 quality=QualityReport(True, 1.0), grade=0, probabilities=(0.8, 0.1, 0.05, 0.03, 0.02),
                                 confidence=0.8, referable=False, threshold=0.5)
            s = client.post("/v1/sync", headers=headers, json={"results": [
                {"result": r2.to_dict(), "content_hash": r2.content_hash(), "overlay_png_b64": base64.b64encode(data).decode(),
                 "image_b64": base64.b64encode(data).decode()}]})
            assert s.status_code < 500, (name, s.status_code)
            sync = f"{s.status_code} {s.json()['items'][0]['status']}" if s.status_code == 200 else str(s.status_code)
            REPORT["hostile"].append({"name": name, "grade": outcome, "predict": predict, "sync": sync})
        history = client.get("/v1/history", headers=headers).json()
        assert any(row["result_id"] == seed.result_id for row in history["data"])  # nothing stored was lost
    assert box.counts()["pending"] >= 1
    # The CLI reports each bad file with its typed error and keeps going.
    paths = []
    for i, data in enumerate(list(files.values())[:6]):
        paths.append(tmp_path / f"h{i}.jpg")
        paths[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "grade", *map(str, paths), "--artifact", artifact, "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 6 and proc.returncode in (0, 1) and "Traceback" not in proc.stderr


def test_api_fuzzing_finds_no_server_errors(tmp_path, tiny_run, request):
    import schemathesis
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck
    from hypothesis import settings as hsettings

    from companion_api.main import create_app

    settings = Settings(DATABASE_URL=f"sqlite:///{tmp_path / 'fuzz.db'}", TEACHER_CHECKPOINT=str(tiny_run.best_checkpoint),
                        RATE_LIMIT="100000/minute")
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        token = create_principal(session=session, name="fuzz-dev", role="device")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    max_examples = 60 if request.config.getoption("--runslow") else 12
    client = TestClient(app, raise_server_exceptions=False)
    for result in schema.get_all_operations():
        operation = result.ok()
        errors = cases = 0
        strategy = operation.as_strategy()

        @hsettings(max_examples=max_examples, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
        def check(case):
            nonlocal errors, cases
            kwargs = case.as_transport_kwargs(base_url="http://testserver", headers={"Authorization": f"Bearer {token}"})
            kwargs.pop("base_url", None)
            response = client.request(**{k: v for k, v in kwargs.items() if k in ("method", "url", "headers", "params", "json", "content", "files", "data", "cookies")})
            cases += 1
            errors += response.status_code >= 500

        from hypothesis import given

        given(strategy)(check)()
        REPORT["fuzz"].append({"operation": f"{operation.method.upper()} {operation.path}", "cases": cases, "errors": errors})
    assert sum(f["errors"] for f in REPORT["fuzz"]) == 0, REPORT["fuzz"]


def test_security_controls(tmp_path):
    from fastapi.testclient import TestClient

    from companion_api.crud import revoke_principal
    from companion_api.main import create_app

    app = create_app(Settings(DATABASE_URL=f"sqlite:///{tmp_path / 'sec.db'}", RATE_LIMIT="5/minute", MAX_BODY_BYTES=10_000))
    with app.state.sessionmaker() as session:
        a = create_principal(session=session, name="a", role="device")
        b = create_principal(session=session, name="b", role="device")
        revoke_principal(session=session, name="b")
    with TestClient(app) as client:
        assert client.get("/v1/history").status_code == 401
        assert client.get("/v1/history", headers={"Authorization": f"Bearer {b}"}).status_code == 401
        # An injection attempt is not a device name (422); another device's name is forbidden (403).
        assert client.get("/v1/history?device=a' OR '1'='1", headers={"Authorization": f"Bearer {a}"}).status_code == 422
        assert client.get("/v1/history?device=b", headers={"Authorization": f"Bearer {a}"}).status_code == 403
        assert client.post("/v1/sync", content=b"x" * 20_000, headers={"Authorization": f"Bearer {a}",
                                                                       "Content-Type": "application/json"}).status_code == 413
        codes = [client.get("/v1/history", headers={"Authorization": f"Bearer {a}"}).status_code for _ in range(8)]
        assert 429 in codes
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://evil.example"}).headers
