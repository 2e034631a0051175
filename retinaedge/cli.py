"""The `retinaedge` command. Each subcommand is thin and imports its package lazily, so the edge
commands (grade, watch, sync, info) run in an install without torch."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="RetinaEdge: DR screening from a full-precision teacher to INT8 edge artifacts. "
                  "A screening aid, not a diagnosis.", no_args_is_help=True, add_completion=False)
admin_app = typer.Typer(help="Companion-server administration: tokens.", no_args_is_help=True)
bench_app = typer.Typer(help="Per-device benchmarks of every artifact.", invoke_without_command=True)
app.add_typer(admin_app, name="admin")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
# Tables go to stdout; logs and CI are not terminals, where rich would wrap them to 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 200)
DISCLAIMER = "RetinaEdge assists screening; it does not diagnose. A clinician must confirm every result."


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _quiet(log_path: Path, verbose: bool):
    """Third-party warnings and progress dumps go to ``log_path`` unless --verbose (retinaedge.console)."""
    from retinaedge.console import quiet_output

    if not verbose:
        console.print(f"[dim]details: {log_path} (--verbose prints them here)[/dim]")
    return quiet_output(log_path, verbose)


def _fail(exc: Exception, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
    raise typer.Exit(code)


# ---------------------------------------------------------------- training and compression
def _train_overrides(**kwargs) -> dict:
    data = kwargs.pop("data")
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    if data:
        overrides["data"] = tuple(data)
    return overrides


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with TrainConfig keys (CLI flags win)."),
    model: str | None = typer.Option(None, help="Registered model, e.g. efficientnet_b4, tf_efficientnet_lite0."),
    data: list[str] | None = typer.Option(None, help="Dataset folder(s); none = synthetic fundus data."),
    epochs: int | None = typer.Option(None), batch_size: int | None = typer.Option(None),
    lr: float | None = typer.Option(None), input_size: int | None = typer.Option(None),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained"),
    pretrained_file: str | None = typer.Option(None, help="Local ImageNet checkpoint (offline machines)."),
    loss: str | None = typer.Option(None, help="ce | focal"), device: str | None = typer.Option(None),
    max_minutes: float | None = typer.Option(None), resume: bool | None = typer.Option(None, "--resume"),
    out: str | None = typer.Option(None), seed: int | None = typer.Option(None),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Fine-tune a registered model (defaults -> YAML -> flags). Works under torchrun for multi-GPU."""
    from training.config import TrainConfig, resolve_config
    from training.train import fit

    try:
        cfg = resolve_config(TrainConfig, config, _train_overrides(
            model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
            pretrained=pretrained, pretrained_file=pretrained_file, loss=loss, device=device,
            max_minutes=max_minutes, resume=resume, out=out, seed=seed))
        with _quiet(Path(cfg.out) / "train.log", verbose) as where:
            if verbose:
                result = fit(cfg)
            else:
                with where.console.status(f"training {cfg.model}, {cfg.epochs} epochs (per-epoch lines in the log)"):
                    result = fit(cfg, progress=False)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    if result.metrics.get("val"):
        _metrics_table(result.metrics, f"{cfg.model} -> {result.best_checkpoint}")


def _metrics_table(metrics: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("split", "n", "QWK", "accuracy", "ref. sens", "ref. spec", "ref. AUC"):
        table.add_column(column)
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            table.add_row(split, str(m["n"]), *(f"{m[k]:.3f}" for k in ("qwk", "accuracy", "referable_sensitivity",
                                                                          "referable_specificity", "referable_auc")))
    out_console.print(table)


@app.command()
def evaluate(checkpoint: Path = typer.Option(...), data: Path = typer.Option(...), split: str = typer.Option("test"),
             out: Path | None = typer.Option(None, help="Folder for eval_<data>_<split>.json/.png (default: beside the checkpoint).")):
    """Evaluate a checkpoint on one split of a labelled folder: QWK, accuracy, referable sensitivity/specificity/AUC."""
    from training.evaluate import evaluate as run_evaluate

    try:
        metrics = run_evaluate(checkpoint, data, split, out=out or checkpoint.parent)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    _metrics_table({"test": metrics}, f"{metrics['model']} on {data.name}/{split}")


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="Teacher checkpoint (best.pt of a train run)."),
    student: str = typer.Option("tf_efficientnet_lite0", help="Registered student model."),
    config: Path | None = typer.Option(None, "--config", "-c"),
    data: list[str] | None = typer.Option(None), epochs: int | None = typer.Option(None),
    alpha: float | None = typer.Option(None), temperature: float | None = typer.Option(None),
    cam_weight: float | None = typer.Option(None, help="CAM-attention transfer weight (0 = off)."),
    input_size: int | None = typer.Option(None), pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained"),
    batch_size: int | None = typer.Option(None), lr: float | None = typer.Option(None),
    max_minutes: float | None = typer.Option(None), out: str | None = typer.Option(None),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Distil a teacher into a student: soft targets (KL at temperature T) + class-weighted CE (+ CAM transfer)."""
    from compression.distill import distill as run_distill
    from training.config import TrainConfig, resolve_config

    try:
        cfg = resolve_config(TrainConfig, config, _train_overrides(
            teacher=str(teacher), model=student, data=data, epochs=epochs, alpha=alpha, temperature=temperature,
            cam_weight=cam_weight, input_size=input_size, pretrained=pretrained, batch_size=batch_size, lr=lr,
            max_minutes=max_minutes, out=out))
        if out is None and cfg.out == TrainConfig().out:  # neither YAML nor flags chose a folder
            cfg = dataclasses.replace(cfg, out="runs/distill")
        with _quiet(Path(cfg.out) / "distill.log", verbose) as where:
            if verbose:
                run, report = run_distill(cfg)
            else:
                with where.console.status(f"distilling into {cfg.model}, {cfg.epochs} epochs (details in the log)"):
                    run, report = run_distill(cfg, progress=False)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    table = Table(title=f"student vs teacher on {report['split']} (n={report['n']})")
    for column in ("model", "QWK", "ref. sens", "ref. spec", "ref. AUC"):
        table.add_column(column)
    for role in ("student", "teacher"):
        m = report[role]
        table.add_row(role, *(f"{m[k]:.3f}" for k in ("qwk", "referable_sensitivity", "referable_specificity", "referable_auc")))
    out_console.print(table)
    out_console.print(f"grade agreement {report['agreement']:.3f}, CAM correlation {report['cam_correlation']:.3f}")


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="Checkpoint from train/distill."),
    formats: str = typer.Option("onnx,tflite,coreml", help="Comma-separated: onnx, tflite, coreml."),
    precisions: str = typer.Option("fp32,fp16,int8", help="Comma-separated; each format makes those it supports."),
    calib: list[Path] | None = typer.Option(None, help="Real fundus photos for INT8 calibration (`calib` split) and "
                                            "tuning (`train` split); repeat for several folders."),
    val: list[Path] | None = typer.Option(None, help="Labelled photos for parity and the fidelity gate (`val` split); "
                                          "repeat to judge the val splits of several folders together."),
    val_limit: int = typer.Option(128, help="At most this many val photos per --val folder (grades stratified)."),
    out: Path = typer.Option(Path("artifacts"), help="Output folder (gets index.json)."),
    recipe: str = typer.Option("ort", help="INT8 recipe: ort | nncf | nncf_ac (ONNX; TFLite/CoreML use PT2E) | "
                               "qat (ONNX through NNCF, TFLite/CoreML through PT2E)."),
    target: str = typer.Option("x86_avx2", help="CPU class preset: x86_avx2 | x86_avx2_fast | x86_vnni | arm64 | jetson_orin."),
    calibration: str = typer.Option("minmax", help="minmax | percentile | entropy (ort recipe)."),
    min_agreement: float = typer.Option(0.995), min_qwk_ratio: float = typer.Option(0.995),
    max_sensitivity_drop: float = typer.Option(0.01),
    name: str | None = typer.Option(None, help="Artifact file stem (default: model name)."),
    qat_steps: int = typer.Option(0, help="Quantization-aware fine-tuning steps when post-training INT8 and its "
                                  "mixed-precision retries all fail the gate (0: off); uses --calib's train split."),
    qat_lr: float | None = typer.Option(None, help="QAT learning rate (Adam; default QATConfig's 1e-5)."),
    tuning_images: int = typer.Option(256, help="Unlabelled photos from --calib's train split that accuracy-"
                                      "controlled mixed precision and QAT hold to FP32's grades (0: none)."),
    escalate: bool = typer.Option(True, "--escalate/--no-escalate",
                                  help="After a failed INT8 gate retry with sensitive layers in float, then accuracy-"
                                  "controlled mixed precision (ONNX), then QAT (with --qat-steps; every format); off: "
                                  "report the recipe as is."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Export self-describing artifacts, verify each numerically, gate INT8; non-zero exit if any fails."""
    from dataclasses import replace

    from compression.gate import GateThresholds
    from compression.qat import QATConfig
    from compression.quantize import QuantRecipe
    from exporters.pipeline import build_context

    try:
        quant = replace(QuantRecipe.for_target(target, recipe), calibration=calibration)
        thresholds = GateThresholds(min_agreement, min_qwk_ratio, max_sensitivity_drop)
        # --recipe qat goes straight to QAT: its default length unless --qat-steps says otherwise.
        qat = QATConfig(steps=qat_steps or (QATConfig().steps if recipe == "qat" else 0),
                        **({"lr": qat_lr} if qat_lr is not None else {}))
        # Tuning photos serve nncf_ac and QAT, directly or through the escalation (ONNX: nncf_ac and QAT;
        # TFLite/CoreML: QAT): skip preprocessing them when nothing can use them.
        uses_tuning = "int8" in precisions.split(",") and (
            recipe in ("nncf_ac", "qat") or escalate and ("onnx" in formats.split(",") or qat.steps > 0))
        with _quiet(out / "export.log", verbose) as where:
            ctx = build_context(checkpoint, out, calib, val, quant, thresholds, val_limit=val_limit, name=name,
                                qat=qat, tuning_limit=tuning_images if uses_tuning else 0, escalate=escalate)
            records = _export_with_progress(ctx, formats.split(","), precisions.split(","), where.console)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    _print_records(records)
    if any(r.status != "ok" or r.gate == "failed" for r in records):
        raise typer.Exit(1)


def _export_with_progress(ctx, formats: list[str], precisions: list[str], terminal: Console) -> list:
    """export_all one job at a time under a progress bar on the user's terminal (the log gets the rest)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from exporters.base import write_index
    from exporters.formats import get_format
    from exporters.pipeline import export_all

    for fmt in formats:
        get_format(fmt)  # unknown names fail before any work
    jobs = [(f, p) for f in formats for p in precisions if p in get_format(f).precisions]
    records: list = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=terminal) as bar:
        for fmt, precision in jobs:
            task = bar.add_task(f"{fmt} {precision}", total=1)
            records += export_all(ctx, [fmt], [precision], progress=False)
            bar.update(task, completed=1, description=f"{fmt} {precision}: {records[-1].status}, gate {records[-1].gate}")
    write_index(ctx.out_dir, records, ctx.meta)
    return records


def _print_records(records) -> None:
    from exporters.base import gate_failures

    table = Table(title="artifacts")
    for column in ("format", "precision", "status", "size MB", "max|dlogit|", "agreement", "CAM corr", "gate", "s", "note"):
        table.add_column(column)
    def fmt(parity: dict, key: str, spec: str = "{:.4f}") -> str:
        return spec.format(parity[key]) if key in parity else "-"

    for r in records:
        p = r.parity
        table.add_row(r.format, r.precision, r.status, f"{r.size_mb or 0:.2f}", fmt(p, "max_abs_logit_diff", "{:.2e}"),
                      fmt(p, "agreement"), fmt(p, "cam_correlation"), r.gate or "-", f"{r.export_seconds or 0:.1f}",
                      (r.error or "; ".join(gate_failures(r)) or r.verified or "")[:80])
    out_console.print(table)


# ---------------------------------------------------------------- edge
@app.command()
def grade(
    images: list[Path] = typer.Argument(..., help="Fundus photos."),
    artifact: Path = typer.Option(..., help="An exported artifact (.onnx, .tflite, .mlpackage) with its manifest."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    save_overlay: Path | None = typer.Option(None, help="Folder for CAM overlay PNGs."),
    outbox: Path | None = typer.Option(None, help="Outbox database; results are stored before they are printed."),
    device_id: str = typer.Option("local"), threads: int | None = typer.Option(None),
    allow_ungated: bool = typer.Option(False, "--allow-ungated", help="Use an artifact that failed its fidelity gate."),
):
    """Grade fundus photos on this device (no torch needed)."""
    from edge_runtime.errors import ImageError, RetinaEdgeError
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener

    try:
        screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, threads=threads, device_id=device_id,
                                          outbox=Outbox(outbox) if outbox else None)
    except (RetinaEdgeError, ImportError) as exc:
        _fail(exc)
    failures = 0
    for image in images:
        try:
            screening = screener.screen_file(image)
        except ImageError as exc:
            failures += 1
            payload = {"image": str(image), "error": type(exc).__name__, "detail": str(exc)}
            print(json.dumps(payload)) if json_output else console.print(f"[red]{image.name}: {exc}[/red]")
            continue
        result = screening.result
        overlay_path = None
        if save_overlay and screening.overlay_png:
            save_overlay.mkdir(parents=True, exist_ok=True)
            overlay_path = save_overlay / f"{image.stem}_cam.png"
            overlay_path.write_bytes(screening.overlay_png)
        if json_output:
            print(json.dumps(_grade_json(result, overlay_path)))
        else:
            verdict = (f"grade {result.grade} ({result.grade_name}), confidence {result.confidence:.2f}, "
                       f"referable {'YES' if result.referable else 'no'}") if result.grade is not None else \
                "UNGRADABLE - retake, or refer if a retake fails: " + "; ".join(result.quality.reasons)
            out_console.print(f"{image.name}: {verdict}  [{result.backend}/{result.provider}, {result.model_version}]")
    if not json_output:
        console.print(DISCLAIMER)
    raise typer.Exit(1 if failures else 0)


def _grade_json(result, overlay_path) -> dict:
    return {"image": result.image_name, "result_id": result.result_id, "outcome": result.outcome, "grade": result.grade,
            "grade_name": result.grade_name, "probabilities": result.probabilities, "confidence": result.confidence,
            "referable": result.referable,
            "quality": {"gradable": result.quality.gradable, "score": result.quality.score,
                        "reasons": list(result.quality.reasons), "metrics": result.quality.metrics},
            "cam_peak": result.cam_peak, "overlay": str(overlay_path) if overlay_path else None,
            "model_version": result.model_version, "model_sha256": result.model_sha256, "backend": result.backend,
            "provider": result.provider, "latency_ms": result.latency_ms, "disclaimer": result.disclaimer}


@app.command()
def watch(
    folder: Path = typer.Argument(..., help="Capture folder to watch."),
    artifact: Path = typer.Option(...), outbox: Path = typer.Option(Path("retinaedge_outbox.db")),
    device_id: str = typer.Option("local"), interval: float = typer.Option(2.0),
    once: bool = typer.Option(False, "--once", help="Grade what is there now, then exit."),
    allow_ungated: bool = typer.Option(False, "--allow-ungated"),
):
    """Grade each new image in a capture folder exactly once, surviving restarts."""
    _logging(False)
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from edge_runtime.watch import watch_folder

    box = Outbox(outbox)
    screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, device_id=device_id, outbox=box)
    graded = watch_folder(folder, screener, box, interval=interval, once=once)
    console.print(f"graded {graded} new image(s); outbox {box.counts()}")


@app.command()
def sync(
    server: str = typer.Option(..., help="Companion server URL."), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
    outbox: Path = typer.Option(Path("retinaedge_outbox.db")), loop: bool = typer.Option(False, "--loop"),
    batch_size: int = typer.Option(25), max_rounds: int | None = typer.Option(None),
):
    """Send unacknowledged results to the companion server (idempotent; resumes after restarts)."""
    _logging(False)
    from edge_runtime.outbox import Outbox
    from edge_runtime.sync import SyncClient, SyncError

    box = Outbox(outbox)
    try:
        report = SyncClient(server, token, box, batch_size).run(loop=loop, max_rounds=max_rounds)
    except SyncError as exc:
        _fail(exc)
    console.print(f"sent {report.sent}, outbox {box.counts()}, errors {report.errors}")


@app.command("update-model")
def update_model(server: str = typer.Option(...), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
                 format: str = typer.Option("onnx"), dest: Path = typer.Option(Path("models"))):
    """Download the newest artifact from the companion server; it is used only if its sha256 matches."""
    from edge_runtime.errors import RetinaEdgeError
    from edge_runtime.updates import fetch_latest_model

    try:
        path = fetch_latest_model(server, token, format, dest)
    except (RetinaEdgeError, OSError) as exc:
        _fail(exc)
    out_console.print(f"verified and installed {path}")


@app.command()
def info(artifact: Path = typer.Argument(...), allow_ungated: bool = typer.Option(True)):
    """Show an artifact's manifest, backend and active providers."""
    from edge_runtime.backends import open_session
    from edge_runtime.errors import RetinaEdgeError

    try:
        session = open_session(artifact, allow_ungated=allow_ungated)
        manifest, backend = session.info.manifest.to_dict(), {"backend": session.info.backend, "provider": session.info.provider,
                                                               **session.info.extra}
    except ImportError as exc:  # e.g. CoreML on Linux: still show the manifest
        from edge_runtime.backends import load_manifest

        manifest, backend = load_manifest(artifact).to_dict(), {"unavailable": str(exc)}
    except RetinaEdgeError as exc:
        _fail(exc)
    print(json.dumps({"manifest": manifest, "runtime": backend}, indent=2, default=str))


@app.command()
def synth(out: Path = typer.Argument(...), per_grade: int = typer.Option(40), size: int = typer.Option(256),
          seed: int = typer.Option(0)):
    """Write a synthetic fundus dataset (labels.csv layout)."""
    from training.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(out, per_grade, size, seed)
    console.print(f"wrote {per_grade * 5} images to {out}")


# ---------------------------------------------------------------- benchmarks
@bench_app.callback()
def bench(
    ctx: typer.Context,
    artifacts: Path | None = typer.Option(None, help="Folder of exported artifacts (with manifests)."),
    data: Path | None = typer.Option(None, help="Labelled photos for accuracy (its `test` split)."),
    lesions: Path | None = typer.Option(None, help="lesion_boxes folder for the CAM pointing game."),
    torch_checkpoint: list[Path] | None = typer.Option(None, help="PyTorch eager baselines, e.g. the B4 teacher."),
    runs: int = typer.Option(100), min_seconds: float = typer.Option(10.0), threads: int | None = typer.Option(None),
    mlperf: bool = typer.Option(False, "--mlperf", help="MLPerf single-stream: >= 1024 queries and >= 60 s."),
    eval_limit: int | None = typer.Option(None), split: str = typer.Option("test"),
    out: Path = typer.Option(Path("bench")), verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Benchmark every artifact this device can run; writes JSON, Markdown, plots and HTML."""
    if ctx.invoked_subcommand is not None:
        return
    if artifacts is None:
        _fail(ValueError("--artifacts DIR is required"))
    from benchmarks.runner import BenchConfig, run_benchmark, to_markdown

    cfg = BenchConfig(runs=runs, min_seconds=min_seconds, threads=threads, mlperf=mlperf, eval_limit=eval_limit, split=split)
    with _quiet(out / "bench.log", verbose) as where:
        with where.console.status(f"benchmarking {artifacts} (runs >= {runs}, >= {min_seconds} s each)"):
            report = run_benchmark(artifacts, out, data, lesions, torch_checkpoint, cfg, progress=False)
    print(to_markdown(report))
    if any(r.get("status") == "failed" for r in report["rows"]):
        raise typer.Exit(1)


@bench_app.command("compare")
def bench_compare(reports: list[Path] = typer.Argument(...), out: Path = typer.Option(Path("bench/compare"))):
    """Merge report.json files from several devices into one table and plot."""
    from benchmarks.report import compare

    print(compare(reports, out))


# ---------------------------------------------------------------- companion server
@app.command()
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000), workers: int = typer.Option(1)):
    """Run the companion API (migrations are applied at start). Settings from RETINAEDGE_* / .env."""
    import uvicorn

    from companion_api.core.config import Settings
    from companion_api.core.db import run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    if workers > 1 and settings.is_sqlite:
        console.print("[yellow]several workers on SQLite serialise on one file; use PostgreSQL for scale-out[/yellow]")
    uvicorn.run("companion_api.asgi:app", host=host, port=port, workers=workers, log_level="info")


def _admin_session():
    from companion_api.core.config import Settings
    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    return make_sessionmaker(make_engine(settings.DATABASE_URL))()


def _create(name: str, role: str) -> None:
    from companion_api.crud import create_principal

    with _admin_session() as session:
        try:
            token = create_principal(session=session, name=name, role=role)
        except ValueError as exc:
            _fail(exc)
    console.print(f"{role} {name!r} created; the token is shown once:")
    print(token)


@admin_app.command("create-device")
def create_device(name: str):
    """Create a device token (stored hashed)."""
    _create(name, "device")


@admin_app.command("create-reviewer")
def create_reviewer(name: str):
    """Create a reviewer token (reads every device's results)."""
    _create(name, "reviewer")


@admin_app.command()
def revoke(name: str):
    """Revoke a device or reviewer token."""
    from companion_api.crud import revoke_principal

    with _admin_session() as session:
        try:
            revoke_principal(session=session, name=name)
        except ValueError as exc:
            _fail(exc)
    console.print(f"revoked {name!r}")


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="Toy sizes (tests): about half a minute."),
         data: Path | None = typer.Option(None, help="A real labelled folder instead of synthetic data."),
         lesions: Path | None = typer.Option(None, help="A lesion_boxes folder: CAM gallery with lesion boxes and "
                                              "the pointing game."),
         escalate: bool = typer.Option(False, "--escalate", help="After a failed INT8 gate also try accuracy-controlled "
                                       "mixed precision and QAT (minutes on a CPU); off: only the seconds-long retry."),
         out: Path = typer.Option(Path("runs/demo")), verbose: bool = typer.Option(False, "--verbose", "-v")):
    """End-to-end demo: data -> teacher -> distilled student -> INT8 + gate -> exports -> bench -> grade -> sync -> report."""
    from retinaedge.demo import run_demo

    (out / "demo.log").unlink(missing_ok=True)  # one run's details per log
    try:
        with _quiet(out / "demo.log", verbose) as where:
            summary = run_demo(out, quick, data, lesions, escalate, console=where.console)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    table = Table(title=f"RetinaEdge demo ({summary['mode']}): {summary['total_s']} s")
    table.add_column("step")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    for step, seconds in summary["timings_s"].items():
        table.add_row(step, f"{seconds:.1f}", f"{summary['cpu_s'][step]:.1f}")
    table.add_row("total", f"{summary['total_s']:.1f}", f"{sum(summary['cpu_s'].values()):.1f}", style="bold")
    out_console.print(table)
    load = summary.get("load_average")
    if load:
        out_console.print(f"load average {load[0]} / {load[1]} / {load[2]} (1/5/15 min) on {summary['device']['cores']} cores")
    out_console.print(_demo_headline(summary))
    out_console.print(f"report: {out / 'report.html'}   log: {out / 'demo.log'}   artifacts: {out / 'artifacts'}")
    console.print(DISCLAIMER)


def _demo_headline(summary: dict) -> str:
    def value(metric: dict) -> str:
        ci = metric.get("ci")
        return f"{metric['value']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "") if metric.get("value") is not None else "-"

    lines = []
    for m in summary["evaluation"]["models"]:
        lines.append(f"{m['role']} {m['precision']}: QWK {value(m['qwk'])}, referable sensitivity {value(m['sensitivity'])}, "
                     f"specificity {value(m['specificity'])} (test n={m['n']})")
    gates = ", ".join(f"{a['format']} {a['precision']} {a['gate']}" for a in summary["artifacts"] if a["precision"] == "int8")
    chosen = summary["screening_artifact"]
    lines.append(f"INT8 gate: {gates or '-'}; the device screened with {Path(chosen['path']).name}")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
