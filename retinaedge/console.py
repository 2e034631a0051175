"""A quiet console for the long commands (demo, train, export, bench).

Converters and runtimes write progress dumps and warnings from Python (warnings, logging, tqdm, print) and from
C/C++ straight to file descriptors 1 and 2 (ONNX Runtime, TensorFlow Lite, absl, MLIR). Only redirecting the
descriptors catches all of them, so while ``quiet_output`` is active fds 1 and 2 point at a log file and
``QuietOutput.console`` writes to duplicates of the original terminal descriptors: the user sees one rich progress
display and the summary, the log keeps everything else. With ``verbose`` nothing is redirected.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class QuietOutput:
    """Where output goes while a command runs: ``console`` is the user's terminal, ``log_path`` the details."""

    console: Console
    log_path: Path | None  # None when verbose (nothing redirected)


@contextlib.contextmanager
def quiet_output(log_path: Path, verbose: bool = False) -> Iterator[QuietOutput]:
    """Send warnings, logging and fd-level stdout/stderr to ``log_path`` (appended) unless ``verbose``."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=LOG_FORMAT, stream=sys.stderr, force=True)
        yield QuietOutput(Console(stderr=True), None)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    # rich decides colour and live display from this file, the real terminal, not the log fd 2 will point at.
    console = Console(file=terminal)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in finally
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    # Libraries that log through their own handlers and do not propagate (NNCF does) are sent to the log too.
    detached = {lg: lg.handlers[:] for lg in _non_propagating_loggers()}
    for lg in detached:
        lg.handlers = [handler]
    logging.captureWarnings(True)
    saved_streams = sys.stdout, sys.stderr
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Python-level writes too, where sys.stdout/stderr are not the fd 1/2 wrappers (pytest, notebooks).
        sys.stdout = sys.stderr = log_file
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # once per location, into the log through logging.captureWarnings
            yield QuietOutput(console, log_path)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        logging.captureWarnings(False)
        root.handlers, root.level = saved_handlers, saved_level
        for lg, handlers in detached.items():
            lg.handlers = handlers
        handler.close()
        log_file.close()
        terminal.close()


def _non_propagating_loggers() -> list[logging.Logger]:
    return [lg for lg in logging.root.manager.loggerDict.values()
            if isinstance(lg, logging.Logger) and not lg.propagate and lg.handlers]
