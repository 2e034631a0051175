"""`retinaedge bench`: every artifact this device can run, and the cross-device comparison."""
from __future__ import annotations

from pathlib import Path

import typer

from retinaedge.cli._app import bench_app
from retinaedge.cli._common import fail, quiet


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
        fail(ValueError("--artifacts DIR is required"))
    from benchmarks.report import to_markdown
    from benchmarks.runner import BenchConfig, run_benchmark

    cfg = BenchConfig(runs=runs, min_seconds=min_seconds, threads=threads, mlperf=mlperf, eval_limit=eval_limit, split=split)
    with quiet(out / "bench.log", verbose) as where:
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
