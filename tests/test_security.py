"""Server side of the hostile probes: one test per finding, named after it; SQLite and PostgreSQL.

Each test reproduces the probe's input and asserts the fixed behaviour (before the fix each one failed: the
probe's numbers are quoted in the docstrings). The second round's tests (a re-test after the first fixes) follow
the first round's, from "Round two" on.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from companion_api.core.config import Settings
from companion_api.crud import create_principal, revoke_principal
from companion_api.main import create_app
from edge_runtime.contract import ArtifactManifest
from edge_runtime.signing import generate_key_pair, sign_manifest
from edge_runtime.wire import QualityReport, ScreeningResult

from .conftest import POSTGRES_URL, ROOT, postgres_available, reset_postgres
from .test_companion_api import auth, entry, result

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def database_url(kind: str, tmp_path) -> str:
    if kind == "postgres":
        if not postgres_available():
            pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
        reset_postgres()
        return POSTGRES_URL
    return f"sqlite:///{tmp_path / 'server.db'}"


PUBLISHER_PRIVATE, PUBLISHER_PUBLIC = generate_key_pair()


def make_server(url: str, tmp_path, **overrides):
    settings = Settings(**{"DATABASE_URL": url, "RATE_LIMIT": "1000/minute", "ARTIFACT_DIR": str(tmp_path / "store"),
                           "GEMINI_API_KEY": None, "MAX_BODY_BYTES": 3_000_000,
                           "PUBLISHER_KEYS": [PUBLISHER_PUBLIC.decode()], **overrides})
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        tokens = {name: create_principal(session=session, name=name, role=role)
                  for name, role in (("dev-a", "device"), ("dev-b", "device"), ("rev", "reviewer"),
                                     ("pub", "publisher"))}
    return app, tokens


@pytest.fixture(params=BACKENDS)
def server(request, tmp_path):
    app, tokens = make_server(database_url(request.param, tmp_path), tmp_path)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, tokens, app


def sync(client, token, *entries):
    response = client.post("/v1/sync", json={"results": list(entries)}, headers=auth(token))
    assert response.status_code == 200, response.text
    return [item["status"] for item in response.json()["items"]], response.json()["items"]


def raw_entry(data: dict) -> dict:
    """An entry for a hand-edited result dict (content_hash over the text as sent, as a naive client would)."""
    return {"result": data, "content_hash": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------------- High


@pytest.mark.parametrize("captured_at", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_high1_far_future_captured_at_is_rejected_and_review_stays_up(server, captured_at):
    """Probe: stored with 200, then /review, reviewer and device /v1/history answered 500 for good on PostgreSQL.
    (A time no UTC calendar holds is still rejected; a merely implausible one is stored with the server's clock.)"""
    client, tokens, _ = server
    data = result().to_dict()
    data["captured_at"] = captured_at
    statuses, items = sync(client, tokens["dev-a"], raw_entry(data), entry(result(grade=4)))
    assert statuses == ["rejected", "stored"] and "plausible window" in items[0]["detail"]
    for token in (tokens["rev"], tokens["dev-a"]):
        history = client.get("/v1/history", headers=auth(token))
        assert history.status_code == 200 and history.json()["count"] == 1
    client.cookies.set("retinaedge_token", tokens["rev"])
    page = client.get("/review")
    client.cookies.clear()
    assert page.status_code == 200 and "4 - Proliferative DR" in page.text


def test_high1_offsets_are_normalised_to_utc_and_filter_correctly(server):
    """Probe: SQLite dropped the offset; 10:00+05:30 came back as naive 10:00 and fell in the wrong window."""
    client, tokens, _ = server
    r = result(captured_at="2026-03-01T10:00:00+05:30")
    assert sync(client, tokens["dev-a"], entry(r))[0] == ["stored"]
    h = auth(tokens["rev"])
    row = client.get(f"/v1/results/{r.result_id}", headers=h).json()
    assert datetime.fromisoformat(row["captured_at"]) == datetime(2026, 3, 1, 4, 30, tzinfo=timezone.utc)
    assert row["result"]["captured_at"] == "2026-03-01T04:30:00+00:00"
    window = {"since": "2026-03-01T04:00:00+00:00", "until": "2026-03-01T05:00:00+00:00"}
    assert client.get("/v1/history", params=window, headers=h).json()["count"] == 1
    # The same instant written with another offset selects it too; the naive wall-clock 10:00 window does not.
    assert client.get("/v1/history", params={"since": "2026-03-01T05:00:00+00:30", "until": "2026-03-01T06:00:00+01:00"},
                      headers=h).json()["count"] == 1
    assert client.get("/v1/history", params={"since": "2026-03-01T09:30:00", "until": "2026-03-01T10:30:00"},
                      headers=h).json()["count"] == 0


def test_high1_capture_window_is_configurable(tmp_path):
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, CAPTURED_AT_MAX_FUTURE_S=0,
                              CAPTURED_AT_MIN=datetime(2020, 1, 1, tzinfo=timezone.utc))
    soon = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    results = [result(captured_at=soon), result(captured_at="2019-06-01T00:00:00+00:00"), result()]
    with TestClient(app) as client:
        statuses, _ = sync(client, tokens["dev-a"], *[entry(r) for r in results])
        assert statuses == ["stored"] * 3  # outside the window: stored with the server's clock, skew recorded
        skews = [client.get(f"/v1/results/{r.result_id}", headers=auth(tokens["rev"])).json()["device_clock_skew_s"]
                 for r in results]
    assert 3000 < skews[0] < 3700 and skews[1] < -86_400 * 365 and skews[2] is None


def test_high2_chunked_body_is_cut_at_the_limit_before_auth():
    """Probe: a chunked 400 MB body with a wrong token was read completely before the 401 (0.48 -> 1.10 GB)."""
    from companion_api.middleware import BodyLimitMiddleware

    limit, chunk, pulled, reached = 100_000, 16_384, [0], []

    async def endless_receive():
        pulled[0] += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": True}

    async def app(scope, receive, send):  # authentication would start here
        reached.append(scope["path"])

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/sync", "headers": [(b"transfer-encoding", b"chunked"),
                                                                               (b"authorization", b"Bearer wrong")]}
    asyncio.run(BodyLimitMiddleware(app, limit)(scope, endless_receive, send))
    assert sent[0]["status"] == 413 and reached == []
    assert pulled[0] <= limit + chunk  # stopped reading as soon as the limit was crossed


def test_high2_chunked_body_over_the_limit_gets_413_not_401(server):
    client, tokens, _ = server

    def stream():
        for _ in range(400):  # 400 x 16 KiB = 6.5 MB, more than twice the 3 MB limit, without Content-Length
            yield b"x" * 16_384

    response = client.post("/v1/sync", content=stream(), headers={**auth("red_wrong"), "Content-Type": "application/json"})
    assert response.status_code == 413
    assert client.post("/v1/sync", content=stream(), headers=auth(tokens["dev-a"])).status_code == 413


def test_high2_free_text_fields_and_collections_are_capped(server):
    """Probe: a 60 MB disclaimer was stored and every later history response was 60 MB."""
    client, tokens, _ = server
    long_text = result().to_dict() | {"disclaimer": "x" * 1_000_000}
    many_reasons = result().to_dict()
    many_reasons["quality"]["reasons"] = ["blur"] * 1000
    many_metrics = result().to_dict()
    many_metrics["quality"]["metrics"] = {f"m{i}": 1.0 for i in range(1000)}
    statuses, items = sync(client, tokens["dev-a"], raw_entry(long_text), raw_entry(many_reasons), raw_entry(many_metrics))
    assert statuses == ["rejected"] * 3, items
    assert client.get("/v1/history", headers=auth(tokens["dev-a"])).json()["count"] == 0


# -------------------------------------------------------------------------------------------------- Medium


class _FakeGemini(BaseHTTPRequestHandler):
    answer: dict = {}

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        text = json.dumps(_FakeGemini.answer)
        payload = json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


def _gemini(answer: dict, grade: int, outcome: str = "graded", dme_present: bool | None = None):
    from companion_api.insights import make_insight

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGemini)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _FakeGemini.answer = answer
    settings = Settings(GEMINI_API_KEY="test-key", GEMINI_BASE_URL=f"http://127.0.0.1:{httpd.server_port}",
                        GEMINI_TIMEOUT_S=5.0)
    try:
        return make_insight(settings, grade, 0.9, {"gradable": True, "score": 0.9}, [0.4, 0.5], outcome, dme_present,
                            None if dme_present is None else 0.8)
    finally:
        httpd.shutdown()


def test_medium5_insight_that_lowers_urgency_is_rejected():
    """Probe: "urgency none, follow up in 2 years, no signs of DR" for a grade-4 result was cached and shown."""
    body, source = _gemini({"summary": "No signs of diabetic retinopathy.", "follow_up_interval": "2 years",
                            "referral_urgency": "none", "caveats": []}, grade=4)
    assert source == "guideline" and body.referral_urgency == "urgent" and body.follow_up_interval == "< 1 month"


def test_medium5_urgency_and_interval_come_from_the_ico_table():
    body, source = _gemini({"summary": "Moderate changes; refer.", "follow_up_interval": "whenever convenient",
                            "referral_urgency": "urgent", "caveats": ["Screening aid only."]}, grade=2)
    assert source == "gemini" and body.summary == "Moderate changes; refer."
    assert (body.referral_urgency, body.follow_up_interval) == ("soon", "3-6 months")  # the table, not the model


def test_medium5_sanitiser_drops_unclosed_tags_and_script_urls_and_refills_empty_fields():
    """Probe: `<img src=x onerror=...` (no closing >) and `javascript:` survived into the JSON API output."""
    from companion_api.insights import validate_untrusted

    body = validate_untrusted(json.dumps({
        "summary": "Refer soon <img src=x onerror=alert(document.cookie)", "follow_up_interval": "<b></b>",
        "referral_urgency": "soon", "caveats": ["see javascript:alert(1) and https://evil.example/x", "<script>x</script>"]}),
        grade=2)
    text = json.dumps(body.model_dump())
    for bad in ("<", ">", "onerror", "javascript", "https://", "script"):
        assert bad not in text, (bad, text)
    assert body.summary == "Refer soon" and body.follow_up_interval == "3-6 months"
    assert body.caveats == ["see and"]
    empty = validate_untrusted(json.dumps({"summary": "<i></i>", "follow_up_interval": " ", "referral_urgency": "soon",
                                           "caveats": []}), grade=2)
    assert empty.summary.startswith("Moderate non-proliferative DR") and empty.caveats


def test_medium4_insights_refer_grade_0_with_dme_and_the_prompt_carries_dme():
    """Re-test: grade 0 with DME present (referable) got urgency "none", follow-up 1-2 years; no DME in the prompt."""
    from companion_api.insights import build_prompt, guideline_insight

    body = guideline_insight(0, "graded", dme_present=True)
    assert (body.referral_urgency, body.follow_up_interval) == ("urgent", "< 1 month")
    assert "macular oedema" in body.summary
    assert guideline_insight(0, "graded", dme_present=False).referral_urgency == "none"
    facts = json.loads(build_prompt(0, 0.9, {"gradable": True}, None, "standard", True, 0.81).split("\n", 1)[1])
    assert facts["diabetic_macular_oedema_present"] is True and facts["dme_probability"] == 0.81
    # Gemini's "none" for grade 0 + DME is lower than the guideline: not shown.
    reply, source = _gemini({"summary": "No diabetic retinopathy.", "follow_up_interval": "1-2 years",
                             "referral_urgency": "none", "caveats": []}, grade=0, dme_present=True)
    assert source == "guideline" and reply.referral_urgency == "urgent"


@pytest.mark.parametrize("grade, dme, summary", [
    (4, None, "Proliferative changes, but no referral is needed; routine screening in 1-2 years."),
    (0, True, "Findings look normal; annual screening is enough."),
    (0, None, "Refer urgently to an ophthalmologist."),
])
def test_low1_gemini_text_that_contradicts_the_guideline_urgency_is_not_shown(grade, dme, summary):
    """Re-test: the structured urgency was replaced by the table's, but a summary saying the opposite was shown."""
    urgency = {4: "urgent", 0: "urgent" if dme else "none"}[grade]
    reply, source = _gemini({"summary": summary, "follow_up_interval": "x", "referral_urgency": urgency,
                             "caveats": []}, grade=grade, dme_present=dme)
    assert source == "guideline" and summary not in reply.summary


def test_medium6_contradictory_records_are_rejected_and_the_server_derives_names(server):
    """Probe: grade 4 + referable false + "No DR"; ungradable with grade 4; graded with grade null; NaN/-1/Inf
    probabilities stored as null or summing to 3; grade "3" or true coerced; the page printed "4 - No DR"."""
    client, tokens, _ = server
    base = result(grade=4).to_dict()
    cases = {
        "grade 4, not referable, No DR": {"referable": False, "grade_name": "No DR"},
        "ungradable with grade 4": {"outcome": "ungradable"},
        "graded without grade": {"grade": None, "grade_name": None},
        "probabilities sum to 3": {"probabilities": [0.6, 0.6, 0.6, 0.6, 0.6]},
        "negative probability": {"probabilities": [-1.0, 0.5, 0.5, 0.5, 0.5]},
        "grade as text": {"grade": "4", "grade_name": None},
        "grade as bool": {"grade": True, "grade_name": None},
    }
    entries = []
    for change in cases.values():
        data = {**base, **change}
        if data.get("grade_name") is None:
            data.pop("grade_name")
        entries.append(raw_entry(data))
    statuses, items = sync(client, tokens["dev-a"], *entries)
    assert statuses == ["rejected"] * len(cases), list(zip(cases, items, strict=True))
    # Non-finite numbers as Python's json writes them (NaN, Infinity): rejected, never stored as null, never 500.
    for token in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps({"results": [raw_entry(base)]}).replace('"confidence": 0.8', f'"confidence": {token}')
        response = client.post("/v1/sync", content=body, headers={**auth(tokens["dev-a"]), "Content-Type": "application/json"})
        assert response.status_code == 200 and response.json()["items"][0]["status"] == "rejected"
    assert client.get("/v1/history", headers=auth(tokens["rev"])).json()["count"] == 0
    good = result(grade=4)
    sync(client, tokens["dev-a"], entry(good))
    row = client.get(f"/v1/results/{good.result_id}", headers=auth(tokens["rev"])).json()
    assert (row["grade_name"], row["referable"]) == ("Proliferative DR", True)


def _upload(client, token, manifest: ArtifactManifest, blob: bytes, sequence: int | None = 1, days: float = 30,
            key=PUBLISHER_PRIVATE):
    """Upload as a publisher does: the manifest signed with a release (unsigned when ``sequence`` is None)."""
    from edge_runtime.signing import Release

    data = manifest.to_dict()
    if sequence is not None:
        data = sign_manifest(data, key, release=Release(sequence, datetime.now(timezone.utc) + timedelta(days=days)))
    return client.post("/v1/models", files={"artifact": ("m.onnx", blob)}, data={"manifest": json.dumps(data)},
                       headers=auth(token))


def _model(blob: bytes, version: str = "m-1", **kw) -> ArtifactManifest:
    kw.setdefault("gate", {"status": "not_required"})  # an FP32 artifact: ready to screen
    return ArtifactManifest.from_dict({"model_name": "m", "model_version": version, "format": "onnx",
                                       "sha256": hashlib.sha256(blob).hexdigest(), **kw})


def test_medium8_model_upload_ignores_model_version_as_a_path_and_a_failed_upload_keeps_the_live_artifact(server, tmp_path):
    """Probe: model_version ../../../x wrote outside ARTIFACT_DIR; a wrong-sha upload deleted the live artifact."""
    client, tokens, app = server
    blob = b"onnx bytes of model one"
    assert _upload(client, tokens["pub"], _model(blob, "../../../escape"), blob).status_code == 422
    manifest = _model(blob)
    first = _upload(client, tokens["pub"], manifest, blob)
    assert first.status_code == 200, first.text
    store = tmp_path / "store"
    assert not any(tmp_path.parent.rglob("escape*")) and [p.parent for p in store.iterdir()] == [store]
    assert ".." not in first.json()["filename"] and "/" not in first.json()["filename"]
    # Same version, wrong checksum: refused, and the live artifact is untouched and still downloadable.
    bad = _upload(client, tokens["pub"], manifest, b"tampered bytes", sequence=2)
    assert bad.status_code == 422
    latest = client.get("/v1/models/latest?format=onnx", headers=auth(tokens["dev-a"])).json()
    assert latest["sha256"] == manifest.sha256
    assert client.get(latest["download_url"], headers=auth(tokens["dev-a"])).content == blob
    assert not list(store.glob("*.part")) and len(list(store.iterdir())) == 1


def test_medium2_only_publishers_publish_models(server):
    """Re-test: a reviewer token published models to every device."""
    client, tokens, _ = server
    blob = b"a model"
    assert _upload(client, tokens["rev"], _model(blob), blob).status_code == 403
    assert _upload(client, tokens["dev-a"], _model(blob), blob).status_code == 403
    assert _upload(client, tokens["pub"], _model(blob), blob).status_code == 200


def test_low7_server_publishes_only_signed_newer_releases_with_their_size(server, tmp_path):
    """Re-test: the server published any manifest a reviewer uploaded (unsigned, ../ versions, no size), and
    "latest" was the newest upload, so a replayed older release became the fleet's update."""
    client, tokens, app = server
    pub = tokens["pub"]
    one, two = b"model one bytes", b"model two bytes, longer"
    assert _upload(client, pub, _model(one), one, sequence=None).status_code == 422  # unsigned
    assert _upload(client, pub, _model(one), one, days=-1).status_code == 422  # expired
    other_private, _ = generate_key_pair()
    refused = _upload(client, pub, _model(one), one, key=other_private)
    assert refused.status_code == 422 and "not one this device trusts" in refused.json()["detail"]
    failed = _model(one, gate={"status": "failed", "failures": ["agreement 0.41 < 0.95"]})
    assert _upload(client, pub, failed, one).status_code == 422
    assert _upload(client, pub, _model(two, "m-2"), two, sequence=2).status_code == 200
    assert _upload(client, pub, _model(one), one, sequence=1).status_code == 409  # older than the published release
    assert _upload(client, pub, _model(one), one, sequence=2).status_code == 409  # a sequence is used once
    latest = client.get("/v1/models/latest?format=onnx", headers=auth(tokens["dev-a"])).json()
    assert (latest["sequence"], latest["size_bytes"], latest["manifest"]["model_version"]) == (2, len(two), "m-2")
    assert latest["manifest"]["signature"]["release"]["sequence"] == 2  # as signed, so devices can verify it
    # A revoked publisher key is refused; a development server may take unsigned uploads, production may not.
    app.state.settings.REVOKED_PUBLISHER_KEYS = [latest["manifest"]["signature"]["key_id"]]
    assert _upload(client, pub, _model(one, "m-3"), one, sequence=3).status_code == 422
    app.state.settings.ALLOW_UNSIGNED_MODELS = True
    assert _upload(client, pub, _model(one, "m-dev"), one, sequence=None).status_code == 200
    with pytest.raises(ValueError, match="development setting"):
        Settings(ENV="production", DATABASE_URL=POSTGRES_URL, ALLOW_UNSIGNED_MODELS=True)


def test_medium10_opposite_order_batches_do_not_deadlock_and_busy_answers_503(tmp_path):
    """Probe: two batches with the same ids in opposite order gave 6 of 40 requests DeadlockDetected (500)."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    app, tokens = make_server(database_url("postgres", tmp_path), tmp_path)
    ids = [result(grade=g % 5) for g in range(40)]
    forward = [entry(r, overlay=None) for r in ids]
    codes: list[int] = []
    with TestClient(app, raise_server_exceptions=False) as client:
        def send(order):
            for _ in range(5):
                codes.append(client.post("/v1/sync", json={"results": order}, headers=auth(tokens["dev-a"])).status_code)

        threads = [threading.Thread(target=send, args=(forward if i % 2 else forward[::-1],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 40
        assert client.get("/v1/history?limit=500", headers=auth(tokens["dev-a"])).json()["count"] == 40

    # A serialization failure the retries cannot resolve answers 503 with Retry-After, not 500.
    from sqlalchemy.exc import OperationalError

    import companion_api.api.routes.sync as sync_route

    class Busy(Exception):
        sqlstate = "40P01"

    def always_busy(**kwargs):
        raise OperationalError("INSERT", {}, Busy("deadlock detected"))

    original, sync_route.store_batch = sync_route.store_batch, always_busy
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post("/v1/sync", json={"results": forward[:1]}, headers=auth(tokens["dev-a"]))
    finally:
        sync_route.store_batch = original
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


# ----------------------------------------------------------------------------------------------------- Low


def test_low_nan_and_lone_surrogate_answer_422_without_echoing_the_input(server):
    client, tokens, _ = server
    h = {**auth(tokens["dev-a"]), "Content-Type": "application/json"}
    for body in ('{"results": [{"result": {}, "content_hash": NaN}]}',
                 '{"results": [{"result": {}, "content_hash": "\\ud800"}]}',
                 '{"results": NaN}', '{"\\ud800": 1, "results": []}', '{"results": [1e999]}'):
        response = client.post("/v1/sync", content=body, headers=h)
        assert response.status_code == 422, (body, response.status_code, response.text)
        assert "input" not in response.text and "ud800" not in response.text.replace("\\\\ud800", "")
    # Inside a result: a per-item rejection whose detail does not carry the input either.
    data = result().to_dict() | {"image_name": "\ud800"}
    body = json.dumps({"results": [raw_entry(data | {"image_name": "x"}) | {"result": data}]})
    response = client.post("/v1/sync", content=body, headers=h)
    assert response.status_code == 200 and response.json()["items"][0]["status"] == "rejected"


def test_low_redis_down_degrades_to_in_process_limits_and_health_says_so(tmp_path):
    """Probe: Redis unreachable -> every authenticated request was 500 while /health said ok."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, REDIS_URL="redis://127.0.0.1:1/0",
                              RATE_LIMIT="3/minute")
    with TestClient(app, raise_server_exceptions=False) as client:
        codes = [client.get("/v1/history", headers=auth(tokens["dev-a"])).status_code for _ in range(4)]
        health = client.get("/health").json()
    assert codes == [200, 200, 200, 429]  # still limited, in-process
    assert health == {"status": "degraded", "rate_limits": "memory (Redis unreachable)"}


def test_low_wrong_tokens_are_rate_limited(tmp_path):
    """Probe: 340 wrong tokens, no 429."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, AUTH_FAILURE_LIMIT="10/minute")
    with TestClient(app) as client:
        codes = [client.get("/v1/history", headers=auth(f"red_guess{i}")).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
        # The address is throttled for every wrong token it tries next; a valid token still passes.
        assert client.get("/v1/history", headers=auth("red_guess-next")).status_code == 429


def test_low_review_pages_through_every_result(tmp_path):
    """Probe: 100 results dated 2099 pushed a real grade-4 result off /review, which showed the newest 100."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, REVIEW_PAGE_SIZE=5)
    now = datetime.now(timezone.utc)
    target = result(grade=4, captured_at=(now - timedelta(days=30)).isoformat())
    newer = [result(grade=0, captured_at=(now - timedelta(minutes=i)).isoformat()) for i in range(12)]
    with TestClient(app) as client:
        future = result().to_dict() | {"captured_at": "2099-01-01T00:00:00+00:00"}
        statuses, _ = sync(client, tokens["dev-a"], raw_entry(future), entry(target), *[entry(r) for r in newer])
        assert statuses[0] == "stored"  # with the server's clock: it sorts as received now, not as 2099
        client.cookies.set("retinaedge_token", tokens["rev"])
        pages, url = [], "/review"
        while url:
            page = client.get(url)
            assert page.status_code == 200
            pages.append(page.text)
            marker = "id='next' href='"
            url = page.text.split(marker)[1].split("'")[0].replace("&amp;", "&") if marker in page.text else None
    assert len(pages) == 3 and "4 - Proliferative DR" in pages[-1] and "5 shown" in pages[0] and "4 shown" in pages[-1]


@pytest.mark.parametrize("path", ["/v1/results/%00", "/v1/results/" + "a" * 300, "/v1/history?device=%00",
                                  "/v1/history?device=" + "d" * 300, "/v1/results/%ff%fe", "/v1/history?since=%00",
                                  "/v1/results/00000000-0000-0000-0000-000000000000/overlay.png?device=%00",
                                  "/v1/history?since=9999-12-31T23:59:59-05:00", "/v1/history?group=%00",
                                  "/review?device=%00"])
def test_low_odd_paths_answer_404_or_422_not_500(server, path):
    client, tokens, _ = server
    response = client.get(path, headers=auth(tokens["rev"]))
    assert response.status_code in (404, 422), response.text


def test_low_revoked_device_name_can_be_reissued(server):
    client, tokens, app = server
    sync(client, tokens["dev-b"], entry(result(device="dev-b")))
    with app.state.sessionmaker() as session:
        with pytest.raises(ValueError, match="already exists"):
            create_principal(session=session, name="dev-b", role="device")
        revoke_principal(session=session, name="dev-b")
        new_token = create_principal(session=session, name="dev-b", role="device")
    assert client.get("/v1/history", headers=auth(tokens["dev-b"])).status_code == 401  # the old token stays dead
    history = client.get("/v1/history", headers=auth(new_token))
    assert history.status_code == 200 and history.json()["count"] == 1  # the name keeps its history


def test_low_no_id_oracle_and_no_squatting(server):
    """Probe: another device's id answered "belongs to another device"; a squatted id got the owner's result rejected."""
    client, tokens, _ = server
    owner = result(device="dev-a")
    squat = result(device="dev-b", grade=0, result_id=owner.result_id)
    statuses, items = sync(client, tokens["dev-b"], entry(squat))
    assert statuses == ["stored"] and "another device" not in json.dumps(items)
    assert sync(client, tokens["dev-a"], entry(owner))[0] == ["stored"]  # the owner is not locked out
    mine = client.get(f"/v1/results/{owner.result_id}", headers=auth(tokens["dev-a"])).json()
    assert mine["grade"] == 2 and mine["device"] == "dev-a"
    assert client.get(f"/v1/results/{owner.result_id}", headers=auth(tokens["dev-b"])).json()["grade"] == 0
    assert client.get(f"/v1/results/{owner.result_id}?device=dev-a", headers=auth(tokens["rev"])).json()["grade"] == 2
    unknown = client.get(f"/v1/results/{uuid.uuid4()}", headers=auth(tokens["dev-b"]))
    foreign = client.get(f"/v1/results/{result().result_id}", headers=auth(tokens["dev-b"]))
    assert unknown.status_code == foreign.status_code == 404 and unknown.json() == foreign.json()


def test_low_content_hash_is_verified(server):
    client, tokens, _ = server
    r = result()
    forged = entry(r) | {"content_hash": "f" * 64}
    statuses, items = sync(client, tokens["dev-a"], forged)
    assert statuses == ["rejected"] and "content_hash" in items[0]["detail"]
    assert sync(client, tokens["dev-a"], entry(r))[0] == ["stored"]


def test_low_database_errors_do_not_log_sql_parameters(server):
    """Probe: a database error's traceback carried every SQL parameter, the result payload included."""
    client, tokens, app = server
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    payload = f"secret-payload-{uuid.uuid4().hex}"  # built at run time, so the test's own source line cannot hold it
    with pytest.raises(DBAPIError) as error, app.state.engine.begin() as conn:
        conn.execute(text("INSERT INTO principals (name) VALUES (:name)"), {"name": payload})
    logged = "".join(traceback.format_exception(error.value))
    assert payload not in logged and "parameters hidden" in logged


def test_low_cookie_is_secure_and_pages_send_csp_and_frame_protection(server):
    client, tokens, _ = server
    login = client.post("/review/login", data={"token": tokens["rev"]}, follow_redirects=False)
    cookie = login.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    for path in ("/review/login", "/health", "/v1/history"):
        headers = client.get(path).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert "script-src" not in client.get("/review/login").headers["content-security-policy"]  # default-src 'none'


# --------------------------------------------------------------------------------------------- Encounters


def test_encounters_are_stored_grouped_and_decided(server):
    client, tokens, _ = server
    clean = dict(grade=0)
    visit_refer = [result(encounter_id="visit-1", eye="left", **clean), result(encounter_id="visit-1", eye="right", grade=3)]
    visit_clean = [result(encounter_id="visit-2", eye="left", **clean), result(encounter_id="visit-2", eye="right", **clean)]
    blurred = ScreeningResult(device_id="dev-a", model_version="v1", model_sha256="a" * 64, backend="onnxruntime",
                              provider="CPU", quality=QualityReport(False, 0.1, ("blurred",)), outcome="ungradable",
                              encounter_id="visit-3", eye="left")
    visit_ungradable = [blurred, result(encounter_id="visit-3", eye="right", **clean)]
    visit_half = [result(encounter_id="visit-4", eye="left", **clean)]
    everything = visit_refer + visit_clean + visit_ungradable + visit_half + [result()]
    assert sync(client, tokens["dev-a"], *[entry(r) for r in everything])[0] == ["stored"] * len(everything)
    grouped = client.get("/v1/history?group=encounter", headers=auth(tokens["dev-a"])).json()
    decisions = {e["encounter_id"]: (e["decision"], e["reason"]) for e in grouped["data"]}
    assert grouped["count"] == 4 and decisions == {
        "visit-1": ("refer", "right eye referable"), "visit-2": ("no_referral", "both eyes gradable and not referable"),
        "visit-3": ("refer", "left eye ungradable after retakes"), "visit-4": ("incomplete", "no gradable photo of the right eye yet")}
    first = next(e for e in grouped["data"] if e["encounter_id"] == "visit-1")
    assert first["left"]["grade"] == 0 and first["right"]["grade"] == 3 and "not diagnose" in first["disclaimer"]
    client.cookies.set("retinaedge_token", tokens["rev"])
    page = client.get("/review?view=encounters").text
    assert page.count("class='encounter'") == 4 and "REFER" in page and "not diagnose" in page
    assert "3 - Severe NPDR" in page and "not captured" in page


# -------------------------------------------------------------------------------------------- Concurrency

SYNC_WORKER = """
import json, random, sys, httpx
base, token, seed, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.stdin.read())
rng = random.Random(seed)
out = []
with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
    for batch in batches:
        if rng.random() < 0.5:
            batch = batch[::-1]
        r = client.post("/v1/sync", json={"results": batch})
        out.append({"code": r.status_code, "items": r.json().get("items", []) if r.status_code == 200 else []})
print(json.dumps(out))
"""


@pytest.mark.slow  # 13-15 s per database (8 client processes + a uvicorn server)
@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrency_eight_processes_sync_same_and_conflicting_ids(kind, tmp_path, monkeypatch):
    """8 client processes at once: shared ids (same content), conflicting ids (each process its own content) and
    their own ids, in random orders. 0 5xx, 0 duplicates, 0 lost; each conflicting id stored once, by one process."""
    from sqlalchemy import text

    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations

    from .faults import ServerProcess

    url = database_url(kind, tmp_path)
    engine_url = Settings(DATABASE_URL=url).DATABASE_URL
    run_migrations(engine_url)
    with make_sessionmaker(make_engine(engine_url))() as session:
        token = create_principal(session=session, name="dev-a", role="device")
    server = ServerProcess(url, cwd=str(ROOT))
    server.start()
    shared = [entry(result(grade=g % 5), overlay=None) for g in range(30)]
    conflict_ids = [str(uuid.uuid4()) for _ in range(10)]
    procs = []
    try:
        for p in range(8):
            own = [entry(result(grade=p % 5), overlay=None) for _ in range(15)]
            mine = [entry(result(grade=(p + i) % 5, result_id=rid, image_name=f"p{p}.jpg"), overlay=None)
                    for i, rid in enumerate(conflict_ids)]
            items = shared + own + mine
            import random

            random.Random(p).shuffle(items)
            batches = [items[i:i + 10] for i in range(0, len(items), 10)]
            proc = subprocess.Popen([sys.executable, "-c", SYNC_WORKER, f"http://127.0.0.1:{server.port}", token, str(p)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            procs.append((proc, json.dumps(batches), own, mine))
        outputs = []
        for proc, batches, _, _ in procs:  # all started; now feed them (they post as soon as input closes)
            proc.stdin.write(batches)
            proc.stdin.close()
        for proc, _, own, mine in procs:
            outputs.append((json.loads(proc.stdout.read()), own, mine))
            proc.wait(timeout=120)
    finally:
        server.stop()
    codes = [r["code"] for out, _, _ in outputs for r in out]
    assert codes and all(c == 200 for c in codes), sorted(set(codes))
    stored_by: dict[str, list[str]] = {}
    for p, (out, _, _) in enumerate(outputs):
        for r in out:
            for item in r["items"]:
                assert item["status"] in ("stored", "duplicate", "conflict"), item
                if item["status"] == "stored":
                    stored_by.setdefault(item["result_id"], []).append(str(p))
    engine = make_engine(engine_url)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT result_id, content_hash FROM results")).fetchall())
        total = conn.execute(text("SELECT COUNT(*) FROM results")).scalar()
    engine.dispose()
    expected = {e["result"]["result_id"] for e in shared} | set(conflict_ids)
    expected |= {e["result"]["result_id"] for _, own, _ in outputs for e in own}
    assert total == len(rows) == len(expected) == 30 + 10 + 8 * 15  # nothing duplicated, nothing lost
    assert set(rows) == expected and all(len(v) == 1 for v in stored_by.values()) and set(stored_by) == expected
    for rid in conflict_ids:  # the stored content is the winner's
        winner = int(stored_by[rid][0])
        assert rows[rid] == next(e["content_hash"] for e in outputs[winner][2] if e["result"]["result_id"] == rid)


def test_rejected_results_never_shadow_stored_ones(server):
    """A rejected retry of a stored id answers rejected and leaves the stored result as it was."""
    client, tokens, _ = server
    r = result(grade=3)
    assert sync(client, tokens["dev-a"], entry(r))[0] == ["stored"]
    broken = r.to_dict() | {"referable": False}
    assert sync(client, tokens["dev-a"], raw_entry(broken))[0] == ["rejected"]
    assert client.get(f"/v1/results/{r.result_id}", headers=auth(tokens["dev-a"])).json()["referable"] is True



@pytest.mark.parametrize("kind", BACKENDS)
def test_migration_0002_keeps_results_and_insights(kind, tmp_path):
    """Upgrading a 0001 database (global result ids) to device-scoped ids and encounters loses nothing."""
    from alembic import command
    from sqlalchemy import text

    from .conftest import database_at_revision

    config, engine = database_at_revision(Settings(DATABASE_URL=database_url(kind, tmp_path)).DATABASE_URL, "0001")
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(text("INSERT INTO results (result_id, device, content_hash, payload, outcome, grade, referable, "
                              "confidence, captured_at, received_at) VALUES (:id, 'dev-a', :h, '{}', 'graded', :g, :r, "
                              "0.8, :t, :t)"), {"id": f"0000000{i}-0000-0000-0000-000000000000", "h": "a" * 64, "g": i,
                                               "r": i >= 2, "t": now})
        conn.execute(text("INSERT INTO insights (result_id, source, body, created_at) VALUES "
                          "('00000002-0000-0000-0000-000000000000', 'guideline', '{}', :t)"), {"t": now})
    command.upgrade(config, "head")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT device, result_id, grade, encounter_id, eye FROM results ORDER BY result_id")).all()
        insight = conn.execute(text("SELECT device, result_id, source FROM insights")).all()
    engine.dispose()
    assert [(r.device, r.grade, r.encounter_id, r.eye) for r in rows] == [("dev-a", g, None, None) for g in range(3)]
    assert [tuple(i) for i in insight] == [("dev-a", "00000002-0000-0000-0000-000000000000", "guideline")]



# ---------------------------------------------------------------------------------------------------------------
# Round two: an independent hostile re-test of the fixed server.

@pytest.mark.parametrize("kind", ["tiff", "hdr", "jpeg_ff_fill", "png", "gif", "pfm"])
def test_high_decode_bombs_are_refused_from_the_header_before_any_decode(tmp_path, monkeypatch, tiny_run, kind):
    """Re-test: a 1.2 MB 20000x20000 TIFF took the server from 0.16 to 2.6 GB per /v1/predict (HDR: 4.7 GB), and an
    FF fill byte hid a JPEG's size from the header parser. Only JPEG, PNG and WebP are accepted, and their size is
    read from the header (Pillow) before OpenCV decodes a pixel, on /v1/predict and on synced overlays and images."""
    import base64

    import cv2

    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    from benchmarks.hostile_load import bomb_files

    data = bomb_files()[kind]
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, TEACHER_CHECKPOINT=str(tiny_run.best_checkpoint))
    with TestClient(app) as client:
        r = client.post("/v1/predict", files={"file": ("x.img", data, "application/octet-stream")},
                        headers=auth(tokens["dev-a"]))
        assert r.status_code == 422, r.text
        expected = "ImageTooLargeError" if kind in ("jpeg_ff_fill", "png") else "UnsupportedImageFormatError"
        assert expected in r.json()["detail"]
        image = entry(result()) | {"image_b64": base64.b64encode(data).decode()}
        overlay = entry(result(), overlay=data)
        for sent in (image, overlay):
            statuses, items = sync(client, tokens["dev-a"], sent)
            assert statuses == ["rejected"], items
    assert decoded == []  # nothing reached a decoder


def test_high_predict_decodes_off_the_event_loop_with_bounded_concurrency(tmp_path, monkeypatch, tiny_run, fundus_bgr):
    """Re-test: /v1/predict decoded on the event loop, so /health stalled 5-8 s during one request."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from .conftest import encode

    real = cv2.imdecode

    def slow_decode(*args):
        time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(cv2, "imdecode", slow_decode)
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, TEACHER_CHECKPOINT=str(tiny_run.best_checkpoint),
                              DECODE_CONCURRENCY=1, DECODE_WAIT_S=0.5)
    photo = encode(fundus_bgr)
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        def predict():
            return client.post("/v1/predict", files={"file": ("eye.jpg", photo, "image/jpeg")},
                               headers=auth(tokens["dev-a"])).status_code

        first = pool.submit(predict)
        time.sleep(0.3)  # the first decode is under way
        second = pool.submit(predict)
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        health_s = time.perf_counter() - started
        codes = sorted([first.result(), second.result()])
    assert health_s < 0.5, f"/health took {health_s:.2f}s while a photo decoded"
    assert codes == [200, 503]  # one decode slot: the second request waited 0.5 s, then was told to retry


def test_medium7_failed_sign_ins_never_lock_out_valid_tokens(tmp_path):
    """Re-test: 35 random tokens locked every valid device and reviewer behind the same address (a clinic NAT) out."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, AUTH_FAILURE_LIMIT="30/minute")
    with TestClient(app) as client:
        codes = [client.get("/v1/history", headers=auth(f"red_{uuid.uuid4().hex}")).status_code for _ in range(35)]
        assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
        assert client.get("/v1/history", headers=auth(tokens["dev-a"])).status_code == 200
        assert client.get("/v1/history", headers=auth(tokens["rev"])).status_code == 200


def test_medium7_trusted_proxy_counts_failures_per_forwarded_client(tmp_path):
    """Re-test: `serve` had no trusted-proxy option, so every client behind a proxy shared one failure budget."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, AUTH_FAILURE_LIMIT="5/minute",
                              TRUSTED_PROXIES=["testclient"])
    with TestClient(app) as client:
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        codes = [client.get("/v1/history", headers=auth(f"red_{i}") | guesser).status_code for i in range(7)]
        assert codes == [401] * 5 + [429] * 2
        other = {"X-Forwarded-For": "203.0.113.8"}
        assert client.get("/v1/history", headers=auth("red_typo") | other).status_code == 401  # its own budget
    untrusted, _ = make_server(f"sqlite:///{tmp_path / 't.db'}", tmp_path, AUTH_FAILURE_LIMIT="5/minute")
    with TestClient(untrusted) as client:  # without the setting the header is not believed
        codes = [client.get("/v1/history", headers=auth(f"red_{i}") | {"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                 for i in range(6)]
        assert codes[-1] == 429


class _LiveServer:
    """The app under uvicorn on a loopback port, in a thread (real sockets: slow and stalled bodies)."""

    def __init__(self, app):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _post_and_stall(port: int, headers: str, body: bytes):
    import socket

    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"POST /v1/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode())
    conn.settimeout(0.2)
    try:
        for start in range(0, len(body), 65_536):
            conn.sendall(body[start:start + 65_536])
    except (TimeoutError, OSError):
        pass  # the server stopped reading (it answered): that is the point
    return conn


def _answer(conn, timeout: float) -> tuple[int | None, float]:
    import time

    started = time.perf_counter()
    conn.settimeout(timeout)
    try:
        head = conn.recv(4096)
    except (TimeoutError, OSError):
        return None, time.perf_counter() - started
    finally:
        conn.close()
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1") else None
    return status, time.perf_counter() - started


def test_medium8_unauthenticated_slow_or_large_bodies_are_cut_and_timed_out(tmp_path):
    """Re-test: 12 connections each sending 24 MB without a valid token and stalling were still open after 30-40 s
    (+0.3 GB). Before its token is accepted a request may send 64 KiB; a stalled body times out."""
    app, tokens = make_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path, MAX_BODY_BYTES=25 * 2**20,
                              PREAUTH_BODY_TIMEOUT_S=1.0, BODY_IDLE_TIMEOUT_S=1.0)
    with _LiveServer(app) as live:
        large = [_post_and_stall(live.port, f"Content-Length: {24 * 2**20}\r\nAuthorization: Bearer red_wrong\r\n",
                                 b"x" * 2**20) for _ in range(12)]
        answers = [_answer(conn, 5.0) for conn in large]
        assert all(status == 413 for status, _ in answers), answers
        stalled = [_post_and_stall(live.port, "Content-Length: 5000\r\n", b"{") for _ in range(3)]
        answers = [_answer(conn, 5.0) for conn in stalled]
        assert all(status == 408 and seconds < 3.0 for status, seconds in answers), answers
        # An authenticated body that stalls times out too; one that arrives is served.
        slow = _post_and_stall(live.port, f"Content-Length: 200000\r\nAuthorization: Bearer {tokens['dev-a']}\r\n",
                               b" " * 100_000)
        assert _answer(slow, 5.0)[0] == 408
        body = json.dumps({"results": [entry(result())]}).encode()
        whole = _post_and_stall(live.port, f"Content-Length: {len(body)}\r\nAuthorization: Bearer {tokens['dev-a']}\r\n",
                                body)
        assert _answer(whole, 5.0)[0] == 200


def test_medium6_encounter_views_are_bounded_per_encounter_and_per_page(server):
    """Re-test: one device put 20k captures in one encounter; /v1/history?group=encounter&limit=1 returned 158 MB."""
    client, tokens, app = server
    app.state.settings.MAX_CAPTURES_PER_ENCOUNTER = 6
    now = datetime.now(timezone.utc)
    flood = [result(encounter_id="visit-big", eye=("left", "right")[i % 2], grade=0,
                    captured_at=(now - timedelta(seconds=i)).isoformat()) for i in range(10)]
    statuses, items = sync(client, tokens["dev-a"], *[entry(r) for r in flood])
    assert statuses.count("stored") == 6 and statuses.count("rejected") == 4
    assert all("already holds 6 captures" in i["detail"] for i in items if i["status"] == "rejected")
    statuses, _ = sync(client, tokens["dev-a"], entry(result(encounter_id="visit-big", eye="left")))
    assert statuses == ["rejected"]  # the stored count holds across batches
    grouped = client.get("/v1/history?group=encounter&limit=500", headers=auth(tokens["rev"]))
    assert grouped.status_code == 200 and grouped.json()["limit"] == 100  # encounter pages are capped too
    (visit,) = grouped.json()["data"]
    assert len(visit["results"]) == 6


def test_reads_page_by_key_through_every_view(server):
    """Re-test: history and review counted and offset-scanned the whole table per page (2.65 s at 1M rows). Pages
    now follow a cursor; every view reaches every row exactly once, filters included, with equal timestamps."""
    client, tokens, _ = server
    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    rows = [result(grade=i % 5, captured_at=(at - timedelta(minutes=i // 3)).isoformat(), encounter_id=f"v{i // 2}",
                   eye=("left", "right")[i % 2]) for i in range(23)]
    sync(client, tokens["dev-a"], *[entry(r) for r in rows[:12]])
    sync(client, tokens["dev-b"], *[entry(r.model_copy(update={"device_id": "dev-b"})) for r in rows[12:]])

    def walk(token, **params):
        seen, cursor = [], None
        while True:
            query = {**params, "limit": 4, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/history", params=query, headers=auth(token)).json()
            seen += [r["result_id"] if "result_id" in r else r["encounter_id"] for r in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return seen

    everything = walk(tokens["rev"])
    assert sorted(everything) == sorted(r.result_id for r in rows) and len(set(everything)) == 23
    assert len(walk(tokens["dev-a"])) == 12 and len(walk(tokens["rev"], device="dev-b")) == 11
    assert len(walk(tokens["rev"], grade=4)) == sum(r.grade == 4 for r in rows)
    assert len(walk(tokens["rev"], referable=True)) == sum(bool(r.referable) for r in rows)
    assert len(walk(tokens["rev"], group="encounter")) == 12  # v5 spans both devices: two encounters


def test_low4_a_fast_device_clock_is_recorded_not_rejected(server):
    """Re-test: results stamped by a device clock more than a day fast were rejected forever (and the device
    quarantined them when re-queued). The server now records both clocks."""
    client, tokens, _ = server
    device_now = datetime.now(timezone.utc) + timedelta(days=3)  # the device's clock, three days fast
    fast = ScreeningResult.model_validate(result(grade=3).to_dict() | {"captured_at": device_now.isoformat()},
                                          context={"received_at": device_now})
    statuses, _ = sync(client, tokens["dev-a"], entry(fast))
    assert statuses == ["stored"]
    assert sync(client, tokens["dev-a"], entry(fast))[0] == ["duplicate"]  # a re-sent copy is acknowledged too
    row = client.get(f"/v1/results/{fast.result_id}", headers=auth(tokens["rev"])).json()
    received = datetime.fromisoformat(row["received_at"])
    assert datetime.fromisoformat(row["captured_at"]) == received  # ordered and filtered by the server's clock
    assert row["device_clock_skew_s"] == pytest.approx(3 * 86_400, abs=120)
    assert row["result"]["captured_at"] == fast.to_dict()["captured_at"]  # the device's claim is kept as sent
    newest = client.get("/v1/history?limit=1", headers=auth(tokens["rev"])).json()["data"][0]
    assert newest["result_id"] == fast.result_id


def test_medium7_serve_takes_a_trusted_proxy(tmp_path):
    """Re-test: `serve` had no trusted-proxy option (and uvicorn believed X-Forwarded-For from any local peer)."""
    import os
    import socket

    import httpx

    from edge_runtime.sync import wait_until_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RETINAEDGE_DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}", "RETINAEDGE_AUTH_FAILURE_LIMIT": "3/minute"}
    base = f"http://127.0.0.1:{port}"

    def guesses(*extra: str) -> list[int]:
        server = subprocess.Popen([sys.executable, "-m", "retinaedge.cli", "serve", "--port", str(port), *extra],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_healthy(base, timeout=60)
            codes = [httpx.get(f"{base}/v1/history", headers=auth(f"red_{i}") | {"X-Forwarded-For": "203.0.113.7"}).status_code
                     for i in range(4)]
            return codes + [httpx.get(f"{base}/v1/history",
                                      headers=auth("red_x") | {"X-Forwarded-For": "203.0.113.8"}).status_code]
        finally:
            server.terminate()
            server.wait(timeout=30)

    assert guesses("--trusted-proxy", "127.0.0.1") == [401, 401, 401, 429, 401]  # per forwarded client
    assert guesses() == [401, 401, 401, 429, 429]  # without the option the header is not believed


def test_low2_a_clinician_may_override_a_visit_and_the_automatic_decision_stays_shown(server):
    """Re-test: a later clean retake overrode an earlier grade-4 capture. Every gradable capture now counts, and only
    a clinician (a reviewer) changes the visit's decision, with a reason, beside the automatic one."""
    client, tokens, _ = server
    now = datetime.now(timezone.utc)
    visit = [result(encounter_id="v-o", eye="left", grade=4, captured_at=(now - timedelta(minutes=5)).isoformat()),
             result(encounter_id="v-o", eye="left", grade=0, captured_at=now.isoformat()),
             result(encounter_id="v-o", eye="right", grade=0)]
    sync(client, tokens["dev-a"], *[entry(r) for r in visit])

    def decided():
        (encounter,) = client.get("/v1/history?group=encounter", headers=auth(tokens["rev"])).json()["data"]
        return encounter

    assert (decided()["decision"], decided()["reason"]) == ("refer", "left eye referable")
    body = {"decision": "no_referral", "reason": "grade 4 on the first photo was a lens artefact"}
    url = "/v1/encounters/v-o/decision"
    assert client.post(url, params={"device": "dev-a"}, json=body, headers=auth(tokens["dev-a"])).status_code == 403
    assert client.post(url, params={"device": "dev-b"}, json=body, headers=auth(tokens["rev"])).status_code == 404
    assert client.post(url, params={"device": "dev-a"}, json={**body, "decision": "maybe"},
                       headers=auth(tokens["rev"])).status_code == 422
    assert client.post(url, params={"device": "dev-a"}, json=body, headers=auth(tokens["rev"])).status_code == 204
    encounter = decided()
    assert (encounter["decision"], encounter["decided_by"]) == ("no_referral", "rev")
    assert encounter["reason"] == f"clinician rev: {body['reason']}"
    assert (encounter["automatic_decision"], encounter["automatic_reason"]) == ("refer", "left eye referable")
