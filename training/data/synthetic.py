"""Seeded synthetic fundus photographs with grade-dependent DR lesions.

The demo's embedded default and the tests' data. Not a medical simulator: lesion counts and sizes are
exaggerated so that a small model can learn the ICDR ordering in about a minute on a CPU, while the
image still has what real photos have (black surround, vignetting, optic disc, macula, vessels,
camera variation), so that preprocessing, quality gate and CAM code run on realistic structure.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Lesion counts per ICDR grade (low, high), chosen so the grades are separable but overlapping.
_LESIONS = {
    #  microaneurysms, haemorrhages, hard exudates, cotton-wool spots, neovascular tufts
    0: ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    1: ((3, 7), (0, 0), (0, 1), (0, 0), (0, 0)),
    2: ((8, 14), (3, 7), (4, 10), (0, 1), (0, 0)),
    3: ((12, 20), (10, 18), (6, 14), (2, 5), (0, 0)),
    4: ((12, 20), (8, 16), (6, 14), (2, 5), (2, 4)),
}


@dataclass(frozen=True)
class SyntheticFundus:
    image: np.ndarray  # uint8 BGR
    grade: int
    lesion_boxes: tuple[tuple[str, float, float, float, float], ...]  # (class, cx, cy, w, h) normalised


def _branch(img, rng, start, angle, length, width, color, depth, scale):
    x, y = start
    for _ in range(int(length)):
        angle += rng.normal(0, 0.08)
        nx, ny = x + np.cos(angle) * 3 * scale, y + np.sin(angle) * 3 * scale
        cv2.line(img, (int(x), int(y)), (int(nx), int(ny)), color, max(1, int(round(width))), cv2.LINE_AA)
        x, y = nx, ny
        if depth > 0 and rng.random() < 0.04:
            _branch(img, rng, (x, y), angle + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9),
                    length * 0.5, width * 0.7, color, depth - 1, scale)
        width = max(1.0, width * 0.995)


def generate_fundus(grade: int, size: int = 256, rng: np.random.Generator | None = None) -> SyntheticFundus:
    """One synthetic fundus photo of the given ICDR grade at ``size`` x ``size`` pixels."""
    if grade not in _LESIONS:
        raise ValueError(f"grade must be an ICDR grade 0-4, got {grade!r}")
    rng = rng or np.random.default_rng()
    s = size / 256.0
    img = np.zeros((size, size, 3), np.float32)
    cx, cy = size / 2 + rng.normal(0, 3 * s), size / 2 + rng.normal(0, 3 * s)
    radius = size * rng.uniform(0.44, 0.48)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
    # Orange-red retina (BGR), darker to the rim (vignetting).
    base = np.array([rng.uniform(20, 45), rng.uniform(60, 95), rng.uniform(150, 200)], np.float32)
    vignette = np.clip(1.0 - 0.45 * dist ** 2.5, 0, 1)[..., None]
    img[:] = base * vignette
    img *= (1 + rng.normal(0, 0.03, (size, size, 1))).astype(np.float32)
    eye_side = rng.choice([-1, 1])
    disc = (int(cx + eye_side * radius * 0.45), int(cy + rng.normal(0, 5 * s)))
    macula = (int(cx - eye_side * radius * 0.15), int(cy + rng.normal(0, 3 * s)))
    cv2.circle(img, macula, int(22 * s), (base * 0.55).tolist(), -1, cv2.LINE_AA)
    vessels = np.zeros_like(img)
    for k in range(8):
        angle = (k / 8) * 2 * np.pi + rng.normal(0, 0.2)
        _branch(vessels, rng, disc, angle, 55, 3.2 * s, (1, 1, 1), 2, s)
    img = img * (1 - 0.45 * cv2.GaussianBlur(vessels, (3, 3), 0))
    cv2.circle(img, disc, int(17 * s), (150, 215, 240), -1, cv2.LINE_AA)
    cv2.circle(img, disc, int(7 * s), (200, 240, 255), -1, cv2.LINE_AA)

    boxes: list[tuple[str, float, float, float, float]] = []

    def random_point(max_r: float = 0.85) -> tuple[int, int]:
        r, a = radius * max_r * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        return int(cx + r * np.cos(a)), int(cy + r * np.sin(a))

    def add_box(name: str, p: tuple[int, int], r: float) -> None:
        boxes.append((name, p[0] / size, p[1] / size, 2 * r / size, 2 * r / size))

    ma, hem, ex, cws, nv = (int(rng.integers(lo, hi + 1)) for lo, hi in _LESIONS[grade])
    for _ in range(ma):
        p, r = random_point(), max(1.0, rng.uniform(1.2, 2.2) * s)
        cv2.circle(img, p, int(round(r)), (20, 20, 110), -1, cv2.LINE_AA)
        add_box("haemorrhage", p, r)
    for _ in range(hem):
        p, r = random_point(), rng.uniform(3, 7) * s
        cv2.ellipse(img, p, (int(r), int(r * rng.uniform(0.6, 1.0))), rng.uniform(0, 180), 0, 360, (15, 15, 90), -1, cv2.LINE_AA)
        add_box("haemorrhage", p, r)
    for _ in range(ex):
        p = random_point(0.6)
        for _ in range(int(rng.integers(2, 5))):
            q = (p[0] + int(rng.normal(0, 5 * s)), p[1] + int(rng.normal(0, 5 * s)))
            cv2.circle(img, q, max(1, int(rng.uniform(1.5, 3) * s)), (90, 220, 235), -1, cv2.LINE_AA)
        add_box("hard_exudates", p, 10 * s)
    for _ in range(cws):
        p, r = random_point(0.7), rng.uniform(6, 10) * s
        patch = np.zeros_like(img)
        cv2.circle(patch, p, int(r), (1, 1, 1), -1, cv2.LINE_AA)
        patch = cv2.GaussianBlur(patch, (0, 0), r / 2)
        img = img * (1 - 0.7 * patch) + np.array([200, 225, 235], np.float32) * 0.7 * patch
        add_box("cotton_wool", p, r)
    for _ in range(nv):
        a = rng.uniform(0, 2 * np.pi)
        p = (int(disc[0] + np.cos(a) * 25 * s), int(disc[1] + np.sin(a) * 25 * s))
        for _ in range(14):
            q = (p[0] + int(rng.normal(0, 9 * s)), p[1] + int(rng.normal(0, 9 * s)))
            cv2.line(img, p, q, (30, 30, 150), max(1, int(s)), cv2.LINE_AA)
            p = q
        add_box("neovascularisation", p, 15 * s)

    # Camera variation: colour cast, exposure, defocus, sensor noise.
    img *= rng.uniform(0.85, 1.15, 3).astype(np.float32) * rng.uniform(0.8, 1.15)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0) * s)
    img += rng.normal(0, rng.uniform(1, 5), img.shape).astype(np.float32)
    img *= (dist <= 1.0)[..., None]
    return SyntheticFundus(np.clip(img, 0, 255).astype(np.uint8), grade, tuple(boxes))


def synthetic_batch(n: int, size: int = 128, seed: int = 0, grades: list[int] | None = None):
    """``n`` images balanced over grades (or the given grades): returns (list of BGR images, grades array)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(grades if grades is not None else [i % 5 for i in range(n)], dtype=np.int64)
    images = [generate_fundus(int(g), size, np.random.default_rng([seed, i])).image for i, g in enumerate(labels)]
    order = rng.permutation(len(labels))
    return [images[i] for i in order], labels[order]


def write_synthetic_dataset(out_dir: str | Path, n_per_grade: int = 40, size: int = 256, seed: int = 0,
                            split_fractions: tuple[float, float, float, float] = (0.6, 0.15, 0.1, 0.15)) -> Path:
    """Write ``images/*.png`` and a ``labels.csv`` (image,grade,patient,split) in the generic layout."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    splits = ("train", "val", "calib", "test")
    bounds = np.cumsum(split_fractions) * n_per_grade
    rows = []
    for grade in range(5):
        for i in range(n_per_grade):
            name = f"syn_{grade}_{i:04d}.png"
            img = generate_fundus(grade, size, np.random.default_rng([seed, grade, i])).image
            cv2.imwrite(str(out_dir / "images" / name), img)
            split = splits[int(np.searchsorted(bounds, i, side="right"))] if i < bounds[-1] else "test"
            rows.append((name, grade, f"p{grade}_{i:04d}", split))
    with open(out_dir / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient", "split"])
        writer.writerows(rows)
    return out_dir
