"""Best-frame selection from a capture stream: a phone ophthalmoscope's video or a burst of photos.

Every frame (or every ``stride``-th) is scored by the quality gate (a few milliseconds at 720p, see
``benchmarks/video_speed.py``); the sharpest gradable frame is graded and stored as the eye's one result, named ``<source>#frame=<index>`` (``#eye=<eye>&frame=<index>`` when the eye is known) with its
quality score in ``result.quality.score``. When no frame is gradable the best-scoring one is stored as
ungradable with the gate's reasons and "retake" advice, so a capture is never silently dropped.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .capture import Visit, eye_of
from .errors import ImageError, UnreadableImageError
from .preprocess import read_image, to_bgr8
from .quality import DEFAULT_THRESHOLDS, QualityThresholds, assess
from .screen import Screener, Screening
from .wire import QualityReport

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm")
RETAKE = "no gradable frame in the capture: retake (steady the camera, focus, adjust the light)"


@dataclass(frozen=True)
class FrameQuality:
    """The gate's verdict on one frame of a stream."""

    index: int
    report: QualityReport


@dataclass(frozen=True)
class FrameChoice:
    """The frame chosen from a stream, with every frame's verdict (for audit and for the retake advice)."""

    index: int
    frame: np.ndarray  # uint8 BGR
    report: QualityReport
    scored: tuple[FrameQuality, ...]

    @property
    def gradable(self) -> bool:
        return self.report.gradable


def centre_square(frame: np.ndarray) -> np.ndarray:
    """The centred square of a wide (or tall) frame, as a view: a phone ophthalmoscope's circular field sits in
    the middle of a 16:9 frame, and the gate's field-of-view limits are for a frame the fundus can fill."""
    h, w = frame.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return frame[y0:y0 + side, x0:x0 + side]


def video_frames(path: str | Path, stride: int = 1, max_frames: int | None = None,
                 square: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 BGR) of every ``stride``-th frame of a video file, decoded with OpenCV; ``square`` keeps the
    centred square of each frame (:func:`centre_square`).

    Raises:
        UnreadableImageError: the file is missing or OpenCV cannot decode it.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"video {path} not found")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UnreadableImageError(f"OpenCV cannot open {path.name} as a video; expected {', '.join(VIDEO_SUFFIXES)}")
    try:
        index = yielded = 0
        while max_frames is None or yielded < max_frames:
            if index % stride:
                if not capture.grab():  # skipped frames are demuxed, not converted to pixels
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                yielded += 1
                frame = to_bgr8(frame)
                yield index, np.ascontiguousarray(centre_square(frame)) if square else frame
            index += 1
        if index == 0:
            raise UnreadableImageError(f"{path.name} has no decodable frames")
    finally:
        capture.release()


def burst_frames(paths: Iterable[Path]) -> Iterator[tuple[int, np.ndarray]]:
    """(index in sorted order, uint8 BGR) of a burst of photos; unreadable files are skipped."""
    for index, path in enumerate(sorted(paths)):
        try:
            yield index, read_image(path)
        except ImageError:
            continue


def choose_frame(frames: Iterable[tuple[int, np.ndarray]],
                 thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> FrameChoice:
    """The sharpest gradable frame, else the frame closest to gradable (highest quality score).

    Every gradable frame already passed every exposure, field and haze limit; what still tells them apart for a
    grader is detail, so they are ranked by the weakest direction's edge energy (brightness-normalised; defocus
    and motion blur both lower it). Only the current best frame's pixels are kept, so a long video needs the
    memory of two frames.

    Raises:
        UnreadableImageError: the stream held no frame at all.
    """
    best: tuple[tuple[bool, float], int, np.ndarray, QualityReport] | None = None
    scored = []
    for index, frame in frames:
        report = assess(frame, thresholds)
        scored.append(FrameQuality(index, report))
        key = (True, report.metrics["directional_sharpness"]) if report.gradable else (False, report.score)
        if best is None or key > best[0]:
            best = (key, index, frame, report)
    if best is None:
        raise UnreadableImageError("the capture stream held no frames")
    _, index, frame, report = best
    return FrameChoice(index, frame, report, tuple(scored))


def frame_name(source: str, index: int, eye: str | None = None) -> str:
    return f"{source}#eye={eye}&frame={index}" if eye else f"{source}#frame={index}"


def screen_choice(screener: Screener, choice: FrameChoice, source: str, eye: str | None = None,
                  capture_key: str | None = None, encounter_id: str | None = None) -> Screening:
    """Grade and store the chosen frame; an all-ungradable stream is stored as ungradable with retake advice."""
    name = frame_name(source, choice.index, eye)
    if not choice.gradable:
        n = len(choice.scored)
        report = QualityReport(False, choice.report.score,
                               (f"{RETAKE}; best of {n} frame(s) was #{choice.index}",) + choice.report.reasons,
                               choice.report.metrics)
        return screener.store_ungradable(report, name, capture_key, Visit(encounter_id, eye))
    return screener.screen_image(choice.frame, name, capture_key, Visit(encounter_id, eye))


def screen_video(screener: Screener, path: str | Path, eye: str | None = None, stride: int = 1,
                 max_frames: int | None = None, capture_key: str | None = None,
                 encounter_id: str | None = None) -> tuple[Screening, FrameChoice]:
    """Best frame of a video -> one stored result for the eye it shows."""
    path = Path(path)
    choice = choose_frame(video_frames(path, stride, max_frames), screener.quality)
    return screen_choice(screener, choice, path.name, eye, capture_key, encounter_id), choice


def group_burst(paths: Iterable[Path]) -> dict[str | None, list[Path]]:
    """A burst folder's photos by eye (from their names); photos naming no eye form one group (None)."""
    groups: dict[str | None, list[Path]] = {}
    for path in sorted(paths):
        groups.setdefault(eye_of(path.name), []).append(path)
    return groups
