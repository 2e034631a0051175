"""Capture-folder watcher: each image is graded exactly once, across restarts (the outbox remembers)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .errors import ImageError
from .outbox import Outbox
from .screen import Screener

log = logging.getLogger(__name__)
SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def capture_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def watch_folder(folder: Path, screener: Screener, outbox: Outbox, interval: float = 2.0, once: bool = False,
                 settle_seconds: float = 1.0) -> int:
    """Poll ``folder``; returns how many images were graded. Files still being written (changed within
    ``settle_seconds``) wait for the next poll."""
    graded, failed = 0, set()
    while True:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
            try:
                if not once and time.time() - path.stat().st_mtime < settle_seconds:
                    continue
                key = capture_key(path)
            except FileNotFoundError:
                continue
            if key in failed or outbox.has_capture(key):
                continue
            try:
                screener.screen_file(path, capture_key=key)  # result + capture key in one transaction
                graded += 1
            except ImageError as exc:
                failed.add(key)
                log.warning("cannot grade %s: %s", path.name, exc)
        if once:
            return graded
        time.sleep(interval)
