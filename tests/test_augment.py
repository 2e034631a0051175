"""Augmentation recipes (TrainConfig.augment): `basic` reproduces earlier runs, `phone` adds handheld-camera variation
and draws from one distribution on both training paths."""
import math

import numpy as np
import pytest
import torch

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ConfigError
from training.config import TrainConfig, resolve_config
from training.data import device_batches
from training.data.dataset import FundusDataset
from training.data.device_batches import DeviceBatches, augment_batch, phone_capture_batch
from training.data.synthetic import generate_fundus
from training.train import fit

POLICY = PreprocessPolicy(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
PROBABILITIES = ("CROP_PROBABILITY", "ROTATION_PROBABILITY", "BLUR_PROBABILITY", "VIGNETTE_PROBABILITY",
                 "GAMMA_PROBABILITY")


def _fingerprint(x: torch.Tensor) -> list[float]:
    """Per photo: the mean and a position-weighted mean (which sees orientation, not only brightness)."""
    weights = torch.linspace(-1, 1, x[0].numel()).view(x[0].shape)
    return [float(v) for p in x for v in (p.mean(), (p * weights).mean())]


def _only(monkeypatch, name: str | None, probability: float = 1.0) -> None:
    """Switch every phone transform off but ``name`` (at ``probability``)."""
    for other in PROBABILITIES:
        monkeypatch.setattr(device_batches, other, probability if other == name else 0.0)


def _disc(side: int, radius: float, n: int) -> torch.Tensor:
    centres = torch.arange(side) + 0.5 - side / 2
    inside = (centres[None, :] ** 2 + centres[:, None] ** 2 <= radius ** 2).float()
    return inside.expand(n, 3, side, side).contiguous()


def test_basic_recipe_reproduces_the_draws_of_earlier_runs():
    # Computed at c3e9592, before TrainConfig.augment existed: a changed draw order or formula changes them.
    images = np.random.default_rng(7).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    loader = FundusDataset(images, np.zeros(4), POLICY, train=True, seed=3, augment="basic")
    assert _fingerprint(torch.stack([loader[i][0] for i in range(4)])) == pytest.approx(
        [-0.435313, 0.032513, 0.261342, 0.000877, 0.240367, -0.012845, 0.088355, 0.029557], abs=2e-6)
    raw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert _fingerprint(augment_batch(raw, torch.Generator().manual_seed(5), augment="basic")) == pytest.approx(
        [0.394673, -0.001899, 0.549018, -0.007168, 0.544917, -0.00462, 0.510948, -0.002832], abs=2e-6)
    assert _fingerprint(augment_batch(raw, torch.Generator().manual_seed(5), geometric=False)) == pytest.approx(
        [0.530292, 0.007718, 0.435315, -0.004307, 0.593441, 0.001534, 0.559805, -2.7e-05], abs=2e-6)


def test_phone_gamma_raises_a_constant_image_to_a_power_in_range_for_about_half_the_photos(monkeypatch):
    _only(monkeypatch, "GAMMA_PROBABILITY", device_batches.GAMMA_PROBABILITY)
    out = phone_capture_batch(torch.full((400, 3, 8, 8), 0.5), torch.Generator().manual_seed(0), geometric=False)
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # elementwise: every photo stays constant
    gamma = out[:, 0, 0, 0].log() / math.log(0.5)
    changed = gamma[(gamma - 1).abs() > 1e-6]
    assert 0.4 < len(changed) / len(gamma) < 0.6  # probability 0.5
    assert changed.min() >= 0.7 - 1e-4 and changed.max() <= 1.5 + 1e-4
    assert changed.min() < 0.75 and changed.max() > 1.4  # the whole range is drawn
    assert 0.35 < (changed < 1).float().mean() < 0.6  # log-uniform: brightening about as likely as darkening


def test_phone_vignetting_darkens_the_rim_more_than_the_centre(monkeypatch):
    _only(monkeypatch, "VIGNETTE_PROBABILITY")
    out = phone_capture_batch(torch.full((64, 3, 32, 32), 0.8), torch.Generator().manual_seed(1), geometric=False)
    centre = out[:, :, 15:17, 15:17].mean(dim=(1, 2, 3))
    rim = out[:, :, 0, 15:17].mean(dim=(1, 2))  # the middle of the top edge lies on the field of view's circle
    assert torch.allclose(centre, torch.full_like(centre, 0.8), atol=0.01)
    ratio = rim / centre
    assert ratio.max() < 1 and ratio.min() >= 0.5 - 0.02  # strength up to 0.5 at r = 1
    assert ratio.min() < 0.6 and ratio.std() > 0.05  # per-photo strengths across the range


@pytest.mark.parametrize("side", [112, 448])
def test_phone_blur_spreads_a_point_by_a_sigma_that_scales_with_the_side(monkeypatch, side):
    _only(monkeypatch, "BLUR_PROBABILITY")
    image = torch.zeros(24, 3, side, side)
    image[:, :, side // 2, side // 2] = 1.0
    out = phone_capture_batch(image, torch.Generator().manual_seed(2), geometric=False)[:, 0]
    assert torch.allclose(out.sum(dim=(1, 2)), torch.ones(24), atol=1e-4)  # blur moves light, never adds it
    assert (out.amax(dim=(1, 2)) < 1).all()
    offsets = torch.arange(side) - side // 2
    sigma = (out.sum(dim=1) * offsets ** 2).sum(dim=1).sqrt()  # spread along x
    high = device_batches.BLUR_SIGMA_AT_224[1] * side / 224
    assert sigma.max() <= high * 1.02 and sigma.max() > 0.8 * high and sigma.min() < 0.5 * high


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass, centroid (pixels from the centre) and principal-axis angle (degrees) of channel 0 per photo."""
    image = x[:, 0]
    side = image.shape[-1]
    centres = torch.arange(side, dtype=image.dtype) + 0.5 - side / 2
    mass = image.sum(dim=(1, 2))
    cx = (image * centres[None, None, :]).sum(dim=(1, 2)) / mass
    cy = (image * centres[None, :, None]).sum(dim=(1, 2)) / mass
    dx, dy = centres[None, None, :] - cx[:, None, None], centres[None, :, None] - cy[:, None, None]
    mu20, mu02, mu11 = ((image * d).sum(dim=(1, 2)) for d in (dx * dx, dy * dy, dx * dy))
    angle = 0.5 * torch.atan2(2 * mu11, mu20 - mu02) * 180 / math.pi
    return mass, torch.stack([cx, cy], 1), angle


def test_phone_rotation_turns_a_centred_bar_by_any_angle_up_to_45_degrees_and_keeps_its_mass(monkeypatch):
    _only(monkeypatch, "ROTATION_PROBABILITY")
    image = torch.zeros(200, 3, 64, 64)
    image[:, :, 30:34, 12:52] = 1.0  # horizontal bar inside the field of view's circle
    out = phone_capture_batch(image, torch.Generator().manual_seed(3), geometric=True)
    mass, centroid, angle = _moments(out)
    assert torch.allclose(mass, torch.full_like(mass, 160.0), rtol=0.02)  # 4 x 40 pixels
    assert centroid.abs().max() < 0.3
    assert angle.abs().max() <= 45.5
    assert (angle.abs() > 35).any() and ((angle.abs() > 2) & (angle.abs() < 43)).float().mean() > 0.8


def test_phone_crop_enlarges_a_centred_disc_by_up_to_the_inverse_square_of_the_scale(monkeypatch):
    _only(monkeypatch, "CROP_PROBABILITY")
    out = phone_capture_batch(_disc(64, 16, 200), torch.Generator().manual_seed(4), geometric=True)
    growth = out[:, 0].sum(dim=(1, 2)) / _disc(64, 16, 1)[0, 0].sum()
    smallest_scale = device_batches.CROP_SCALE[0]
    assert growth.min() >= 0.98 and growth.max() <= 1.03 / smallest_scale ** 2
    assert growth.mean() > 1.15 and growth.max() > 1.45  # mean of 1 / s^2 for s ~ U(0.8, 1) is 1.25
    _, centroid, _ = _moments(out)
    assert centroid.abs().max() > 1  # the centre is jittered, not only zoomed


def test_phone_output_stays_in_range_and_each_photo_draws_its_own_reproducibly():
    image = torch.from_numpy(generate_fundus(2, 48, np.random.default_rng(0)).image).permute(2, 0, 1).float() / 255
    batch = image.expand(16, -1, -1, -1).contiguous()
    out = augment_batch(batch, torch.Generator().manual_seed(5), augment="phone")
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    assert all(not torch.equal(out[i], out[j]) for i in range(16) for j in range(i))
    assert torch.equal(out, augment_batch(batch, torch.Generator().manual_seed(5), augment="phone"))


def test_phone_without_geometry_keeps_every_pixel_in_place_on_both_paths():
    # A single bright point off the centre: blur, vignetting, gamma and jitter change its value, never its place.
    image = torch.zeros(3, 32, 32)
    image[:, 9, 21] = 1.0
    batch = image.expand(64, -1, -1, -1).contiguous()

    def peaks(x: torch.Tensor) -> set[int]:
        return set(x[:, 1].flatten(1).argmax(dim=1).tolist())

    at = {9 * 32 + 21}
    assert peaks(augment_batch(batch, torch.Generator().manual_seed(6), geometric=False, augment="phone")) == at
    photo = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    policy = PreprocessPolicy(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    loader = FundusDataset(np.stack([photo] * 16), np.zeros(16), policy, train=True, geometric=False, augment="phone")
    assert peaks(torch.stack([loader[i][0] for i in range(16)])) == at
    # ...while with geometry the point moves (the check above can fail).
    assert len(peaks(augment_batch(batch, torch.Generator().manual_seed(6), augment="phone"))) > 8


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, values, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, values, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def test_phone_draws_the_same_distribution_on_the_loader_and_device_paths():
    photo = generate_fundus(3, 32, np.random.default_rng(1)).image
    policy = PreprocessPolicy(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    n = 500
    loader = FundusDataset(np.stack([photo] * n), np.zeros(n), policy, train=True, seed=11, augment="phone")
    per_photo = torch.stack([loader[i][0] for i in range(n)]) * 0.25 + 0.5
    raw = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    batched = DeviceBatches(np.stack([photo] * n), np.zeros(n), policy, torch.device("cpu"), batch_size=50, seed=12,
                            augment="phone")
    on_device = torch.cat([x for x, _, _ in batched]) * 0.25 + 0.5
    # Brightness change and pixel spread (contrast, blur, vignetting and gamma move it) per photo.
    for statistic in (lambda x: x.mean(dim=(1, 2, 3)) / raw.mean(), lambda x: x.std(dim=(1, 2, 3)) / raw.std()):
        a, b = statistic(per_photo), statistic(on_device)
        assert _ks_distance(a, b) < 0.12, (a.mean(), b.mean())  # about the 0.1 % critical value for 500 vs 500
        assert abs(float(a.mean() - b.mean())) < 0.02


def test_augment_recipe_is_validated_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"augment must be basic \| phone, got 'phnoe'; did you mean 'phone'"):
        TrainConfig(augment="phnoe")
    with pytest.raises(ConfigError, match="augment must be"):
        FundusDataset(np.zeros((1, 16, 16, 3), np.uint8), np.zeros(1), POLICY, augment="heavy")
    with pytest.raises(ConfigError, match="augment must be"):
        augment_batch(torch.zeros(1, 3, 4, 4), torch.Generator(), augment="Phone")
    path = tmp_path / "c.yaml"
    path.write_text("augment: phone\n")
    assert resolve_config(TrainConfig, path).augment == "phone"
    assert TrainConfig().augment == "basic"  # earlier configs keep training as they did


@pytest.mark.parametrize("augment_on", ["device", "loader"])
def test_training_runs_with_phone_augmentation_on_either_path(tmp_path, augment_on):
    cfg = TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=6, synthetic_size=64, input_size=64,
                      epochs=1, batch_size=8, augment="phone", augment_on=augment_on,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / augment_on))
    run = fit(cfg, progress=False)
    assert run.metrics["history"][0]["train_images_per_s"] > 0
    assert run.best_checkpoint.is_file()
    assert "augment: phone" in (tmp_path / augment_on / "config.yaml").read_text()
