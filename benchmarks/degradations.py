"""Code-made degradations of real fundus photos, for choosing and testing the quality gate's thresholds.

Each degradation takes a ``strength`` in [0, 1] (0 = the mildest level that should already be ungradable,
1 = severe) and sizes itself on the photo's field of view, not its pixel count, so a 512-px pre-cropped
Messidor-2 photo and a 1024-px raw EyePACS photo are degraded alike. ``degrade(img, name, rng)`` draws the
strength uniformly; ``STRENGTH_BINS`` names the thirds mild / moderate / severe for reports.

What phones produce: defocus; motion blur at any angle; under- and over-exposure (also of photos
that are already bright or pre-cropped: ``overexpose`` is defined by where the result lands, ``overexpose_gain``
by +1 to +2 EV over a typical exposure); an off-centre field; veiling haze (cataract, a fogged or dirty lens),
uneven across the field; noise; partial eyelid occlusion from the top (a soft-edged, curved shadow with lashes); lens flare; heavy JPEG.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

STRENGTH_BINS = (("mild", 0.0, 1 / 3), ("moderate", 1 / 3, 2 / 3), ("severe", 2 / 3, 1.0001))


def _fov(img: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(bool mask, diameter, centre) of the bright field of view (black surround excluded)."""
    mask = img.max(axis=2) > 12
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        h, w = img.shape[:2]
        return mask, float(min(h, w)), (w / 2, h / 2)
    diameter = float(max(xs.max() - xs.min(), ys.max() - ys.min()))
    return mask, diameter, (float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2)


def _lerp(strength: float, mild: float, severe: float) -> float:
    return mild + (severe - mild) * float(np.clip(strength, 0, 1))


NORMAL_MEAN = 90.0  # a typical exposure: about the median field luminance of the val/calib originals (both folders)


def _field_mean(img: np.ndarray) -> float:
    """Mean luminance of the field of view (>= 1)."""
    mask, _, _ = _fov(img)
    luminance = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[mask]
    return max(float(luminance.mean()) if luminance.size else NORMAL_MEAN, 1.0)


def defocus(img, strength, rng):
    _, diameter, _ = _fov(img)
    sigma = diameter * _lerp(strength, 0.006, 0.014)
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img, strength, rng):
    """A line kernel at a random angle (0-180 degrees)."""
    _, diameter, _ = _fov(img)
    length = max(5, int(diameter * _lerp(strength, 0.025, 0.06)))
    size = length | 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, (size - length) // 2:(size - length) // 2 + length] = 1.0
    rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    return cv2.filter2D(img, -1, kernel / max(float(kernel.sum()), 1e-6))


def underexpose(img, strength, rng):
    """x0.28 (-1.8 EV) to x0.08 (-3.6 EV) under a typical exposure: a photo brighter than typical (``NORMAL_MEAN``)
    is first brought down to it, since x0.28 of an already-bright photo (mean luminance up to 224 on val/calib) is
    an ordinary exposure (the mirror image of ``overexpose_gain``)."""
    gain = _lerp(strength, 0.28, 0.08) * min(1.0, NORMAL_MEAN / _field_mean(img))
    return (img.astype(np.float32) * gain).astype(np.uint8)


def overexpose(img, strength, rng):
    """Scaled so the field's mean luminance lands at 165-235 whatever it was (already-bright photos included),
    plus a flat lift of the blacks; highlights clip as a sensor's would. The gain is solved for the clipped
    result (a few fixed-point steps): clipping alone used to leave mild copies of bright photos 1-10 levels short
    of the target."""
    mask, _, _ = _fov(img)
    field = img[mask].astype(np.float32)
    weights = np.array([0.114, 0.587, 0.299], np.float32)  # BGR luminance

    def mean_luminance(values: np.ndarray) -> float:
        return float((values @ weights).mean()) if values.size else 100.0

    current = max(mean_luminance(field), 1.0)
    target = _lerp(strength, 165, 235)
    lift = rng.uniform(5, 30)
    gain = max(1.0, (target - lift) / current)
    for _ in range(6):  # clipping lowers the mean: raise the gain until the clipped field lands on the target
        reached = mean_luminance(np.clip(field * gain + lift, 0, 255))
        if reached >= target - 0.5 or reached >= 254:
            break
        gain *= (target - lift) / max(reached - lift, 1.0)
    out = np.clip(img.astype(np.float32) * gain + lift, 0, 255)
    return np.where(mask[..., None], out, img).astype(np.uint8)


def overexpose_gain(img, strength, rng):
    """Camera over-exposure by exposure value: +1 EV (x2) to +2 EV (x4) over a typical exposure, on the whole
    frame, clipped as a sensor clips. A photo darker than typical (``NORMAL_MEAN``) is first brought up to it:
    +1 EV of an under-exposed photo only corrects it (on val/calib, x2 to x4 of the photos as taken left 30 of 381
    copies inside the originals' range, most of them from photos with a mean luminance of 40-70). Unlike
    ``overexpose`` nothing is lifted and the result's brightness is not fixed: red saturates and the disc blows
    out first, and a pre-cropped Messidor-2 photo lands where its own colours take it."""
    gain = 2.0 ** _lerp(strength, 1.0, 2.0) * max(1.0, NORMAL_MEAN / _field_mean(img))
    return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def off_centre(img, strength, rng):
    h, w = img.shape[:2]
    _, diameter, _ = _fov(img)
    shift = diameter * _lerp(strength, 0.22, 0.45)
    angle = rng.uniform(0, 2 * np.pi)
    return cv2.warpAffine(img, np.float32([[1, 0, shift * np.cos(angle)], [0, 1, shift * np.sin(angle)]]), (w, h))


def haze(img, strength, rng):
    """Veiling haze: blend toward a light grey-yellow veil, stronger on one side, plus softening."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    alpha_mean = _lerp(strength, 0.45, 0.85)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gradient = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / max(diameter, 1.0)  # -0.5..0.5
    alpha = np.clip(alpha_mean + 0.25 * alpha_mean * gradient, 0, 0.95)[..., None]
    veil = np.array([rng.uniform(140, 175), rng.uniform(160, 185), rng.uniform(170, 200)], np.float32)
    out = img.astype(np.float32) * (1 - alpha) + veil * alpha
    out = cv2.GaussianBlur(out, (0, 0), max(0.5, diameter * 0.003))
    return np.where(mask[..., None], out, img).astype(np.uint8)


def noise(img, strength, rng):
    sigma = _lerp(strength, 14, 30)
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def occlusion(img, strength, rng):
    """A partial eyelid from the top: a curved, soft-edged shadow over 22-50% of the field, with lashes."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    top = cy - diameter / 2
    depth = diameter * _lerp(strength, 0.22, 0.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sag = depth * 0.25 * (1 - ((xx - cx) / max(diameter / 2, 1)) ** 2)  # the lid margin is an arc
    edge = top + depth + sag - depth * 0.25
    lid = (yy < edge).astype(np.float32)
    for _ in range(int(25 + 40 * strength)):  # lashes: dark strokes hanging below the margin
        x0 = rng.uniform(cx - diameter / 2, cx + diameter / 2)
        y0 = float(top + depth + depth * 0.25 * (1 - ((x0 - cx) / max(diameter / 2, 1)) ** 2) - depth * 0.25)
        length = diameter * rng.uniform(0.03, 0.08)
        x1 = x0 + rng.uniform(-0.5, 0.5) * length
        cv2.line(lid, (int(x0), int(y0)), (int(x1), int(y0 + length)), 1.0, max(1, int(diameter * 0.004)))
    lid = cv2.GaussianBlur(lid, (0, 0), max(1.0, diameter * 0.01))[..., None]
    darkness = rng.uniform(0.04, 0.25)
    skin = np.array([20, 30, 60], np.float32) * rng.uniform(0.3, 1.0)  # dim, reddish-brown lid
    out = img.astype(np.float32) * (1 - lid) + (img.astype(np.float32) * darkness + skin * darkness) * lid
    return np.where(mask[..., None], out, img).astype(np.uint8)


def flare(img, strength, rng):
    """Lens flare: a bright, desaturated blob (or two) inside the field."""
    mask, diameter, (cx, cy) = _fov(img)
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        r = diameter * _lerp(strength, 0.1, 0.22)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.3) * diameter
        fx, fy = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
        blob = np.exp(-((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * r ** 2))[..., None]
        out = out * (1 - 0.9 * blob) + 250 * 0.9 * blob
    return np.where(mask[..., None], np.clip(out, 0, 255), img).astype(np.uint8)


def heavy_jpeg(img, strength, rng):
    quality = int(round(_lerp(strength, 10, 3)))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else img


Degradation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
DEGRADATIONS: dict[str, Degradation] = {f.__name__: f for f in (
    defocus, motion_blur, underexpose, overexpose, off_centre, haze, noise, occlusion, flare, heavy_jpeg, overexpose_gain)}


def degrade(img: np.ndarray, name: str, rng: np.random.Generator, strength: float | None = None) -> tuple[np.ndarray, float]:
    """(degraded copy, strength used); the strength is drawn uniformly from [0, 1] unless given."""
    strength = float(rng.uniform(0, 1)) if strength is None else strength
    return DEGRADATIONS[name](img, strength, rng), strength


def strength_bin(strength: float) -> str:
    return next(name for name, low, high in STRENGTH_BINS if low <= strength < high)


# --- Other cameras: the same photo framed as another camera would frame it (gradable when the original is) ---

def _field_square(img: np.ndarray) -> tuple[np.ndarray, float]:
    """The photo's fundus on a black square canvas centred on the field's circle, and the circle's diameter.

    A photo whose field is already clipped (raw EyePACS: top and bottom) keeps its clipped parts black: only
    what the camera recorded is moved, never invented.
    """
    mask, diameter, (cx, cy) = _fov(img)
    side = int(np.ceil(diameter)) + 4
    shift = np.float32([[1, 0, side / 2 - cx], [0, 1, side / 2 - cy]])
    return cv2.warpAffine(img, shift, (side, side), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0)), diameter


def reframe(img: np.ndarray, width: int, aspect: float, field: float, quality: int = 92,
            offset: tuple[float, float] = (0.0, 0.0)) -> bytes:
    """The photo as a ``width`` x ``width / aspect`` JPEG (``quality``) whose circular field is ``field`` x the
    frame's height across (> 1: clipped at the top and bottom, as 3:2 and 4:3 sensors clip it), shifted by
    ``offset`` x the field's diameter."""
    square, diameter = _field_square(img)
    height = int(round(width / aspect))
    target = field * height  # the field's diameter in the new frame
    scale = target / max(diameter, 1.0)
    size = max(8, int(round(square.shape[0] * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    square = cv2.resize(square, (size, size), interpolation=interp)
    frame = np.zeros((height, width, 3), np.uint8)
    x0 = int(round(width / 2 - size / 2 + offset[0] * target))
    y0 = int(round(height / 2 - size / 2 + offset[1] * target))
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x0 + size), min(height, y0 + size)
    frame[fy0:fy1, fx0:fx1] = square[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def recompress(img: np.ndarray, quality: int) -> bytes:
    """The photo as taken, saved again at JPEG ``quality``."""
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


# name -> photo -> JPEG bytes. Frames: a 3:2 camera (1500 x 1000, the field clipped top and bottom at 1.2 x the
# frame's height), a 4:3 camera (1024 x 768, 1.1 x), the public 760 x 570 format at JPEG 75, a field small in a
# large frame (0.6 x the height of 2048 x 1536), a field larger than the frame (clipped on all four sides, corners
# still black), a 12-MP phone frame (4000 x 3000, decoded at 1/8 for the gate), and the photo as taken at JPEG 50/70.
REFRAMINGS: dict[str, Callable[[np.ndarray], bytes]] = {
    "clip_3x2": lambda img: reframe(img, 1500, 1.5, 1.2),
    "clip_4x3": lambda img: reframe(img, 1024, 4 / 3, 1.1),
    "camera_760x570_q75": lambda img: reframe(img, 760, 4 / 3, 1.05, quality=75),
    "field_small": lambda img: reframe(img, 2048, 4 / 3, 0.6),
    "field_large": lambda img: reframe(img, 1024, 4 / 3, 1.3),
    "phone_4000x3000": lambda img: reframe(img, 4000, 4 / 3, 0.9, quality=85),
    "jpeg_q70": lambda img: recompress(img, 70),
    "jpeg_q50": lambda img: recompress(img, 50),
}


# --- Not a fundus: code-made captures the gate must refuse, never grade ---

def _canvas(h: int, w: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.full((h, w, 3), colour, np.uint8)


def blank_black(rng: np.random.Generator) -> np.ndarray:
    """A lens cap or a dark room: black with sensor noise."""
    return np.clip(rng.normal(4, 2, (768, 1024, 3)), 0, 255).astype(np.uint8)


def blank_grey(rng: np.random.Generator) -> np.ndarray:
    """A flat, mid-grey frame (an over-exposed or unfocused capture of a wall)."""
    return np.clip(rng.normal(128, 3, (768, 1024, 3)), 0, 255).astype(np.uint8)


def blank_white(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(245, 3, (768, 1024, 3)), 0, 255).astype(np.uint8)


def document(rng: np.random.Generator, on_desk: bool = False) -> np.ndarray:
    """A printed page: lines of black text on white; ``on_desk``: the page lying on a dark desk (a bright
    rectangle on black, where a field-of-view search finds a large bright region)."""
    page = _canvas(1100, 850, (235, 238, 240))
    for row in range(80, 1040, 34):
        words = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz  "), int(rng.integers(30, 45))))
        cv2.putText(page, words, (60, row), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (20, 20, 20), 2, cv2.LINE_AA)
    if not on_desk:
        return cv2.resize(page, (768, 1024), interpolation=cv2.INTER_AREA)
    frame = _canvas(1200, 1600, (10, 12, 14))
    small = cv2.resize(page, (700, 900), interpolation=cv2.INTER_AREA)
    frame[150:1050, 450:1150] = small
    return frame


def face(rng: np.random.Generator, dark_background: bool = False) -> np.ndarray:
    """A face: a skin-coloured oval with eyes, brows, nose and mouth, hair, on a grey wall or a dark studio."""
    h, w = 1024, 768
    img = _canvas(h, w, (12, 12, 12) if dark_background else (150, 155, 160))
    skin = tuple(int(c) for c in np.array([120, 150, 205]) + rng.integers(-15, 15, 3))  # BGR
    cv2.ellipse(img, (w // 2, h // 2 - 40), (300, 390), 0, 180, 360, (30, 35, 45), -1)  # hair
    cv2.ellipse(img, (w // 2, h // 2), (250, 340), 0, 0, 360, skin, -1)
    for x in (w // 2 - 100, w // 2 + 100):
        cv2.ellipse(img, (x, h // 2 - 60), (45, 22), 0, 0, 360, (235, 235, 235), -1)  # eye white
        cv2.circle(img, (x, h // 2 - 60), 18, (60, 90, 40), -1)  # iris
        cv2.circle(img, (x, h // 2 - 60), 8, (10, 10, 10), -1)  # pupil
        cv2.line(img, (x - 55, h // 2 - 110), (x + 55, h // 2 - 115), (40, 50, 60), 10)  # brow
    cv2.line(img, (w // 2, h // 2 - 40), (w // 2 - 15, h // 2 + 60), (90, 110, 160), 6)  # nose
    cv2.ellipse(img, (w // 2, h // 2 + 150), (80, 25), 0, 0, 180, (70, 70, 150), 10)  # mouth
    img = cv2.GaussianBlur(img, (0, 0), 2.0)
    return np.clip(img.astype(np.float32) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def anterior_segment(rng: np.random.Generator) -> np.ndarray:
    """An external eye photo (anterior segment): skin and lids around a white sclera, an iris, a black pupil and
    the flash's corneal reflex; fills the frame."""
    h, w = 768, 1024
    skin = tuple(int(c) for c in np.array([110, 140, 200]) + rng.integers(-15, 15, 3))
    img = _canvas(h, w, skin)
    cv2.ellipse(img, (w // 2, h // 2), (420, 210), 0, 0, 360, (215, 220, 230), -1)  # sclera
    iris = tuple(int(c) for c in rng.choice([(40, 70, 110), (140, 110, 60), (60, 100, 70)]))
    cv2.circle(img, (w // 2, h // 2), 170, iris, -1)
    for angle in range(0, 360, 6):  # iris fibres
        t = np.deg2rad(angle)
        cv2.line(img, (int(w / 2 + 70 * np.cos(t)), int(h / 2 + 70 * np.sin(t))),
                 (int(w / 2 + 165 * np.cos(t)), int(h / 2 + 165 * np.sin(t))), tuple(int(c * 0.7) for c in iris), 2)
    cv2.circle(img, (w // 2, h // 2), 65, (8, 8, 8), -1)  # pupil
    cv2.circle(img, (w // 2 + 30, h // 2 - 30), 14, (255, 255, 255), -1)  # corneal reflex
    cv2.ellipse(img, (w // 2, h // 2), (425, 215), 0, 180, 360, (40, 60, 90), 14)  # upper lid margin, lashes
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    return np.clip(img.astype(np.float32) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def anterior_segment_slit_lamp(rng: np.random.Generator) -> np.ndarray:
    """An anterior-segment photo under a slit lamp: the lit eye in a dark surround (a bright, roughly round region
    on black, like a fundus field, but white sclera and a dark pupil instead of a red retina)."""
    img = anterior_segment(rng)
    h, w = img.shape[:2]
    light = np.zeros((h, w), np.float32)
    cv2.ellipse(light, (w // 2, h // 2), (380, 330), 0, 0, 360, 1.0, -1)
    light = cv2.GaussianBlur(light, (0, 0), 25)[..., None]
    return (img.astype(np.float32) * light).astype(np.uint8)


def bright_disc(rng: np.random.Generator) -> np.ndarray:
    """A uniform pale disc on black (a lit lens cap, a calibration target): a field of view with no retina."""
    img = blank_black(rng)
    cv2.circle(img, (512, 384), 340, (200, 205, 210), -1)
    return cv2.GaussianBlur(img, (0, 0), 2.0)


NON_FUNDUS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "blank_black": blank_black, "blank_grey": blank_grey, "blank_white": blank_white,
    "document": document, "document_on_desk": lambda rng: document(rng, on_desk=True),
    "face": face, "face_dark_background": lambda rng: face(rng, dark_background=True),
    "anterior_segment": anterior_segment, "anterior_segment_slit_lamp": anterior_segment_slit_lamp,
    "bright_disc": bright_disc,
}
