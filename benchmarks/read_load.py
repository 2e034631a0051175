"""Read-path load figure for the companion API: every history and review view against 1M and 10M stored results.

    python -m benchmarks.read_load --database postgresql://postgres@127.0.0.1:5432/retinaedge_bench --rows 1000000 10000000

For each size the results table is filled in SQL (generate_series: one INSERT ... SELECT, indexes built after the
load, as a restore would), a real uvicorn server (``--workers``) is started on 127.0.0.1, and each view is requested
``--requests`` times one after another after a warm-up; p50 and p95 latency per view are printed as a table and
written to reports/read_load.json. The sizes are filled in ascending order in one table (the rows of 1M are the
first rows of 10M). The database named is dropped and re-created: never point it at one that holds data.

Synthetic rows: 200 devices, two eyes per encounter, a capture every 3 s (10M rows span about a year), grades
70/10/12/5/3 %, DME found in 2 %, payload a real ScreeningResult JSON (about 700 bytes), no overlay or image bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import create_engine, text

from companion_api.core.config import Settings
from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
from companion_api.crud import create_principal, encode_cursor, revoke_principal
from companion_api.models import Encounter, Result
from edge_runtime.sync import wait_until_healthy
from edge_runtime.wire import QualityReport, ScreeningResult

from .sync_load import _cpu_flags

DEVICES = 200
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
STEP_S = 3


def _payload_template() -> str:
    """A real stored payload with placeholders the SQL fill replaces per row."""
    r = ScreeningResult(device_id="DEVICE", model_version="lite0-1a2b3c4d-int8", model_sha256="a" * 64,
                        backend="onnxruntime", provider="CPUExecutionProvider",
                        quality=QualityReport(True, 0.91, (), {"mean": 101.2, "sharpness": 0.42, "field_diameter": 610.0}),
                        grade=0, probabilities=(0.8, 0.1, 0.05, 0.03, 0.02), confidence=0.8, referable=False,
                        threshold=0.31, cam_peak=(0.41, 0.52), result_id=str(uuid.UUID(int=0)), encounter_id="ENCOUNTER",
                        eye="left", latency_ms={"decode": 4.1, "quality": 6.3, "infer": 3.2})
    return r.canonical_json()


def _database(url: str) -> str:
    """Drop and create the benchmark database; returns its SQLAlchemy URL."""
    settings_url = Settings(DATABASE_URL=url).DATABASE_URL
    name = settings_url.rsplit("/", 1)[1]
    admin = create_engine(settings_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return settings_url


_GRADE = "CASE WHEN h < 70 THEN 0 WHEN h < 80 THEN 1 WHEN h < 92 THEN 2 WHEN h < 97 THEN 3 ELSE 4 END"


def _fill(engine, start: int, stop: int, template: str) -> float:
    """Rows [start, stop) in one INSERT ... SELECT over generate_series, encounters alongside; indexes dropped for the
    load and built after it. Returns seconds."""
    started = time.perf_counter()
    indexes = list(Result.__table__.indexes) + list(Encounter.__table__.indexes)
    with engine.begin() as conn:
        for index in indexes:
            conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
        conn.execute(text(f"""
            INSERT INTO results (device, result_id, content_hash, payload, outcome, grade, referable, confidence,
                                 dme_present, dme_probability, captured_at, received_at, encounter_id, eye)
            SELECT 'load-' || ((i / 2) % {DEVICES}), rid, md5(rid), replace(replace(replace(:template,
                       '00000000-0000-0000-0000-000000000000', rid), 'ENCOUNTER', 'visit-' || (i / 2)), 'DEVICE',
                       'load-' || ((i / 2) % {DEVICES})),
                   'graded', g, g >= 2 OR h % 50 = 7, 0.8, (h % 50 = 7), CASE WHEN h % 50 = 7 THEN 0.9 ELSE 0.1 END,
                   ts, ts, 'visit-' || (i / 2), CASE WHEN i % 2 = 0 THEN 'left' ELSE 'right' END
            FROM (SELECT i, lpad(to_hex(i), 32, '0')::uuid::text AS rid, (i * 7919) % 100 AS h,
                         :start_at + make_interval(secs => i * {STEP_S}) AS ts
                  FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS i) s, LATERAL (SELECT {_GRADE} AS g) grade
        """), {"template": template, "lo": start, "hi": stop - 1, "start_at": START})
        conn.execute(text(f"""
            INSERT INTO encounters (device, encounter_id, last_captured_at, captures)
            SELECT 'load-' || (j % {DEVICES}), 'visit-' || j, :start_at + make_interval(secs => (2 * j + 1) * {STEP_S}), 2
            FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS j
        """), {"lo": start // 2, "hi": stop // 2 - 1, "start_at": START})
    with engine.begin() as conn:
        for index in indexes:
            index.create(conn)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE results"))
        conn.execute(text("VACUUM ANALYZE encounters"))
    return time.perf_counter() - started


def _views(rows: int) -> dict[str, tuple[str, str, dict]]:
    """name -> (who, path, params). A deep page starts at a cursor in the middle of the table."""
    middle = rows // 2
    at = START.timestamp() + middle * STEP_S
    deep = encode_cursor(datetime.fromtimestamp(at, timezone.utc), f"load-{(middle // 2) % DEVICES}",
                         str(uuid.UUID(int=middle)))
    deep_visit = encode_cursor(datetime.fromtimestamp(at + STEP_S, timezone.utc), f"load-{(middle // 2) % DEVICES}",
                               f"visit-{middle // 2}")
    day = {"since": datetime.fromtimestamp(at - 43_200, timezone.utc).isoformat(),
           "until": datetime.fromtimestamp(at + 43_200, timezone.utc).isoformat(), "limit": 50}
    return {
        "reviewer history": ("rev", "/v1/history", {"limit": 50}),
        "reviewer history, deep page": ("rev", "/v1/history", {"limit": 50, "cursor": deep}),
        "reviewer history grade=4": ("rev", "/v1/history", {"limit": 50, "grade": 4}),
        "reviewer history referable": ("rev", "/v1/history", {"limit": 50, "referable": "true"}),
        "reviewer history dme": ("rev", "/v1/history", {"limit": 50, "dme": "true"}),
        "reviewer history one day (since/until)": ("rev", "/v1/history", day),
        "reviewer history one device": ("rev", "/v1/history", {"limit": 50, "device": "load-7"}),
        "reviewer encounters": ("rev", "/v1/history", {"limit": 50, "group": "encounter"}),
        "reviewer encounters, deep page": ("rev", "/v1/history", {"limit": 50, "group": "encounter", "cursor": deep_visit}),
        "device history (own)": ("dev", "/v1/history", {"limit": 50}),
        "device encounters (own)": ("dev", "/v1/history", {"limit": 50, "group": "encounter"}),
        "/review": ("rev-cookie", "/review", {}),
        "/review?view=encounters": ("rev-cookie", "/review", {"view": "encounters"}),
        "/review?grade=4": ("rev-cookie", "/review", {"grade": 4}),
    }


def _measure(base: str, tokens: dict[str, str], rows: int, requests: int) -> list[dict]:
    out = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for name, (who, path, params) in _views(rows).items():
            if who == "rev-cookie":
                headers, cookies = {}, {"retinaedge_token": tokens["rev"]}
            else:
                headers, cookies = {"Authorization": f"Bearer {tokens[who]}"}, {}
            client.cookies.clear()
            for key, value in cookies.items():
                client.cookies.set(key, value)
            times, sizes, statuses = [], [], set()
            for i in range(requests + 3):
                t0 = time.perf_counter()
                response = client.get(path, params=params, headers=headers)
                elapsed = (time.perf_counter() - t0) * 1000
                statuses.add(response.status_code)
                if i >= 3:  # warm-up: connection, plan cache, first page in shared buffers
                    times.append(elapsed)
                    sizes.append(len(response.content))
            shown = response.json()["count"] if path.startswith("/v1") and response.status_code == 200 else None
            out.append({"rows": rows, "view": name, "n": len(times), "p50_ms": round(float(np.percentile(times, 50)), 1),
                        "p95_ms": round(float(np.percentile(times, 95)), 1), "kb": round(float(np.mean(sizes)) / 1024, 1),
                        "items": shown, "status": sorted(statuses)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/retinaedge_bench")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per view (after 3 warm-up ones)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--reuse", action="store_true",
                        help="measure the table as a previous run left it (its size is the last of --rows) without "
                             "filling it again")
    args = parser.parse_args()
    if args.reuse:
        url = Settings(DATABASE_URL=args.database).DATABASE_URL
        run_migrations(url)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as session:  # new tokens for the reviewer and the measured device
            tokens = {}
            for key, name, role in (("rev", "rev", "reviewer"), ("dev", "load-7", "device")):
                revoke_principal(session=session, name=name)
                tokens[key] = create_principal(session=session, name=name, role=role)
    else:
        url = _database(args.database)
        run_migrations(url)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as session:
            tokens = {"rev": create_principal(session=session, name="rev", role="reviewer")}
            for d in range(DEVICES):
                token = create_principal(session=session, name=f"load-{d}", role="device")
                if d == 7:
                    tokens["dev"] = token
    template = _payload_template()
    env = {**os.environ, "RETINAEDGE_DATABASE_URL": args.database, "RETINAEDGE_RATE_LIMIT": "1000000/minute",
           "RETINAEDGE_COOKIE_SECURE": "false"}
    table, filled = [], 0
    for rows in sorted(args.rows)[-1:] if args.reuse else sorted(args.rows):
        if not args.reuse:
            seconds = _fill(engine, filled, rows, template)
            print(f"filled {filled:,} -> {rows:,} rows in {seconds:.0f} s", flush=True)
            filled = rows
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                                   "--port", str(args.port), "--workers", str(args.workers), "--log-level", "warning"],
                                  env=env)
        try:
            wait_until_healthy(f"http://127.0.0.1:{args.port}", timeout=60)
            table += _measure(f"http://127.0.0.1:{args.port}", tokens, rows, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"\nRead paths, PostgreSQL, {args.workers} uvicorn workers, loopback, {args.requests} requests per view "
          f"after 3 warm-up; CPU int8 features: {_cpu_flags()}; {os.cpu_count()} cores")
    print("| rows | view | n | p50 ms | p95 ms | KB | items | HTTP |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in table:
        print(f"| {r['rows']:,} | {r['view']} | {r['n']} | {r['p50_ms']} | {r['p95_ms']} | {r['kb']} | "
              f"{'' if r['items'] is None else r['items']} | {','.join(map(str, r['status']))} |")
    Path("reports").mkdir(exist_ok=True)
    Path("reports/read_load.json").write_text(json.dumps({"cpu_int8_flags": _cpu_flags(), "workers": args.workers,
                                                          "requests": args.requests, "views": table}, indent=2))


if __name__ == "__main__":
    main()
