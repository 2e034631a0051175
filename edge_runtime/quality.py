"""Image-quality gate for fundus photos: is this a fundus photo, and is it gradable?

Three steps, each with its own kind of answer:

1. **Is it a fundus photo?** A fundus photo shows a textured retina inside a round field whose visible arc meets a
   dark surround. A frame with no dark surround or no round arc (a face, a document, a grey frame, an external eye
   photo) or a blank field is refused as "not a fundus photo" and never graded (:func:`not_fundus_reason`).
2. **Rules with reasons.** Indicators from the smartphone-ophthalmoscopy quality literature, each with a limit
   and a reason that says what to do ("too bright: reduce illumination"): exposure, focus and motion, haze,
   occlusion, flare, noise, heavy JPEG, centring (judged on the visible arc of the field, so a camera that clips
   the top and bottom of the field is centred) and the field's size in pixels.
3. **A learned score** (``quality_model.py``): a logistic model over the same indicators, fitted to human
   graders' labels and code-made degradations, catching what no rule names; its operating point says how many of
   the graders' rejects it caught where it was chosen. The report says which fired: rule reasons, the learned score, or both.

One verdict per photo: everything is measured on a canonical view of the photo (:func:`gate_view`: the decode,
reduced by a power of two to a shorter side of at least ``GATE_SIDE`` px, the scale the Screener decodes at for
any model up to 224 px), and the indicators inside the field resized to ``WORK_SIZE``. The verdict therefore does
not depend on the model's input size. Limits live in ``edge_runtime/data/quality_thresholds.json``, written by
``python -m studies.quality_thresholds``; ``docs/reference/quality_gate.md`` describes the gate.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources

import cv2
import numpy as np

from .decision import decide_gradability
from .errors import ConfigError, ImageError, NoFundusError
from .preprocess import FieldOfView, detect_fov
from .quality_model import GradabilityModel, packaged_model
from .wire import QualityReport

WORK_SIZE = 384  # field of view resized to this longer side before measuring (256 lost motion blur on Messidor-2)
# The gate measures a photo at this shorter side (or its own, when smaller): the Screener decodes at least this,
# so a 128-px and a 224-px model see the same pixels; a larger decode is reduced to it by a power of two.
GATE_SIDE = 336
_ERODE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))  # keeps the rim's artificial edge out of every indicator
# The directional measures also skip a rim band of ~4% of WORK_SIZE: any blur smears the black surround into the
# field by half its length, and that radial edge (present at every angle) hid motion blur from the isotropy ratio.
_RIM_BAND = cv2.getStructuringElement(cv2.MORPH_RECT, (31, 31))
PATCH_SCALE = 4  # the pale-patch indicator works on a 1/4-scale copy (96 px): a region larger than the disc survives
PATCH_DIAMETER = 0.2  # its disc element, as a share of the field's longer side; the optic disc is ~0.14 (2% of the area)
# The dark-patch indicator's element: an eyelid's edge reaches >= 0.2 of the field into it, the camera's dark rim
# crescent and the fovea are narrower.
DARK_PATCH_DIAMETER = 0.1
# JPEG codes 8 x 8 blocks, which a reduced decode turns into 4 x 4 (1/2 scale, the gate's view of raw EyePACS
# photos); at 1/4 and 1/8 the blocks are 2 and 1 px and the grid is not measured.
BLOCK_PERIODS = (4, 8)
BLOCK_RIM = 0.03  # the blockiness skips a rim band this share of the field wide: the rim's edge steps at any phase

# Not a fundus. A fundus photo is a retina seen through the camera's round field stop: a textured field whose
# boundary away from the frame's edges (its visible arc) lies on a circle, in a dark surround. A frame without a
# dark surround (a face, a page, an external eye photo filling the frame), a field whose arc is not round (a face
# or a page on a dark background) or a field with no texture at all (a blank or lit-up frame) is not one.
# ``roundness`` is the share of the arc within ARC_TOLERANCE x the radius of the circle that most of it lies on.
ARC_TOLERANCE = 0.03
STRAIGHT_EDGE = 0.5  # a run of boundary points along one row or column this share of the radius long is a crop
MIN_ARC_POINTS = 24  # arc points (on the 256-px detection mask) needed to fit a circle at all
MIN_ROUNDNESS = 0.5  # an eyelid over half the field leaves 0.61 of the arc on the circle; real fields 0.7-1.0
# The arc is judged only in a field bright enough for its edge to stand clear of the FOV threshold: in a very dark
# photo the edge dips under it unevenly (such a photo is judged by the exposure rules instead).
MIN_MEAN_FOR_ARC = 40.0
MAX_FOV_FRACTION = 0.99  # a field covering more of the frame has no dark surround (fields larger than a square
# frame, black only in its corners, cover up to 0.97 of it)
MIN_FIELD_RANGE = 8.0  # luminance p99 - p1 (8-bit levels) below which the field is blank (real fields: > 14)
# The retina is seen through the pupil, so a fundus field has no black hole in it; an eye photographed from outside
# (a slit lamp's lit anterior segment) shows its pupil as a black disc inside the lit region. The largest hole in
# the field's mask, as a share of the field's area, is judged in fields bright enough (MIN_MEAN_FOR_ARC) that a
# dark fundus region does not fall under the mask's threshold: real fields measured <= 0.0023 (mexico_dme, the
# camera with the darkest photos), an external eye's pupil 0.015-0.025.
MAX_FIELD_HOLE = 0.01
NOT_FUNDUS = "not a fundus photo"
# Some cameras draw the surround a flat dark grey instead of black (a mexico_dme camera: level 17-20, above the
# field-of-view threshold of 12, so the whole frame looked lit and its sharp photos were refused as having no dark
# surround). When the field covers more than MAX_FOV_FRACTION of the frame, the frame's corners are read: lit
# corners that are all flat (max - min <= SURROUND_SPREAD levels over a square SURROUND_CORNER x the shorter side
# wide) and dark (<= MAX_SURROUND_LEVEL) are the surround, and the field is found again above their level (+ the
# usual threshold). A retina, a face or a page is not flat over a corner, so their verdicts do not change.
SURROUND_CORNER = 0.04
SURROUND_SPREAD = 6
MAX_SURROUND_LEVEL = 48
FOV_THRESHOLD = 12  # detect_fov's default: the brightest channel above this is inside the field

_LEVELS = np.arange(256, dtype=np.float32)
# Neighbour pairs ((dy, dx) of a, (dy, dx) of b) of the 4 directional differences 0, 90, 45, 135 degrees, and the
# squared step length that puts the diagonals on the axes' scale.
_DIRECTIONS = (((0, 0), (0, 1), 1.0), ((0, 0), (1, 0), 1.0), ((1, 0), (0, 1), 2.0), ((0, 0), (1, 1), 2.0))

# Limits on shares or ratios of like quantities, valid only in [0, 1].
SHARE_LIMITS = frozenset({
    "min_wavelet_hf_ratio", "min_sharpness_isotropy", "max_underexposed", "max_overexposed", "max_red_clipped",
    "max_bright_area", "max_dark_patch", "max_dark_area", "min_illumination_balance", "max_glare"})
THRESHOLDS_FILE = "data/quality_thresholds.json"


def _packaged_thresholds() -> dict[str, float]:
    """The limits the threshold study wrote (``edge_runtime/data/quality_thresholds.json``)."""
    text = resources.files(__package__).joinpath(THRESHOLDS_FILE).read_text()
    return {name: float(value) for name, value in json.loads(text)["thresholds"].items()}


_PACKAGED = _packaged_thresholds()


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of a gradable photo. Each failing limit adds a reason; any failure makes it ungradable.

    Defaults: the packaged ``data/quality_thresholds.json``, chosen by ``studies/quality_thresholds.py`` on
    val/calib photos (docs/reference/quality_gate.md).
    """

    max_decentering: float = _PACKAGED["max_decentering"]  # centre of the field's circle (fitted to its visible arc) from the frame centre, in radii
    min_field_diameter: float = _PACKAGED["min_field_diameter"]  # the field's circle across, px of the gate's view
    min_mean: float = _PACKAGED["min_mean"]  # mean 8-bit luminance inside the field of view
    max_mean: float = _PACKAGED["max_mean"]
    min_std: float = _PACKAGED["min_std"]
    min_entropy: float = _PACKAGED["min_entropy"]  # bits
    min_dynamic_range: float = _PACKAGED["min_dynamic_range"]  # p99 - p1 luminance
    min_laplacian_var: float = _PACKAGED["min_laplacian_var"]  # focus; green channel at WORK_SIZE
    min_tenengrad: float = _PACKAGED["min_tenengrad"]
    min_wavelet_hf_ratio: float = _PACKAGED["min_wavelet_hf_ratio"]  # detail / total energy over two Haar levels
    min_directional_sharpness: float = _PACKAGED["min_directional_sharpness"]  # weakest of 4 directions' edge energy / mean green^2 (x 1000)
    min_sharpness_isotropy: float = _PACKAGED["min_sharpness_isotropy"]  # weakest direction's edge energy / strongest's (motion blur: low)
    min_local_contrast: float = _PACKAGED["min_local_contrast"]  # RMS of green minus its blur, over mean green
    max_dark_channel: float = _PACKAGED["max_dark_channel"]  # p5 of min(B, G, R): a veil lifts it
    max_underexposed: float = _PACKAGED["max_underexposed"]  # share of fundus pixels darker than 15
    max_overexposed: float = _PACKAGED["max_overexposed"]  # share of fundus pixels brighter than 245
    max_red_clipped: float = _PACKAGED["max_red_clipped"]  # share of fundus pixels whose red channel is >= 250
    max_bright_area: float = _PACKAGED["max_bright_area"]  # share of fundus pixels brighter than 190 (luminance)
    max_pale_patch: float = _PACKAGED["max_pale_patch"]  # whiteness of the palest region wider than the optic disc, over the median
    max_dark_patch: float = _PACKAGED["max_dark_patch"]  # how far a region wider than 0.1 x the field falls below the median luminance (share)
    max_dark_area: float = _PACKAGED["max_dark_area"]  # share of the field darker than 0.45 x its median luminance
    min_illumination_balance: float = _PACKAGED["min_illumination_balance"]  # darkest third's mean / brightest third's
    max_glare: float = _PACKAGED["max_glare"]  # share of near-white, low-saturation pixels
    max_noise: float = _PACKAGED["max_noise"]  # robust noise sigma of the green channel (MAD of a high-pass)
    max_blockiness: float = _PACKAGED["max_blockiness"]  # JPEG block grid: steps on the grid's strongest phase / elsewhere (1: none)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ConfigError(f"QualityThresholds.{f.name} must be a finite number, got {value!r}")
            if f.name in SHARE_LIMITS and not 0.0 <= value <= 1.0:
                raise ConfigError(f"QualityThresholds.{f.name} is a share and must lie in [0, 1], got {value!r}; "
                                  "a limit outside that range can never fire (re-run studies.quality_thresholds)")

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> QualityThresholds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown quality threshold(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in data.items()})


DEFAULT_THRESHOLDS = QualityThresholds()


@lru_cache(maxsize=16)
def _disc(diameter: int) -> np.ndarray:
    """Elliptical structuring element, made once per size (no per-call kernel allocation)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))


@lru_cache(maxsize=16)
def _rect(side: int) -> np.ndarray:
    """Square structuring element, made once per size."""
    return cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))


class _Scratch(threading.local):
    """Per-thread buffers that the gate's intermediate planes are written into, reused from photo to photo.

    Each indicator's plane is 100-600 kB; a fresh one per step is fresh memory that the kernel maps and zeroes on
    first touch, which cost as much CPU time as the steps themselves (~800 page faults per photo). Thread-local
    because the Screener may run the gate in a worker thread beside inference. Nothing the gate returns lives
    in these buffers.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.views: dict[tuple, np.ndarray] = {}  # (name, shape, dtype) -> its array, while the buffer stands

    def __call__(self, name: str, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
        """A C-contiguous ``shape`` x ``dtype`` array (contents undefined) in the buffer called ``name``."""
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is None:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            buffer = self.buffers.get(name)
            if buffer is None or buffer.size < nbytes:
                buffer = self.buffers[name] = np.empty(nbytes, np.uint8)
                self.views = {k: v for k, v in self.views.items() if k[0] != name}
            view = self.views[key] = buffer[:nbytes].view(dtype).reshape(shape)
        return view


_SCRATCH = _Scratch()


def _haar_hf_ratio(box: np.ndarray) -> float:
    """Detail / total energy over two orthonormal Haar levels, from energies alone.

    The orthonormal Haar transform keeps energy, so the detail energy of two levels is the input's energy minus
    that of the level-2 approximation (4 x the 4 x 4 block means), and the total is that plus the approximation's
    variance: one integer-factor area resize instead of two explicit decompositions.
    """
    h, w = (box.shape[0] // 4) * 4, (box.shape[1] // 4) * 4
    if h == 0 or w == 0:
        return 0.0
    x = box[:h, :w]
    as_float = _SCRATCH("haar", (h, w), np.float32)
    np.copyto(as_float, x)
    approx = cv2.resize(as_float, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    approx_energy = 16.0 * cv2.norm(approx, cv2.NORM_L2SQR)
    detail = cv2.norm(x, cv2.NORM_L2SQR) - approx_energy
    total = detail + approx_energy - 16.0 * approx.size * float(cv2.mean(approx)[0]) ** 2
    return detail / total if total > 0 else 0.0


def _hist_stats(hist: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """(mean, std, entropy bits, p1, p99, p5) of a 256-bin histogram of 8-bit values."""
    total = float(hist.sum())
    p = hist / total
    mean = float(p @ _LEVELS)
    std = float(np.sqrt(max(0.0, float(p @ np.square(_LEVELS - mean)))))
    nonzero = p[p > 0]
    cdf = np.cumsum(hist)
    p1, p5, p99 = (float(np.searchsorted(cdf, q * total)) for q in (0.01, 0.05, 0.99))
    return mean, std, float(-(nonzero * np.log2(nonzero)).sum()), p1, p99, p5


def _hist(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """256-bin histogram of a uint8 image inside ``mask`` (uint8, nonzero inside), float32."""
    return cv2.calcHist([img], [0], mask, [256], [0, 256]).ravel()


def _median_from_hist(hist: np.ndarray) -> float:
    return float(np.searchsorted(np.cumsum(hist), hist.sum() / 2))


def _patches(whiteness: np.ndarray, gray: np.ndarray, mask: np.ndarray, white_median: float,
             lum_median: float) -> tuple[float, float]:
    """(pale_patch, dark_patch) inside ``mask`` (uint8 0/255): how far the palest region wider than the optic disc rises above the field's
    median whiteness (8-bit levels), and how far the darkest region wider than ``DARK_PATCH_DIAMETER`` falls below
    its median luminance (a share of the median, 0-1).

    Whiteness is min(B, G, R): high only where every channel is bright, i.e. bright *and* desaturated, as stray
    light (lens flare, a reflection off the cornea or the phone's own lens) makes the red fundus look. A grey-level
    erosion with a disc of ``PATCH_DIAMETER`` x the field removes every pale structure narrower than that (the optic
    disc, exudates, vessel reflexes), so its maximum is the level that a whole disc-wider region exceeds. The dark
    patch is the mirror image on luminance (a dilation): an eyelid or a shadow across part of the field is wide,
    while vessels, the fovea and the dark crescent that many cameras leave along the rim are narrow. Done at
    1/``PATCH_SCALE`` scale on cells wholly inside the field: the regions are large, and each morphology step then
    costs a few hundredths of a millisecond.
    """
    h, w = (mask.shape[0] // PATCH_SCALE) * PATCH_SCALE, (mask.shape[1] // PATCH_SCALE) * PATCH_SCALE  # integer factor
    size = (w // PATCH_SCALE, h // PATCH_SCALE)
    inside = cv2.compare(cv2.resize(mask[:h, :w], size, interpolation=cv2.INTER_AREA), 255, cv2.CMP_EQ)
    if not cv2.countNonZero(inside):
        return 0.0, 0.0
    side = max(h, w) / PATCH_SCALE
    white = cv2.resize(whiteness[:h, :w], size, interpolation=cv2.INTER_AREA)
    eroded = cv2.erode(cv2.bitwise_and(white, inside), _disc(max(3, int(round(PATCH_DIAMETER * side)) | 1)))
    lum = cv2.resize(gray[:h, :w], size, interpolation=cv2.INTER_AREA)
    dilated = cv2.dilate(cv2.bitwise_or(lum, cv2.bitwise_not(inside)),  # cells touching the surround count as white
                         _disc(max(3, int(round(DARK_PATCH_DIAMETER * side)) | 1)))
    pale = max(0.0, cv2.minMaxLoc(eroded)[1] - white_median)
    dark = max(0.0, 1.0 - cv2.minMaxLoc(dilated)[0] / max(lum_median, 1.0))
    return pale, dark


def _blockiness(bgr: np.ndarray, fov: FieldOfView) -> float:
    """How much stronger the green channel's steps are on a JPEG block grid than between grid lines (1: no grid).

    Heavy JPEG quantises each 8 x 8 block's detail away and leaves steps where blocks meet, so the mean absolute
    difference between neighbours is high on every 8th column and row and low in between (the ratio of boundary
    to within-block differences, after Wang, Sheikh and Bovik 2002). Measured on the photo as decoded, since any
    resize blurs the grid: for each period of ``BLOCK_PERIODS`` (the grid is 4 px in a 1/2-scale decode) and each
    axis, the phase with the largest mean difference against the other phases (the strongest phase, so a photo
    cropped off the 8-px grid is measured too), averaged over the two axes; the largest over periods. Inside the
    field, ``BLOCK_RIM`` away from its rim, whose edge would add strong steps at every phase.
    """
    x0, y0, w, h = fov.x, fov.y, fov.w, fov.h
    green = cv2.extractChannel(bgr[y0:y0 + h, x0:x0 + w], 1, dst=_SCRATCH("block_green", (h, w)))
    s = fov.mask_scale
    mask = fov.mask[int(y0 * s):int(np.ceil((y0 + h) * s)), int(x0 * s):int(np.ceil((x0 + w) * s))]
    if green.shape[0] < 2 * max(BLOCK_PERIODS) or green.shape[1] < 2 * max(BLOCK_PERIODS) or not mask.size:
        return 1.0
    band = max(3, int(round(BLOCK_RIM * max(mask.shape))) | 1)  # eroded on the small detection mask: cheaper
    mask = cv2.resize(_erode(mask, _rect(band)), (w, h), dst=_SCRATCH("block_mask", (h, w)),
                      interpolation=cv2.INTER_NEAREST)
    ratios: dict[int, list[float]] = {p: [] for p in BLOCK_PERIODS}
    # vertical steps summed along each row (reduced to a column), horizontal steps along each column (to a row)
    for a, b, ma, mb, dim, offset in ((green[1:], green[:-1], mask[1:], mask[:-1], 1, y0),
                                      (green[:, 1:], green[:, :-1], mask[:, 1:], mask[:, :-1], 0, x0)):
        both = cv2.bitwise_and(ma, mb, dst=_SCRATCH("block_both", ma.shape))
        steps = cv2.absdiff(a, b, dst=_SCRATCH("block_steps", a.shape))
        steps = cv2.bitwise_and(steps, both, dst=steps)
        sums = cv2.reduce(steps, dim, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel().astype(np.float64)
        counts = cv2.reduce(both, dim, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel() / 255.0
        position = np.arange(1 + offset, 1 + offset + sums.size)  # the step between pixels position-1 and position
        for p in BLOCK_PERIODS:
            phase = position % p
            s_phase, n_phase = np.bincount(phase, sums, p), np.bincount(phase, counts, p)
            if n_phase.min() < 1:
                return 1.0
            k = int(np.argmax(s_phase / n_phase))
            rest = (s_phase.sum() - s_phase[k]) / (n_phase.sum() - n_phase[k])
            ratios[p].append(s_phase[k] / n_phase[k] / max(rest, 1e-3))
    return float(max(np.mean(r) for r in ratios.values()))


def _shrink(img: np.ndarray, size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
    """Resize to ``size`` (w, h): an integer-factor area average first when shrinking by 2x or more, then linear.
    ``dst``: where the last step writes (an array of the result's shape and type).

    OpenCV's area resize is fast only for integer factors (a 495 -> 384 px area resize costs ~7x a linear one);
    the linear step that remains never shrinks by 2x or more, so it does not alias.
    """
    k = int(min(img.shape[1] / size[0], img.shape[0] / size[1]))
    if k >= 2:
        h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
        img = cv2.resize(img[:h, :w], (w // k, h // k), dst=dst if (w // k, h // k) == size else None,
                         interpolation=cv2.INTER_AREA)
    return img if (img.shape[1], img.shape[0]) == size else cv2.resize(img, size, dst=dst,
                                                                       interpolation=cv2.INTER_LINEAR)


def _field_planes(bgr: np.ndarray, fov: FieldOfView) -> tuple[np.ndarray, np.ndarray]:
    """The field of view at ``WORK_SIZE`` (uint8 BGR) and its eroded mask (uint8 0/255), in this thread's
    scratch buffers: valid until the gate's next call in this thread."""
    crop = bgr[fov.y:fov.y + fov.h, fov.x:fov.x + fov.w]
    scale = WORK_SIZE / max(crop.shape[:2])
    size = (max(8, int(round(crop.shape[1] * scale))), max(8, int(round(crop.shape[0] * scale))))
    small = _shrink(crop, size, _SCRATCH("field", (size[1], size[0], 3)))
    s = fov.mask_scale
    mask = fov.mask[int(fov.y * s):int(np.ceil((fov.y + fov.h) * s)), int(fov.x * s):int(np.ceil((fov.x + fov.w) * s))]
    mask = cv2.resize(mask, size, dst=_SCRATCH("field_mask", (size[1], size[0])), interpolation=cv2.INTER_NEAREST)
    return small, _erode(mask, _ERODE, _SCRATCH("inner", mask.shape))


def field_crop(bgr: np.ndarray, fov: FieldOfView) -> tuple[np.ndarray, np.ndarray]:
    """The field of view at ``WORK_SIZE`` (uint8 BGR) and its eroded mask (bool), from one resize each."""
    small, inner = _field_planes(bgr, fov)
    return small.copy(), inner > 0


def _erode(mask: np.ndarray, element: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """Erosion that treats the outside of the crop as background: a field whose edge is a straight chord inside
    the frame (a camera's mask plate, an earlier crop) has that edge on the crop's border, where OpenCV's default
    border would keep it, and its step would dominate every focus measure."""
    return cv2.erode(mask, element, dst=dst, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def gate_view(bgr: np.ndarray) -> np.ndarray:
    """The photo at the gate's scale: reduced by the largest power of two (2, 4 or 8) that keeps its shorter side
    >= ``GATE_SIDE``, by area averaging (what a reduced JPEG decode does), or as it is. A photo the Screener
    decoded for a model up to 224 px is already at that scale; one decoded larger for a larger model is reduced
    to it, so the verdict does not depend on the model."""
    k = next((f for f in (8, 4, 2) if min(bgr.shape[:2]) // f >= GATE_SIDE), 1)
    if k == 1:
        return bgr
    h, w = (bgr.shape[0] // k) * k, (bgr.shape[1] // k) * k
    return cv2.resize(bgr[:h, :w], (w // k, h // k), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class FieldCircle:
    """The circle of the field of view, fitted to its visible arc (image pixels), and how well the arc fits it."""

    center: tuple[float, float]
    radius: float
    roundness: float  # share of the arc's points within ARC_TOLERANCE x the radius of the circle (0: no arc)
    coverage: float  # share of the circle's area inside the frame


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle through ``points`` (n x 2): centre x, centre y, radius."""
    x, y = points[:, 0], points[:, 1]
    a = np.column_stack([x, y, np.ones_like(x)])
    (p, q, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
    cx, cy = p / 2, q / 2
    return float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 1e-9)))


def _circles_through(p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) and radii of the circles through point triples (arrays n x 2); degenerate triples: radius inf."""
    (ax, ay), (bx, by), (cx, cy) = p1.T, p2.T, p3.T
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    safe = np.where(np.abs(d) < 1e-9, np.nan, d)
    a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx * cx + cy * cy
    ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / safe
    uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / safe
    r = np.hypot(ax - ux, ay - uy)
    return ux, uy, np.where(np.isfinite(r), r, np.inf)


_ARC_SAMPLES = np.random.default_rng(0).random((96, 3))  # fixed triples (as shares of the arc): a deterministic fit
# The unit disc sampled on a 41 x 41 grid over [-1, 1]^2 (the points where the field's coverage of the frame is read).
_GRID_X, _GRID_Y = np.meshgrid(np.linspace(-1, 1, 41), np.linspace(-1, 1, 41))
_DISC_X, _DISC_Y = (g[_GRID_X ** 2 + _GRID_Y ** 2 <= 1] for g in (_GRID_X, _GRID_Y))


def _votes(points: np.ndarray, ux: np.ndarray, uy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """For each circle (centres ``ux``, ``uy``, radii ``r``), how many of ``points`` (n x 2) lie within
    ``ARC_TOLERANCE`` x its radius (at least 1 px) of it.

    The distances of every point to every circle (~15,000) are taken as the square root of the squared sides,
    in this thread's buffers: ``np.hypot`` costs ~3x more, and the two differ in the last bit of a double at most.
    """
    shape = (len(r), len(points))
    distance = np.subtract(points[None, :, 0], ux[:, None], out=_SCRATCH("votes_distance", shape, np.float64))
    np.multiply(distance, distance, out=distance)
    dy = np.subtract(points[None, :, 1], uy[:, None], out=_SCRATCH("votes_dy", shape, np.float64))
    np.multiply(dy, dy, out=dy)
    np.add(distance, dy, out=distance)
    np.sqrt(distance, out=distance)
    np.subtract(distance, r[:, None], out=distance)
    np.abs(distance, out=distance)
    near = np.less_equal(distance, np.maximum(ARC_TOLERANCE * r[:, None], 1.0), out=_SCRATCH("votes_near", shape, bool))
    return np.count_nonzero(near, axis=1)


def field_circle(fov: FieldOfView, shape: tuple[int, ...]) -> FieldCircle:
    """Fit the field's circle to its visible arc: the boundary of the field's mask away from the frame's edges.

    A camera that clips the top and bottom of the field (3:2 and 4:3 sensors), a field larger than the frame, or a
    field cut by the frame because it is off-centre all leave an arc of the true circle, so its centre and radius
    are found whatever the frame cuts off; straight row or column edges inside the frame (an earlier crop) are
    left out like the frame's own edges. The circle is the one through three arc points that most arc points lie
    on (96 fixed triples, then a least-squares fit to those points), so an eyelid's edge or a clipped field's
    chord does not pull it; ``roundness`` is the share of the arc on it.
    """
    s = fov.mask_scale
    h_mask, w_mask = fov.mask.shape[:2]
    contours, _ = cv2.findContours(fov.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    fallback = FieldCircle(fov.center, fov.radius, 0.0, 1.0)
    if not contours:
        return fallback
    points = max(contours, key=len)[:, 0, :].astype(np.float64)
    away = ((points[:, 0] > 1) & (points[:, 0] < w_mask - 2) & (points[:, 1] > 1) & (points[:, 1] < h_mask - 2))
    arc = points[away]
    # A straight edge along a row or a column is a crop (an earlier square crop, letterboxing), not the field's
    # arc: a circle's top or side spans ~2 sqrt(2 r) px of one row, a crop's edge about the radius or more.
    columns, rows = arc[:, 0].astype(int), arc[:, 1].astype(int)
    run = STRAIGHT_EDGE * max(h_mask, w_mask) / 2
    arc = arc[(np.bincount(columns)[columns] < run) & (np.bincount(rows)[rows] < run)]
    if len(arc) < MIN_ARC_POINTS:
        return fallback
    idx = (_ARC_SAMPLES * len(arc)).astype(int)
    ux, uy, r = _circles_through(arc[idx[:, 0]], arc[idx[:, 1]], arc[idx[:, 2]])
    plausible = np.isfinite(r) & (r < 2 * max(h_mask, w_mask))
    if not plausible.any():
        return fallback
    ux, uy, r = ux[plausible], uy[plausible], r[plausible]
    votes = arc[::max(1, len(arc) // 160)]  # every arc point votes in the final fit; ~160 choose the circle
    best = int(np.argmax(_votes(votes, ux, uy, r)))
    inliers = arc[np.abs(np.hypot(arc[:, 0] - ux[best], arc[:, 1] - uy[best]) - r[best])
                  <= max(ARC_TOLERANCE * r[best], 1.0)]
    cx, cy, radius = _fit_circle(inliers) if len(inliers) >= 3 else (ux[best], uy[best], r[best])
    residual = np.abs(np.hypot(arc[:, 0] - cx, arc[:, 1] - cy) - radius)
    roundness = float(np.mean(residual <= max(ARC_TOLERANCE * radius, 1.0)))
    if roundness < MIN_ROUNDNESS:  # no circle to trust (a ragged edge in a very dark field): the box's geometry
        return FieldCircle(fov.center, fov.radius, roundness, 1.0)
    # coverage: the circle sampled on a coarse grid, the share of its samples inside the frame
    px, py = (cx + radius * _DISC_X) / s, (cy + radius * _DISC_Y) / s
    coverage = float(np.mean((px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])))
    return FieldCircle((cx / s, cy / s), radius / s, roundness, coverage)


def surround_level(bgr: np.ndarray) -> int | None:
    """The level of a flat dark-grey surround drawn in the frame's corners (the brightest lit corner's maximum of
    the brightest channel), or None when a lit corner is not flat or not dark, or no corner is lit."""
    side = max(2, int(round(SURROUND_CORNER * min(bgr.shape[:2]))))
    brightest = cv2.max(cv2.max(bgr[:, :, 0], bgr[:, :, 1]), bgr[:, :, 2])
    level = None
    for corner in (brightest[:side, :side], brightest[:side, -side:], brightest[-side:, :side],
                   brightest[-side:, -side:]):
        low, high = (int(v) for v in cv2.minMaxLoc(corner)[:2])
        if high <= FOV_THRESHOLD:  # a black corner: already outside the field
            continue
        if high - low > SURROUND_SPREAD or high > MAX_SURROUND_LEVEL:
            return None
        level = max(level or 0, high)
    return level


def surround_fov(bgr: np.ndarray, fov: FieldOfView) -> FieldOfView:
    """The field of view above a flat dark-grey surround (:func:`surround_level`) when ``fov`` covers more than
    ``MAX_FOV_FRACTION`` of the frame because the surround is lighter than the field-of-view threshold; else
    ``fov``. Raises NoFundusError when nothing lies above the surround."""
    if fov.fraction <= MAX_FOV_FRACTION:
        return fov
    level = surround_level(bgr)
    return fov if level is None else detect_fov(bgr, level + FOV_THRESHOLD)


def field_hole(fov: FieldOfView) -> float:
    """The largest black hole inside the field: background pixels of the detection mask that no 4-connected path
    of background joins to the frame's border, as a share of the field with its holes (pixel counts, so a port
    counts the same).

    A flood fill from a one-pixel background ring around the mask clears every background region that reaches the
    border; only a field with something left (a hole) pays for the labelling of components.
    """
    holes = cv2.copyMakeBorder(cv2.bitwise_not(fov.mask), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=255)
    cv2.floodFill(holes, None, (0, 0), 0, flags=4)
    if not cv2.countNonZero(holes):
        return 0.0
    _, _, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    area = stats[1:, cv2.CC_STAT_AREA]
    return float(area.max()) / float(cv2.countNonZero(fov.mask) + area.sum())


def redness(bgr: np.ndarray, fov: FieldOfView) -> float:
    """(median red - median blue) / (median red + 1) inside the field, on the detection-size copy (the one
    :func:`detect_fov` made of ``bgr``, or the same resize again for a field built without it): a fundus is red."""
    small = fov.detection_copy
    if small is None or small.shape[:2] != fov.mask.shape[:2]:
        s = fov.mask_scale
        small = bgr if s == 1 else cv2.resize(bgr, (fov.mask.shape[1], fov.mask.shape[0]), interpolation=cv2.INTER_AREA)
    blue = cv2.calcHist([small], [0], fov.mask, [256], [0, 256]).ravel()
    red = cv2.calcHist([small], [2], fov.mask, [256], [0, 256]).ravel()
    median_blue, median_red = _median_from_hist(blue), _median_from_hist(red)
    return (median_red - median_blue) / (median_red + 1.0)


def not_fundus_reason(metrics: dict[str, float]) -> str | None:
    """Why the photo is not a fundus photo (no dark surround, no round field, a black hole in it, a blank field),
    or None."""
    advice = "photograph the retina through the pupil, with the camera's round field in the frame"
    if metrics["fov_fraction"] > MAX_FOV_FRACTION:
        return f"{NOT_FUNDUS}: the frame has no dark surround around a round field; {advice}"
    if metrics["roundness"] < MIN_ROUNDNESS and metrics["mean"] >= MIN_MEAN_FOR_ARC:
        return (f"{NOT_FUNDUS}: the bright region is not a round field of view (roundness {metrics['roundness']:.2f} "
                f"vs {MIN_ROUNDNESS}); {advice}")
    if metrics.get("field_hole", 0.0) > MAX_FIELD_HOLE and metrics["mean"] >= MIN_MEAN_FOR_ARC:
        return (f"{NOT_FUNDUS}: a black disc inside the lit region (a pupil seen from outside the eye? hole "
                f"{metrics['field_hole']:.3f} of the field vs {MAX_FIELD_HOLE}); {advice}")
    if metrics["dynamic_range"] < MIN_FIELD_RANGE:
        return (f"{NOT_FUNDUS}: the field is blank (luminance range {metrics['dynamic_range']:.0f} levels "
                f"vs {MIN_FIELD_RANGE:.0f}); {advice}")
    return None


def _masked_mean(total: float, count: int) -> float:
    """The mean of ``count`` values summing to ``total``, formed as cv2.mean forms it (a product with 1 / n)."""
    return total * (1.0 / count)


def _masked_std(total: float, squares: float, count: int) -> float:
    """The standard deviation of ``count`` values from their sum and sum of squares, formed as cv2.meanStdDev
    forms it, so that it equals the masked call's to the last bit."""
    scale = 1.0 / count
    mean = total * scale
    return float(np.sqrt(max(squares * scale - mean * mean, 0.0)))


def quality_metrics(bgr: np.ndarray, fov: FieldOfView | None = None) -> dict[str, float]:
    """All indicators for one uint8 BGR photo, measured on its :func:`gate_view`. Raises NoFundusError when no
    field of view exists. ``fov``: the field found on ``bgr`` (the Screener's, found once); found again when the
    view is a reduced copy, and above a flat dark-grey surround (:func:`surround_fov`).

    Everything runs on the one ``WORK_SIZE`` copy of the field, on 8-bit planes where the indicator allows (sums
    of squared differences with ``cv2.norm``, shares and percentiles from 256-bin histograms) and float32
    elsewhere; the constant kernels are made once, and the intermediate planes are written into this thread's
    reused buffers (:class:`_Scratch`).
    """
    view = gate_view(bgr)
    fov = detect_fov(view) if fov is None or view is not bgr else fov
    fov = surround_fov(view, fov)
    bgr = view
    h_img, w_img = bgr.shape[:2]
    small, mask = _field_planes(bgr, fov)  # mask: uint8 0/255, the field eroded off its rim
    n_inner = cv2.countNonZero(mask)
    if n_inner < 100:
        raise NoFundusError("field of view too small to assess quality")
    h_in, w_in = shape = mask.shape
    blue, green, red = cv2.split(small, [_SCRATCH(name, shape) for name in ("blue", "green", "red")])
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY, dst=_SCRATCH("gray", shape))
    hist = _hist(gray, mask)
    mean, std, entropy, p1, p99, _ = _hist_stats(hist)
    whiteness = cv2.min(blue, green, dst=_SCRATCH("whiteness", shape))
    whiteness = cv2.min(whiteness, red, dst=whiteness)
    whiteness_hist = _hist(whiteness, mask)
    dark_channel = _hist_stats(whiteness_hist)[5]

    # Sums inside the field are taken over planes zeroed outside it (a masked OpenCV reduction costs ~20x an
    # unmasked one); sums of integers are exact in any order, and the means are formed as cv2.mean and
    # cv2.meanStdDev form them, so every value is the one the masked calls give.
    green_in = cv2.bitwise_and(green, mask, dst=_SCRATCH("green_in", shape))
    green_mean = max(_masked_mean(cv2.sumElems(green_in)[0], n_inner), 1.0)
    mask16 = cv2.merge([mask, mask], dst=_SCRATCH("mask16", (*shape, 2))).view(np.int16).reshape(shape)  # 0 / -1
    gradient = cv2.Laplacian(green, cv2.CV_16S, dst=_SCRATCH("gradient", shape, np.int16))  # exact in 16 bits
    gradient = cv2.bitwise_and(gradient, mask16, dst=gradient)
    lap_std = _masked_std(cv2.sumElems(gradient)[0], cv2.norm(gradient, cv2.NORM_L2SQR), n_inner)
    tenengrad = 0.0
    for dx, dy in ((1, 0), (0, 1)):
        gradient = cv2.Sobel(green, cv2.CV_16S, dx, dy, dst=gradient)
        tenengrad += cv2.norm(cv2.bitwise_and(gradient, mask16, dst=gradient), cv2.NORM_L2SQR)
    tenengrad /= n_inner
    # Edge energy along 0, 90, 45 and 135 degrees, inside the rim band; motion blur along one angle leaves the
    # others sharp. The core is eroded far from the rim, so a pixel's neighbour one step away is inside it too.
    core = _erode(mask, _RIM_BAND, _SCRATCH("core", shape))
    core = core if cv2.countNonZero(core) >= 100 else mask
    energies = []
    for (ay, ax), (by, bx), norm in _DIRECTIONS:  # masked 8-bit differences: as fast as any unmasked route
        a = green[ay:h_in - 1 + ay, ax:w_in - 1 + ax]
        b = green[by:h_in - 1 + by, bx:w_in - 1 + bx]
        where = core[ay:h_in - 1 + ay, ax:w_in - 1 + ax]
        energies.append(cv2.norm(a, b, cv2.NORM_L2SQR, where) / max(cv2.countNonZero(where), 1) / norm)
    g = _SCRATCH("green_float", shape, np.float32)
    np.copyto(g, green)
    blurred = cv2.GaussianBlur(g, (0, 0), 2.0, dst=_SCRATCH("blurred", shape, np.float32))
    detail_energy = cv2.norm(g, blurred, cv2.NORM_L2SQR, mask) / n_inner

    # Glare: V = max(B, G, R) > 235 and S = 255 (V - min) / V < 40, without an HSV copy.
    value = cv2.max(blue, green, dst=_SCRATCH("value", shape))
    value = cv2.max(value, red, dst=value)
    bright = cv2.compare(value, 235, cv2.CMP_GT, dst=_SCRATCH("bright", shape))
    bright = cv2.bitwise_and(bright, mask, dst=bright)
    glare = 0
    if cv2.countNonZero(bright):
        chroma = cv2.subtract(value, whiteness)[bright > 0].astype(np.int32)
        glare = int(np.count_nonzero(chroma * 255 < 40 * value[bright > 0].astype(np.int32)))
    x0, y0, bw, bh = cv2.boundingRect(mask)
    box = green_in[y0:y0 + bh, x0:x0 + bw]
    # Robust noise: median absolute deviation of a 3x3 median high-pass, from histograms (values clipped to +-127).
    shifted = cv2.medianBlur(green, 3, dst=_SCRATCH("high_pass", shape))
    shifted = cv2.addWeighted(green, 1.0, shifted, -1.0, 128.0, dst=shifted)
    hp_median = _median_from_hist(_hist(shifted, mask))
    noise = 1.4826 * _median_from_hist(_hist(cv2.absdiff(shifted, hp_median, dst=shifted), mask))
    clipped = cv2.compare(red, 249, cv2.CMP_GT, dst=bright)
    red_clipped = cv2.countNonZero(cv2.bitwise_and(clipped, mask, dst=clipped))

    lum_median = _median_from_hist(hist)
    pale_patch, dark_patch = _patches(whiteness, gray, mask, _median_from_hist(whiteness_hist), lum_median)
    t_h, t_w = h_in // 3, w_in // 3
    gray_in = cv2.bitwise_and(gray, mask, dst=_SCRATCH("gray_in", shape))
    bands = ((slice(0, t_h), slice(None)), (slice(h_in - t_h, None), slice(None)),
             (slice(None), slice(0, t_w)), (slice(None), slice(w_in - t_w, None)))
    thirds = []
    for band in bands:
        inside = cv2.countNonZero(mask[band])
        if inside:
            thirds.append(_masked_mean(cv2.sumElems(gray_in[band])[0], inside))
    circle = field_circle(fov, bgr.shape)
    return {
        "fov_fraction": float(fov.fraction),
        "decentering": float(np.hypot(circle.center[0] - w_img / 2, circle.center[1] - h_img / 2) / circle.radius),
        "field_diameter": 2 * circle.radius,
        "field_coverage": circle.coverage,
        "roundness": circle.roundness,
        "field_hole": field_hole(fov),
        "redness": redness(bgr, fov),
        "mean": mean,
        "std": std,
        "entropy": entropy,
        "dynamic_range": p99 - p1,
        "laplacian_var": lap_std ** 2,
        "tenengrad": float(tenengrad),
        "wavelet_hf_ratio": _haar_hf_ratio(box),
        "directional_sharpness": float(min(energies)) / green_mean ** 2 * 1000,
        "sharpness_isotropy": float(min(energies)) / max(float(max(energies)), 1e-9),
        "local_contrast": float(np.sqrt(detail_energy)) / green_mean,
        "dark_channel": dark_channel,
        "underexposed": float(hist[:15].sum() / n_inner),
        "overexposed": float(hist[246:].sum() / n_inner),
        "red_clipped": red_clipped / n_inner,
        "dark_area": float(hist[:int(np.ceil(0.45 * lum_median))].sum() / n_inner),
        "bright_area": float(hist[191:].sum() / n_inner),
        "pale_patch": pale_patch,
        "dark_patch": dark_patch,
        "illumination_balance": min(thirds) / max(max(thirds), 1.0) if thirds else 1.0,
        "glare": glare / n_inner,
        "noise": float(noise),
        "blockiness": _blockiness(bgr, fov),
    }


# metric -> (threshold field, comparison, human-readable reason with the advice)
RULES = (
    ("decentering", "max_decentering", "<=", "fundus is off-centre: re-align the camera with the pupil"),
    ("field_diameter", "min_field_diameter", ">=", "the field is too small to show detail: move closer / centre the pupil"),
    ("mean", "min_mean", ">=", "too dark: increase illumination or dilate the pupil"),
    ("mean", "max_mean", "<=", "too bright: reduce illumination"),
    ("std", "min_std", ">=", "very low contrast (haze or cataract?): clean the lens, re-capture"),
    ("entropy", "min_entropy", ">=", "little image information: check focus and exposure"),
    ("dynamic_range", "min_dynamic_range", ">=", "flat exposure, low dynamic range"),
    ("laplacian_var", "min_laplacian_var", ">=", "blurred (defocus or motion): hold still and refocus"),
    ("tenengrad", "min_tenengrad", ">=", "edges are soft: refocus"),
    ("wavelet_hf_ratio", "min_wavelet_hf_ratio", ">=", "no fine detail (vessels not resolved): refocus"),
    ("directional_sharpness", "min_directional_sharpness", ">=",
     "smeared in one direction (motion blur): hold the camera and the patient still, re-capture"),
    ("sharpness_isotropy", "min_sharpness_isotropy", ">=",
     "detail lost along one direction (motion blur): hold the camera and the patient still, re-capture"),
    ("local_contrast", "min_local_contrast", ">=", "vessels washed out (haze, cataract or a dirty lens): clean the lens, re-capture"),
    ("dark_channel", "max_dark_channel", "<=", "veiling haze over the image: clean the lens, shield stray light, re-capture"),
    ("underexposed", "max_underexposed", "<=", "large under-exposed areas: increase illumination"),
    ("overexposed", "max_overexposed", "<=", "large over-exposed (washed-out) areas: reduce illumination"),
    ("red_clipped", "max_red_clipped", "<=", "over-exposed (red channel saturated): reduce illumination or gain"),
    ("bright_area", "max_bright_area", "<=", "large bright areas (over-exposure): reduce illumination or gain"),
    ("pale_patch", "max_pale_patch", "<=",
     "pale washed-out patch larger than the optic disc (lens flare or reflection): shield stray light, re-angle"),
    ("dark_patch", "max_dark_patch", "<=",
     "a wide part of the field is dark (eyelid, lashes or a shadow): ask the patient to open wide, re-align, re-capture"),
    ("dark_area", "max_dark_area", "<=", "part of the field is dark (eyelid or lashes?): ask the patient to open wide, re-capture"),
    ("illumination_balance", "min_illumination_balance", ">=",
     "one side of the field is shadowed (eyelid, lashes or tilt): open the eye wide, re-align, re-capture"),
    ("glare", "max_glare", "<=", "glare or reflections: adjust the angle of the light"),
    ("noise", "max_noise", "<=", "sensor noise too high: more light, lower gain"),
    ("blockiness", "max_blockiness", "<=",
     "heavy JPEG compression (8 x 8 blocks visible): send the camera's original or save at a higher JPEG quality"),
)
RULE_METRICS = tuple(dict.fromkeys(metric for metric, *_ in RULES))


def margins(metrics: dict[str, float], thresholds: QualityThresholds) -> dict[str, float]:
    """Signed distance of each indicator inside its limit, in units of the limit (< 0: failing)."""
    out = {}
    for metric, field_name, op, _ in RULES:
        limit = getattr(thresholds, field_name)
        value = metrics[metric]
        out[field_name] = ((value - limit) if op == ">=" else (limit - value)) / (abs(limit) + 1e-9)
    return out


def quality_score(metrics: dict[str, float], thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
                  learned: tuple[float, float] | None = None) -> float:
    """0-1, monotone in the worst margin: 0.5 at a limit, higher is better. The margins are the indicators'
    (signed distance inside each limit, in units of the limit) and, with ``learned`` = (P(ungradable), its
    threshold), the learned score's (threshold - P) / threshold."""
    worst = min(margins(metrics, thresholds).values())
    if learned is not None:
        probability, threshold = learned
        worst = min(worst, (threshold - probability) / threshold)
    return float(np.clip(0.5 + 0.5 * np.tanh(2 * worst), 0, 1))


LEARNED = "learned gradability score"


def verdict(metrics: dict[str, float], thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
            model: GradabilityModel | None = None) -> QualityReport:
    """Gradable / ungradable verdict with a 0-1 score and, for each failing limit, why and what to do; with the
    learned ``model``, its P(ungradable) in the metrics (``learned_ungradable``) and, when it fires, a reason that
    says so (the reasons then tell which part fired: rules, the learned score, or both)."""
    reasons = []
    for metric, field_name, op, reason in RULES:
        limit, value = getattr(thresholds, field_name), metrics[metric]
        if not (value >= limit if op == ">=" else value <= limit):
            reasons.append(f"{reason} ({metric} {value:.4g} vs limit {limit:.4g})")
    learned = None
    if model is not None:
        probability, ungradable = decide_gradability(model.logit(metrics), model.point)
        learned = (probability, model.point.threshold)
        metrics = {**metrics, "learned_ungradable": probability}
        if ungradable:
            reasons.append(f"{LEARNED}: P(ungradable) {probability:.2f} >= {model.point.threshold:.2f}, poor overall "
                           "(focus, exposure and contrast together): clean the lens, refocus and re-capture")
    return QualityReport(not reasons, round(quality_score(metrics, thresholds, learned), 4), tuple(reasons),
                         {k: round(v, 6) for k, v in metrics.items()})


def assess(bgr: np.ndarray, thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
           fov: FieldOfView | None = None, model: GradabilityModel | None | str = "packaged") -> QualityReport:
    """The gate's verdict on one uint8 BGR photo: refused as not a fundus photo (score 0, one reason that starts
    with ``NOT_FUNDUS``), or gradable / ungradable with a 0-1 score and the reasons that failed. ``model``: the
    learned score (default: the packaged one; None: rules only)."""
    try:
        metrics = quality_metrics(bgr, fov)
    except ImageError as exc:
        return QualityReport(False, 0.0, (f"{NOT_FUNDUS}: {exc}",), {})
    refusal = not_fundus_reason(metrics)
    if refusal is not None:
        return QualityReport(False, 0.0, (refusal,), {k: round(v, 6) for k, v in metrics.items()})
    return verdict(metrics, thresholds, PACKAGED_MODEL if model == "packaged" else model)


def is_not_fundus(report: QualityReport) -> bool:
    """The gate refused the photo as not a fundus photo (never graded)."""
    return bool(report.reasons) and report.reasons[0].startswith(NOT_FUNDUS)


PACKAGED_MODEL = packaged_model()
