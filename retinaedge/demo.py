"""`retinaedge demo`: the whole pipeline on embedded synthetic data (or --data DIR), everything under runs/demo/.

synthetic data -> teacher -> distilled student -> INT8 through the gate -> ONNX/TFLite/CoreML -> evaluation ->
benchmark -> on-device screening with CAM overlays -> companion server (SQLite) -> sync -> insights -> report.html

Sizes come from training/configs/demo.yaml (``full`` or ``quick``); the console shows one progress display and
the summary, third-party output goes to runs/demo/demo.log (retinaedge.console).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from edge_runtime.contract import REFERABLE_MIN_GRADE
from edge_runtime.decision import decide_batch
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import wilson_interval

log = logging.getLogger("retinaedge.demo")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml"
GALLERY_LESION_IMAGES = 4  # lesion_boxes photos shown (with their boxes) when --lesions is given


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (training/configs/demo.yaml)."""

    synthetic_per_grade: int
    synthetic_size: int
    teacher: str
    teacher_pretrained: bool
    teacher_size: int
    teacher_epochs: int
    teacher_lr: float
    student: str
    student_pretrained: bool
    student_size: int
    student_epochs: int
    student_lr: float
    formats: tuple[str, ...]
    precisions: tuple[str, ...]
    skip: tuple[str, ...]  # "format/precision" pairs left out for time
    calib_images: int
    gate_photos_per_grade: int  # synthetic gate set (val photos only): 5x this many photos, 3/5 of them referable
    bench_runs: int
    bench_seconds: float
    bench_eval_images: int
    gallery_images: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "skip", tuple(self.skip))
        for name in ("synthetic_per_grade", "teacher_epochs", "student_epochs", "calib_images", "gate_photos_per_grade",
                     "bench_runs", "gallery_images"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"demo plan: {name} must be >= 1, got {getattr(self, name)!r}")

    @classmethod
    def load(cls, mode: str, path: Path = DEMO_CONFIG) -> DemoPlan:
        from training.config import check_keys

        plans = yaml.safe_load(Path(path).read_text()) or {}
        if mode not in plans:
            raise ConfigError(f"{path} has no {mode!r} plan; it has {sorted(plans)}")
        check_keys(cls, plans[mode], f"{path}:{mode}")
        try:
            return cls(**plans[mode])
        except TypeError as exc:
            raise ConfigError(f"{path}:{mode}: {exc}") from exc

    def jobs(self, fmt: str) -> list[str]:
        """The precisions of ``fmt`` this plan exports: those the format has, less the skipped ones."""
        from exporters.formats import get_format

        return [p for p in self.precisions if p in get_format(fmt).precisions and f"{fmt}/{p}" not in self.skip]


# ---------------------------------------------------------------- steps and progress
STEP_NOTES = {
    "synthetic data": "seeded synthetic fundus photos with grade-dependent lesions (training/data/synthetic.py)",
    "teacher": "fine-tunes the teacher on the train split, keeps the epoch with the best validation QWK",
    "student (distillation)": "trains the edge student on the teacher's soft grades and CAMs",
    "export + INT8 gate": "ONNX/TFLite/CoreML files, each run against PyTorch; INT8 judged by the fidelity gate on "
                          "its own synthetic gate set (val photos only), 16 re-capture draws of each",
    "evaluation": "teacher and student artifacts on the held-out test split: QWK, sensitivity, specificity, ROC",
    "benchmark": "latency percentiles, throughput, memory and accuracy of every artifact this machine can run",
    "edge screening": "the torch-free runtime screens test photos: quality gate, grade, CAM overlay, outbox",
    "server sync": "a local companion server (SQLite) receives the outbox and answers insight requests",
    "report": "this page",
}


class Steps:
    """Runs the demo's steps in order under one rich progress display and records each one's seconds."""

    def __init__(self, names: list[str], console):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.timings: dict[str, float] = {}
        # CPU seconds of this process (all its threads) per step: on a shared machine wall time also measures
        # the neighbours; CPU time shows the step's own cost.
        self.cpu_seconds: dict[str, float] = {}
        self.progress = Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description:<24}"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.tasks = {name: self.progress.add_task(name, total=1, start=False) for name in names}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run(self, name: str, fn: Callable, *args, **kwargs):
        task = self.tasks[name]
        self.progress.start_task(task)
        log.info("== %s", name)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            self.progress.update(task, description=f"[red]{name} failed (see the log)")
            raise
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.cpu_seconds[name] = round(time.process_time() - cpu_started, 1)
        self.progress.update(task, completed=1)
        log.info("   %s done in %.1fs (%.1f CPU s)", name, self.timings[name], self.cpu_seconds[name])
        return result

    def skip(self, name: str) -> None:
        self.progress.remove_task(self.tasks[name])


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was (timings on a shared machine need it)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, data: Path | None = None, lesions: Path | None = None,
             escalate: bool = False, console=None, plan: DemoPlan | None = None) -> dict:
    """Run every step; returns the summary also written to ``out``/summary.json (and ``out``/report.html)."""
    from rich.console import Console

    from compression.distill import distill
    from training.config import TrainConfig
    from training.train import fit

    plan = plan or DemoPlan.load("quick" if quick else "full")
    if data is not None and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder; pass a labelled dataset folder (see README)")
    if lesions is not None and not (Path(lesions) / "boxes.csv").is_file():
        raise FileNotFoundError(f"--lesions {lesions} has no boxes.csv; pass a lesion_boxes folder (see README)")
    # runs/demo/ is the demo's own scratch folder; keep the log the caller may already be writing there.
    if out.exists():
        for child in out.iterdir():
            if child.name != "demo.log":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    names = list(STEP_NOTES)
    synthetic = data is None
    started = time.perf_counter()
    cache = str(out / "cache")
    with Steps(names, console or Console(stderr=True)) as steps:
        if data is None:
            data, gate_data = steps.run("synthetic data", _synthetic_data, out, plan)
        else:
            gate_data = data  # a real folder's val split is its gate set
            steps.skip("synthetic data")
        common = dict(data=(str(data),), cache_dir=cache, batch_size=16, patience=50)
        teacher = steps.run("teacher", fit, TrainConfig(
            model=plan.teacher, pretrained=plan.teacher_pretrained, input_size=plan.teacher_size,
            epochs=plan.teacher_epochs, lr=plan.teacher_lr, out=str(out / "teacher"), **common), progress=False)
        student, distill_report = steps.run("student (distillation)", distill, TrainConfig(
            model=plan.student, pretrained=plan.student_pretrained, input_size=plan.student_size,
            epochs=plan.student_epochs, lr=plan.student_lr, teacher=str(teacher.best_checkpoint), cam_weight=0.5,
            out=str(out / "student"), **common), progress=False)
        artifacts, teacher_artifacts = out / "artifacts", out / "teacher" / "artifacts"
        records, teacher_onnx = steps.run("export + INT8 gate", _export, plan, student.best_checkpoint,
                                          teacher.best_checkpoint, artifacts, teacher_artifacts, data, gate_data,
                                          escalate)
        evaluation = steps.run("evaluation", _evaluate, records, teacher_onnx, data)
        bench_report = steps.run("benchmark", _bench, plan, artifacts, teacher_artifacts, out / "bench", data,
                                 teacher.best_checkpoint)
        chosen = _screening_artifact(records)
        screened = steps.run("edge screening", _screen, out, chosen, data, lesions, plan.gallery_images)
        server = steps.run("server sync", _sync, out, screened)
        summary = {"mode": "quick" if quick else "full", "plan": dataclasses.asdict(plan), "data": str(data),
                   "synthetic": synthetic, "step_notes": STEP_NOTES,
                   "lesions": str(lesions) if lesions else None, "escalate": escalate,
                   "teacher": {"model": plan.teacher, "input_size": plan.teacher_size, "metrics": teacher.metrics.get("test"),
                               "checkpoint": str(teacher.best_checkpoint)},
                   "distillation": distill_report, "artifacts": [dataclasses.asdict(r) for r in records],
                   "gates": _gates(records),
                   "teacher_artifact": dataclasses.asdict(teacher_onnx) if teacher_onnx else None,
                   "screening_artifact": {"path": chosen.path, "format": chosen.format, "precision": chosen.precision,
                                          "gate": chosen.gate},
                   "evaluation": evaluation, "graded": screened["gallery"], "stage_ms": screened["stage_ms"],
                   "pointing_game": screened["pointing_game"], "screened": screened["counts"], "server": server,
                   "device": bench_report["device"], "student_cost": _student_cost(plan, student.best_checkpoint)}
        steps.run("report", _write_outputs, out, summary, bench_report, steps, started)
    summary["timings_s"], summary["cpu_s"] = steps.timings, steps.cpu_seconds
    summary["total_s"] = round(time.perf_counter() - started, 1)
    summary["load_average"] = _load_average()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    # The report's own step took a moment: write it once more so its table shows every step's seconds.
    from retinaedge.demo_report import write_report

    write_report(out, summary, bench_report)
    return summary


def _write_outputs(out: Path, summary: dict, bench_report: dict, steps: Steps, started: float) -> None:
    from retinaedge.demo_report import write_report

    summary["timings_s"], summary["cpu_s"] = dict(steps.timings), dict(steps.cpu_seconds)
    summary["total_s"] = round(time.perf_counter() - started, 1)
    summary["load_average"] = _load_average()
    write_report(out, summary, bench_report)


def _synthetic_data(out: Path, plan: DemoPlan) -> tuple[Path, Path]:
    """The training photos (train/val/calib/test) and, apart, the gate set: val photos only, from other seeds,
    as many as the fidelity gate's minimum evidence asks (600 photos, 150 referable by default) in a full run."""
    from training.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(out / "data", plan.synthetic_per_grade, plan.synthetic_size, 0)
    gate = write_synthetic_dataset(out / "gate_data", plan.gate_photos_per_grade, plan.synthetic_size, 1,
                                   split_fractions=(0.0, 1.0, 0.0, 0.0))
    return data, gate


def _student_cost(plan: DemoPlan, student_ckpt: Path) -> dict:
    """What the student costs per photo against an EfficientNet-B4 at 380 px (the usual DR teacher; random
    weights, no download): multiply-accumulates and parameters. The demo's own teacher is a Lite0, so
    comparing against it would say nothing about the student."""
    import timm

    from training.models import load_checkpoint
    from training.models.profile import count_macs

    student, meta = load_checkpoint(student_ckpt)
    b4 = timm.create_model("efficientnet_b4", pretrained=False, num_classes=5).eval()
    return {"student": {"model": plan.student, "input_size": meta.preprocess.input_size,
                        "macs": count_macs(student, meta.preprocess.input_size),
                        "params": sum(p.numel() for p in student.parameters())},
            "b4": {"model": "efficientnet_b4", "input_size": 380, "macs": count_macs(b4, 380),
                   "params": sum(p.numel() for p in b4.parameters())}}


# ---------------------------------------------------------------- export and gate
def _export(plan: DemoPlan, student_ckpt: Path, teacher_ckpt: Path, artifacts: Path, teacher_artifacts: Path,
            data: Path, gate_data: Path, escalate: bool):
    """Student artifacts in every planned format x precision, judged on the gate set ``gate_data``; the teacher as
    ONNX FP32 for evaluation, in its own folder (teacher and student may share an architecture, and the benchmark
    pairs files by model name). The gate is the product's default (``GateThresholds()``: noise floor, Tango
    non-inferiority, minimum evidence), at the student's own operating point.

    Without ``escalate`` a failed INT8 gate gets only the seconds-long retry (sensitive layers kept in float,
    ONNX); ``escalate`` adds accuracy-controlled mixed precision and QAT, minutes on a CPU."""
    from compression.qat import QATConfig
    from compression.quantize import QuantRecipe
    from exporters.base import write_index
    from exporters.pipeline import ExportPipeline, ExportPlan, export_all, load_inputs

    # "auto": U8S8 where the CPU has int8 dot products (VNNI, ARM dotprod), U8U8 on plain AVX2 (TOOLCHAIN.md).
    inputs = load_inputs(student_ckpt, artifacts, data, gate_data, calib_limit=plan.calib_images,
                         tuning_limit=256 if escalate else 0)
    full_plan = ExportPlan(tuple(plan.formats), tuple(plan.precisions), QuantRecipe.for_target("auto"),
                           QATConfig() if escalate else None, escalate=True)
    pipeline = ExportPipeline(inputs, full_plan)  # one FP32 reference and one set of torch graphs for every job
    records = []
    for fmt in plan.formats:
        if plan.jobs(fmt):
            job_plan = dataclasses.replace(full_plan, formats=(fmt,), precisions=tuple(plan.jobs(fmt)))
            records += export_all(inputs, job_plan, progress=False, pipeline=pipeline)
    write_index(artifacts, records, inputs.meta)
    teacher_inputs = load_inputs(teacher_ckpt, teacher_artifacts, data, data, calib_limit=plan.calib_images,
                                 name=f"teacher_{plan.teacher}", tuning_limit=0)
    teacher_records = export_all(teacher_inputs, ExportPlan(("onnx",), ("fp32",)), progress=False)
    teacher_onnx = next((r for r in teacher_records if r.status == "ok"), None)
    return records, teacher_onnx


def _gates(records) -> dict[str, dict]:
    """The fidelity gate of every gated artifact, as its manifest records it (status, criteria, failures)."""
    from edge_runtime.backends import load_manifest

    gates = {}
    for r in records:
        if r.status == "ok" and r.gate in ("passed", "failed", "insufficient_evidence"):
            gate = load_manifest(r.path).gate
            gates[Path(r.path).name] = {"status": gate.status, "failures": list(gate.failures),
                                        "criteria": [dataclasses.asdict(c) for c in gate.criteria]}
    return gates


def _screening_artifact(records):
    """The INT8 ONNX student if it passed its gate, else its FP32 ONNX (the report says which and why)."""
    onnx = [r for r in records if r.status == "ok" and r.format == "onnx"]
    chosen = next((r for r in onnx if r.precision == "int8" and r.gate == "passed"), None) or \
        next((r for r in onnx if r.precision == "fp32"), None)
    if chosen is None:
        raise RuntimeError("no usable ONNX student artifact was exported; see the export rows in the log")
    return chosen


# ---------------------------------------------------------------- evaluation
def _evaluate(records, teacher_onnx, data: Path) -> dict:
    """Teacher, student FP32 and student INT8 on the test split, each through its own exported artifact."""
    models = []
    if teacher_onnx is not None:
        models.append(("teacher", "fp32", teacher_onnx.path))
    for r in records:
        if r.status == "ok" and r.format == "onnx":
            models.append(("student", r.precision, r.path))
    results = []
    teacher_grades = None
    for role, precision, path in models:
        row = evaluate_artifact(Path(path), data)
        row.update(role=role, precision=precision, name=Path(path).name)
        if role == "teacher":
            teacher_grades = np.asarray(row["predicted"])
        elif teacher_grades is not None and len(teacher_grades) == len(row["predicted"]):
            row["agreement_with_teacher"] = proportion(int((np.asarray(row["predicted"]) == teacher_grades).sum()),
                                                       len(teacher_grades))
        results.append(row)
    return {"split": "test", "models": results}


def evaluate_artifact(path: Path, data: Path, split: str = "test") -> dict:
    """Grades and referable probabilities of one artifact on a labelled split, with 95% intervals."""
    from compression.calibration import load_batch
    from edge_runtime.backends import load_manifest, open_session

    manifest = load_manifest(path)
    point = manifest.operating_point
    x, y = load_batch(data, manifest.preprocess, split)
    if y is None:
        raise ValueError(f"{data} has no grades; the demo needs a labelled folder for --data")
    session = open_session(path, allow_ungated=True)
    logits = np.concatenate([session.run(x[i:i + 16])[0] for i in range(0, len(x), 16)])
    decisions = decide_batch(logits, point)
    return {"n": int(len(y)), "labels": y.tolist(), "predicted": decisions.grades.tolist(),
            "referable_probability": decisions.referable_probability.round(6).tolist(),
            "threshold": point.threshold, "rule": point.rule,
            **clinical_metrics(y, decisions)}


def proportion(successes: int, n: int) -> dict:
    """A share with its Wilson 95% interval."""
    if n == 0:
        return {"value": None, "ci": None, "k": 0, "n": 0}
    return {"value": successes / n, "ci": list(wilson_interval(successes, n)), "k": int(successes), "n": int(n)}


def clinical_metrics(y: np.ndarray, decisions) -> dict:
    """The report's figures of one model on labelled photos, each with its n and 95% interval, computed by
    edge_runtime.metrics on the decisions ``decide_batch`` took (the grades shown, the referrals made)."""
    from edge_runtime.metrics import (
        auc_interval,
        confusion,
        is_referable,
        quadratic_weighted_kappa,
        qwk_interval,
        roc_auc,
    )

    y = np.asarray(y, int)
    predicted, score = decisions.grades, decisions.referable_probability
    truth, flagged = is_referable(y), np.asarray(decisions.dr_referable, bool)
    both = 0 < truth.sum() < len(truth)
    return {"qwk": {"value": quadratic_weighted_kappa(y, predicted),
                    "ci": list(qwk_interval(y, predicted)) if len(y) >= 5 else None, "n": int(len(y))},
            "accuracy": proportion(int((predicted == y).sum()), len(y)),
            "sensitivity": proportion(int((flagged & truth).sum()), int(truth.sum())),
            "specificity": proportion(int((~flagged & ~truth).sum()), int((~truth).sum())),
            "auc": {"value": roc_auc(truth, score) if both else None,
                    "ci": list(auc_interval(y, score)) if both else None, "n": int(len(y))},
            "confusion_matrix": confusion(y, predicted).tolist()}


# ---------------------------------------------------------------- benchmark
def _bench(plan: DemoPlan, artifacts: Path, teacher_artifacts: Path, out: Path, data: Path, teacher_ckpt: Path) -> dict:
    """Teacher (PyTorch eager and ONNX) and student artifacts, benchmarked apart so that each file's
    'agreement with FP32' is against its own model's FP32, then merged into one report."""
    from benchmarks.report import write_report
    from benchmarks.runner import BenchConfig, run_benchmark

    cfg = BenchConfig(runs=plan.bench_runs, min_seconds=plan.bench_seconds, warmup=3, batch_sizes=(1, 4),
                      eval_limit=plan.bench_eval_images)
    teacher = run_benchmark(teacher_artifacts, out / "teacher", data, None, [teacher_ckpt], cfg, progress=False)
    for row in teacher["rows"]:
        row["name"] = row["name"] if row["name"].startswith("teacher") else f"teacher_{row['name']}"
    student = run_benchmark(artifacts, out, data, None, None, cfg, progress=False)
    merged = {**student, "rows": teacher["rows"] + student["rows"]}
    (out / "history.csv").unlink(missing_ok=True)  # written by the student run; the merged report writes it whole
    write_report(merged, out)
    return merged


# ---------------------------------------------------------------- edge screening and the server
def _lesion_boxes(lesions: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    boxes: dict[str, list] = {}
    with open(lesions / "boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["class_name"] != "optic_disc":
                boxes.setdefault(row["image"], []).append(tuple(float(row[k]) for k in
                                                                ("x_center", "y_center", "width", "height")))
    return boxes


def _screen(out: Path, chosen, data: Path, lesions: Path | None, gallery_size: int) -> dict:
    """Screen the test split (and, with --lesions, lesion photos) on the edge runtime into the outbox."""
    from benchmarks.html_report import draw_boxes
    from benchmarks.runner import pointing_game
    from edge_runtime.backends import load_manifest
    from edge_runtime.errors import ImageError
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from training.data.layouts import read_dataset, select

    box = Outbox(out / "edge_outbox.db")
    screener = Screener.from_artifact(chosen.path, device_id="demo-device", outbox=box)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    pool = select(read_dataset(data), "test") or read_dataset(data)
    # One photo of each grade first, so the gallery shows the whole ICDR range.
    firsts = [next(s for s in pool if s.grade == g) for g in sorted({s.grade for s in pool})]
    ordered = firsts + [s for s in pool if s not in firsts]
    screened_photos = ordered[:60]
    gallery, stages, counts = [], [], {"graded": 0, "ungradable": 0, "unreadable": 0}

    def screen(path: Path, reference_grade, lesion_boxes=None, show: bool = False) -> None:
        try:
            screening = screener.screen_file(path)
        except ImageError as exc:
            counts["unreadable"] += 1
            log.warning("%s: %s", path.name, exc)
            return
        r = screening.result
        counts[r.outcome if r.outcome in counts else "graded"] += 1
        if r.outcome == "graded":
            stages.append(r.latency_ms)
        if not show:
            return
        overlay = None
        if screening.overlay_png:
            png = screening.overlay_png
            if lesion_boxes:
                png = draw_boxes(png, lesion_boxes, r.cam_peak)
            overlay = f"overlays/{path.stem}_cam.png"
            (out / overlay).write_bytes(png)
        probabilities = r.probabilities or ()
        gallery.append({"image": path.name, "source": "lesion_boxes" if lesion_boxes is not None else "test split",
                        "reference_grade": reference_grade, "grade": r.grade, "outcome": r.outcome,
                        "confidence": r.confidence, "referable": r.referable,
                        "referable_probability": round(float(sum(probabilities[REFERABLE_MIN_GRADE:])), 4)
                        if probabilities else None,
                        "quality_score": r.quality.score, "quality_reasons": list(r.quality.reasons),
                        "lesion_boxes": len(lesion_boxes) if lesion_boxes is not None else None,
                        "artifact": Path(chosen.path).name, "latency_ms": r.latency_ms, "overlay": overlay,
                        "result_id": r.result_id})

    for i, sample in enumerate(screened_photos):
        screen(sample.path, sample.grade, show=i < gallery_size)
    pointing = None
    if lesions is not None:
        boxes = _lesion_boxes(lesions)
        for name in sorted(boxes)[:GALLERY_LESION_IMAGES]:
            screen(lesions / "images" / name, None, boxes[name], show=True)
        manifest = load_manifest(chosen.path)
        readable = sum((lesions / "images" / name).is_file() for name in boxes)
        hit_rate = pointing_game(screener.session.run, manifest.preprocess, lesions)
        if hit_rate is not None:
            pointing = proportion(round(hit_rate * readable), readable)
    stage_ms = {s: float(np.median([t[s] for t in stages])) for s in stages[0]} if stages else {}
    return {"gallery": gallery, "stage_ms": stage_ms, "stage_n": len(stages), "counts": counts,
            "pointing_game": pointing, "outbox": box}


def _sync(out: Path, screened: dict) -> dict:
    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations
    from companion_api.crud import create_principal
    from edge_runtime.sync import SyncClient, wait_until_healthy

    box = screened.pop("outbox")
    url = f"sqlite:///{(out / 'server.db').resolve()}"
    run_migrations(url)
    with make_sessionmaker(make_engine(url))() as session:
        device_token = create_principal(session=session, name="demo-device", role="device")
    port = _free_port()
    env = {"RETINAEDGE_DATABASE_URL": url, "RETINAEDGE_ARTIFACT_DIR": str(out / "model_store")}
    server_log = open(out / "server.log", "w")  # noqa: SIM115 - closed below, after the server exits
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "companion_api.asgi:app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "warning"], env={**os.environ, **env},
                              stdout=server_log, stderr=subprocess.STDOUT)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {device_token}"}
        wait_until_healthy(base)
        report = SyncClient(base, device_token, box, batch_size=25).run(max_rounds=20)
        history = httpx.get(f"{base}/v1/history", headers=headers, params={"limit": 200}).json()
        insights = []
        for item in screened["gallery"]:
            if item["outcome"] != "graded":
                continue
            insight = httpx.post(f"{base}/v1/results/{item['result_id']}/insight", headers=headers, timeout=30).json()
            insights.append({"result_id": item["result_id"], "image": item["image"], "grade": item["grade"], **insight})
    finally:
        server.terminate()
        server.wait(timeout=10)
        server_log.close()
    return {"synced": report.sent, "outbox": box.counts(), "stored_on_server": history["count"], "insights": insights}
