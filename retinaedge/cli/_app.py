"""The Typer applications every command module registers on, and the consoles they print to."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(help="RetinaEdge: DR screening from a full-precision teacher to INT8 edge artifacts. "
                  "A screening aid, not a diagnosis.", no_args_is_help=True, add_completion=False)
admin_app = typer.Typer(help="Companion-server administration: tokens.", no_args_is_help=True)
bench_app = typer.Typer(help="Per-device benchmarks of every artifact.", invoke_without_command=True)
app.add_typer(admin_app, name="admin")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
# Tables go to stdout; logs and CI are not terminals, where rich would wrap them to 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 200)
