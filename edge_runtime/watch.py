"""Capture-folder watcher: each image is graded exactly once, across restarts (the outbox remembers)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .capture import is_photo, photos_in
from .errors import ImageError
from .outbox import Outbox
from .screen import Screener

log = logging.getLogger(__name__)


def capture_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def watch_folder(folder: Path, screener: Screener, outbox: Outbox, interval: float = 2.0, once: bool = False,
                 settle_seconds: float = 1.0) -> int:
    """Poll ``folder``; returns how many images were graded. Files still being written (changed within
    ``settle_seconds``) wait for the next poll."""
    graded, failed = 0, set()
    while True:
        for path in photos_in(folder):
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


def _bursts(folder: Path) -> list[Path]:
    """Each sub-folder holding photos is one capture burst; photos directly in ``folder`` form one more."""
    bursts = [p for p in sorted(folder.iterdir()) if p.is_dir() and any(is_photo(q) for q in p.iterdir())]
    if photos_in(folder):
        bursts.append(folder)
    return bursts


def watch_bursts(folder: Path, screener: Screener, outbox: Outbox, interval: float = 2.0, once: bool = False,
                 settle_seconds: float = 1.0) -> int:
    """Poll ``folder`` for bursts of frames (see :func:`_bursts`); for each burst and eye (from the photo names:
    left/right/OS/OD) the sharpest gradable frame is graded and stored once, as ``<burst>#eye=..&frame=..``, or
    the burst is stored as ungradable with retake advice. Returns how many results were stored. A burst waits
    until none of its files changed within ``settle_seconds``; frames added after it was graded are ignored."""
    from .video import burst_frames, choose_frame, group_burst, screen_choice

    stored = 0
    while True:
        for burst in _bursts(folder):
            photos = photos_in(burst)
            try:
                if not once and time.time() - max(p.stat().st_mtime for p in photos) < settle_seconds:
                    continue
            except (FileNotFoundError, ValueError):
                continue
            for eye, paths in group_burst(photos).items():
                key = f"burst:{burst.resolve()}#eye={eye}"
                if outbox.has_capture(key):
                    continue
                try:
                    choice = choose_frame(burst_frames(paths), screener.quality)
                    screen_choice(screener, choice, burst.name, eye, capture_key=key)
                    stored += 1
                except ImageError as exc:
                    log.warning("cannot grade burst %s (%s eye): %s", burst.name, eye or "unknown", exc)
        if once:
            return stored
        time.sleep(interval)
