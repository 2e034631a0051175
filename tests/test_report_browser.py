"""The demo's report.html and the benchmark report in headless Chromium: every plot loads, tables are tables."""
import shutil

import pytest

from ._demo_run import quick_demo

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield browser
    browser.quit()


def _loaded_images(driver) -> list[tuple[str, int]]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete ? i.naturalWidth : 0]);")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium/chromium-driver not installed (make install adds them)")
def test_demo_report_renders_plots_and_tables(driver, tmp_path):
    from selenium.webdriver.common.by import By

    run = quick_demo()
    assert run.returncode == 0, run.console[-3000:]
    driver.get((run.out / "report.html").resolve().as_uri())
    images = _loaded_images(driver)
    broken = [alt for alt, width in images if not width]
    assert not broken, broken
    alts = [alt for alt, _ in images]
    for plot in ("ROC curve with operating points", "latency vs size", "per-stage latency"):
        assert plot in alts, alts
    assert sum(alt.startswith("confusion matrix") for alt in alts) >= 2
    assert sum(alt.startswith("CAM overlay") for alt in alts) >= 1
    tables = driver.find_elements(By.TAG_NAME, "table")
    assert len(tables) >= 5
    assert all(t.find_elements(By.CSS_SELECTOR, "tbody tr") for t in tables)
    assert not driver.find_elements(By.TAG_NAME, "pre")  # no raw JSON or Markdown dumps
    assert "does not diagnose" in driver.find_element(By.CLASS_NAME, "disclaimer").text
    driver.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium/chromium-driver not installed (make install adds them)")
def test_benchmark_report_renders_plots_and_a_table(driver):
    from selenium.webdriver.common.by import By

    run = quick_demo()
    assert run.returncode == 0, run.console[-3000:]
    driver.get((run.out / "bench" / "report.html").resolve().as_uri())
    images = _loaded_images(driver)
    assert len(images) >= 2 and all(width for _, width in images), images
    rows = driver.find_elements(By.CSS_SELECTOR, "table tbody tr")
    assert len(rows) >= 4  # torch teacher + ONNX rows + the CoreML row that cannot run here
    assert not driver.find_elements(By.TAG_NAME, "pre")
