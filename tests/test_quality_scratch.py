"""The gate's fast paths give the values of the plain OpenCV calls they replace, reused buffers never leak
between photos or threads, and the parity check compares rules, not printed digits."""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import cv2
import numpy as np
import pytest

from edge_runtime.preprocess import detect_fov
from edge_runtime.quality import (
    ARC_TOLERANCE,
    _masked_mean,
    _masked_std,
    _Scratch,
    _votes,
    assess,
    field_crop,
    quality_metrics,
    redness,
)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from training.data.synthetic import generate_fundus

    rng = np.random.default_rng(5)
    return [generate_fundus(grade, size, rng).image for grade, size in ((0, 512), (2, 448), (4, 384))]


def test_masked_mean_and_std_match_opencv_to_the_last_bit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(-1020, 1021, (97, 131)).astype(np.int16)
        mask = (rng.random(values.shape) < 0.7).astype(np.uint8)
        inside = values[mask > 0].astype(np.int64)
        mean, std = cv2.meanStdDev(values, mask=mask)
        assert _masked_std(float(inside.sum()), float((inside * inside).sum()), inside.size) == std[0, 0]
        assert _masked_mean(float(inside.sum()), inside.size) == mean[0, 0]
        pixels = rng.integers(0, 256, values.shape).astype(np.uint8)
        assert _masked_mean(float(pixels[mask > 0].astype(np.int64).sum()), inside.size) == cv2.mean(pixels, mask=mask)[0]


def test_focus_and_balance_equal_the_masked_opencv_definitions(photos):
    for photo in photos:
        metrics = quality_metrics(photo)
        small, inner = field_crop(photo, detect_fov(photo))
        mask = inner.view(np.uint8)
        green, gray = cv2.split(small)[1], cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        n = cv2.countNonZero(mask)
        laplacian_std = cv2.meanStdDev(cv2.Laplacian(green, cv2.CV_16S), mask=mask)[1][0, 0]
        tenengrad = (cv2.norm(cv2.Sobel(green, cv2.CV_16S, 1, 0), cv2.NORM_L2SQR, mask)
                     + cv2.norm(cv2.Sobel(green, cv2.CV_16S, 0, 1), cv2.NORM_L2SQR, mask)) / n
        h, w = mask.shape
        bands = ((slice(0, h // 3), slice(None)), (slice(h - h // 3, None), slice(None)),
                 (slice(None), slice(0, w // 3)), (slice(None), slice(w - w // 3, None)))
        thirds = [cv2.mean(gray[b], mask=mask[b])[0] for b in bands if cv2.countNonZero(mask[b])]
        # sums of squares of 16-bit planes: OpenCV's unmasked norm rounds in the last bit, the masked one does not
        assert metrics["laplacian_var"] == pytest.approx(laplacian_std ** 2, rel=1e-14)
        assert metrics["tenengrad"] == pytest.approx(tenengrad, rel=1e-14)
        assert metrics["illumination_balance"] == min(thirds) / max(max(thirds), 1.0)


def test_reused_buffers_do_not_leak_between_photos(photos):
    first = quality_metrics(photos[0])
    small, inner = field_crop(photos[0], detect_fov(photos[0]))
    kept = small.copy(), inner.copy()
    for photo in photos[1:]:
        quality_metrics(photo)
    assert quality_metrics(photos[0]) == first
    assert np.array_equal(small, kept[0]) and np.array_equal(inner, kept[1])  # field_crop's arrays are its own


def test_gates_in_parallel_threads_agree_with_one_thread(photos):
    alone = [assess(p) for p in photos] * 4
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(assess, photos * 4))
    assert [(r.gradable, r.reasons, r.metrics) for r in together] == [(r.gradable, r.reasons, r.metrics) for r in alone]


def test_scratch_grows_and_keeps_its_buffer():
    scratch = _Scratch()
    a = scratch("plane", (4, 6), np.int16)
    assert a.shape == (4, 6) and a.dtype == np.int16 and a.flags.c_contiguous
    smaller = scratch("plane", (2, 3))
    assert np.shares_memory(a, smaller)
    larger = scratch("plane", (40, 60), np.float32)
    assert larger.shape == (40, 60) and not np.shares_memory(a, larger)


def test_parity_compares_rules_not_printed_digits():
    from benchmarks.quality_parity import verdict_of
    from edge_runtime.wire import QualityReport

    def report(value: str) -> QualityReport:
        return QualityReport(False, 0.3, (f"blurred: refocus (laplacian_var {value} vs limit 12.5)",), {})

    assert verdict_of(report("10.01")) == verdict_of(report("10.02"))
    assert verdict_of(report("10.01")) != verdict_of(QualityReport(True, 0.9, (), {}))


def test_redness_reads_the_detection_copy_that_a_fresh_resize_would_give(photos):
    for photo in photos:
        fov = detect_fov(photo)
        size = (fov.mask.shape[1], fov.mask.shape[0])
        assert np.array_equal(fov.detection_copy, cv2.resize(photo, size, interpolation=cv2.INTER_AREA))
        assert redness(photo, fov) == redness(photo, replace(fov, detection_copy=None))
        swapped = np.ascontiguousarray(photo[..., ::-1])  # a blue field on the same black surround
        assert redness(swapped, detect_fov(swapped)) < 0 < redness(photo, fov)


def test_arc_votes_count_the_points_np_hypot_counts():
    rng = np.random.default_rng(3)
    for _ in range(50):
        points = rng.integers(0, 256, (int(rng.integers(20, 320)), 2)).astype(np.float64)
        ux, uy = rng.uniform(-50, 300, (2, 96))
        r = rng.uniform(1, 400, 96)
        distance = np.abs(np.hypot(points[None, :, 0] - ux[:, None], points[None, :, 1] - uy[:, None]) - r[:, None])
        expected = (distance <= np.maximum(ARC_TOLERANCE * r[:, None], 1.0)).sum(axis=1)
        assert np.array_equal(_votes(points, ux, uy, r), expected)
        within = distance[:5, :10] <= np.maximum(ARC_TOLERANCE * r[:5, None], 1.0)
        assert np.array_equal(_votes(points[:10], ux[:5], uy[:5], r[:5]), within.sum(axis=1))  # buffers reshaped
