"""`retinaedge demo`: the end-to-end run on embedded defaults (retinaedge.demo)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edge_runtime.presentation import NOT_A_DIAGNOSIS
from retinaedge.cli._app import app, console, out_console
from retinaedge.cli._common import fail, quiet


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
        with quiet(out / "demo.log", verbose) as where:
            summary = run_demo(out, quick, data, lesions, escalate, console=where.console)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(exc)
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
    console.print(NOT_A_DIAGNOSIS)


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
