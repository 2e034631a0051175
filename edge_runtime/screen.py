"""On-device screening: decode -> quality gate -> preprocess -> infer -> decide -> CAM -> outbox.

The step is built to cost little more than the model itself: JPEGs far larger than the model input are
decoded at reduced scale, the field of view is found once on a small copy and shared by the quality gate
and the crop, and the CAM overlay is rendered at display size only when someone asks for it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from .backends import RuntimeOptions, Session, open_session
from .cam import render_overlay
from .capture import NO_VISIT, Visit
from .contract import OperatingPoint, PreprocessPolicy
from .decision import decide
from .errors import ImageError
from .outbox import Outbox
from .preprocess import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_image, detect_fov, preprocess, to_bgr8
from .quality import DEFAULT_THRESHOLDS, GATE_SIDE, QualityThresholds, assess
from .wire import QualityReport, ScreeningResult

log = logging.getLogger(__name__)


def decode_side(policy: PreprocessPolicy) -> int:
    """Shortest side a photo is decoded at: 1.5x the model input (INTER_AREA then still averages >= 1.5 source
    pixels per input pixel), and at least the quality gate's ``GATE_SIDE``, so every model up to 224 px gives
    the gate the same pixels (one verdict per photo, whatever the model)."""
    return max(math.ceil(1.5 * policy.input_size), GATE_SIDE)


@dataclass(frozen=True)
class Screening:
    """A stored result; the CAM overlay (PNG at display size) is rendered on first access, off the critical path."""

    result: ScreeningResult
    render_overlay: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def overlay_png(self) -> bytes | None:
        return self.render_overlay() if self.render_overlay is not None else None


class Screener:
    """Grades fundus photos with one artifact; stores each result in the outbox before returning it."""

    def __init__(self, session: Session, device_id: str = "local", outbox: Outbox | None = None,
                 quality: QualityThresholds = DEFAULT_THRESHOLDS, keep_images: bool = False,
                 max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS, store_overlays: bool = False,
                 reduced_decode: bool = True, parallel_gate: bool = False,
                 operating_point: OperatingPoint | None = None):
        """``store_overlays``: render the overlay inside the step and store it with the result (what the companion
        server's review page shows); off, it is rendered only when ``Screening.overlay_png`` is read.
        ``reduced_decode``: decode large JPEGs at 1/2-1/8 scale (see :func:`decode_side`).
        ``parallel_gate``: run the quality gate beside preprocessing and inference (see ``_gate_pool``).
        ``operating_point``: where referral is decided instead of the manifest's, e.g. a site's own point
        (``edge_runtime.site``); the manifest's by default."""
        self.session, self.device_id, self.outbox = session, device_id, outbox
        self.operating_point = operating_point or session.info.manifest.operating_point
        self.quality, self.keep_images = quality, keep_images
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.store_overlays = store_overlays
        self.min_side = decode_side(session.info.manifest.preprocess) if reduced_decode else None
        # On, one worker thread runs the quality gate while the model runs (hides the gate where a core is free);
        # off (default), the gate runs first and an ungradable photo skips inference. On the 2 oversubscribed
        # cores measured (benchmarks/latency_breakdown.py --parallel-gate) neither won consistently.
        self._gate_pool = ThreadPoolExecutor(1, thread_name_prefix="quality-gate") if parallel_gate else None

    @classmethod
    def from_artifact(cls, artifact: str | Path, allow_ungated: bool = False, threads: int | None = None,
                      options: RuntimeOptions | None = None, **kwargs):
        return cls(open_session(artifact, allow_ungated=allow_ungated, options=options, threads=threads), **kwargs)

    def screen_file(self, path: str | Path, capture_key: str | None = None, visit: Visit = NO_VISIT) -> Screening:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
        return self.screen_bytes(data, path.name, capture_key, visit)

    def screen_bytes(self, data: bytes, image_name: str | None = None, capture_key: str | None = None,
                     visit: Visit = NO_VISIT) -> Screening:
        """Grade one encoded image. Raises a typed ImageError for unusable bytes; ungradable photos are stored."""
        clock = _Clock()
        bgr = decode_image(data, self.max_bytes, self.max_pixels, self.min_side)
        clock.lap("decode")
        return self._screen(bgr, data, image_name, capture_key, clock, visit)

    def screen_image(self, bgr: np.ndarray, image_name: str | None = None, capture_key: str | None = None,
                     visit: Visit = NO_VISIT) -> Screening:
        """Grade one decoded uint8 BGR image (e.g. a video frame); stored like :meth:`screen_bytes`."""
        clock = _Clock()
        bgr = to_bgr8(bgr)
        return self._screen(bgr, None, image_name, capture_key, clock, visit)

    def store_ungradable(self, quality: QualityReport, image_name: str | None = None,
                         capture_key: str | None = None, visit: Visit = NO_VISIT) -> Screening:
        """Store an ungradable verdict reached elsewhere (e.g. no gradable frame in a video)."""
        clock = _Clock()
        result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=clock.timings,
                                 **self._common(image_name, visit))
        return self._store(result, None, None, capture_key, clock)

    def _common(self, image_name: str | None, visit: Visit) -> dict:
        info = self.session.info
        return dict(device_id=self.device_id, model_version=info.manifest.model_version,
                    model_sha256=info.manifest.sha256 or "", backend=info.backend, provider=info.provider,
                    image_name=image_name, encounter_id=visit.encounter_id, eye=visit.eye)

    def _screen(self, bgr: np.ndarray, data: bytes | None, image_name: str | None, capture_key: str | None,
                clock: _Clock, visit: Visit = NO_VISIT) -> Screening:
        manifest = self.session.info.manifest
        try:  # found once, used by both the quality gate and the crop
            fov = detect_fov(bgr, manifest.preprocess.fov_threshold)
        except ImageError:
            fov = None  # assess() reports "no fundus found" as its verdict
        clock.lap("fov")
        common = self._common(image_name, visit)
        if self._gate_pool is None or fov is None:
            quality = assess(bgr, self.quality, fov)
            clock.lap("quality")
            if not quality.gradable:
                result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=clock.timings, **common)
                return self._store(result, None, data, capture_key, clock)
            pending = None
        else:  # the gate runs beside preprocess + inference (OpenCV releases the GIL); its verdict still decides
            pending = self._gate_pool.submit(_timed_assess, bgr, self.quality, fov)
        try:
            pre = preprocess(bgr, manifest.preprocess, fov)
        except ImageError as exc:  # the gate passed but cropping failed: still a stored, ungradable capture
            quality = pending.result()[0] if pending is not None else quality
            quality = QualityReport(False, 0.0, quality.reasons + (str(exc),), quality.metrics)
            result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=clock.timings, **common)
            return self._store(result, None, data, capture_key, clock)
        clock.lap("preprocess")
        outputs = self.session.run_heads(pre.tensor)
        clock.lap("infer")
        if pending is not None:
            quality, gate_ms = pending.result()
            clock.lap("gate_wait")  # what the gate added after inference; its own time is recorded as "quality"
            clock.timings["quality"] = gate_ms
            if not quality.gradable:  # the inference is discarded: an ungradable photo is never graded
                result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=clock.timings, **common)
                return self._store(result, None, data, capture_key, clock)
        dme = {}
        if manifest.has_dme:
            dme = dict(dme_logit=outputs.dme_logit[0], dme_cam=outputs.dme_cam[0], dme_point=manifest.dme_operating_point)
        decision = decide(outputs.logits[0], outputs.cam[0], self.operating_point, **dme)
        clock.lap("decide")
        cam_peak = pre.to_original(*decision.cam_peak)
        if decision.dme is not None:
            common.update(dme_probability=decision.dme.probability, dme_present=decision.dme.present,
                          dme_threshold=decision.dme.threshold, dme_cam_peak=pre.to_original(*decision.dme.cam_peak))
        render = partial(render_overlay, bgr, decision.cam, pre)  # holds the decoded photo, not a copy
        clock.lap("cam")
        if self.store_overlays:
            png = render()
            render = partial(bytes, png)
            clock.lap("overlay")
        result = ScreeningResult(quality=quality, grade=decision.grade, probabilities=decision.probabilities,
                                 confidence=decision.confidence, referable=decision.referable,
                                 referable_probability=decision.referable_probability, threshold=decision.threshold,
                                 outcome=decision.outcome, cam_peak=cam_peak, latency_ms=clock.timings, **common)
        return self._store(result, render, data, capture_key, clock)

    def _store(self, result: ScreeningResult, render: Callable[[], bytes] | None, data: bytes | None,
               capture_key: str | None, clock: _Clock) -> Screening:
        if self.outbox is not None:
            stored = render() if render is not None and self.store_overlays else None
            self.outbox.put(result, stored, data if self.keep_images else None, capture_key)
        clock.lap("store")
        # The stored record was validated with the stages before the durable write; the caller also sees its time.
        result = result.model_copy(update={"latency_ms": dict(clock.timings)})
        log.info("screened %s: %s (grade %s, backend %s/%s)", result.result_id, result.outcome, result.grade,
                 result.backend, result.provider)
        return Screening(result, render)


def _timed_assess(bgr: np.ndarray, thresholds: QualityThresholds, fov) -> tuple[QualityReport, float]:
    started = time.perf_counter()
    return assess(bgr, thresholds, fov), round((time.perf_counter() - started) * 1000, 3)


class _Clock:
    """Stage timings (ms) into one dict; the result holds that dict, so the store time lands after the durable write."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round((now - self._last) * 1000, 3)
        self._last = now
