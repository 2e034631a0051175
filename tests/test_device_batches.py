"""Device-resident training batches: the GPU path's augmentation and sharding, run on the CPU."""

import numpy as np
import pytest
import torch

from edge_runtime.contract import PreprocessPolicy
from training.config import TrainConfig
from training.data.device_batches import DeviceBatches, augment_batch
from training.train import fit

POLICY = PreprocessPolicy(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _orientations(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square (C x S x S): flips combined with rotations by multiples of 90 degrees."""
    return [torch.rot90(f, k, dims=(1, 2)) for f in (image, image.flip(2)) for k in range(4)]


def test_batched_orientations_are_the_squares_eight_symmetries_each_drawn():
    # No symmetry of its own, and values in [0.3, 0.6] so no jitter draw reaches the clamp (which would tie pixels).
    image = 0.3 + 0.3 * torch.arange(3 * 5 * 5, dtype=torch.float32).view(3, 5, 5) / 75.0
    batch = image.expand(4000, -1, -1, -1).contiguous()
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(batch, generator, geometric=True)
    candidates = _orientations(image)
    found = []
    for photo in out:
        # Brightness, contrast and channel gains are positive affine maps: the pixels' rank order is the geometry.
        order = photo[0].flatten().argsort()
        matches = [i for i, c in enumerate(candidates) if torch.equal(c[0].flatten().argsort(), order)]
        assert len(matches) == 1
        found.append(matches[0])
    counts = np.bincount(found, minlength=8)
    assert counts.min() > 400, counts  # each of 8 orientations about 500 times in 4000


def test_batched_colour_jitter_is_per_photo_and_bounded():
    batch = torch.full((64, 3, 4, 4), 0.5)
    out = augment_batch(batch, torch.Generator().manual_seed(1), geometric=False)
    per_photo = out.mean(dim=(1, 2, 3))
    assert per_photo.std() > 0.01  # each photo draws its own brightness
    # brightness in [0.8, 1.2] x channel in [0.95, 1.05] around a flat 0.5 image
    assert per_photo.min() >= 0.5 * 0.8 * 0.95 - 1e-6 and per_photo.max() <= 0.5 * 1.2 * 1.05 + 1e-6


def test_device_batches_cover_every_photo_once_per_epoch_and_shard_evenly():
    images = np.random.default_rng(0).integers(0, 255, (11, 16, 16, 3), dtype=np.uint8)
    grades = np.arange(11) % 5
    single = DeviceBatches(images, grades, POLICY, torch.device("cpu"), batch_size=4, drop_last=False)
    seen = torch.cat([idx for _, _, idx in single])
    assert sorted(seen.tolist()) == list(range(11)) and len(single) == 3
    shards = [DeviceBatches(images, grades, POLICY, torch.device("cpu"), batch_size=2, rank=r, world=2) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(3)
    per_rank = [torch.cat([idx for _, _, idx in shard]) for shard in shards]
    assert len(shards[0]) == len(shards[1]) == 2  # equal step counts, or DDP's all-reduce hangs
    assert set(per_rank[0].tolist()).isdisjoint(per_rank[1].tolist())
    x, y, idx = next(iter(shards[0]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(y, torch.as_tensor(grades[idx.numpy()]))
    # normalised with the policy: (v - 0.5) / 0.25 for v in [0, 1]
    assert x.min() >= -2.0 and x.max() <= 2.0


def test_device_batches_augment_then_normalise_with_the_policy():
    images = np.random.default_rng(1).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    batches = DeviceBatches(images, np.zeros(3), POLICY, torch.device("cpu"), batch_size=3, drop_last=False)
    x, _, idx = next(iter(batches))
    raw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    # The same seeded draws, batch position by batch position, on the photos in the epoch's order.
    expected = (augment_batch(raw[idx], torch.Generator().manual_seed(0), geometric=True) - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("augment_on", ["device", "loader"])
def test_training_runs_with_either_augmentation_path_and_records_throughput(tmp_path, augment_on):
    cfg = TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=6, synthetic_size=64, input_size=64,
                      epochs=2, batch_size=8, val_every=2, augment_on=augment_on, cache_dir=str(tmp_path / "cache"),
                      out=str(tmp_path / augment_on))
    run = fit(cfg, progress=False)
    history = run.metrics["history"]
    assert [h["epoch"] for h in history] == [2]  # validated only at epoch 2 (val_every=2)
    assert history[0]["train_images_per_s"] > 0
    assert run.best_checkpoint.is_file()


def test_val_every_and_augment_on_are_validated():
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="val_every"):
        TrainConfig(val_every=0)
    with pytest.raises(ConfigError, match="augment_on"):
        TrainConfig(augment_on="gpu")



def test_sensor_noise_lands_on_the_8_bit_grid_with_a_per_photo_sigma():
    from training.data.device_batches import sensor_noise_batch

    flat = torch.full((64, 3, 32, 32), 100 / 255)
    noisy = sensor_noise_batch(flat, torch.Generator().manual_seed(0), max_levels=6.0)
    levels = noisy * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4) and noisy.min() >= 0 and noisy.max() <= 1
    sigma = (levels - 100).flatten(1).std(1)  # one sigma per photo, drawn in [0, 6] levels
    assert sigma.max() <= 6.5 and sigma.min() < 1.5 and sigma.max() > 4.5
    assert torch.equal(sensor_noise_batch(flat, torch.Generator().manual_seed(0), 0.0), flat.mul(255).round() / 255)


def test_sensor_noise_reaches_both_augmentation_paths_and_is_off_by_default():
    from edge_runtime.errors import ConfigError
    from training.data.dataset import FundusDataset

    images = np.full((4, 16, 16, 3), 120, np.uint8)
    batches = DeviceBatches(images, np.zeros(4), POLICY, torch.device("cpu"), batch_size=4, drop_last=False,
                            geometric=False, sensor_noise=8.0)
    x, _, _ = next(iter(batches))
    loader_x = torch.stack([FundusDataset(images, np.zeros(4), POLICY, train=True, geometric=False,
                                          sensor_noise=8.0)[i][0] for i in range(4)])
    for batch in (x, loader_x):
        pixels = (batch * 0.25 + 0.5) * 255  # undo the policy's normalisation
        assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # on the 8-bit grid, as a device's input is
        assert (pixels.flatten(2).std(2) > 0).all()  # the flat photos got noise (jitter alone keeps each channel flat)
    plain = DeviceBatches(images, np.zeros(4), POLICY, torch.device("cpu"), batch_size=4, drop_last=False, geometric=False)
    assert (next(iter(plain))[0].flatten(2).std(2) < 1e-6).all()
    assert TrainConfig().sensor_noise == 0.0
    with pytest.raises(ConfigError, match="sensor_noise"):
        TrainConfig(sensor_noise=-1)
