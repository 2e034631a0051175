"""The web app's speed in headless Chromium against native ONNX Runtime on the same CPU, in the same run.

For every ONNX artifact given (default: the web fixtures' tiny FP32/INT8 model and an EfficientNet-Lite0 student at
``--input-size`` in FP32 and INT8, built as ``benchmarks.int8_speed`` builds it), one table row: p50 of inference and
of the whole screening step (decode .. quality gate .. preprocess .. infer .. decide .. overlay .. durable outbox
write) in the browser (ONNX Runtime Web, WASM SIMD, threads, cross-origin isolated) and natively (edge_runtime's
Screener with an outbox), with the ratio; the app's first-load bytes (app + runtime as the server sends them, plus
the model); the CPU's int8 features and the browser's version. Native and browser samples are taken in the same run
on the same photo; the machine may be shared, so read ratios rather than absolutes and rerun when they move.

    python -m benchmarks.browser_speed --threads 2 --runs 30
    python -m benchmarks.browser_speed --artifact path/to/model_int8.onnx --photo ../shared/data/eyepacs_full/images/17_left.jpg
    python -m benchmarks.browser_speed --litert   # also the Lite0 TFLite files in LiteRT.js (XNNPack WASM, threads)

``--litert`` installs ``@litertjs/core`` (npm, outside the app's lockfile) into ``--work``, bundles
``web/timing/litert.ts`` into ``web/dist/bench/`` for the run and removes it afterwards: the app never ships it.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .device import cpu_model, fingerprint
from .report import write_markdown_and_json

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
FIXTURE_MODELS = [WEB / "fixtures" / "model" / f"model_{p}.onnx" for p in ("fp32", "int8")]
DEFAULT_PHOTO = ROOT.parent / "shared" / "data" / "eyepacs_full" / "images" / "17_left.jpg"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "eyepacs_full"


def first_load_bytes(dist: Path) -> dict[str, int]:
    """What a first visit downloads for the app shell and runtime: each file the service worker caches, gzip where
    the server has a .gz beside it (it sends that to browsers that accept gzip)."""
    sent = raw = 0
    for path in sorted(dist.rglob("*")):
        if not path.is_file() or path.suffix == ".gz" or path.name.startswith("check."):
            continue
        packed = path.with_name(path.name + ".gz")
        raw += path.stat().st_size
        sent += packed.stat().st_size if packed.is_file() else path.stat().st_size
    return {"app_runtime_sent": sent, "app_runtime_raw": raw}


def native_times(artifact: Path, photo: bytes, threads: int, runs: int, tmp: Path) -> dict[str, float]:
    """p50 (ms) of native inference and of the Screener's whole step, outbox included, on this CPU."""
    from edge_runtime.backends import open_session
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener

    session = open_session(artifact, allow_ungated=True, threads=threads)
    screener = Screener(session, outbox=Outbox(tmp / f"native-{artifact.stem}-{time.time_ns()}.db"), store_overlays=True)
    first = screener.screen_bytes(photo, "bench.jpg")
    policy = session.info.manifest.preprocess
    size = policy.input_size
    x = np.random.default_rng(0).standard_normal((1, 3, size, size) if policy.layout == "NCHW" else
                                                  (1, size, size, 3)).astype(np.float32)
    for _ in range(5):
        session.run(x)
    infer = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(x)
        infer.append((time.perf_counter() - start) * 1000)
    step = []
    for _ in range(max(5, runs // 3)):
        start = time.perf_counter()
        screener.screen_bytes(photo, "bench.jpg")
        step.append((time.perf_counter() - start) * 1000)
    return {"infer_ms": float(np.median(infer)), "step_ms": float(np.median(step)), "outcome": first.result.outcome}


class Server:
    """The companion server with an empty SQLite database, serving the built app at /app/."""

    def __init__(self, tmp: Path):
        from companion_api.core.db import run_migrations

        url = f"sqlite:///{tmp / 'bench.db'}"
        run_migrations(url)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "RETINAEDGE_DATABASE_URL": url, "RETINAEDGE_RATE_LIMIT": "100000/minute"}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "error"], env=env, cwd=str(ROOT),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from edge_runtime.sync import wait_until_healthy

        wait_until_healthy(f"http://127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def browser(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", f"--user-data-dir={tmp / 'chrome'}", "--window-size=412,915"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(600)
    return driver


def browser_times(driver, artifact: Path, photo: bytes, threads: int, runs: int) -> dict:
    manifest = Path(str(artifact) + ".manifest.json").read_text()
    info = driver.execute_async_script(
        "const d = arguments[arguments.length - 1]; window.retinaedgeCheck.openForTiming(arguments[0], arguments[1], "
        "arguments[2]).then(d, (e) => d({error: String(e)}))", base64.b64encode(artifact.read_bytes()).decode(),
        manifest, threads)
    if "error" in info:
        return {"error": info["error"]}
    got = driver.execute_async_script(
        "const d = arguments[arguments.length - 1]; window.retinaedgeCheck.time(arguments[0], 'image/jpeg', "
        "arguments[1]).then(d, (e) => d({error: String(e)}))", base64.b64encode(photo).decode(), runs)
    return {**got, "runtime": info}


def lite0_artifacts(work: Path, size: int, data: Path, formats: tuple[str, ...]) -> list[Path]:
    from edge_runtime.backends import cpu_features, int8_target

    from .int8_speed import build_artifacts

    found = build_artifacts(work, data, int8_target(cpu_features()), formats=formats, input_size=size,
                            pretrained=False)
    return [found[(fmt, precision)] for fmt in formats for precision in ("fp32", "int8") if (fmt, precision) in found]


LITERT_VERSION = "2.5.3"


def install_litert(work: Path) -> Path:
    """@litertjs/core in ``work`` and its timing page bundled into web/dist/bench/ (removed by the caller)."""
    prefix = work / "litert"
    if not (prefix / "node_modules" / "@litertjs" / "core").is_dir():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error", "--prefix",
                        str(prefix), f"@litertjs/core@{LITERT_VERSION}"], check=True)
    bench = WEB / "dist" / "bench"
    (bench / "litert-wasm").mkdir(parents=True, exist_ok=True)
    esbuild = WEB / "node_modules" / ".bin" / "esbuild"
    subprocess.run([str(esbuild), str(WEB / "timing" / "litert.ts"), "--bundle", "--format=esm", "--log-level=warning",
                    f"--outfile={bench / 'litert.js'}"], check=True,
                   env={**os.environ, "NODE_PATH": str(prefix / "node_modules")})
    shutil.copy(WEB / "timing" / "litert.html", bench / "litert.html")
    for name in ("litert_wasm_threaded_internal.js", "litert_wasm_threaded_internal.wasm"):
        shutil.copy(prefix / "node_modules" / "@litertjs" / "core" / "wasm" / name, bench / "litert-wasm" / name)
    return bench


def litert_times(driver, base: str, artifact: Path, runs: int) -> dict:
    policy = json.loads(Path(str(artifact) + ".manifest.json").read_text())["preprocess"]
    size = policy["input_size"]
    shape = [1, 3, size, size] if policy["layout"] == "NCHW" else [1, size, size, 3]
    driver.get(f"{base}/app/bench/litert.html")
    deadline = time.monotonic() + 60
    while not driver.execute_script("return !!window.litertCheck") and time.monotonic() < deadline:
        time.sleep(0.1)
    return driver.execute_async_script(
        "const d = arguments[arguments.length - 1]; window.litertCheck.time(arguments[0], arguments[1], arguments[2])"
        ".then(d, (e) => d({error: String(e && e.message || e)}))", base64.b64encode(artifact.read_bytes()).decode(),
        shape, runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", type=Path, help="ONNX artifact with its sidecar (repeatable)")
    parser.add_argument("--input-size", type=int, default=224, help="the Lite0 student built when no --artifact")
    parser.add_argument("--no-lite0", action="store_true", help="only the fixture models (no Lite0 export)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO if DEFAULT_PHOTO.is_file() else
                        WEB / "fixtures" / "photos" / "grade2.jpg")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="calibration photos for the Lite0 INT8 export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retinaedge_browser_speed")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "browser_speed")
    parser.add_argument("--litert", action="store_true", help="also time the Lite0 TFLite files in LiteRT.js")
    args = parser.parse_args(argv)
    subprocess.run(["make", "-s", "web"], cwd=ROOT, check=True)
    artifacts = list(args.artifact or FIXTURE_MODELS)
    build_error = None
    if not args.artifact and not args.no_lite0:
        try:
            artifacts += lite0_artifacts(args.work, args.input_size, args.data,
                                         ("onnx", "tflite") if args.litert else ("onnx",))
        except Exception as exc:  # noqa: BLE001 - the table says why the student is missing; the rest still runs
            build_error = f"Lite0 {args.input_size}px not built: {type(exc).__name__}: {exc}"
    photo = args.photo.read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="retinaedge-browser-speed-"))
    bench = install_litert(args.work) if args.litert else None
    server = Server(tmp)
    driver = browser(tmp)
    rows = []
    try:
        driver.get(f"http://127.0.0.1:{server.port}/app/check.html")
        deadline = time.monotonic() + 60
        while not driver.execute_script("return !!window.retinaedgeCheck") and time.monotonic() < deadline:
            time.sleep(0.1)
        isolated = driver.execute_script("return self.crossOriginIsolated")
        version = driver.capabilities.get("browserVersion", "?")
        for artifact in [a for a in artifacts if a.suffix == ".onnx"] + [a for a in artifacts if a.suffix != ".onnx"]:
            manifest = json.loads(Path(str(artifact) + ".manifest.json").read_text())
            row = {"artifact": artifact.name, "model": manifest["model_name"], "precision": manifest["quantization"]["precision"],
                   "input": manifest["preprocess"]["input_size"], "size_mb": artifact.stat().st_size / 1e6,
                   "gate": manifest["gate"]["status"], "runtime": "onnxruntime-web" if artifact.suffix == ".onnx" else "LiteRT.js"}
            row["native"] = native_times(artifact, photo, args.threads, args.runs, tmp)
            if artifact.suffix == ".onnx":
                row["browser"] = browser_times(driver, artifact, photo, args.threads, args.runs)
            else:  # the app screens with ONNX only: LiteRT.js is timed on inference
                row["browser"] = litert_times(driver, f"http://127.0.0.1:{server.port}", artifact, args.runs)
            rows.append(row)
    finally:
        driver.quit()
        server.stop()
        if bench is not None:
            shutil.rmtree(bench, ignore_errors=True)
    load = first_load_bytes(WEB / "dist")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    int8 = ", ".join(sorted({f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags.split()})) or "none"
    lines = [f"# Web app speed: ONNX Runtime Web (WASM SIMD, {args.threads} threads, cross-origin isolated: {isolated}) "
             f"vs native ONNX Runtime", "",
             f"CPU: {cpu_model()} ({os.cpu_count()} cores), int8 features: {int8}; Chromium {version} headless; "
             f"photo {args.photo.name}; p50 of {args.runs} inferences and {max(5, args.runs // 3)} whole steps each.", "",
             "| artifact | browser runtime | precision | input | gate | MB | browser infer ms | native infer ms | ratio "
             "| browser step ms | native step ms | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, n = r["browser"], r["native"]
        head = f"| {r['artifact']} | {r['runtime']} | {r['precision']} | {r['input']} | {r['gate']} | {r['size_mb']:.2f} | "
        if "error" in b:
            lines.append(head + f"failed: {b['error'][:80]} | {n['infer_ms']:.2f} | | | {n['step_ms']:.1f} | |")
            continue
        step = (f"{b['step_ms']:.1f} | {n['step_ms']:.1f} | {b['step_ms'] / n['step_ms']:.1f}x" if "step_ms" in b
                else f"- | {n['step_ms']:.1f} | -")
        lines.append(head + f"{b['infer_ms']:.2f} | {n['infer_ms']:.2f} | {b['infer_ms'] / n['infer_ms']:.1f}x | {step} |")
    app_mb = load["app_runtime_sent"] / 1e6
    lines += ["", f"First load: app + runtime {app_mb:.2f} MB as sent (gzip; {load['app_runtime_raw'] / 1e6:.2f} MB "
              "unpacked) + the model: " + ", ".join(f"{r['artifact']} {app_mb + r['size_mb']:.2f} MB" for r in rows
                                                    if r["runtime"] == "onnxruntime-web") + ".",
              "Browser stages of the last step (ms): " + "; ".join(
                  f"{r['artifact']}: " + ", ".join(f"{k} {v:.1f}" for k, v in (r["browser"].get("stages") or {}).items())
                  for r in rows if "stages" in r["browser"])]
    if build_error:
        lines += ["", build_error]
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    write_markdown_and_json(args.out, table, {"rows": rows, "first_load": load, "device": fingerprint(),
                                              "chromium": version, "cross_origin_isolated": isolated})


if __name__ == "__main__":
    main()
