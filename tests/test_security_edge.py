"""Device side of the hostile probes: one test per finding, each against a hostile local server (127.0.0.1 only)
or a hostile file, each bounded in time. Named after the finding: high3, medium4, medium7, medium9, low (sync
client); the second round's (medium1, medium2, low4-low8) follow "Round two"."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from edge_runtime.backends import open_session
from edge_runtime.contract import (
    ArtifactManifest,
    manifest_path_for,
    sha256_file,
)
from edge_runtime.errors import (
    ArtifactError,
    ManifestError,
    ManifestSignatureError,
    ModelUpdateError,
    OutboxCorruptError,
    OutboxMissingError,
)
from edge_runtime.formats import embedded_manifest_json
from edge_runtime.outbox import Outbox
from edge_runtime.signing import (
    generate_key_pair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from edge_runtime.sync import SyncClient, SyncStalledError, UnexpectedResponseError
from edge_runtime.updates import UpdateLimits, install_latest_model
from edge_runtime.wire import QualityReport, ScreeningResult

from .conftest import ROOT, encode

# A fuse on each test body (not on the shared tiny-model fixture, which takes minutes on a loaded machine).
pytestmark = pytest.mark.timeout(120, func_only=True)


# ---------------------------------------------------------------- a hostile HTTP server on loopback
class HostileServer:
    """Threaded HTTP/1.0 server on 127.0.0.1: ``routes`` maps a path to ``fn(handler)``; every request is logged
    with its Authorization header, and bytes written by body routes are counted."""

    def __init__(self):
        self.routes: dict[str, Callable] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body may run until the connection closes

            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Authorization")))
                route = outer.routes.get(self.path.split("?")[0])
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what a good client does to an endless body

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def write(self, handler, data: bytes) -> None:
        handler.wfile.write(data)
        handler.wfile.flush()
        self.bytes_sent += len(data)

    def json(self, obj, status: int = 200) -> Callable:
        def route(h):
            body = json.dumps(obj).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self.write(h, body)
        return route

    def blob(self, data: bytes, content_length: bool = True) -> Callable:
        def route(h):
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            if content_length:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            self.write(h, data)
        return route

    def redirect(self, location: str) -> Callable:
        def route(h):
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        return route

    def publish(self, artifact: Path, manifest: dict | None = None, **overrides) -> dict:
        """Serve ``artifact`` the way the companion server does: /v1/models/latest + /dl."""
        data = artifact.read_bytes()
        manifest = manifest or json.loads(manifest_path_for(artifact).read_text())
        info = {"format": manifest["format"], "filename": artifact.name, "sha256": manifest["sha256"],
                "manifest": manifest, "download_url": f"{self.url}/dl", "size_bytes": len(data),
                "uploaded_at": "2026-01-01T00:00:00Z", **overrides}
        self.routes["/v1/models/latest"] = self.json(info)
        self.routes.setdefault("/dl", self.blob(data))
        return info

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile():
    servers: list[HostileServer] = []

    def make() -> HostileServer:
        servers.append(HostileServer())
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def artifacts(tiny_artifacts) -> dict[tuple[str, str], Path]:
    return {key: Path(record.path) for key, record in tiny_artifacts[0].items()}


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


FAST = UpdateLimits(deadline_s=20.0, io_timeout_s=5.0)


@pytest.fixture(autouse=True)
def _unsigned_models_allowed(monkeypatch):
    """The first round's update tests exercise the transport, not signatures: they run as a development device.
    The signature tests below clear it."""
    monkeypatch.setenv("RETINAEDGE_ALLOW_UNSIGNED_MODELS", "1")


# ---------------------------------------------------------------- High 3
def test_high3_update_model_refuses_path_traversal_filename(artifacts, hostile, tmp_path):
    server = hostile()
    dest = tmp_path / "a" / "b" / "models"
    for filename in ("../../x.onnx", str(tmp_path / "abs.onnx"), ".hidden.onnx", "model.sh"):
        server.publish(artifacts[("onnx", "fp32")], filename=filename)
        with pytest.raises(ModelUpdateError, match="unsafe file name"):
            install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    # A model_version is part of the versioned directory name: it must be a plain name too.
    manifest = json.loads(manifest_path_for(artifacts[("onnx", "fp32")]).read_text())
    server.publish(artifacts[("onnx", "fp32")], {**manifest, "model_version": "../../../evil"})
    with pytest.raises(ModelUpdateError, match="model_version"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    assert not any(p.suffix == ".onnx" for p in _files_under(tmp_path)), "nothing may be written anywhere"
    # Through the CLI: a typed error, exit code 2, no traceback, nothing claimed "installed".
    server.publish(artifacts[("onnx", "fp32")], filename="../../x.onnx")
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "update-model", "--server", server.url,
                           "--token", "tok", "--dest", str(dest)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "ModelUpdateError" in proc.stderr and "Traceback" not in proc.stderr
    assert "installed" not in proc.stdout and not (tmp_path / "a" / "x.onnx").exists()


def test_high3_update_model_never_sends_token_to_another_host(artifacts, hostile, tmp_path):
    server, elsewhere = hostile(), hostile()  # two ports on 127.0.0.1 are two origins
    data = artifacts[("onnx", "fp32")].read_bytes()
    elsewhere.routes["/dl"] = elsewhere.blob(data)
    server.publish(artifacts[("onnx", "fp32")], download_url=f"{elsewhere.url}/dl")
    with pytest.raises(ModelUpdateError, match="not its own origin"):
        install_latest_model(server.url, "secret-token", "onnx", tmp_path / "m", limits=FAST)
    # A same-origin URL that redirects elsewhere, and a scheme change, are refused the same way.
    server.routes["/dl"] = server.redirect(f"{elsewhere.url}/dl")
    server.publish(artifacts[("onnx", "fp32")])
    with pytest.raises(ModelUpdateError, match="not its own origin"):
        install_latest_model(server.url, "secret-token", "onnx", tmp_path / "m", limits=FAST)
    server.publish(artifacts[("onnx", "fp32")], download_url=server.url.replace("http://", "https://") + "/dl")
    with pytest.raises(ModelUpdateError, match="not its own origin"):
        install_latest_model(server.url, "secret-token", "onnx", tmp_path / "m", limits=FAST)
    assert elsewhere.requests == []  # the other host was never even asked, so it never saw the token
    assert all(auth == "Bearer secret-token" for _, auth in server.requests)
    assert not (tmp_path / "m" / "current").exists()


# ---------------------------------------------------------------- Medium 4
def test_medium4_update_model_caps_size_of_an_endless_body(artifacts, hostile, tmp_path):
    server = hostile()
    artifact = artifacts[("onnx", "fp32")]
    size = artifact.stat().st_size

    def endless(h):
        h.send_response(200)
        h.end_headers()
        for _ in range(2000):  # 128 MB at most, so a client without limits ends (wrongly) instead of hanging
            server.write(h, b"\0" * 65536)

    def attempt(limits: UpdateLimits, match: str) -> None:
        server.bytes_sent = 0
        with pytest.raises(ModelUpdateError, match=match):
            install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=limits)
        time.sleep(0.3)  # let the server thread run into the hang-up
        assert server.bytes_sent < 16 * 2**20, "the client kept reading an endless body"
        assert _files_under(tmp_path / "m") == set(), "no .part or staging file may be left behind"

    server.routes["/dl"] = endless
    server.publish(artifact)  # publishes size_bytes: the client stops right after it
    attempt(FAST, f"exceeded {size:,} bytes")
    server.publish(artifact, size_bytes=None)  # an older server: the local cap still holds
    attempt(UpdateLimits(max_model_bytes=2**20, deadline_s=20, io_timeout_s=5), "exceeded 1,048,576 bytes")
    server.publish(artifact, size_bytes=3 * 2**30)  # refused before a byte is downloaded
    requests_before = len(server.requests)
    attempt(FAST, "over this device's")
    assert [p for p, _ in server.requests[requests_before:]] == ["/v1/models/latest?format=onnx"]


def test_medium4_update_model_deadline_stops_a_slow_drip(artifacts, hostile, tmp_path):
    server = hostile()

    def drip(h):
        h.send_response(200)
        h.end_headers()
        for _ in range(40):  # a byte every 0.3 s (the probe used 3 s): never idle long enough for a read timeout
            server.write(h, b"\0")
            time.sleep(0.3)

    server.routes["/dl"] = drip
    server.publish(artifacts[("onnx", "fp32")])
    started = time.monotonic()
    with pytest.raises(ModelUpdateError, match="deadline"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m",
                             limits=UpdateLimits(deadline_s=1.5, io_timeout_s=5.0))
    assert time.monotonic() - started < 4.0
    assert _files_under(tmp_path / "m") == set()


def test_medium4_update_model_caps_the_latest_json(hostile, tmp_path):
    server = hostile()
    huge = json.dumps({"padding": "x" * (20 * 2**20)}).encode()  # the probe sent 300 MB; 20 MB shows the cap
    for declared in (True, False):  # a declared Content-Length is refused up front, a streamed body on the way
        server.bytes_sent = 0
        server.routes["/v1/models/latest"] = server.blob(huge, content_length=declared)
        with pytest.raises(ModelUpdateError, match="/latest answer.*262,144"):
            install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)
        time.sleep(0.3)
        assert server.bytes_sent < 32 * 2**20
    server.routes["/v1/models/latest"] = server.blob(b"<html>captive portal</html>")
    with pytest.raises(ModelUpdateError, match="not JSON"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)


def test_medium4_update_model_refuses_failed_gate_and_keeps_the_working_model(artifacts, hostile, tmp_path):
    server, dest = hostile(), tmp_path / "models"
    good = artifacts[("onnx", "fp32")]
    server.publish(good)
    first = install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    assert first.path == dest / "current" / "model.onnx" and first.previous is None
    assert open_session(first.path).info.manifest.sha256 == sha256_file(good)
    # Gate failed: refused before the download; the working model stays current.
    manifest = json.loads(manifest_path_for(artifacts[("onnx", "int8")]).read_text())
    failed = {**manifest, "gate": {**manifest["gate"], "status": "failed", "failures": ["agreement 0.41 < 0.95"]}}
    server.routes.pop("/dl")
    server.publish(artifacts[("onnx", "int8")], failed)
    with pytest.raises(ModelUpdateError, match="fidelity gate is 'failed'"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    # Format checked before the switch: a manifest edited on the server (threshold) no longer matches the file.
    edited = _with_threshold(manifest, 0.99)
    server.publish(artifacts[("onnx", "int8")], edited)
    with pytest.raises(ModelUpdateError, match="failed its checks.*operating_point.threshold"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    assert open_session(dest / "current" / "model.onnx").info.manifest.sha256 == sha256_file(good)
    # A good new model: installed under a versioned name, the previous one kept for rollback.
    server.publish(artifacts[("onnx", "int8")])
    second = install_latest_model(server.url, "tok", "onnx", dest, limits=FAST)
    assert second.version_path.parent.name == f"{manifest['model_version']}-{manifest['sha256'][:12]}"
    assert sha256_file(second.path) == manifest["sha256"]
    assert second.previous is not None and sha256_file(second.previous) == sha256_file(good)
    assert open_session(second.previous).info.manifest.quantization.precision == "fp32"


def test_medium4_update_model_redirects_and_empty_bodies_are_typed_and_cleaned(artifacts, hostile, tmp_path):
    server = hostile()
    server.routes["/dl"] = server.redirect("/dl")  # same-origin redirect loop
    server.publish(artifacts[("onnx", "fp32")])
    with pytest.raises(ModelUpdateError, match="more than 3 redirects"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)
    server.routes["/dl"] = server.redirect("/dl2")  # a same-origin redirect is followed
    server.routes["/dl2"] = server.blob(b"")
    with pytest.raises(ModelUpdateError, match="empty"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)
    assert _files_under(tmp_path / "m") == set(), "no 0-byte .part may be left behind"
    server.routes["/dl2"] = server.blob(artifacts[("onnx", "fp32")].read_bytes())
    assert install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST).path.is_file()


# ---------------------------------------------------------------- Medium 7
def sidecar_manifest_json(manifest: ArtifactManifest, artifact: Path, key=None) -> str:
    """The sidecar as exporters.manifest.finalise_manifest writes it: sha256 of the final file, signed with ``key``."""
    data = {**manifest.to_dict(), "sha256": sha256_file(artifact), "signature": None}
    return json.dumps(sign_manifest(data, key) if key is not None else data, indent=2, sort_keys=True)


def _repackage(src: Path, dst: Path, manifest: dict, key=None, embedded: dict | None = None) -> Path:
    """Copy ``src`` to ``dst`` with ``embedded`` (default: ``manifest``) inside and ``manifest`` as its sidecar,
    the way an exporter writes them (the sidecar signed when ``key`` is given)."""
    shutil.copy(src, dst)
    fmt = manifest["format"]
    embed = __import__(f"exporters.{fmt}", fromlist=["embed_manifest"]).embed_manifest
    embed(dst, embedded_manifest_json(ArtifactManifest.from_dict({**(embedded or manifest), "signature": None})))
    manifest_path_for(dst).write_text(sidecar_manifest_json(ArtifactManifest.from_dict(
        {**manifest, "signature": None}), dst, key))
    return dst


def _with_threshold(manifest: dict, threshold: float) -> dict:
    return {**manifest, "operating_point": {**manifest["operating_point"], "threshold": threshold,
                                            "uncertain_band": None}}


def _sidecar(path: Path) -> dict:
    return json.loads(manifest_path_for(path).read_text())


def test_medium7_edited_sidecar_threshold_or_preprocess_is_refused(artifacts, tmp_path):
    for key in (("onnx", "int8"), ("tflite", "int8")):
        src = artifacts[key]
        copy = tmp_path / src.name
        shutil.copy(src, copy)
        original = _sidecar(src)
        for edit, field in ((lambda m: m["operating_point"].update(threshold=0.99, uncertain_band=None),
                             "operating_point.threshold"),
                            (lambda m: m["preprocess"].update(mean=[0.9, 0.9, 0.9], std=[0.05, 0.05, 0.05]),
                             "preprocess.mean"),
                            (lambda m: m.update(class_names=[*m["class_names"][:4], "No DR"]), "class_names")):
            manifest = json.loads(json.dumps(original))
            edit(manifest)  # sha256 unchanged: the file itself was not touched
            manifest_path_for(copy).write_text(json.dumps(manifest))
            with pytest.raises(ManifestError, match=f"disagrees with the one embedded.*{field}"):
                open_session(copy)
        manifest_path_for(copy).write_text(json.dumps(original))
        assert open_session(copy).info.manifest.sha256 == original["sha256"]


def test_medium7_sidecar_passed_cannot_override_embedded_failed(artifacts, tmp_path):
    src = artifacts[("onnx", "int8")]
    manifest = _sidecar(src)
    failed = {**manifest, "gate": {**manifest["gate"], "status": "failed", "failures": ["agreement 0.41 < 0.95"]}}
    copy = _repackage(src, tmp_path / "m.onnx", failed)
    with pytest.raises(ArtifactError, match="fidelity gate is 'failed'"):
        open_session(copy)
    manifest_path_for(copy).write_text(json.dumps({**_sidecar(copy), "gate": manifest["gate"]}))  # edited: "passed"
    with pytest.raises(ManifestError, match="disagrees with the one embedded.*gate"):
        open_session(copy)


def test_medium7_coreml_sidecar_is_checked_against_its_embedded_manifest(artifacts, tmp_path):
    """CoreML packages are checked the same way, without coremltools on the device (it only builds the package)."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    from edge_runtime.errors import BackendUnavailableError
    from exporters.formats import FORMATS

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def program(x):
        return mb.linear(x=x, weight=np.eye(4, dtype=np.float32), name="y")

    manifest = {**_sidecar(artifacts[("onnx", "fp32")]), "format": "coreml", "signature": None}
    package = tmp_path / "m.mlpackage"
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)
    model.user_defined_metadata["retinaedge_manifest"] = embedded_manifest_json(ArtifactManifest.from_dict(manifest))
    model.save(str(package))
    manifest_path_for(package).write_text(sidecar_manifest_json(ArtifactManifest.from_dict(manifest), package))
    if not FORMATS["coreml"].runs_here:  # every check passed; only the runtime is missing here
        with pytest.raises(BackendUnavailableError):
            open_session(package)
    manifest_path_for(package).write_text(json.dumps(_with_threshold(_sidecar(package), 0.99)))
    with pytest.raises(ManifestError, match="disagrees with the one embedded.*operating_point.threshold"):
        open_session(package)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_medium7_fp32_file_under_int8_manifest_is_refused(artifacts, tmp_path, fmt):
    suffix = ".onnx" if fmt == "onnx" else ".tflite"
    int8_manifest = _sidecar(artifacts[(fmt, "int8")])
    # An FP32 file carrying a consistent INT8 manifest inside and beside it, with its own correct sha256.
    copy = _repackage(artifacts[(fmt, "fp32")], tmp_path / f"m{suffix}", int8_manifest)
    with pytest.raises(ArtifactError, match="manifest says int8 but the file stores fp32 weights"):
        open_session(copy)
    # The other way round, and the sha256 check that already held.
    copy = _repackage(artifacts[(fmt, "int8")], tmp_path / f"n{suffix}", _sidecar(artifacts[(fmt, "fp32")]))
    with pytest.raises(ArtifactError, match="manifest says fp32 but the file stores int8 weights"):
        open_session(copy)
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        open_session(copy)


def test_medium7_trusted_key_refuses_unsigned_and_altered_manifests(artifacts, hostile, tmp_path, monkeypatch):
    private_pem, public_pem = generate_key_pair()
    (tmp_path / "publisher.pub").write_bytes(public_pem)
    src = artifacts[("onnx", "int8")]
    manifest = _sidecar(src)
    signed = _repackage(src, tmp_path / "signed.onnx", manifest, key=load_private_key(private_pem))
    sidecar = _sidecar(signed)
    verify_manifest(sidecar, public_pem)  # the signature covers the file's sha256
    verify_manifest(ArtifactManifest.from_dict(sidecar).to_dict(), public_pem)  # survives a parse/re-serialise (server)
    assert sidecar["sha256"] == sha256_file(signed) and sidecar["signature"]["algorithm"] == "ed25519"
    assert open_session(signed, trusted_key=tmp_path / "publisher.pub").info.manifest.signature is not None
    # Unsigned: refused with a key, accepted without one (the sidecar/embedded checks still run).
    with pytest.raises(ManifestSignatureError, match="unsigned"):
        open_session(src, trusted_key=public_pem)
    assert open_session(src).info.manifest.sha256 == manifest["sha256"]
    # Altered after signing, consistently inside and beside the file: the embedded/sidecar check cannot see it,
    # the signature does.
    altered = _with_threshold(sidecar, 0.99)
    manifest_path_for(signed).write_text(json.dumps(altered))
    with pytest.raises(ManifestSignatureError, match="changed after signing"):
        open_session(signed, trusted_key=public_pem)
    # Signed by someone else: refused, named by key id.
    other_private, _ = generate_key_pair()
    manifest_path_for(signed).write_text(json.dumps(sign_manifest(altered, other_private)))
    with pytest.raises(ManifestSignatureError, match="signed by key"):
        open_session(signed, trusted_key=public_pem)
    # The environment variable configures devices (Screener, CLI) without code changes.
    monkeypatch.setenv("RETINAEDGE_TRUSTED_KEY", str(tmp_path / "publisher.pub"))
    with pytest.raises(ManifestSignatureError):
        open_session(src)
    # update-model with the key refuses an unsigned offer before switching; a signed one installs.
    server = hostile()
    server.publish(src)
    with pytest.raises(ModelUpdateError, match="unsigned"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "models", limits=FAST)
    server.routes.pop("/dl")
    _repackage(src, signed, manifest, key=load_private_key(private_pem))
    server.publish(signed, _released(signed, private_pem, 1))
    assert install_latest_model(server.url, "tok", "onnx", tmp_path / "models", limits=FAST).path.is_file()


# ---------------------------------------------------------------- Medium 9
def _result(i: int = 0) -> ScreeningResult:
    grade = i % 5
    probabilities = tuple(0.6 if g == grade else 0.1 for g in range(5))
    referable_probability = round(sum(probabilities[2:]), 6)
    return ScreeningResult(device_id="d", model_version="v", model_sha256="0" * 64, backend="b", provider="p",
                           quality=QualityReport(gradable=True, score=1.0), grade=grade, probabilities=probabilities,
                           confidence=0.6, referable_probability=referable_probability, threshold=0.5,
                           referable=referable_probability >= 0.5)


def _fill(path: Path, n: int, overlay: bytes = b"png") -> list[str]:
    box = Outbox(path)
    results = [_result(i) for i in range(n)]
    for r in results:
        box.put(r, overlay=overlay)
    box.close()
    return [r.result_id for r in results]


def test_medium9_sync_refuses_missing_or_empty_outbox(tmp_path):
    def sync(outbox: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "retinaedge.cli", "sync", "--server", "http://127.0.0.1:9",
                               "--token", "t", "--outbox", str(outbox)], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)

    missing = tmp_path / "typo" / "outbox.db"
    proc = sync(missing)
    assert proc.returncode == 2 and "OutboxMissingError" in proc.stderr and str(missing) in proc.stderr.replace("\n", "")
    assert not missing.exists() and not missing.parent.exists(), "sync must never create an outbox"
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    proc = sync(empty)
    assert proc.returncode == 2 and "empty (0 bytes)" in " ".join(proc.stderr.split()) and empty.stat().st_size == 0
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(OutboxMissingError, match="not a RetinaEdge outbox"):
        Outbox(tmp_path / "other.db", create=False)


def test_medium9_corrupt_outbox_is_a_typed_error_and_grade_does_not_report_success(tmp_path, artifacts, fundus_bgr):
    db = tmp_path / "outbox.db"
    _fill(db, 60, overlay=bytes(3000))  # several pages of results
    pages = db.read_bytes()
    page_size = int.from_bytes(pages[16:18], "big")
    damaged = bytearray(pages)
    damaged[3 * page_size:5 * page_size] = b"\xa5" * (2 * page_size)  # two b-tree pages overwritten
    db.write_bytes(bytes(damaged))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(OutboxCorruptError, match=r"\.recover"):
        Outbox(db)
    with pytest.raises(OutboxCorruptError):
        Outbox(db, create=False)
    image = tmp_path / "eye.jpg"
    image.write_bytes(encode(fundus_bgr))
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "grade", str(image), "--artifact",
                           str(artifacts[("onnx", "fp32")]), "--outbox", str(db), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "OutboxCorruptError" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "", "no result may be reported when it could not be stored"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before, "the damaged outbox is kept as it was"
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxCorruptError, match="cannot be read"):
        Outbox(tmp_path / "garbage.db")


class AckServer:
    """MockTransport handler acknowledging every result it receives; records what it saw."""

    def __init__(self):
        self.received: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        ids = [e["result"]["result_id"] for e in json.loads(request.content)["results"]]
        self.received += ids
        return httpx.Response(200, json={"items": [{"result_id": i, "status": "stored"} for i in ids]})


def test_medium9_undecodable_row_is_quarantined_and_the_rest_are_sent(tmp_path):
    db = tmp_path / "o.db"
    ids = _fill(db, 6)
    raw = sqlite3.connect(db)
    raw.execute("UPDATE results SET payload = '{not json' WHERE result_id = ?", (ids[1],))
    raw.execute("UPDATE results SET payload = CAST(X'7B22FF' AS TEXT) WHERE result_id = ?", (ids[3],))  # bad UTF-8
    raw.execute("UPDATE results SET payload = ? WHERE result_id = ?",  # decodes, but names another result
                (json.dumps(_result(9).to_dict()), ids[4]))
    raw.commit()
    raw.close()
    box, server = Outbox(db, create=False), AckServer()
    report = SyncClient("http://s", "t", box, batch_size=2, transport=httpx.MockTransport(server),
                        sleep=lambda s: None).run(max_rounds=20)
    assert sorted(server.received) == sorted([ids[0], ids[2], ids[5]])
    assert box.counts() == {"pending": 0, "sent": 0, "acknowledged": 3, "rejected": 0}
    assert report.quarantined == 3
    kept = {row.result_id: row.reason for row in box.quarantined()}
    assert set(kept) == {ids[1], ids[3], ids[4]} and "JSONDecodeError" in kept[ids[1]]
    assert "UnicodeDecodeError" in kept[ids[3]] and "names result" in kept[ids[4]]
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0] == 6, "nothing is deleted"


# ---------------------------------------------------------------- Low: the sync client
def _sync(box: Outbox, handler, **kwargs) -> tuple[SyncClient, list[float]]:
    sleeps: list[float] = []
    return SyncClient("http://s", "t", box, batch_size=5, transport=httpx.MockTransport(handler),
                      sleep=sleeps.append, **kwargs), sleeps


def test_low_sync_client_stops_on_empty_items(tmp_path):
    _fill(tmp_path / "o.db", 3)
    box, posts = Outbox(tmp_path / "o.db"), []

    def empty(request):
        posts.append(request)
        return httpx.Response(200, json={"items": []})

    client, sleeps = _sync(box, empty, max_stalled_rounds=4)
    with pytest.raises(SyncStalledError, match="moved nothing forward"):
        client.run(max_rounds=500)  # a fuse: without the fix this posts 500 times and returns quietly
    assert len(posts) == 4 and len(sleeps) == 3 and all(s > 0 for s in sleeps)  # backed off between tries
    assert box.counts()["acknowledged"] == 0 and box.counts()["pending"] + box.counts()["sent"] == 3


def test_low_sync_client_survives_captive_portal_html(tmp_path):
    ids = _fill(tmp_path / "o.db", 4)
    box = Outbox(tmp_path / "o.db")

    def portal(request):
        return httpx.Response(200, text="<html><body>Please log in to the hotel Wi-Fi</body></html>",
                              headers={"content-type": "text/html"})

    client, _ = _sync(box, portal, max_stalled_rounds=2)
    with pytest.raises(UnexpectedResponseError, match="captive portal"):
        client.push_batch()
    with pytest.raises(SyncStalledError):
        client.run()
    counts = box.counts()
    assert counts["acknowledged"] == counts["rejected"] == 0 and counts["pending"] + counts["sent"] == 4
    server = AckServer()
    _sync(box, server)[0].run(max_rounds=10)  # back on a real network: everything leaves
    assert sorted(server.received) == sorted(ids) and box.counts()["acknowledged"] == 4


def test_low_sync_client_keeps_unknown_status_due(tmp_path):
    ids = _fill(tmp_path / "o.db", 4)
    box = Outbox(tmp_path / "o.db")

    def odd(request):  # stores the first result; answers a status this client does not know for the others
        sent = [e["result"]["result_id"] for e in json.loads(request.content)["results"]]
        return httpx.Response(200, json={"items": [{"result_id": i, "status": "stored" if i == ids[0] else "queued"}
                                                   for i in sent]})

    client, _ = _sync(box, odd, max_stalled_rounds=2)
    with pytest.raises(SyncStalledError):
        client.run(max_rounds=50)
    assert box.counts() == {"pending": 0, "sent": 3, "acknowledged": 1, "rejected": 0}
    server = AckServer()
    _sync(box, server)[0].run(max_rounds=10)
    assert sorted(server.received) == sorted(ids[1:]) and box.counts()["acknowledged"] == 4



# ---------------------------------------------------------------- Round two: model distribution
def _released(artifact: Path, private_pem: bytes, sequence: int, min_sequence: int = 0, days: float = 30) -> dict:
    """The artifact's sidecar signed with a release, as a publisher uploads it."""
    from datetime import datetime, timedelta, timezone

    from edge_runtime.signing import Release

    release = Release(sequence, datetime.now(timezone.utc) + timedelta(days=days), min_sequence)
    return sign_manifest(_sidecar(artifact), private_pem, release=release)


def test_medium1_device_refuses_a_signed_rollback_an_expired_or_a_withdrawn_release(artifacts, hostile, tmp_path,
                                                                                     monkeypatch):
    """Re-test: with a trusted key, a device installed an older release signed by the same key ("latest" was the
    newest upload, with no order, minimum version or expiry in what was signed)."""
    monkeypatch.delenv("RETINAEDGE_ALLOW_UNSIGNED_MODELS")
    private_pem, public_pem = generate_key_pair()
    server, dest = hostile(), tmp_path / "models"
    old, new = artifacts[("onnx", "fp32")], artifacts[("onnx", "int8")]
    server.publish(new, _released(new, private_pem, 5, min_sequence=3))
    installed = install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    assert json.loads((dest / "release.json").read_text())["sequence"] == 5
    # The older release, validly signed by the same key: a rollback, refused before any download.
    server.routes.pop("/dl")
    server.publish(old, _released(old, private_pem, 4))
    downloads = [path for path, _ in server.requests].count("/dl")
    with pytest.raises(ModelUpdateError, match="rollback"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    assert [path for path, _ in server.requests].count("/dl") == downloads
    # The release block cannot be edited or stripped: it is signed with the manifest.
    replayed = _released(old, private_pem, 4)
    replayed["signature"]["release"]["sequence"] = 9
    server.publish(old, replayed)
    with pytest.raises(ModelUpdateError, match="changed after signing"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    stripped = sign_manifest(_sidecar(old), private_pem)
    server.publish(old, stripped)
    with pytest.raises(ModelUpdateError, match="without a release"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    # Expired: refused even when newer.
    server.publish(old, _released(old, private_pem, 7, days=-1))
    with pytest.raises(ModelUpdateError, match="expired"):
        install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    assert sha256_file(dest / "current" / "model.onnx") == sha256_file(installed.path)
    # Same release again: a no-op reinstall is fine; a newer one installs and records its floor.
    server.routes["/dl"] = server.blob(new.read_bytes())
    server.publish(new, _released(new, private_pem, 5, min_sequence=3))
    install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    server.routes["/dl"] = server.blob(old.read_bytes())
    server.publish(old, _released(old, private_pem, 8, min_sequence=6))
    install_latest_model(server.url, "tok", "onnx", dest, limits=FAST, trusted_key=public_pem)
    assert json.loads((dest / "release.json").read_text()) == {"sequence": 8, "min_sequence": 6,
                                                               "sha256": sha256_file(old)}


def test_medium2_device_requires_a_signature_unless_configured_for_development(artifacts, hostile, tmp_path,
                                                                                monkeypatch):
    """Re-test: signature checking was opt-in, so by default update-model installed an unsigned model (a trojan)."""
    monkeypatch.delenv("RETINAEDGE_ALLOW_UNSIGNED_MODELS")
    monkeypatch.delenv("RETINAEDGE_TRUSTED_KEY", raising=False)
    server = hostile()
    server.publish(artifacts[("onnx", "fp32")])
    with pytest.raises(ModelUpdateError, match="signed models only"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)
    assert server.requests == [] and not (tmp_path / "m" / "current").exists()
    # Only an explicit development setting installs it.
    assert install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST, allow_unsigned=True).path.is_file()
    monkeypatch.setenv("RETINAEDGE_ALLOW_UNSIGNED_MODELS", "1")
    assert install_latest_model(server.url, "tok", "onnx", tmp_path / "m2", limits=FAST).path.is_file()


def test_low6_trusted_keys_rotate_and_revoke(tmp_path, monkeypatch):
    """Re-test: a single trusted key, no rotation or revocation."""
    from datetime import datetime, timedelta, timezone

    from edge_runtime.signing import Keyring, Release, load_keyring, trusted_key_from_env

    manifest = ArtifactManifest(model_name="m", model_version="m-1", format="onnx", sha256="a" * 64).to_dict()
    release = Release(2, datetime.now(timezone.utc) + timedelta(days=1))
    (old_private, old_public), (new_private, new_public) = generate_key_pair(), generate_key_pair()
    both = tmp_path / "publishers.pem"
    both.write_bytes(old_public + new_public)  # during a rotation devices trust both keys
    keyring = load_keyring(both)
    assert len(keyring.keys) == 2
    for private in (old_private, new_private):
        assert verify_manifest(sign_manifest(manifest, private, release=release), keyring) == release
    # The old key is revoked: what it signs is refused, by its id, even though the key is still listed.
    old_id = key_id(load_public_key(old_public))
    monkeypatch.setenv("RETINAEDGE_TRUSTED_KEY", str(both))
    monkeypatch.setenv("RETINAEDGE_REVOKED_KEYS", old_id)
    revoked = trusted_key_from_env()
    with pytest.raises(ManifestSignatureError, match="revoked"):
        verify_manifest(sign_manifest(manifest, old_private, release=release), revoked)
    assert verify_manifest(sign_manifest(manifest, new_private, release=release), revoked) == release
    other_private, _ = generate_key_pair()
    with pytest.raises(ManifestSignatureError, match="not one this device trusts"):
        verify_manifest(sign_manifest(manifest, other_private, release=release), Keyring.of(new_public))



def test_low8_deeply_nested_manifests_are_typed_errors(hostile, tmp_path):
    """Re-test: a 100k-level nested sidecar manifest raised RecursionError instead of a typed error."""
    from edge_runtime.backends.base import load_manifest

    nested = "[" * 100_000 + "]" * 100_000
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    manifest_path_for(model).write_text('{"model_name": ' + nested + "}")
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest(model)
    with pytest.raises(ManifestError, match="nested too deeply"):
        ArtifactManifest.from_json(nested)
    server = hostile()
    server.routes["/v1/models/latest"] = server.blob(nested.encode())
    with pytest.raises(ModelUpdateError, match="nested too deeply"):
        install_latest_model(server.url, "tok", "onnx", tmp_path / "m", limits=FAST)


def test_low5_full_disk_sync_still_sends_and_prunes_acknowledged_results(tmp_path, monkeypatch):
    """Re-test: on a full disk sync failed too (it records each attempt before sending), and acknowledged rows were
    never pruned, so the disk never recovered."""
    from edge_runtime.errors import OutboxError

    db = tmp_path / "o.db"
    old_ids = _fill(db, 8, overlay=b"\x89PNG" + b"o" * 20_000)  # acknowledged weeks ago, each holding its overlay
    box = Outbox(db)
    box.mark_acknowledged(old_ids)
    box.db.execute("UPDATE results SET acknowledged_at = acknowledged_at - 30 * 86400")
    pending = [_result(i) for i in range(3)]
    for r in pending:
        box.put(r)
    # The disk is full: the file may not grow (SQLite's own limit), and the attempt bookkeeping fails.
    pages = box.db.execute("PRAGMA page_count").fetchone()[0]
    box.db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(OutboxError, match="full"):
        box.put(_result(9), overlay=b"\x89PNG" + b"n" * 60_000)

    def full(*args):
        raise OutboxError("marking results sent failed: OperationalError: database or disk is full")

    monkeypatch.setattr(box, "mark_sent", full)
    server = AckServer()
    client, _ = _sync(box, server)
    report = client.run()
    assert sorted(server.received) == sorted(r.result_id for r in pending)  # sent despite the full disk
    assert report.pruned == 8 and box.counts() == {"pending": 0, "sent": 0, "acknowledged": 3, "rejected": 0}
    box.put(_result(9), overlay=b"\x89PNG" + b"n" * 60_000)  # the pruned pages hold the next result
    assert box.counts()["pending"] == 1
    box.close()
