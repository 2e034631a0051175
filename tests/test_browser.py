"""Reviewer page in headless Chromium (Debian chromium + chromedriver, driven by selenium)."""
import shutil
import uuid

import cv2
import numpy as np
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium/chromium-driver not installed (make install adds them)")
def test_reviewer_page_shows_results_overlays_and_filters(tmp_path, monkeypatch):
    import httpx
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
    from companion_api.crud import create_principal
    from edge_runtime.wire import QualityReport, ScreeningResult

    from .faults import ServerProcess

    url = f"sqlite:///{tmp_path / 'review.db'}"
    run_migrations(url)
    with make_sessionmaker(make_engine(url))() as session:
        device = create_principal(session=session, name="clinic-1", role="device")
        reviewer = create_principal(session=session, name="reviewer", role="reviewer")
    monkeypatch.setenv("RETINAEDGE_COOKIE_SECURE", "false")  # plain http on loopback in this test only
    server = ServerProcess(url, cwd=str(ROOT))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        import base64

        heat = cv2.applyColorMap(np.tile(np.arange(128, dtype=np.uint8), (128, 1)), cv2.COLORMAP_JET)
        overlay = base64.b64encode(cv2.imencode(".png", heat)[1].tobytes()).decode()
        entries = []
        for grade, eye in ((0, "left"), (2, "right"), (4, None)):
            probs = tuple(0.8 if g == grade else 0.05 for g in range(5))
            r = ScreeningResult(device_id="clinic-1", model_version="lite0-int8", model_sha256="a" * 64, backend="onnxruntime",
                                provider="CPUExecutionProvider", quality=QualityReport(True, 0.9), grade=grade,
                                probabilities=probs, confidence=0.8, referable=grade >= 2, threshold=0.5,
                                result_id=str(uuid.uuid4()), encounter_id="visit-1" if eye else None, eye=eye)
            entries.append({"result": r.to_dict(), "content_hash": r.content_hash(), "overlay_png_b64": overlay})
        ungradable = ScreeningResult(device_id="clinic-1", model_version="lite0-int8", model_sha256="a" * 64, backend="onnxruntime",
                                     provider="CPU", quality=QualityReport(False, 0.1, ("blurred",)), outcome="ungradable")
        entries.append({"result": ungradable.to_dict(), "content_hash": ungradable.content_hash()})
        headers = {"Authorization": f"Bearer {device}"}
        assert httpx.post(f"{base}/v1/sync", json={"results": entries}, headers=headers).status_code == 200
        first = entries[2]["result"]["result_id"]
        assert httpx.post(f"{base}/v1/results/{first}/insight", headers=headers).json()["source"] == "guideline"

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            driver.get(f"{base}/review")
            assert "/review/login" in driver.current_url  # no token: sent to the login form
            driver.find_element(By.ID, "token").send_keys(reviewer)
            driver.find_element(By.ID, "login").click()

            def settled(condition):  # the click returns before the next page has loaded; a busy CI box is slow
                WebDriverWait(driver, 30).until(lambda d: condition(), message=f"page at {driver.current_url}")

            settled(lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.result")) == 4)
            assert "REFERABLE" in driver.page_source and "retake" in driver.page_source and "does not diagnose" in driver.page_source
            images = driver.find_elements(By.CSS_SELECTOR, "img[alt='CAM overlay']")
            assert len(images) == 3
            settled(lambda: all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 128
                                for img in images))
            assert "guideline" in driver.page_source
            shot = ROOT / "reports" / "reviewer_page.png"
            shot.parent.mkdir(exist_ok=True)
            driver.save_screenshot(str(shot))
            driver.get(f"{base}/review?grade=4")
            settled(lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.result")) == 1)
            # Encounters: one visit, both eyes, referred because the right eye is referable; CSP lets overlays load.
            driver.find_element(By.ID, "tab-encounters").click()
            settled(lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.encounter")) == 1)
            visit = driver.find_element(By.CSS_SELECTOR, "tr.encounter")
            assert "REFER" in visit.text and "right eye referable" in visit.text and "does not diagnose" in driver.page_source
            eyes = visit.find_elements(By.CSS_SELECTOR, "td.eye img[alt='CAM overlay']")
            assert len(eyes) == 2
            settled(lambda: all(driver.execute_script("return arguments[0].naturalWidth", img) == 128 for img in eyes))
            driver.save_screenshot(str(ROOT / "reports" / "reviewer_encounters.png"))
        finally:
            driver.quit()
    finally:
        server.stop()
