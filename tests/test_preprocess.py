import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ImageTooLargeError, NoFundusError, UnreadableImageError
from edge_runtime.preprocess import decode_image, detect_fov, image_size_from_header, preprocess

from .conftest import encode


def test_preprocess_shapes_and_normalisation(fundus_bgr):
    policy = PreprocessPolicy(input_size=96)
    pre = preprocess(fundus_bgr, policy)
    assert pre.tensor.shape == (1, 3, 96, 96) and pre.tensor.dtype == np.float32
    assert pre.resized_rgb.shape == (96, 96, 3)
    nhwc = preprocess(fundus_bgr, PreprocessPolicy(input_size=96, layout="NHWC"))
    assert nhwc.tensor.shape == (1, 96, 96, 3)
    assert np.allclose(nhwc.tensor.transpose(0, 3, 1, 2), pre.tensor)


def test_crop_to_fov_and_map_back():
    img = np.zeros((300, 500, 3), np.uint8)
    cv2.circle(img, (320, 150), 120, (40, 80, 160), -1)
    fov = detect_fov(img)
    assert abs(fov.center[0] - 320) < 3 and abs(fov.center[1] - 150) < 3
    pre = preprocess(img, PreprocessPolicy(input_size=64))
    x, y = pre.to_original(0.5, 0.5)
    assert abs(x * 500 - 320) < 4 and abs(y * 300 - 150) < 4


def test_ben_graham_changes_pixels(fundus_bgr):
    plain = preprocess(fundus_bgr, PreprocessPolicy(input_size=64)).resized_rgb
    bg = preprocess(fundus_bgr, PreprocessPolicy(input_size=64, ben_graham=True)).resized_rgb
    assert not np.array_equal(plain, bg) and abs(float(bg.mean()) - 128) < 40


def test_grayscale_16bit_and_alpha_inputs(fundus_bgr):
    gray = cv2.cvtColor(fundus_bgr, cv2.COLOR_BGR2GRAY)
    assert decode_image(encode(gray, ".png")).shape == fundus_bgr.shape
    sixteen = fundus_bgr.astype(np.uint16) * 257
    decoded = decode_image(encode(sixteen, ".png"))
    assert decoded.dtype == np.uint8 and np.abs(decoded.astype(int) - fundus_bgr).max() <= 1
    alpha = np.dstack([fundus_bgr, np.full(fundus_bgr.shape[:2], 255, np.uint8)])
    assert np.array_equal(decode_image(encode(alpha, ".png")), fundus_bgr)


def test_exif_rotation_is_applied():
    from PIL import Image

    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue())
    assert decoded.shape[:2] == (200, 100)
    assert decoded[:90].mean() > 200 and decoded[110:].mean() < 50  # white half is now on top


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, np.random.default_rng(0).bytes(5000),
                                  b"<html><svg onload=alert(1)></svg></html>"])
def test_unreadable_bytes_raise_typed_error(data):
    with pytest.raises(UnreadableImageError):
        decode_image(data)


def test_truncated_jpeg_raises(fundus_bgr):
    data = encode(fundus_bgr)
    with pytest.raises(UnreadableImageError):
        decode_image(data[: len(data) // 8])


def test_decompression_bomb_rejected_from_header():
    # A PNG header claiming 60000 x 60000 pixels: refused before any decoding.
    ihdr = b"IHDR" + struct.pack(">II", 9000, 9000) + b"\x08\x02\x00\x00\x00"
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    idat = b"IDAT" + zlib.compress(b"\x00" * 1000)
    png = header + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    assert image_size_from_header(png) == (9000, 9000)
    with pytest.raises(ImageTooLargeError, match="MP"):
        decode_image(png)
    with pytest.raises(ImageTooLargeError):
        decode_image(b"\xff\xd8" + b"\x00" * 100, max_bytes=50)


def test_jpeg_header_size(fundus_bgr):
    assert image_size_from_header(encode(fundus_bgr)) == (256, 256)


def test_no_fundus_raises():
    with pytest.raises(NoFundusError):
        preprocess(np.zeros((200, 200, 3), np.uint8), PreprocessPolicy(input_size=64))
    speck = np.zeros((400, 400, 3), np.uint8)
    speck[10:20, 10:20] = 200
    with pytest.raises(NoFundusError, match="covers only"):
        detect_fov(speck)


def test_reduced_jpeg_decode_keeps_the_model_input(fundus_bgr):
    """A 1/2-scale JPEG decode gives (nearly) the model input of a full decode: same crop, pixels within a few levels."""
    from edge_runtime.preprocess import jpeg_reduction

    big = cv2.resize(fundus_bgr, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    data = encode(big)
    full, reduced = decode_image(data), decode_image(data, min_side=336)
    assert full.shape[:2] == (1024, 1024) and reduced.shape[:2] == (512, 512)
    assert jpeg_reduction((1024, 683), 336) == 2 and jpeg_reduction((512, 512), 336) == 1
    assert jpeg_reduction((4000, 3000), 336) == 8
    policy = PreprocessPolicy(input_size=224)
    a, b = preprocess(full, policy), preprocess(reduced, policy)
    assert np.abs(a.resized_rgb.astype(int) - b.resized_rgb).mean() < 2.0
    assert np.allclose(a.to_original(0.3, 0.6), b.to_original(0.3, 0.6), atol=0.01)
    png = encode(big, ".png")  # only JPEG decodes at reduced scale
    assert decode_image(png, min_side=336).shape[:2] == (1024, 1024)


def test_fov_mask_is_small_and_geometry_is_in_image_pixels():
    img = np.zeros((1200, 1600, 3), np.uint8)
    cv2.circle(img, (800, 600), 500, (40, 80, 160), -1)
    fov = detect_fov(img)
    assert max(fov.mask.shape) <= 256 and fov.mask_scale == pytest.approx(256 / 1600)
    assert abs(fov.x - 300) <= 7 and abs(fov.w - 1001) <= 14 and abs(fov.center[1] - 600) <= 7
    assert fov.fraction == pytest.approx(np.pi * 500 ** 2 / (1200 * 1600), rel=0.03)


def test_normalize_matches_the_formula():
    from edge_runtime.preprocess import normalize

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    policy = PreprocessPolicy(input_size=16, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    expected = ((rgb / 255.0 - np.array(policy.mean)) / np.array(policy.std)).transpose(0, 3, 1, 2)
    assert np.allclose(normalize(rgb, policy), expected, atol=1e-5)
    bgr_policy = PreprocessPolicy(input_size=16, color_order="BGR", layout="NHWC")
    expected_bgr = (rgb[..., ::-1] / 255.0 - np.array(bgr_policy.mean)[::-1]) / np.array(bgr_policy.std)[::-1]
    assert np.allclose(normalize(rgb, bgr_policy), expected_bgr, atol=1e-5)
