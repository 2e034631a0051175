"""The web app's speed in headless Chromium against the native runtimes on the same CPU, in the same run.

For every artifact the app can use (the Lite0 student at ``--input-size`` as ONNX and TFLite, FP32 and INT8, built
as ``benchmarks.int8_speed`` builds it; ``--fixtures`` adds the web fixtures' tiny models; ``--artifact`` replaces
them), one row of one printed table: the browser runtime the app opens it with (ONNX Runtime Web's WASM SIMD +
threads for ONNX, LiteRT.js's XNNPack WASM with relaxed SIMD + threads for TFLite), p50 with a 95% interval of
inference and of the whole screening step (decode .. quality gate .. preprocess .. infer .. decide .. overlay ..
durable outbox write) in the browser and natively (edge_runtime's Screener, ONNX Runtime or LiteRT, with an outbox),
their ratios, the first-load bytes with that model, and the app's preference rank (``web/src/runtime.ts``). Header:
CPU model and int8 features, the load average before and after (the machine may be shared), Chromium's version,
cross-origin isolation and whether WebGPU has an adapter. Samples are taken in rounds that visit every artifact,
native then browser, so load from other processes falls on all of them alike.

    python -m benchmarks.browser_speed                       # Lite0 224 px: ONNX and TFLite, FP32 and INT8
    python -m benchmarks.browser_speed --fixtures --no-lite0  # the tiny fixture models only (seconds)
    python -m benchmarks.browser_speed --artifact a.tflite --artifact b.onnx --photo ../shared/data/eyepacs_full/images/17_left.jpg
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
FIXTURE_MODELS = [WEB / "fixtures" / "model" / f"model_{p}.{f}" for f in ("onnx", "tflite") for p in ("fp32", "int8")]
DEFAULT_PHOTO = ROOT.parent / "shared" / "data" / "eyepacs_full" / "images" / "17_left.jpg"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "eyepacs_full"
BROWSER_RUNTIME = {"onnx": "onnxruntime-web", "tflite": "litert.js"}
RUNTIME_DIRS = {"onnx": "ort", "tflite": "litert"}  # where web/dist keeps each runtime's files


def first_load_bytes(dist: Path) -> dict[str, int]:
    """What a first visit downloads before the model: every file the service worker precaches (the shell and both
    runtimes), gzip where the server has a .gz beside it (it sends that to browsers that accept gzip); and per
    runtime its own share."""
    sent = raw = 0
    per_runtime = {name: 0 for name in RUNTIME_DIRS.values()}
    for path in sorted(dist.rglob("*")):
        if not path.is_file() or path.suffix == ".gz" or path.name.startswith("check.") or "bench" in path.parts:
            continue
        packed = path.with_name(path.name + ".gz")
        size = packed.stat().st_size if packed.is_file() else path.stat().st_size
        raw += path.stat().st_size
        sent += size
        top = path.relative_to(dist).parts[0]
        if top in per_runtime:
            per_runtime[top] += size
    return {"app_runtime_sent": sent, "app_runtime_raw": raw, **{f"runtime_{k}": v for k, v in per_runtime.items()}}


def median_interval(samples: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """p50 and a distribution-free interval for it: the order statistics whose ranks bound the median with
    ``confidence`` (binomial(n, 1/2))."""
    from scipy.stats import binom

    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    lo = int(binom.ppf((1 - confidence) / 2, n, 0.5))
    hi = int(binom.isf((1 - confidence) / 2, n, 0.5))
    return float(np.median(x)), float(x[max(lo - 1, 0)]), float(x[min(hi, n - 1)])


class Native:
    """One artifact in edge_runtime: its session (inference alone) and a Screener with an outbox (the step)."""

    def __init__(self, artifact: Path, photo: bytes, threads: int, tmp: Path):
        from edge_runtime.backends import open_session
        from edge_runtime.outbox import Outbox
        from edge_runtime.screen import Screener

        self.session = open_session(artifact, allow_ungated=True, threads=threads)
        self.screener = Screener(self.session, outbox=Outbox(tmp / f"native-{artifact.name}-{time.time_ns()}.db"),
                                 store_overlays=True)
        self.photo = photo
        self.outcome = self.screener.screen_bytes(photo, "bench.jpg").result.outcome
        policy = self.session.info.manifest.preprocess
        size = policy.input_size
        shape = (1, 3, size, size) if policy.layout == "NCHW" else (1, size, size, 3)
        self.x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(3):
            self.session.run(self.x)

    def time(self, n: int, steps: int) -> tuple[list[float], list[float]]:
        infer, step = [], []
        for _ in range(n):
            start = time.perf_counter()
            self.session.run(self.x)
            infer.append((time.perf_counter() - start) * 1000)
        for _ in range(steps):
            start = time.perf_counter()
            self.screener.screen_bytes(self.photo, "bench.jpg")
            step.append((time.perf_counter() - start) * 1000)
        return infer, step


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

        wait_until_healthy(f"http://127.0.0.1:{self.port}", timeout=300)  # a shared, loaded machine starts it slowly

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
    driver.set_script_timeout(900)
    return driver


def call(driver, method: str, *args):
    """``window.retinaedgeCheck[method](...args)`` awaited; an exception comes back as {"error": ...}."""
    return driver.execute_async_script(
        "const d = arguments[arguments.length - 1]; const a = Array.from(arguments).slice(0, -1);"
        f"window.retinaedgeCheck.{method}(...a).then(d, (e) => d({{error: String(e && e.message || e)}}))", *args)


def lite0_artifacts(work: Path, size: int, data: Path) -> list[Path]:
    from edge_runtime.backends import cpu_features, int8_target

    from .int8_speed import build_artifacts

    formats = ("onnx", "tflite")
    found = build_artifacts(work, data, int8_target(cpu_features()), formats=formats, input_size=size,
                            pretrained=False)
    return [found[(fmt, precision)] for fmt in formats for precision in ("fp32", "int8") if (fmt, precision) in found]


def int8_features() -> str:
    from edge_runtime.backends import cpu_features

    return ", ".join(cpu_features().int8) or "none"


def measure(args, artifacts: list[Path], photo: bytes) -> tuple[list[dict], dict]:
    tmp = Path(tempfile.mkdtemp(prefix="retinaedge-browser-speed-"))
    server = Server(tmp)
    driver = browser(tmp)
    rows: list[dict] = []
    try:
        driver.get(f"http://127.0.0.1:{server.port}/app/check.html")
        deadline = time.monotonic() + 60
        while not driver.execute_script("return !!window.retinaedgeCheck") and time.monotonic() < deadline:
            time.sleep(0.1)
        env = call(driver, "environment")
        env["chromium"] = driver.capabilities.get("browserVersion", "?")
        live = []
        for artifact in artifacts:
            manifest = json.loads(Path(str(artifact) + ".manifest.json").read_text())
            row = {"artifact": artifact.name, "format": manifest["format"], "model": manifest["model_name"],
                   "precision": manifest["quantization"]["precision"], "input": manifest["preprocess"]["input_size"],
                   "bytes": artifact.stat().st_size, "gate": manifest["gate"]["status"],
                   "runtime": BROWSER_RUNTIME.get(manifest["format"], "?"), "native": {}, "browser": {}}
            rows.append(row)
            try:
                native = Native(artifact, photo, args.threads, tmp)
            except Exception as exc:  # noqa: BLE001 - the row says why; the other artifacts still run
                row["native"]["error"] = f"{type(exc).__name__}: {exc}"[:120]
                native = None
            info = call(driver, "openForTiming", artifact.name, base64.b64encode(artifact.read_bytes()).decode(),
                        json.dumps(manifest), args.threads)
            if "error" in info:
                row["browser"]["error"] = info["error"][:120]
            else:
                row["browser"]["info"] = info
            live.append((row, native, "error" not in info))
        samples = {r["artifact"]: {"native_infer": [], "native_step": [], "infer": [], "step": [], "stages": []}
                   for r in rows}
        per = max(1, args.runs // args.rounds)
        steps = max(1, args.steps // args.rounds)
        photo_b64 = base64.b64encode(photo).decode()
        for _ in range(args.rounds):
            for row, native, in_browser in live:
                got = samples[row["artifact"]]
                if native is not None:
                    infer, step = native.time(per, steps)
                    got["native_infer"] += infer
                    got["native_step"] += step
                if in_browser:
                    timed = call(driver, "time", row["artifact"], photo_b64, "image/jpeg", per, steps)
                    if "error" in timed:
                        row["browser"]["error"] = timed["error"][:120]
                        continue
                    got["infer"] += timed["infer"]
                    got["step"] += timed["step"]
                    got["stages"] += timed["stages"]
                    row["browser"]["outcome"] = timed["outcome"]
        for row, native, _ in live:
            got = samples[row["artifact"]]
            if native is not None:
                row["native"] = {"infer": median_interval(got["native_infer"]), "step": median_interval(got["native_step"]),
                                 "outcome": native.outcome, "n_infer": len(got["native_infer"]),
                                 "n_step": len(got["native_step"]), "provider": native.session.info.provider}
            if got["infer"]:
                row["browser"].update({
                    "infer": median_interval(got["infer"]), "step": median_interval(got["step"]),
                    "n_infer": len(got["infer"]), "n_step": len(got["step"]),
                    "stages": {k: float(np.median([s.get(k, 0.0) for s in got["stages"]])) for k in got["stages"][0]}})
    finally:
        driver.quit()
        server.stop()
    return rows, env


def app_choice(rows: list[dict], preference: list[dict]) -> tuple[str | None, str | None]:
    """The artifact the app's table puts first among those that ran here, and the one with the fastest whole step
    in this run (the table is checked by this; which of them a phone may use also needs its gate to pass)."""
    ran = sorted((r for r in rows if "infer" in r["browser"]), key=lambda r: rank(r, preference))
    chosen = ran[0]["artifact"] if ran else None
    fastest = min(ran, key=lambda r: r["browser"]["step"][0])["artifact"] if ran else None
    return chosen, fastest


def rank(row: dict, preference: list[dict]) -> int:
    key = {"format": row["format"], "precision": row["precision"]}
    return preference.index(key) + 1 if key in preference else len(preference) + 1


def fmt_p50(v: tuple[float, float, float] | None) -> str:
    return "-" if v is None else f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"


def render(rows: list[dict], env: dict, load: dict, args, photo_name: str) -> str:
    shell = load["app_runtime_sent"]
    isolated = env.get("isolated")
    lines = [
        f"# Web app speed: the app's browser runtimes ({args.threads} threads, cross-origin isolated: {isolated}) vs "
        "native runtimes, same CPU, same run", "",
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), int8 features: {int8_features()}; load average (1 min) "
        f"{load['before']:.2f} before, {load['after']:.2f} after; Chromium {env.get('chromium')} headless, WebGPU: "
        f"{env.get('webgpu')}; photo {photo_name}; {args.rounds} rounds visiting every artifact; p50 [95% interval].",
        "",
        "| artifact | browser runtime | precision | gate | MB | rank | browser infer ms | native infer ms | ratio "
        "| browser step ms | native step ms | ratio | first load MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, n = r["browser"], r["native"]
        first = (shell + r["bytes"]) / 1e6
        head = (f"| {r['artifact']} ({r['input']} px) | {r['runtime']} | {r['precision']} | {r['gate']} | "
                f"{r['bytes'] / 1e6:.2f} | {rank(r, env['preference'])} | ")
        if "infer" not in b:
            native = fmt_p50(n.get("infer")) if "infer" in n else n.get("error", "-")
            lines.append(head + f"failed: {b.get('error', '?')[:90]} | {native} | | | "
                         f"{fmt_p50(n.get('step'))} | | {first:.2f} |")
            continue
        ni, ns = n.get("infer"), n.get("step")
        ri = f"{b['infer'][0] / ni[0]:.1f}x" if ni else "-"
        rs = f"{b['step'][0] / ns[0]:.1f}x" if ns else "-"
        lines.append(head + f"{fmt_p50(b['infer'])} | {fmt_p50(ni)} | {ri} | {fmt_p50(b['step'])} | {fmt_p50(ns)} | "
                     f"{rs} | {first:.2f} |")
    chosen, fastest = app_choice(rows, env["preference"])
    lines += ["", f"n per cell: browser {rows[0]['browser'].get('n_infer', 0)} inferences / "
                  f"{rows[0]['browser'].get('n_step', 0)} steps, native likewise. First load: app shell + both "
                  f"runtimes as the service worker precaches them {shell / 1e6:.2f} MB as sent (gzip; ONNX Runtime Web "
                  f"{load['runtime_ort'] / 1e6:.2f} MB, LiteRT.js {load['runtime_litert'] / 1e6:.2f} MB; "
                  f"{load['app_runtime_raw'] / 1e6:.2f} MB unpacked) + the model as downloaded.",
              f"First in the app's table (runtime.PREFERENCE) among these: {chosen}; fastest whole step in this run: "
              f"{fastest}" + ("" if chosen == fastest else " (the table and this run disagree)") + ". A phone uses "
              "an artifact only when its fidelity gate passed (column gate).",
              "Browser stages, p50 ms: " + "; ".join(
                  f"{r['artifact']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["browser"]["stages"].items())
                  for r in rows if "stages" in r["browser"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", type=Path, help="artifact with its sidecar (repeatable)")
    parser.add_argument("--input-size", type=int, default=224, help="the Lite0 student built when no --artifact")
    parser.add_argument("--no-lite0", action="store_true", help="no Lite0 export (with --fixtures: seconds)")
    parser.add_argument("--fixtures", action="store_true", help="also the web fixtures' tiny ONNX/TFLite models")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO if DEFAULT_PHOTO.is_file() else
                        WEB / "fixtures" / "photos" / "grade2.jpg")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="calibration photos for the Lite0 INT8 export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="inferences per artifact and runtime")
    parser.add_argument("--steps", type=int, default=20, help="whole steps per artifact and runtime")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the samples are spread over")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retinaedge_browser_speed")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "browser_speed")
    args = parser.parse_args(argv)
    subprocess.run(["make", "-s", "web"], cwd=ROOT, check=True)
    artifacts = list(args.artifact or [])
    build_error = None
    if not args.artifact:
        artifacts += FIXTURE_MODELS if args.fixtures else []
        if not args.no_lite0:
            try:
                artifacts += lite0_artifacts(args.work, args.input_size, args.data)
            except Exception as exc:  # noqa: BLE001 - the table says why the student is missing; the rest still runs
                build_error = f"Lite0 {args.input_size}px not built: {type(exc).__name__}: {exc}"
    if not artifacts:
        parser.error("no artifacts: give --artifact, --fixtures, or let it build the Lite0 student")
    load = {"before": os.getloadavg()[0]}
    rows, env = measure(args, artifacts, args.photo.read_bytes())
    load["after"] = os.getloadavg()[0]
    load.update(first_load_bytes(WEB / "dist"))
    table = render(rows, env, load, args, args.photo.name) + (f"\n{build_error}\n" if build_error else "")
    sys.stdout.write(table)
    write_markdown_and_json(args.out, table, {"rows": rows, "load": load, "environment": env, "device": fingerprint(),
                                              "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
