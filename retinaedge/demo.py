"""`retinaedge demo`: the whole pipeline on embedded synthetic data (or --data DIR), everything under runs/demo/.

synthetic data -> teacher -> distilled student -> INT8 through the gate -> ONNX/TFLite/CoreML -> benchmark ->
on-device grading with CAM overlays -> companion server (SQLite) -> sync -> insights -> report.html
"""
from __future__ import annotations

import html
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("retinaedge.demo")


@dataclass(frozen=True)
class DemoPlan:
    per_grade: int
    image_size: int
    teacher: str
    teacher_size: int
    teacher_epochs: int
    student: str
    student_size: int
    student_epochs: int
    bench_runs: int
    bench_seconds: float

    @staticmethod
    def for_mode(quick: bool) -> DemoPlan:
        if quick:  # < 3 minutes on a 2-core CPU
            return DemoPlan(16, 160, "efficientnet_b0", 96, 2, "tf_efficientnet_lite0", 96, 2, 10, 0.5)
        return DemoPlan(40, 256, "efficientnet_b4", 160, 4, "tf_efficientnet_lite0", 128, 5, 50, 2.0)


class Steps:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        log.info("== %s", name)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - started, 1)
        log.info("   %s done in %.1fs", name, self.timings[name])
        return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, data: Path | None = None) -> dict:
    from compression.distill import distill
    from exporters.pipeline import ExportPlan, export_all, load_inputs
    from training.config import TrainConfig
    from training.data.synthetic import write_synthetic_dataset
    from training.train import fit

    plan = DemoPlan.for_mode(quick)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = Steps()
    started = time.perf_counter()
    cache = str(out / "cache")
    if data is None:
        data = steps.run("synthetic data", write_synthetic_dataset, out / "data", plan.per_grade, plan.image_size, 0)
    common = dict(data=(str(data),), cache_dir=cache, batch_size=16, patience=50)
    teacher = steps.run("teacher training", fit, TrainConfig(
        model=plan.teacher, pretrained=False, input_size=plan.teacher_size, epochs=plan.teacher_epochs, lr=3e-3,
        out=str(out / "teacher"), **common), progress=False)
    student, distill_report = steps.run("distillation", distill, TrainConfig(
        model=plan.student, pretrained=True, input_size=plan.student_size, epochs=plan.student_epochs, lr=2e-3,
        teacher=str(teacher.best_checkpoint), cam_weight=0.5, out=str(out / "student"), **common), progress=False)

    artifacts = out / "artifacts"

    def export():
        inputs = load_inputs(student.best_checkpoint, artifacts, data, data, calib_limit=32, val_limit=64)
        records = export_all(inputs, ExportPlan(("onnx", "tflite", "coreml"), ("fp32", "fp16", "int8")), progress=False)
        teacher_inputs = load_inputs(teacher.best_checkpoint, artifacts, data, data, calib_limit=16, val_limit=32,
                                     name=f"teacher_{plan.teacher}")
        records += export_all(teacher_inputs, ExportPlan(("onnx",), ("fp32",)), progress=False)
        from exporters.base import write_index

        write_index(artifacts, records, inputs.meta)
        return records

    records = steps.run("export + gate", export)

    def bench():
        from benchmarks.runner import BenchConfig, run_benchmark

        cfg = BenchConfig(runs=plan.bench_runs, min_seconds=plan.bench_seconds, warmup=3, batch_sizes=(1, 4), eval_limit=40)
        return run_benchmark(artifacts, out / "bench", data, None, [teacher.best_checkpoint], cfg, progress=False)

    bench_report = steps.run("benchmark", bench)
    graded, server_summary = steps.run("edge grading + server sync + insights", _edge_and_server, out, records, data)
    summary = {"mode": "quick" if quick else "full", "plan": plan.__dict__, "timings_s": steps.timings,
               "total_s": round(time.perf_counter() - started, 1), "teacher": teacher.metrics.get("test"),
               "distillation": distill_report, "artifacts": [r.__dict__ for r in records], "graded": graded,
               "server": server_summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_report(out, summary, bench_report)
    return summary


def _edge_and_server(out: Path, records, data: Path):
    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
    from companion_api.crud import create_principal
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from edge_runtime.sync import SyncClient, wait_until_healthy
    from training.data.layouts import read_dataset, select

    usable = [r for r in records if r.status == "ok" and r.format == "onnx" and "teacher" not in Path(r.path).name]
    # Screen with the INT8 artifact if it passed its gate, else with FP32 (and say so).
    chosen = next((r for r in usable if r.precision == "int8" and r.gate == "passed"), None) or \
        next(r for r in usable if r.precision == "fp32")
    box = Outbox(out / "edge_outbox.db")
    screener = Screener.from_artifact(chosen.path, device_id="demo-device", outbox=box)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    pool = select(read_dataset(data), "test") or read_dataset(data)
    # One photo of each grade first, so the report shows the whole ICDR range.
    samples = [next(s for s in pool if s.grade == g) for g in sorted({s.grade for s in pool})]
    samples = (samples + [s for s in pool if s not in samples])[:6]
    graded = []
    for sample in samples:
        screening = screener.screen_file(sample.path)
        if screening.overlay_png:
            (overlays / f"{sample.path.stem}_cam.png").write_bytes(screening.overlay_png)
        r = screening.result
        graded.append({"image": sample.path.name, "reference_grade": sample.grade, "grade": r.grade, "outcome": r.outcome,
                       "confidence": r.confidence, "referable": r.referable, "quality_score": r.quality.score,
                       "artifact": Path(chosen.path).name, "latency_ms": r.latency_ms,
                       "overlay": f"overlays/{sample.path.stem}_cam.png" if screening.overlay_png else None})

    url = f"sqlite:///{(out / 'server.db').resolve()}"
    run_migrations(url)
    with make_sessionmaker(make_engine(url))() as session:
        device_token = create_principal(session=session, name="demo-device", role="device")
    port = _free_port()
    env = {"RETINAEDGE_DATABASE_URL": url, "RETINAEDGE_ARTIFACT_DIR": str(out / "model_store")}
    import os

    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "warning"], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base)
        report = SyncClient(base, device_token, box, batch_size=4).run(max_rounds=20)
        insights = []
        history = httpx.get(f"{base}/v1/history", headers={"Authorization": f"Bearer {device_token}"}).json()
        for row in history["data"]:
            insight = httpx.post(f"{base}/v1/results/{row['result_id']}/insight",
                                 headers={"Authorization": f"Bearer {device_token}"}, timeout=30).json()
            insights.append({"result_id": row["result_id"], "grade": row["grade"], **insight})
    finally:
        server.terminate()
        server.wait(timeout=10)
    return graded, {"synced": report.sent, "outbox": box.counts(), "stored_on_server": history["count"], "insights": insights}


def _img(src: str | None) -> str:
    return f"<img src='{html.escape(src)}' width='160'>" if src else "-"


def _write_report(out: Path, summary: dict, bench_report: dict) -> None:
    from benchmarks.runner import to_markdown

    rows = "".join(
        f"<tr><td>{html.escape(g['image'])}</td><td>{g['reference_grade']}</td><td>{g['grade']}</td><td>{g['outcome']}</td>"
        f"<td>{(g['confidence'] or 0):.2f}</td><td>{g['referable']}</td>"
        f"<td>{_img(g['overlay'])}</td></tr>"
        for g in summary["graded"])
    artifacts = "".join(
        f"<tr><td>{a['format']}</td><td>{a['precision']}</td><td>{a['status']}</td><td>{a.get('size_mb')}</td>"
        f"<td>{a.get('gate')}</td><td>{html.escape(str(a.get('error') or a.get('verified') or ''))[:120]}</td></tr>"
        for a in summary["artifacts"])
    insights = "".join(f"<li>grade {i['grade']}: <b>{html.escape(i['source'])}</b> - {html.escape(i['summary'])}</li>"
                       for i in summary["server"]["insights"])
    timings = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in summary["timings_s"].items())
    page = f"""<html><head><meta charset='utf-8'><title>RetinaEdge demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd}}</style></head>
<body><h1>RetinaEdge end-to-end demo ({summary['mode']}, {summary['total_s']} s)</h1>
<p><b>Synthetic data unless --data was given. RetinaEdge assists screening; it does not diagnose.</b></p>
<h2>Steps</h2><table>{timings}</table>
<h2>Teacher vs distilled student</h2><pre>{html.escape(json.dumps(summary['distillation'], indent=1))}</pre>
<h2>Artifacts (<a href='artifacts/index.json'>index.json</a>)</h2>
<table><tr><th>format</th><th>precision</th><th>status</th><th>MB</th><th>gate</th><th>note</th></tr>{artifacts}</table>
<h2>Benchmark (<a href='bench/report.html'>full report</a>, <a href='bench/report.json'>JSON</a>)</h2>
<pre style='font-size:11px'>{html.escape(to_markdown(bench_report))}</pre>
<h2>On-device grading</h2><table><tr><th>image</th><th>reference</th><th>grade</th><th>outcome</th><th>conf.</th>
<th>referable</th><th>CAM</th></tr>{rows}</table>
<h2>Companion server</h2><p>synced {summary['server']['synced']}, stored {summary['server']['stored_on_server']},
outbox {summary['server']['outbox']}</p><ul>{insights}</ul></body></html>"""
    (out / "report.html").write_text(page)
