"""On-device screening: read -> quality gate -> preprocess -> infer -> grade -> CAM -> outbox."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .backends import Session, open_session
from .cam import cam_on_original, overlay_png
from .contract import QualityReport, ScreeningResult
from .decision import decide
from .errors import ImageError
from .outbox import Outbox
from .preprocess import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_image, detect_fov, preprocess
from .quality import DEFAULT_THRESHOLDS, QualityThresholds, assess

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Screening:
    result: ScreeningResult
    overlay_png: bytes | None


class Screener:
    """Grades fundus photos with one artifact; stores each result in the outbox before returning it."""

    def __init__(self, session: Session, device_id: str = "local", outbox: Outbox | None = None,
                 quality: QualityThresholds = DEFAULT_THRESHOLDS, keep_images: bool = False,
                 max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
        self.session, self.device_id, self.outbox = session, device_id, outbox
        self.quality, self.keep_images = quality, keep_images
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    @classmethod
    def from_artifact(cls, artifact: str | Path, allow_ungated: bool = False, threads: int | None = None, **kwargs):
        return cls(open_session(artifact, allow_ungated=allow_ungated, threads=threads), **kwargs)

    def screen_file(self, path: str | Path, capture_key: str | None = None) -> Screening:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
        return self.screen_bytes(data, path.name, capture_key)

    def screen_bytes(self, data: bytes, image_name: str | None = None, capture_key: str | None = None) -> Screening:
        """Grade one encoded image. Raises a typed ImageError for unusable bytes; ungradable photos are stored."""
        info, manifest = self.session.info, self.session.info.manifest
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round((now - clock) * 1000, 3)
            clock = now

        bgr = decode_image(data, self.max_bytes, self.max_pixels)
        lap("decode")
        try:  # found once, used by both the quality gate and the crop
            fov = detect_fov(bgr, manifest.preprocess.fov_threshold)
        except ImageError:
            fov = None  # assess() reports "no fundus found" as its verdict
        quality = assess(bgr, self.quality, fov)
        lap("quality")
        common = dict(device_id=self.device_id, model_version=manifest.model_version, model_sha256=manifest.sha256 or "",
                      backend=info.backend, provider=info.provider, image_name=image_name)
        if not quality.gradable:
            result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=timings, **common)
            return self._store(result, None, data, capture_key, lap, timings)
        try:
            pre = preprocess(bgr, manifest.preprocess, fov)
        except ImageError as exc:  # the gate passed but cropping failed: still a stored, ungradable capture
            quality = QualityReport(False, 0.0, quality.reasons + (str(exc),), quality.metrics)
            result = ScreeningResult(quality=quality, outcome="ungradable", latency_ms=timings, **common)
            return self._store(result, None, data, capture_key, lap, timings)
        lap("preprocess")
        logits, cam = self.session.run(pre.tensor)
        lap("infer")
        decision = decide(logits[0], cam[0], manifest.operating_point)
        lap("decide")
        overlay = overlay_png(bgr, cam_on_original(decision.cam, pre))
        lap("cam")
        result = ScreeningResult(quality=quality, grade=decision.grade, probabilities=decision.probabilities,
                                 confidence=decision.confidence, referable=decision.referable,
                                 cam_peak=pre.to_original(*decision.cam_peak), latency_ms=timings, **common)
        return self._store(result, overlay, data, capture_key, lap, timings)

    def _store(self, result, overlay, data, capture_key, lap, timings) -> Screening:
        if self.outbox is not None:
            self.outbox.put(result, overlay, data if self.keep_images else None, capture_key)
        lap("store")
        # latency_ms is a dict inside a frozen dataclass: the store time is added after the durable write.
        result.latency_ms.update(timings)
        log.info("screened %s: %s (grade %s, backend %s/%s)", result.result_id, result.outcome, result.grade,
                 result.backend, result.provider)
        return Screening(result, overlay)
