"""Load figure for the companion API: N results synced in batches against a real uvicorn server.

    python -m benchmarks.sync_load --database postgresql://postgres@127.0.0.1:5432/test --results 10000 --batch 50 --workers 2

Prints results/s and p50/p99 request latency and writes reports/sync_load.json. Talks to 127.0.0.1 only; the server
is started and stopped by this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np

from companion_api.core.config import Settings
from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
from companion_api.crud import create_principal
from edge_runtime.sync import wait_until_healthy
from edge_runtime.wire import QualityReport, ScreeningResult

OVERLAY = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()


def _payload(device: str, n: int) -> list[dict]:
    import base64

    overlay = base64.b64encode(OVERLAY).decode()
    out = []
    for i in range(n):
        grade = i % 5
        probabilities = tuple(0.8 if g == grade else 0.05 for g in range(5))
        r = ScreeningResult(device_id=device, model_version="v1", model_sha256="a" * 64, backend="onnxruntime",
                            provider="CPUExecutionProvider", quality=QualityReport(True, 0.9, (), {"mean": 100.0}),
                            grade=grade, probabilities=probabilities, confidence=0.8, referable=grade >= 2,
                            threshold=0.5, cam_peak=(0.4, 0.5), result_id=str(uuid.uuid4()),
                            encounter_id=f"visit-{i // 2}", eye=("left", "right")[i % 2])
        out.append({"result": r.to_dict(), "content_hash": r.content_hash(), "overlay_png_b64": overlay})
    return out


def _cpu_flags() -> str:
    """The CPU's int8 dot-product features, as every benchmark records them (edge_runtime.backends.cpu_features)."""
    from edge_runtime.backends import cpu_features

    return " ".join(cpu_features().to_dict()["int8"]) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--devices", type=int, default=4, help="concurrent devices (client threads)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    url = Settings(DATABASE_URL=args.database).DATABASE_URL
    run_migrations(url)
    tokens = {}
    with make_sessionmaker(make_engine(url))() as session:
        for _ in range(args.devices):
            name = f"load-{uuid.uuid4().hex[:8]}"
            tokens[name] = create_principal(session=session, name=name, role="device")
    env = {**os.environ, "RETINAEDGE_DATABASE_URL": args.database, "RETINAEDGE_RATE_LIMIT": "1000000/minute"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1", "--port",
                               str(args.port), "--workers", str(args.workers), "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_until_healthy(base)
        per_device = args.results // args.devices
        batches = {name: _payload(name, per_device) for name in tokens}
        latencies: list[float] = []
        statuses: dict[str, int] = {}

        def device_run(name: str) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=60) as client:
                items = batches[name]
                for i in range(0, len(items), args.batch):
                    t0 = time.perf_counter()
                    r = client.post("/v1/sync", json={"results": items[i:i + args.batch]})
                    latencies.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        key = f"HTTP {r.status_code}"
                        statuses[key] = statuses.get(key, 0) + 1
                        continue
                    for item in r.json()["items"]:
                        statuses[item["status"]] = statuses.get(item["status"], 0) + 1

        started = time.perf_counter()
        with ThreadPoolExecutor(args.devices) as pool:
            list(pool.map(device_run, tokens))
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=20)
    result = {"results": per_device * args.devices, "batch": args.batch, "devices": args.devices, "workers": args.workers,
              "database": url.split("://")[0], "seconds": round(elapsed, 2),
              "results_per_s": round(per_device * args.devices / elapsed, 1),
              "request_ms": {"p50": round(float(np.percentile(latencies, 50)), 1), "p99": round(float(np.percentile(latencies, 99)), 1)},
              "statuses": statuses}
    result["cpu_int8_flags"] = _cpu_flags()
    Path("reports").mkdir(exist_ok=True)
    Path("reports/sync_load.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
