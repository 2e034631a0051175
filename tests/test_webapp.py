"""The offline web app (web/) in headless Debian Chromium: install, offline screening of both eyes, outbox, sync,
refused models, and the golden fixtures that bind the browser port to edge_runtime."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FIXTURES = ROOT / "web" / "fixtures"
GOLDEN = FIXTURES / "golden.json"
needs_chromium = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                    reason="Debian chromium/chromium-driver not installed (make install adds them)")


@pytest.fixture(scope="module")
def web_dist() -> Path:
    """web/dist, built (or found up to date) by the Makefile target `make test` runs first."""
    if not shutil.which("npm"):
        pytest.skip("node/npm not installed: the web app cannot be built here")
    subprocess.run(["make", "-s", "web"], cwd=ROOT, check=True, timeout=600)
    return ROOT / "web" / "dist"


def chrome(tmp_path: Path, width: int = 412, height: int = 915, extra: tuple[str, ...] = ()):
    """Headless Chromium at a phone-sized viewport, with its own profile (service worker, caches, IndexedDB)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / f'chrome-{uuid.uuid4().hex[:6]}'}", f"--window-size={width},{height}",
                 *extra):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    # A headless window is at least 500 px wide: a phone's viewport is emulated instead.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True})
    return driver


def settled(driver, condition, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(_):
        return condition()

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        check, message=f"{what} (page {driver.current_url}; console {driver.get_log('browser')[-5:]})")


def sign(manifest: dict, private_pem: bytes, sequence: int | None = 1, expires_in_days: float = 30) -> dict:
    """The publisher's signature over the manifest as this version writes it (defaults of newer fields filled in,
    as the server's upload stores it), with a release ``sequence`` (None: no release)."""
    from datetime import datetime, timedelta, timezone

    from edge_runtime.contract import ArtifactManifest
    from edge_runtime.signing import Release, sign_manifest

    release = None if sequence is None else Release(sequence, datetime.now(timezone.utc) + timedelta(days=expires_in_days))
    return sign_manifest(json.loads(ArtifactManifest.from_dict(manifest).to_json()), private_pem, release=release)


def fixture_model(precision: str, fmt: str = "onnx") -> tuple[bytes, dict]:
    path = FIXTURES / "model" / f"model_{precision}.{fmt}"
    return path.read_bytes(), json.loads(Path(str(path) + ".manifest.json").read_text())


class Clinic:
    """A companion server (own process, SQLite) with a device, a reviewer, a publisher key and an uploaded model."""

    def __init__(self, tmp_path: Path, monkeypatch):
        from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
        from companion_api.crud import create_principal
        from edge_runtime.signing import generate_key_pair

        from .faults import ServerProcess

        url = f"sqlite:///{tmp_path / 'clinic.db'}"
        run_migrations(url)
        with make_sessionmaker(make_engine(url))() as session:
            self.device = create_principal(session=session, name="clinic-phone-1", role="device")
            self.reviewer = create_principal(session=session, name="reviewer", role="reviewer")
            self.publisher = create_principal(session=session, name="publisher", role="publisher")
        self.private_pem, public_pem = generate_key_pair()
        # A development server: the app checks the publisher's signature itself, without release sequences.
        monkeypatch.setenv("RETINAEDGE_ALLOW_UNSIGNED_MODELS", "true")
        monkeypatch.setenv("RETINAEDGE_PUBLISHER_KEYS", json.dumps([public_pem.decode()]))
        monkeypatch.setenv("RETINAEDGE_COOKIE_SECURE", "false")  # plain http on loopback in this test only
        monkeypatch.setenv("RETINAEDGE_ARTIFACT_DIR", str(tmp_path / "models"))
        self.server = ServerProcess(url, cwd=str(ROOT))
        self.server.start()
        self.base = f"http://127.0.0.1:{self.server.port}"

    def publish(self, model: bytes, manifest: dict) -> None:
        import httpx

        response = httpx.post(f"{self.base}/v1/models", headers={"Authorization": f"Bearer {self.publisher}"},
                              files={"artifact": (f"model.{manifest['format']}", model)},
                              data={"manifest": json.dumps(manifest)})
        assert response.status_code == 200, response.text

    def history(self) -> list[dict]:
        import httpx

        response = httpx.get(f"{self.base}/v1/history", params={"limit": 500},
                             headers={"Authorization": f"Bearer {self.reviewer}"})
        assert response.status_code == 200, response.text
        return response.json()["data"]


def install_app(driver, clinic: Clinic) -> None:
    """Open the app, enter the device token, set up: the model is downloaded, verified and cached."""
    from selenium.webdriver.common.by import By

    driver.get(f"{clinic.base}/app/")
    settled(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "setup", what="setup")
    driver.find_element(By.ID, "token").send_keys(clinic.device)
    driver.find_element(By.ID, "install").click()
    settled(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "screening",
            what="model downloaded and verified")


OUTBOX_JS = """
const done = arguments[arguments.length - 1];
const open = indexedDB.open('retinaedge');
open.onsuccess = () => {
  const all = open.result.transaction('results').objectStore('results').getAll();
  all.onsuccess = () => done(all.result.map((r) => ({id: r.result_id, state: r.state, outcome: r.result.outcome,
    eye: r.result.eye, encounter: r.result.encounter_id, hash: r.content_hash, canonical: r.canonical})));
};
open.onerror = () => done(null);
"""


def both_eye_photos(tmp_path: Path) -> tuple[Path, Path]:
    """Right and left eye of one EyePACS patient from ../shared/data (never copied), else two synthetic photos."""
    pair = [SHARED_DATA / "eyepacs_full" / "images" / f"15_{eye}.jpg" for eye in ("right", "left")]
    if all(p.is_file() for p in pair):
        return pair[0], pair[1]
    return FIXTURES / "photos" / "grade3.jpg", FIXTURES / "photos" / "grade0.jpg"


def screen_photo(driver, photo: Path, expected_count: int) -> str:
    """Screen a photo file; ``expected_count``: photos screened since the page loaded, this one included."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false", field)
    field.send_keys(str(photo))
    settled(driver, lambda: driver.execute_script("return document.body.dataset.screened") == str(expected_count)
            or driver.find_element(By.ID, "screen-error").text, what=f"result of {photo.name} stored")
    assert not driver.find_element(By.ID, "screen-error").text, driver.find_element(By.ID, "screen-error").text
    return driver.find_element(By.ID, "outcome").get_attribute("data-outcome")


@needs_chromium
def test_install_offline_both_eyes_outbox_sync(web_dist, tmp_path, monkeypatch):
    """Install online, screen offline (server stopped), reload, come online, sync: each result exactly once. The
    server offers ONNX and TFLite INT8 releases: the app screens with the first of runtime.PREFERENCE (TFLite INT8 in
    LiteRT.js) and every result says so."""
    from selenium.webdriver.common.by import By

    clinic = Clinic(tmp_path, monkeypatch)
    for fmt in ("onnx", "tflite"):
        model, manifest = fixture_model("int8", fmt)
        clinic.publish(model, sign(manifest, clinic.private_pem))
    driver = chrome(tmp_path)
    try:
        install_app(driver, clinic)
        assert driver.execute_script("return self.crossOriginIsolated") is True  # COOP/COEP: WASM threads
        assert driver.execute_script("return document.body.dataset.artifact") == "tflite-int8"
        assert driver.execute_script("return document.body.dataset.backend") == "litert.js"
        settled(driver, lambda: driver.execute_script(
            "return !!navigator.serviceWorker.controller"), what="service worker controls the page")

        clinic.server.stop()  # offline: nothing answers at the server's address any more
        driver.refresh()
        settled(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "screening",
                what="app and verified model start from the service worker's caches with no server")
        encounter = driver.find_element(By.ID, "encounter").get_attribute("value")
        right, left = both_eye_photos(tmp_path)
        assert driver.find_element(By.ID, "eye-right").get_attribute("aria-checked") == "true"
        outcomes = [screen_photo(driver, right, 1)]
        assert "does not diagnose" in driver.find_element(By.ID, "disclaimer").text
        if outcomes[0] != "ungradable":  # a gradable right eye moves the visit on to the left eye
            assert driver.find_element(By.ID, "eye-left").get_attribute("aria-checked") == "true"
        driver.find_element(By.ID, "eye-left").click()
        outcomes.append(screen_photo(driver, left, 2))
        visit = driver.find_element(By.ID, "encounter-decision")
        assert visit.get_attribute("data-decision") in ("refer", "no_referral")  # both eyes in: never incomplete
        # An ungradable photo asks for a retake, with its reason and advice.
        assert screen_photo(driver, FIXTURES / "photos" / "blurred.jpg", 3) == "ungradable"
        assert driver.find_element(By.ID, "retake").is_displayed()
        reasons = driver.find_element(By.ID, "reasons").text
        assert "blurred" in reasons and "refocus" in reasons
        assert "UNGRADABLE" in driver.find_element(By.ID, "outcome").text
        assert "does not diagnose" in driver.page_source
        shot = ROOT / "reports" / "webapp_result.png"
        shot.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(shot))

        before = driver.execute_async_script(OUTBOX_JS)
        driver.refresh()  # a reload loses nothing
        settled(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "screening", what="reload")
        after = driver.execute_async_script(OUTBOX_JS)
        assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, before)) and len(after) == 3
        assert {r["state"] for r in after} <= {"pending", "sent"} and {r["encounter"] for r in after} == {encounter}

        clinic.server.start()  # online again, same origin
        driver.find_element(By.ID, "sync").click()
        settled(driver, lambda: driver.execute_script("return document.getElementById('pending').dataset.count") == "0",
                what="synced")
        synced = driver.execute_async_script(OUTBOX_JS)
        assert {r["state"] for r in synced} == {"acknowledged"}
        assert {json.loads(r["canonical"])["backend"] for r in synced} == {"litert.js"}  # the offline reload kept it
        # Idempotent: the same results sent again are duplicates on the server, never second copies.
        driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const open = indexedDB.open('retinaedge');
            open.onsuccess = () => { const tx = open.result.transaction('results', 'readwrite'); const s = tx.objectStore('results');
              s.getAll().onsuccess = (e) => { for (const r of e.target.result) { r.state = 'pending'; s.put(r); } };
              tx.oncomplete = () => done(true); };""")
        driver.find_element(By.ID, "sync").click()
        settled(driver, lambda: driver.execute_script("return document.getElementById('pending').dataset.count") == "0",
                what="re-sent")
        history = clinic.history()
        ids = [r["result_id"] for r in history]
        assert sorted(ids) == sorted(r["id"] for r in before) and len(set(ids)) == len(ids) == 3
        assert {r["device"] for r in history} == {"clinic-phone-1"}
        # The reviewer page shows them like any device's, with the visit of both eyes.
        driver.get(f"{clinic.base}/review/login")
        driver.find_element(By.ID, "token").send_keys(clinic.reviewer)
        driver.find_element(By.ID, "login").click()
        settled(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.result")) == 3, what="review page")
        assert "clinic-phone-1" in driver.page_source and outcomes[0] in ("graded", "uncertain", "ungradable")
        driver.get(f"{clinic.base}/review?view=encounters")
        settled(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.encounter")) == 1, what="encounter")
    finally:
        driver.quit()
        clinic.server.stop()


@needs_chromium
def test_forged_and_ungated_models_are_refused(web_dist, tmp_path, monkeypatch):
    """A manifest altered after signing, a validly signed one whose fidelity gate failed, or one signed without a
    release (which cannot be told from an older one) is never used."""
    from selenium.webdriver.common.by import By

    clinic = Clinic(tmp_path, monkeypatch)
    model, manifest = fixture_model("fp32")
    # Altered after signing: the server checks only signed releases, so this one (signed before releases existed)
    # reaches the phone as a compromised server would serve it; the app must refuse it on its own.
    forged = sign(manifest, clinic.private_pem, sequence=None)
    forged["operating_point"] = {**forged["operating_point"], "temperature": 5.0}  # flattens every score: after signing
    clinic.publish(model, forged)
    driver = chrome(tmp_path)
    try:
        driver.get(f"{clinic.base}/app/")
        settled(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "setup", what="setup")
        driver.find_element(By.ID, "token").send_keys(clinic.device)
        driver.find_element(By.ID, "install").click()
        settled(driver, lambda: "does not verify" in driver.find_element(By.ID, "setup-error").text, what="forged refused")
        clinic.publish(model, sign(manifest, clinic.private_pem, sequence=None))  # signed, but not as a release
        driver.find_element(By.ID, "install").click()
        settled(driver, lambda: "without a release" in driver.find_element(By.ID, "setup-error").text,
                what="release-less manifest refused")
        ungated = sign({**manifest, "gate": {**manifest["gate"], "status": "failed", "failures": ["referral agreement"]}},
                       clinic.private_pem, sequence=1)
        clinic.publish(model, ungated)
        driver.find_element(By.ID, "install").click()
        settled(driver, lambda: "fidelity gate is 'failed'" in driver.find_element(By.ID, "setup-error").text,
                what="ungated refused")
        assert driver.execute_script("return document.body.dataset.ready") == "setup"  # nothing was installed
        assert driver.execute_async_script(
            "const d = arguments[0]; caches.open('retinaedge-model-v1').then((c) => c.keys()).then((k) => d(k.length))") == 0
    finally:
        driver.quit()
        clinic.server.stop()


def test_tflite_int8_fixture_is_integer_inside_with_float_io():
    """The TFLite INT8 artifact LiteRT.js runs: float input and outputs (LiteRT.js refuses int8 ones), int8
    convolutions inside, and a passed gate in its manifest."""
    from ai_edge_litert.interpreter import Interpreter

    path = FIXTURES / "model" / "model_int8.tflite"
    interpreter = Interpreter(model_path=str(path))
    ends = interpreter.get_input_details() + interpreter.get_output_details()
    assert {d["dtype"] for d in ends} == {np.float32}
    assert [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8 and len(d["shape"]) == 4]
    manifest = json.loads(Path(str(path) + ".manifest.json").read_text())
    assert manifest["gate"]["status"] == "passed" and "float I/O" in manifest["quantization"]["notes"]


def load_make_fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("web_make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def default_photos(golden: dict) -> list[dict]:
    """Every synthetic photo, and two gradable and two ungradable real ones (all of them with --runslow)."""
    real = [p for p in golden["photos"] if "/" in p["photo"] and (SHARED_DATA / p["photo"]).is_file()]
    chosen = [p for p in real if p["quality"]["gradable"]][:2] + [p for p in real if not p["quality"]["gradable"]][:2]
    return [p for p in golden["photos"] if "/" not in p["photo"]] + chosen


@needs_chromium
def test_golden_fixtures_agree(web_dist, tmp_path, capsys):
    """Python still makes the golden numbers, and the browser port makes the same: identical verdicts and
    decisions, probabilities within 1e-4, model inputs within one 8-bit level."""
    golden = json.loads(GOLDEN.read_text())
    check_fixtures(golden, default_photos(golden), tmp_path, capsys)


@needs_chromium
@pytest.mark.slow
def test_golden_fixtures_agree_on_every_photo(web_dist, tmp_path, capsys):
    golden = json.loads(GOLDEN.read_text())
    photos = [p for p in golden["photos"] if "/" not in p["photo"] or (SHARED_DATA / p["photo"]).is_file()]
    check_fixtures(golden, photos, tmp_path, capsys)


def check_fixtures(golden: dict, photos: list[dict], tmp_path: Path, capsys) -> None:
    from cryptography.hazmat.primitives import serialization

    from edge_runtime.backends import open_session
    from edge_runtime.preprocess import level_step, preprocess
    from edge_runtime.signing import generate_key_pair, load_public_key

    from .faults import ServerProcess

    fixtures = load_make_fixtures()
    assert (ROOT / "web" / "src" / "contract.generated.json").read_text() == fixtures.contract_text(), \
        "edge_runtime's texts or quality rules changed: run web/fixtures/make_fixtures.py"
    assert sum("/" not in p["photo"] for p in photos) >= 10  # the synthetic ones always
    models = golden["models"]  # fixture key -> file: the ONNX models (ONNX Runtime) and the TFLite ones (LiteRT)
    sessions = {key: open_session(FIXTURES / "model" / name) for key, name in models.items()}
    policy = sessions["fp32"].info.manifest.preprocess
    step = level_step(policy)
    private_pem, public_pem = generate_key_pair()
    key_b64 = b64(load_public_key(public_pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    # 1. Python now == the fixtures (else edge_runtime changed: regenerate them, and the port must follow).
    live = {}
    for entry in photos:
        ref = fixtures.python_reference(entry["photo"], sessions)
        for key in ("decoded_sha256", "fov", "input_sha256", "crop_box"):
            assert ref.get(key) == entry.get(key), f"{entry['photo']}: {key} drifted; run web/fixtures/make_fixtures.py"
        assert (ref["quality"]["gradable"], ref["quality"]["failing"]) == (entry["quality"]["gradable"],
                                                                          entry["quality"]["failing"]), entry["photo"]
        for precision, model in entry["models"].items():
            now = ref["models"][precision]
            assert np.allclose(now["logits"], model["logits"], atol=1e-4), (entry["photo"], precision)
            assert [now[k] for k in ("grade", "referable", "uncertain")] == [model[k] for k in ("grade", "referable", "uncertain")]
        bgr = fixtures.decoded(entry["photo"], policy)
        live[entry["photo"]] = (bgr, preprocess(bgr, policy) if entry["quality"]["gradable"] else None)

    server = ServerProcess(f"sqlite:///{tmp_path / 'check.db'}", cwd=str(ROOT))
    server.start()
    driver = chrome(tmp_path)
    rows, own_decode, worst = [], [], {"probability": 0.0, "tensor_levels": 0.0, "metric_rel": 0.0}
    try:
        driver.get(f"http://127.0.0.1:{server.port}/app/check.html")
        settled(driver, lambda: driver.execute_script("return !!window.retinaedgeCheck"), what="check page")
        assert driver.execute_script("return self.crossOriginIsolated") is True
        driver.set_script_timeout(120)
        for precision, file_name in models.items():
            path = FIXTURES / "model" / file_name
            model, manifest = path.read_bytes(), json.loads(Path(str(path) + ".manifest.json").read_text())
            info = driver.execute_async_script(
                "const d = arguments[arguments.length - 1]; window.retinaedgeCheck.open(arguments[0], arguments[1], "
                "arguments[2]).then(d, (e) => d(String(e)))",
                b64(model), json.dumps(sign(manifest, private_pem)), key_b64)
            assert isinstance(info, dict), info
            assert info["backend"] == {"onnx": "onnxruntime-web", "tflite": "litert.js"}[manifest["format"]], info
            assert driver.execute_script("return window.retinaedgeCheck.decodeSide()") == golden["decode_side"]
            for entry in photos:
                bgr, pre = live[entry["photo"]]
                png = cv2.imencode(".png", bgr)[1].tobytes()  # Python's decoded pixels: the port alone is compared
                got = driver.execute_async_script(
                    "const d = arguments[arguments.length - 1]; window.retinaedgeCheck.analyse(arguments[0], 'image/png')"
                    ".then(d, (e) => d({error: String(e.stack || e)}))", b64(png))
                assert "error" not in got, got
                name = entry["photo"]
                assert got["decoded_sha256"] == hashlib.sha256(bgr.tobytes()).hexdigest(), name
                assert got["fov"] == entry["fov"], name
                q = got["quality"]
                assert q["gradable"] == entry["quality"]["gradable"], (name, q["reasons"], entry["quality"]["failing"])
                failing = fixtures.failing_rules(q["reasons"])
                assert failing == entry["quality"]["failing"], (name, failing)
                for metric, value in entry["quality"]["metrics"].items():
                    rel = abs(q["metrics"][metric] - value) / max(abs(value), 1e-6)
                    worst["metric_rel"] = max(worst["metric_rel"], rel)
                model_ref = entry["models"].get(precision)
                if model_ref is None:
                    assert got["decision"] is None, name
                    rows.append((name, precision, "ungradable", "ungradable", 0.0))
                    continue
                tensor = np.frombuffer(base64.b64decode(got["tensor"]), np.float32).reshape(pre.tensor.shape)
                levels = float((np.abs(tensor - pre.tensor) / step.reshape(1, 3, 1, 1)).max())
                worst["tensor_levels"] = max(worst["tensor_levels"], levels)
                assert levels <= 1.0 + 1e-3, (name, levels)
                d = got["decision"]
                diff = float(np.abs(np.asarray(d["probabilities"]) - np.asarray(model_ref["probabilities"])).max())
                diff = max(diff, abs(d["referable_probability"] - model_ref["referable_probability"]))
                worst["probability"] = max(worst["probability"], diff)
                assert diff <= 1e-4, (name, precision, diff)
                assert [d[k] for k in ("grade", "referable", "uncertain", "outcome")] == \
                    [model_ref[k] for k in ("grade", "referable", "uncertain", "outcome")], (name, precision, d, model_ref)
                rows.append((name, precision, model_ref["outcome"], d["outcome"], diff))
            # The app's own decode of the original file (the browser's JPEG decoder, then the Screener's reduction
            # by area averaging where libjpeg decodes at reduced scale): reported beside the bound port, not bound;
            # once (FP32): the decode is the same for every model.
            for entry in photos if precision == "fp32" else ():
                data = fixtures.photo_bytes(entry["photo"])
                mime = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
                got = driver.execute_async_script(
                    "const d = arguments[arguments.length - 1]; window.retinaedgeCheck.analyse(arguments[0], arguments[1])"
                    ".then(d, (e) => d({error: String(e.stack || e)}))", b64(data), mime)
                model_ref = entry["models"].get(precision)
                own = "ungradable" if got.get("decision") is None else got["decision"]["outcome"]
                same = (got.get("quality", {}).get("gradable") == entry["quality"]["gradable"]
                        and (model_ref is None or (got["decision"] or {}).get("grade") == model_ref["grade"]
                             and own == model_ref["outcome"]))
                own_decode.append((entry["photo"], precision, same))
    finally:
        driver.quit()
        server.stop()
    with capsys.disabled():
        real = len({r[0] for r in rows if "/" in r[0]})
        print(f"\nweb fixtures: {len({r[0] for r in rows})} photos ({real} real), {len(rows)} photo x model pairs, "
              f"identical verdicts and decisions {sum(r[2] == r[3] for r in rows)}/{len(rows)}; largest probability "
              f"difference {worst['probability']:.2e}; largest input difference {worst['tensor_levels']:.3f} 8-bit "
              f"levels; largest relative quality-metric difference {worst['metric_rel']:.2e}; with the browser's own "
              f"decode of the files: {sum(o[2] for o in own_decode)}/{len(own_decode)} identical verdicts and decisions "
              f"(not bound: {[o[:2] for o in own_decode if not o[2]]})")


@needs_chromium
@pytest.mark.slow
def test_phone_screenshot(web_dist, tmp_path, monkeypatch):
    """The README's picture: both eyes of a synthetic patient screened at a 360-px-wide viewport (no real photo)."""
    from selenium.webdriver.common.by import By

    clinic = Clinic(tmp_path, monkeypatch)
    for fmt in ("onnx", "tflite"):  # as a clinic publishes: the phone picks TFLite INT8 (LiteRT.js)
        model, manifest = fixture_model("int8", fmt)
        clinic.publish(model, sign(manifest, clinic.private_pem))
    driver = chrome(tmp_path, width=360, height=780)
    try:
        install_app(driver, clinic)
        screen_photo(driver, FIXTURES / "photos" / "grade0.jpg", 1)
        screen_photo(driver, FIXTURES / "photos" / "grade4.jpg", 2)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 360  # no sideways scrolling
        assert driver.find_element(By.ID, "encounter-decision").get_attribute("data-decision") in ("refer", "no_referral")
        driver.execute_script("document.getElementById('file').hidden = true")
        shot = ROOT / "reports" / "webapp_phone.png"
        shot.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
        clinic.server.stop()


def fake_camera(path: Path, frames: int = 30) -> Path:
    """A Y4M clip of a synthetic fundus (640 x 480, the surround black) for Chromium's fake capture device."""
    photo = cv2.imread(str(FIXTURES / "photos" / "grade3.jpg"))
    frame = cv2.copyMakeBorder(cv2.resize(photo, (480, 480)), 0, 0, 80, 80, cv2.BORDER_CONSTANT, value=0)
    yuv = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes()
    with open(path, "wb") as fh:
        fh.write(b"YUV4MPEG2 W640 H480 F30:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            fh.write(b"FRAME\n" + yuv)
    return path


@needs_chromium
def test_camera_still_is_screened(web_dist, tmp_path, monkeypatch):
    """Camera, then Take photo: a still from the (fake) rear camera's stream goes through the same step."""
    from selenium.webdriver.common.by import By

    clinic = Clinic(tmp_path, monkeypatch)
    model, manifest = fixture_model("fp32")
    clinic.publish(model, sign(manifest, clinic.private_pem))
    driver = chrome(tmp_path, extra=("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                     f"--use-file-for-fake-video-capture={fake_camera(tmp_path / 'fundus.y4m')}"))
    try:
        install_app(driver, clinic)
        driver.find_element(By.ID, "camera").click()
        settled(driver, lambda: driver.find_element(By.ID, "capture").is_displayed()
                and driver.execute_script("return document.getElementById('video').videoWidth") == 640, what="camera on")
        driver.find_element(By.ID, "capture").click()
        settled(driver, lambda: driver.execute_script("return document.body.dataset.screened") == "1", what="still")
        assert not driver.find_element(By.ID, "screen-error").text
        stored = driver.execute_async_script(OUTBOX_JS)
        assert len(stored) == 1 and stored[0]["outcome"] in ("graded", "uncertain") and stored[0]["eye"] == "right"
        # Only an ONNX release on this server: ONNX Runtime Web screens, and the result says so.
        assert json.loads(stored[0]["canonical"])["backend"] == "onnxruntime-web"
        assert driver.execute_script("return document.getElementById('video').srcObject") is None  # camera released
    finally:
        driver.quit()
        clinic.server.stop()
