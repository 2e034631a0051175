"""Which files are captures, which eye and visit each shows: the one rule the CLI, the folder watcher and the
burst grader share."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Photo files every entry point grades (a folder, a watched capture folder, a burst, a training layout): the
# decoder's accepted formats, so no entry point offers a file the decoder refuses or skips one another grades.
from .preprocess import IMAGE_SUFFIXES

_EYE_PATTERN = re.compile(r"(?:^|[^a-z])(left|right|od|os)(?:[^a-z]|$)", re.IGNORECASE)
_EYE_NAMES = {"left": "left", "os": "left", "right": "right", "od": "right"}


def is_photo(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def photos_in(folder: Path) -> list[Path]:
    """The photos directly inside ``folder``, in name order."""
    return sorted(p for p in folder.iterdir() if is_photo(p))


def eye_of(name: str) -> str | None:
    """'left' / 'right' from a file name token (left, right, OS, OD), else None."""
    match = _EYE_PATTERN.search(Path(name).stem)
    return _EYE_NAMES[match.group(1).lower()] if match else None


@dataclass(frozen=True)
class Visit:
    """Which patient visit (encounter) and eye a capture belongs to; programmes refer per visit, not per photo."""

    encounter_id: str | None = None  # an opaque visit id from the clinic's system, never a patient name
    eye: str | None = None  # left | right

    def __post_init__(self) -> None:
        if self.eye not in (None, "left", "right"):
            raise ValueError(f"eye must be 'left' or 'right', got {self.eye!r}")


NO_VISIT = Visit()


def plan_captures(items: Iterable[Path], encounter: str | None = None,
                  eye: str | None = None) -> list[tuple[Path, Visit]]:
    """Each photo to grade with its visit. A folder is one encounter: its name is the visit id (unless
    ``encounter`` is given) and each photo's name says its eye; a file belongs to ``encounter``. ``eye``, when given,
    overrides the names."""
    captures: list[tuple[Path, Visit]] = []
    for item in items:
        if item.is_dir():
            captures += [(photo, Visit(encounter or item.name, eye or eye_of(photo.name))) for photo in photos_in(item)]
        else:
            captures.append((item, Visit(encounter, eye or eye_of(item.name))))
    return captures
