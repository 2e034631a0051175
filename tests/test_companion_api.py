import base64
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from companion_api.core.config import Settings
from companion_api.crud import create_principal
from companion_api.main import create_app
from edge_runtime.signing import generate_key_pair
from edge_runtime.wire import QualityReport, ScreeningResult

from .conftest import POSTGRES_URL, encode, postgres_available, reset_postgres

PUBLISHER_KEYS = generate_key_pair()  # (private, public) PEM of the test publisher


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path, tiny_run):
    if request.param == "postgres":
        if not postgres_available():
            pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
        reset_postgres()
        url = POSTGRES_URL
    else:
        url = f"sqlite:///{tmp_path / 'server.db'}"
    settings = Settings(DATABASE_URL=url, TEACHER_CHECKPOINT=str(tiny_run.best_checkpoint), RATE_LIMIT="1000/minute",
                        ARTIFACT_DIR=str(tmp_path / "store"), GEMINI_API_KEY=None, MAX_BODY_BYTES=3_000_000,
                        PUBLISHER_KEYS=[PUBLISHER_KEYS[1].decode()])
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        tokens = {name: create_principal(session=session, name=name, role=role)
                  for name, role in (("dev-a", "device"), ("dev-b", "device"), ("rev", "reviewer"),
                                     ("pub", "publisher"))}
    with TestClient(app) as client:
        yield client, tokens, app


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def probabilities_for(grade: int) -> tuple[float, ...]:
    """A distribution whose argmax is ``grade`` and whose P(grade >= 2) is >= 0.5 exactly when grade >= 2."""
    probs = [0.05] * 5
    probs[grade] = 0.8
    return tuple(probs)


def result(device="dev-a", grade=2, **kw):
    probs = probabilities_for(grade)
    return ScreeningResult(device_id=device, model_version="v1", model_sha256="a" * 64, backend="onnxruntime",
                           provider="CPUExecutionProvider", quality=QualityReport(True, 0.9, (), {"mean": 100.0}),
                           grade=grade, probabilities=probs, confidence=probs[grade], threshold=0.5,
                           referable=grade >= 2, cam_peak=(0.4, 0.5), **kw)


TINY_PNG = cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()


def entry(r, overlay=TINY_PNG):
    return {"result": r.to_dict(), "content_hash": r.content_hash(),
            "overlay_png_b64": base64.b64encode(overlay).decode() if overlay else None}


def test_health_is_public_everything_else_needs_a_token(server):
    client, tokens, _ = server
    assert client.get("/health").json() == {"status": "ok", "rate_limits": "memory"}
    assert client.get("/v1/history").status_code == 401
    assert client.get("/v1/history", headers=auth("red_wrong")).status_code == 401


def test_sync_rejects_fake_or_bomb_overlays(server):
    client, tokens, _ = server
    r = client.post("/v1/sync", json={"results": [entry(result(), overlay=b"\x89PNG\r\n\x1a\nnot really")]},
                    headers=auth(tokens["dev-a"]))
    assert r.json()["items"][0]["status"] == "rejected"


def test_sync_is_idempotent_and_detects_conflicts(server):
    client, tokens, _ = server
    a, b = result(), result(grade=0)
    r = client.post("/v1/sync", json={"results": [entry(a), entry(b)]}, headers=auth(tokens["dev-a"]))
    assert [i["status"] for i in r.json()["items"]] == ["stored", "stored"]
    r = client.post("/v1/sync", json={"results": [entry(a)]}, headers=auth(tokens["dev-a"]))
    assert r.json()["items"][0]["status"] == "duplicate"
    changed = entry(result(grade=4, result_id=a.result_id))
    assert client.post("/v1/sync", json={"results": [changed]}, headers=auth(tokens["dev-a"])).json()["items"][0]["status"] == "conflict"
    history = client.get("/v1/history", headers=auth(tokens["dev-a"])).json()
    assert history["count"] == 2 and history["data"][0]["disclaimer"]


def test_devices_read_only_their_own_results(server):
    client, tokens, _ = server
    a = result()
    client.post("/v1/sync", json={"results": [entry(a)]}, headers=auth(tokens["dev-a"]))
    assert client.get(f"/v1/results/{a.result_id}", headers=auth(tokens["dev-a"])).status_code == 200
    assert client.get(f"/v1/results/{a.result_id}", headers=auth(tokens["dev-b"])).status_code == 404
    assert client.get("/v1/history?device=dev-a", headers=auth(tokens["dev-b"])).status_code == 403
    assert client.get("/v1/history", headers=auth(tokens["dev-b"])).json()["count"] == 0
    assert client.get("/v1/history?device=dev-a", headers=auth(tokens["rev"])).json()["count"] == 1
    spoof = result(device="dev-a")
    r = client.post("/v1/sync", json={"results": [entry(spoof)]}, headers=auth(tokens["dev-b"]))
    assert r.json()["items"][0]["status"] == "rejected"
    assert client.post("/v1/sync", json={"results": []}, headers=auth(tokens["rev"])).status_code == 403


def test_history_filters_and_pagination(server):
    client, tokens, _ = server
    batch = [result(grade=g % 5) for g in range(12)]
    client.post("/v1/sync", json={"results": [entry(r) for r in batch]}, headers=auth(tokens["dev-a"]))
    h = auth(tokens["rev"])
    assert client.get("/v1/history?grade=0", headers=h).json()["count"] == 3
    assert client.get("/v1/history?referable=true", headers=h).json()["count"] == 6
    seen, cursor = [], None
    while True:  # pages are read by key: follow next_cursor until the last page
        page = client.get("/v1/history", params={"limit": 5, **({"cursor": cursor} if cursor else {})}, headers=h).json()
        seen += [r["result_id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 12 and page["count"] == 2
    assert client.get("/v1/history?cursor=bm90LWEtY3Vyc29y", headers=h).status_code == 422
    assert client.get("/history?grade=1", headers=h).status_code == 200  # alias
    assert client.get("/v1/history?grade=1' OR 1=1 --", headers=h).status_code == 422


def test_revoked_token_and_rate_limit(server, tmp_path):
    client, tokens, app = server
    from companion_api.crud import revoke_principal

    with app.state.sessionmaker() as session:
        revoke_principal(session=session, name="dev-b")
    assert client.get("/v1/history", headers=auth(tokens["dev-b"])).status_code == 401
    from companion_api.ratelimit import RateLimiter

    app.state.limiter = RateLimiter("3/minute")
    codes = [client.get("/v1/history", headers=auth(tokens["dev-a"])).status_code for _ in range(5)]
    assert codes[:3] == [200] * 3 and codes[3] == 429


def test_oversize_body_rejected(server):
    client, tokens, _ = server
    big = {"results": [entry(result(), overlay=TINY_PNG + b"0" * 3_000_000)]}
    assert client.post("/v1/sync", json=big, headers=auth(tokens["dev-a"])).status_code == 413


def test_predict_with_gradcam_and_bad_images(server, fundus_bgr):
    client, tokens, _ = server
    r = client.post("/v1/predict", files={"file": ("eye.jpg", encode(fundus_bgr), "image/jpeg")}, headers=auth(tokens["dev-a"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "not diagnose" in body["disclaimer"] and body["backend"] == "pytorch"
    if body["outcome"] == "ungradable":  # the device's quality gate, at the Screener's decode scale, refused it
        assert body["grade"] is None and body["quality"]["reasons"] and body["overlay_png_b64"] is None
    else:
        # Decided at the teacher's val-chosen operating point, through the same decide() as the device.
        assert 0 <= body["grade"] <= 4 and (body["grade"] >= 2) == (body["referable_probability"] >= body["threshold"])
        assert body["referable"] == (body["referable_probability"] >= body["threshold"])
        assert "sensitivity" in body["operating_point"]
        assert base64.b64decode(body["overlay_png_b64"])[:4] == b"\x89PNG"
    assert client.get(f"/v1/results/{body['result_id']}", headers=auth(tokens["dev-a"])).status_code == 200
    assert client.post("/predict", files={"file": ("x.jpg", b"garbage", "image/jpeg")}, headers=auth(tokens["dev-a"])).status_code == 422


@pytest.mark.parametrize("size", [256, 768])
def test_predict_runs_the_device_screener_path(server, tiny_artifacts, size):
    """One JPEG gets the same quality verdict and decision from /v1/predict (FP32 teacher) as from a device's
    Screener on the FP32 ONNX export of the same checkpoint: one decode scale, one gate, one decide()."""
    from edge_runtime.screen import Screener
    from training.data.synthetic import generate_fundus

    client, tokens, _ = server
    data = encode(generate_fundus(3, size, np.random.default_rng(11)).image)
    device = Screener.from_artifact(tiny_artifacts[0][("onnx", "fp32")].path, allow_ungated=True).screen_bytes(data)
    r = client.post("/v1/predict", files={"file": ("eye.jpg", data, "image/jpeg")}, headers=auth(tokens["dev-a"]))
    assert r.status_code == 200, r.text
    body, expected = r.json(), device.result
    assert body["quality"]["gradable"] == expected.quality.gradable
    assert body["quality"]["reasons"] == list(expected.quality.reasons)
    assert body["quality"]["metrics"] == pytest.approx(expected.quality.metrics, rel=1e-6, abs=1e-9)
    assert (body["outcome"], body["grade"], body["referable"]) == (expected.outcome, expected.grade, expected.referable)
    if expected.probabilities is not None:
        assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-4)


def test_insight_guideline_fallback_is_cached(server):
    client, tokens, app = server
    a = result(grade=3)
    client.post("/v1/sync", json={"results": [entry(a)]}, headers=auth(tokens["dev-a"]))
    first = client.post(f"/v1/results/{a.result_id}/insight", headers=auth(tokens["dev-a"])).json()
    assert first["source"] == "guideline" and first["referral_urgency"] == "urgent" and first["follow_up_interval"] == "< 3 months"
    app.state.settings.GEMINI_API_KEY = "now-configured"  # cached: no second generation
    assert client.post(f"/v1/results/{a.result_id}/insight", headers=auth(tokens["rev"])).json() == first


def test_model_distribution_round_trip(server, tiny_artifacts, tmp_path):
    client, tokens, _ = server
    from datetime import datetime, timedelta, timezone

    from edge_runtime.signing import Release, sign_manifest

    record = tiny_artifacts[0][("onnx", "fp32")]
    release = Release(1, datetime.now(timezone.utc) + timedelta(days=30))
    manifest = json.dumps(sign_manifest(json.load(open(record.path + ".manifest.json")), PUBLISHER_KEYS[0],
                                        release=release))
    with open(record.path, "rb") as fh:
        r = client.post("/v1/models", files={"artifact": ("m.onnx", fh)}, data={"manifest": manifest}, headers=auth(tokens["pub"]))
    assert r.status_code == 200, r.text
    latest = client.get("/v1/models/latest?format=onnx", headers=auth(tokens["dev-a"])).json()
    assert latest["sha256"] == record.sha256
    blob = client.get(latest["download_url"], headers=auth(tokens["dev-a"])).content
    import hashlib

    assert hashlib.sha256(blob).hexdigest() == record.sha256
    # The edge client downloads it, verifies the checksum, and only then puts it in place.
    from edge_runtime.backends import open_session
    from edge_runtime.errors import ArtifactError
    from edge_runtime.updates import fetch_latest_model

    transport = _ASGISyncTransport(client)
    publisher = PUBLISHER_KEYS[1]
    fetched = fetch_latest_model("http://testserver", tokens["dev-a"], "onnx", tmp_path / "models", transport=transport,
                                 trusted_key=publisher)
    assert open_session(fetched).info.manifest.sha256 == record.sha256
    transport.tamper = True
    with pytest.raises(ArtifactError, match="sha256"):
        fetch_latest_model("http://testserver", tokens["dev-a"], "onnx", tmp_path / "models2", transport=transport,
                           trusted_key=publisher)
    assert not any((tmp_path / "models2").glob("*.onnx"))
    with open(record.path, "rb") as fh:  # devices cannot upload
        assert client.post("/v1/models", files={"artifact": ("m.onnx", fh)}, data={"manifest": manifest},
                           headers=auth(tokens["dev-a"])).status_code == 403


class _FakeGemini(BaseHTTPRequestHandler):
    mode = "ok"
    prompts: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeGemini.prompts.append(json.dumps(body))
        if _FakeGemini.mode == "slow":
            import time

            time.sleep(3)
        text = {"ok": json.dumps({"summary": "Moderate NPDR <b>refer</b> https://evil.example", "follow_up_interval": "3-6 months",
                                  "referral_urgency": "soon", "caveats": ["Screening aid only."]}),
                "malformed": "{not json", "slow": "{}"}[_FakeGemini.mode]
        payload = json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first, as the slow case intends

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode, source", [("ok", "gemini"), ("malformed", "guideline"), ("slow", "guideline")])
def test_real_genai_sdk_against_fake_gemini(mode, source):
    from companion_api.insights import make_insight

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGemini)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _FakeGemini.mode, _FakeGemini.prompts = mode, []
    settings = Settings(GEMINI_API_KEY="test-key", GEMINI_BASE_URL=f"http://127.0.0.1:{httpd.server_port}",
                        GEMINI_TIMEOUT_S=1.0)
    try:
        body, got = make_insight(settings, 2, 0.8, {"gradable": True, "score": 0.9}, [0.4, 0.5], "graded")
    finally:
        httpd.shutdown()
    assert got == source
    assert _FakeGemini.prompts, "the SDK never reached the fake endpoint"
    assert "patient" not in _FakeGemini.prompts[0].split("no patient data")[1] if "no patient data" in _FakeGemini.prompts[0] else True
    if source == "gemini":
        assert "<b>" not in body.summary and "http" not in body.summary and body.referral_urgency == "soon"
    else:
        assert body.follow_up_interval == "3-6 months"  # ICO: moderate NPDR


def test_guideline_table_and_resource_setting():
    from companion_api.insights import guideline_insight

    assert guideline_insight(0, "graded").follow_up_interval == "1-2 years"
    assert guideline_insight(1, "graded").follow_up_interval == "6-12 months"
    assert guideline_insight(1, "graded", "low").follow_up_interval == "1-2 years"
    assert guideline_insight(4, "graded").follow_up_interval == "< 1 month"
    assert guideline_insight(None, "ungradable").referral_urgency == "retake"


def test_edge_sync_client_against_real_server(server, onnx_or_none=None):
    """The edge SyncClient drains an outbox into the real app (no network: ASGI transport)."""

    client, tokens, app = server
    import tempfile

    from edge_runtime.outbox import Outbox
    from edge_runtime.sync import SyncClient
    with tempfile.TemporaryDirectory() as tmp:
        box = Outbox(f"{tmp}/o.db")
        for g in range(7):
            box.put(result(grade=g % 5), overlay=TINY_PNG)
        transport = _ASGISyncTransport(client)
        SyncClient("http://testserver", tokens["dev-a"], box, batch_size=3, transport=transport).run()
        assert box.counts()["acknowledged"] == 7
    assert client.get("/v1/history", headers=auth(tokens["dev-a"])).json()["count"] == 7


class _ASGISyncTransport(httpx.BaseTransport):
    """Routes httpx requests through the TestClient (sync) so the edge client talks to the real app."""

    def __init__(self, test_client):
        self.test_client, self.tamper = test_client, False

    def handle_request(self, request):
        r = self.test_client.request(request.method, request.url.path, params=dict(request.url.params),
                                     content=request.read(), headers=dict(request.headers))
        content = r.content
        if self.tamper and "/download" in request.url.path:
            content = content[:-1] + bytes([content[-1] ^ 1])  # one flipped bit in transit
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=content)



def test_rate_limits_shared_through_redis():
    """Two app instances (two workers) share one counter when REDIS_URL is set."""
    import redis as redis_client

    from companion_api.ratelimit import RateLimiter

    try:
        redis_client.Redis.from_url("redis://127.0.0.1:6379").ping()
    except Exception:  # noqa: BLE001
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    rule = "4/minute"
    key = f"token-{uuid.uuid4()}"
    worker_a, worker_b = RateLimiter(rule, "redis://127.0.0.1:6379"), RateLimiter(rule, "redis://127.0.0.1:6379")
    hits = [worker_a.hit(key), worker_b.hit(key), worker_a.hit(key), worker_b.hit(key), worker_a.hit(key)]
    assert hits == [True, True, True, True, False]
    assert 1 <= worker_b.retry_after(key) <= 60
