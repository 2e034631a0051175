"""The `retinaedge` command: one thin module per area; each command imports its package lazily, so the edge
commands (grade, watch, sync, update-model, info) run in an install without torch.

    train.py   train, pretrain, evaluate, operating-point, distill, synth
    export.py  export
    edge.py    grade, watch, sync, update-model, info
    bench.py   bench, bench compare
    server.py  serve, admin
    demo.py    demo
"""
from retinaedge.cli import bench, demo, edge, export, server, train  # noqa: F401 - each registers its commands
from retinaedge.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
