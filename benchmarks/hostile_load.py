"""Memory and latency of the server under hostile uploads: decode bombs and slow or oversized bodies.

    python -m benchmarks.hostile_load

Starts a real uvicorn server (one worker, so its memory is one process's) on 127.0.0.1 with a tiny teacher trained
here in seconds (so /v1/predict reaches the decoder), then sends, each case ``--concurrent`` times at once:
small files that declare 20000 x 20000 pixels (TIFF, Radiance HDR, JPEG with an FF fill byte before its SOF,
PNG, PFM) and a GIF to /v1/predict and as synced images, and a real 4000 x 3000 JPEG while /health is polled. Then 12 connections
without a valid token that announce 24 MB, send 1 MB and stall, and 12 that send 1 KB of a 5 KB body and stall.
For each case: HTTP statuses, latency (p50, max) and the worker's peak RSS above its idle RSS (sampled every 10 ms).
Prints a table and writes reports/hostile_load.json. Talks to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np

from companion_api.core.config import Settings
from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
from companion_api.crud import create_principal
from edge_runtime.sync import wait_until_healthy

from .sync_load import _cpu_flags


def bomb_files() -> dict[str, bytes]:
    """Small files that declare 20000 x 20000 pixels, in the formats the hostile re-test used and two more OpenCV
    decodes (GIF, PFM); the JPEG hides its size behind an FF fill byte before its SOF marker."""
    import io
    import struct
    import zlib

    from PIL import Image

    tiff = io.BytesIO()
    Image.new("L", (64, 64)).save(tiff, format="TIFF", tiffinfo={256: 20000, 257: 20000})
    jpeg = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    gif = io.BytesIO()
    Image.new("L", (16, 16)).save(gif, format="GIF")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 20001 * 64)) + chunk(b"IEND", b""))
    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 20000 +X 20000\n" + b"\x00" * 4 * 20000 * 8
    return {"tiff": tiff.getvalue(), "hdr": hdr, "jpeg_ff_fill": bytes(jpeg[:sof]) + b"\xff" + bytes(jpeg[sof:]),
            "png": png, "gif": gif.getvalue(), "pfm": b"PF\n20000 20000\n-1.0\n" + b"\x00" * 4096}


def _teacher(folder: Path) -> str:
    from training.config import TrainConfig
    from training.data.synthetic import write_synthetic_dataset
    from training.train import fit

    data = write_synthetic_dataset(folder / "synthetic", n_per_grade=12, size=160, seed=3)  # as the test fixture
    cfg = TrainConfig(model="test_dr_tiny", data=(str(data),), pretrained=False, input_size=64, epochs=1,
                      batch_size=8, out=str(folder / "run"), cache_dir=str(folder / "cache"))
    return str(fit(cfg, progress=False).best_checkpoint)


class _PeakRss:
    """Samples a process's RSS every 10 ms while active."""

    def __init__(self, pid: int):
        import psutil  # the benchmark's own need (not the test that borrows bomb_files)

        self.process, self.peak, self.running = psutil.Process(pid), 0, False

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])

    def __enter__(self):
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _stall(port: int, headers: str, body: bytes, wait_s: float) -> tuple[int | None, float]:
    """Send headers and ``body``, then stall; (status of the answer, seconds until it came), None if none came."""
    started = time.perf_counter()
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"POST /v1/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode())
    conn.settimeout(0.5)
    try:
        for start in range(0, len(body), 65_536):
            conn.sendall(body[start:start + 65_536])
    except OSError:
        pass
    conn.settimeout(wait_s)
    try:
        head = conn.recv(4096)
        status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1") else None
    except OSError:
        status = None
    finally:
        conn.close()
    return status, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=2, help="copies of each upload sent at once")
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = _teacher(folder)
        url = f"sqlite:///{folder / 'server.db'}"
        run_migrations(Settings(DATABASE_URL=url).DATABASE_URL)
        with make_sessionmaker(make_engine(Settings(DATABASE_URL=url).DATABASE_URL))() as session:
            token = create_principal(session=session, name="dev-a", role="device")
        env = {**os.environ, "RETINAEDGE_DATABASE_URL": url, "RETINAEDGE_TEACHER_CHECKPOINT": checkpoint,
               "RETINAEDGE_RATE_LIMIT": "100000/minute", "RETINAEDGE_PREAUTH_BODY_TIMEOUT_S": "10"}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                                   "--port", str(args.port), "--log-level", "warning"], env=env)
        base = f"http://127.0.0.1:{args.port}"
        try:
            wait_until_healthy(base, timeout=60)
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
                client.get("/health")
                photo = cv2.imencode(".jpg", cv2.resize(
                    cv2.imread(str(next((folder / "synthetic").rglob("*.png")))), (4000, 3000)))[1].tobytes()
                client.post("/v1/predict", files={"file": ("warm.jpg", photo, "image/jpeg")})  # loads the teacher
                idle = _PeakRss(server.pid).rss()

                def predict(data: bytes) -> tuple[int, float]:
                    t0 = time.perf_counter()
                    r = client.post("/v1/predict", files={"file": ("x", data, "application/octet-stream")})
                    return r.status_code, time.perf_counter() - t0

                def synced(data: bytes) -> tuple[int, float]:
                    from .sync_load import _payload

                    item = _payload("dev-a", 1)[0] | {"image_b64": base64.b64encode(data).decode()}
                    t0 = time.perf_counter()
                    r = client.post("/v1/sync", json={"results": [item]})
                    status = r.json()["items"][0]["status"] if r.status_code == 200 else r.status_code
                    return status, time.perf_counter() - t0

                names = {"tiff": "TIFF", "hdr": "HDR", "jpeg_ff_fill": "JPEG FF-fill", "png": "PNG", "gif": "GIF",
                         "pfm": "PFM"}
                for kind, data in bomb_files().items():
                    name = f"{names[kind]} {'16x16' if kind == 'gif' else '20000x20000'}"
                    for route, send in (("/v1/predict", predict), ("/v1/sync image", synced)):
                        with _PeakRss(server.pid) as peak, ThreadPoolExecutor(args.concurrent) as pool:
                            answers = list(pool.map(send, [data] * args.concurrent))
                        rows.append({"case": f"{name} ({len(data) / 1e6:.2f} MB)", "route": route,
                                     "status": sorted({str(a[0]) for a in answers}),
                                     "p50_ms": round(float(np.median([a[1] for a in answers])) * 1000, 1),
                                     "max_ms": round(max(a[1] for a in answers) * 1000, 1),
                                     "peak_rss_mb": round((peak.peak - idle) / 2**20, 1)})
                # /health while real photos decode: the event loop must stay free.
                health: list[float] = []
                with _PeakRss(server.pid) as peak, ThreadPoolExecutor(args.concurrent + 1) as pool:
                    jobs = [pool.submit(predict, photo) for _ in range(args.concurrent)]
                    while not all(j.done() for j in jobs):
                        t0 = time.perf_counter()
                        httpx.get(f"{base}/health", timeout=30)
                        health.append(time.perf_counter() - t0)
                    answers = [j.result() for j in jobs]
                rows.append({"case": f"4000x3000 JPEG ({len(photo) / 1e6:.2f} MB) + /health polled",
                             "route": "/v1/predict", "status": sorted({str(a[0]) for a in answers}),
                             "p50_ms": round(float(np.median([a[1] for a in answers])) * 1000, 1),
                             "max_ms": round(max(a[1] for a in answers) * 1000, 1),
                             "peak_rss_mb": round((peak.peak - idle) / 2**20, 1),
                             "health_max_ms": round(max(health) * 1000, 1), "health_n": len(health)})
            # Bodies without a valid token: 24 MB announced, 1 MB sent, then stalled; and a small stalled body.
            for name, head, body in (
                    ("24 MB announced, 1 MB sent, stalled (no valid token)",
                     f"Content-Length: {24 * 2**20}\r\nAuthorization: Bearer red_wrong\r\n", b"x" * 2**20),
                    ("5 KB announced, 1 KB sent, stalled (no token)", "Content-Length: 5000\r\n", b"x" * 1024)):
                with _PeakRss(server.pid) as peak, ThreadPoolExecutor(12) as pool:
                    answers = list(pool.map(_stall, [args.port] * 12, [head] * 12, [body] * 12, [60.0] * 12))
                rows.append({"case": f"12 x {name}", "route": "/v1/sync", "status": sorted({str(a[0]) for a in answers}),
                             "p50_ms": round(float(np.median([a[1] for a in answers])) * 1000, 1),
                             "max_ms": round(max(a[1] for a in answers) * 1000, 1),
                             "peak_rss_mb": round((peak.peak - idle) / 2**20, 1)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"\nHostile uploads, 1 uvicorn worker (SQLite), loopback; {args.concurrent} at once per upload case; "
          f"idle worker RSS {idle / 2**20:.0f} MB; CPU int8 features: {_cpu_flags()}; {os.cpu_count()} cores")
    print("| case | route | answers | p50 ms | max ms | peak RSS above idle, MB | /health max ms (n) |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        health = f"{r['health_max_ms']} ({r['health_n']})" if "health_max_ms" in r else ""
        print(f"| {r['case']} | {r['route']} | {','.join(r['status'])} | {r['p50_ms']} | {r['max_ms']} | "
              f"{r['peak_rss_mb']} | {health} |")
    Path("reports").mkdir(exist_ok=True)
    Path("reports/hostile_load.json").write_text(json.dumps({"cpu_int8_flags": _cpu_flags(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
