"""CAM-guided augmentation: crop and erase views, batch doubling, refresh schedule, config, a tiny fit."""
import numpy as np
import pytest
import torch

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ConfigError
from training.cam_augment import CamAugmenter, cam_crop, cam_erase, grade_cams
from training.config import TrainConfig
from training.train import fit

SIDE = 32
POLICY = PreprocessPolicy(input_size=SIDE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _column_ramp(n: int = 1) -> torch.Tensor:
    """Pixel value = its column index (channel 0) and row index (channel 1): bilinear sampling reproduces a
    linear ramp exactly, so a crop's sampled coordinates can be read off its pixels."""
    cols = torch.arange(SIDE, dtype=torch.float32).expand(SIDE, SIDE)
    return torch.stack([cols, cols.T, torch.zeros_like(cols)]).expand(n, -1, -1, -1).contiguous()


def test_crop_is_centred_on_the_cam_peak():
    cam = torch.zeros(1, 4, 4)
    cam[0, 1, 2] = 1.0  # row 1, column 2: centre at (x, y) = (2.5, 1.5) cells = (19.5, 11.5) pixels of 32
    out = cam_crop(_column_ramp(), cam, torch.tensor([0.5]))
    assert out[0, 0].mean().item() == pytest.approx(19.5, abs=1e-4)
    assert out[0, 1].mean().item() == pytest.approx(11.5, abs=1e-4)
    # half the side, resized back to 32: neighbouring output pixels are half a source pixel apart
    assert torch.allclose(out[0, 0, 5, 1:] - out[0, 0, 5, :-1], torch.full((SIDE - 1,), 0.5), atol=1e-4)


def test_crop_near_the_edge_stays_inside_the_image():
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = 1.0  # top-left cell: the 0.5 crop is moved in to the image's top-left quarter-to-half
    out = cam_crop(_column_ramp(), cam, torch.tensor([0.5]))
    # the crop is source pixels 0 .. 15 (its first output column samples -0.25, which border padding reads as 0)
    assert out[0, 0].mean().item() == pytest.approx(7.5, abs=0.01)
    assert out[0, 0].min().item() == pytest.approx(0.0) and out[0, 0].max().item() == pytest.approx(15.25)


def test_erase_keeps_the_high_cam_region_and_damps_the_rest():
    x = torch.full((1, 3, SIDE, SIDE), 0.8)
    cam = torch.zeros(1, 4, 4)
    cam[0, :2, :2] = 1.0  # top-left quarter of the photo
    fill = torch.full((1, 3, 1, 1), 0.5)
    out = cam_erase(x, cam, floor=0.3, fill=fill)
    # bilinear upsampling of 8-pixel cells: the mask is exactly 1 up to pixel 11 and exactly 0 from pixel 20
    assert torch.allclose(out[:, :, :12, :12], torch.tensor(0.8))
    assert torch.allclose(out[:, :, 20:, 20:], torch.tensor(0.5 + 0.3 * 0.3))
    assert torch.allclose(out[:, :, 20:, :12], torch.tensor(0.59))


def test_grade_cams_pick_the_label_or_the_prediction_then_relu_and_scale():
    cams = np.zeros((2, 5, 2, 2), np.float32)
    cams[0, 3] = [[2.0, -1.0], [0.5, 1.0]]
    cams[1, 1] = [[4.0, 0.0], [0.0, -3.0]]
    logits = np.zeros((2, 5), np.float32)
    logits[1, 1] = 5.0  # row 1 is unlabelled: its predicted grade (1) chooses the map
    out = grade_cams(logits, cams, np.array([3, -1]))
    assert torch.allclose(out[0], torch.tensor([[1.0, 0.0], [0.25, 0.5]]))
    assert torch.allclose(out[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def _augmenter(mode: str, n: int = 6, **kwargs) -> CamAugmenter:
    images = np.random.default_rng(0).integers(0, 255, (n, SIDE, SIDE, 3), dtype=np.uint8)
    cfg = TrainConfig(cam_augment=mode, batch_size=4, **kwargs)
    return CamAugmenter(cfg, images, np.arange(n) % 5, POLICY, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["crop", "erase", "both"])
def test_extend_doubles_the_batch_with_matching_labels_and_indices(mode):
    aug = _augmenter(mode)
    aug.set_cams(np.zeros((6, 5), np.float32), np.random.default_rng(1).random((6, 5, 4, 4)).astype(np.float32))
    x, y, idx = torch.randn(3, 3, SIDE, SIDE), torch.tensor([0, 4, -1]), torch.tensor([5, 0, 2])
    x2, y2, idx2 = aug.extend(x, y, idx)
    assert x2.shape == (6, 3, SIDE, SIDE) and torch.equal(x2[:3], x)
    assert y2.tolist() == [0, 4, -1, 0, 4, -1] and idx2.tolist() == [5, 0, 2, 5, 0, 2]
    assert torch.isfinite(x2).all()
    assert not torch.allclose(x2[3:], x)  # the views are new pixels


def test_self_cams_refresh_after_epoch_one_then_every_n():
    aug = _augmenter("both", cam_augment_every=2)
    refreshed = []
    for epoch in range(7):
        if aug.due(epoch):
            refreshed.append(epoch)
            aug.set_cams(np.zeros((6, 5), np.float32), np.ones((6, 5, 2, 2), np.float32))
    assert refreshed == [1, 3, 5] and aug.refreshes == 3
    teacher = _augmenter("crop", cam_augment_source="teacher", cam_augment_teacher="t.pt")
    assert not any(teacher.due(e) for e in range(5))  # a teacher's CAMs are computed once, at set-up


def test_config_validates_cam_augment_options():
    with pytest.raises(ConfigError, match="cam_augment must be"):
        TrainConfig(cam_augment="zoom")
    with pytest.raises(ConfigError, match="cam_augment_teacher"):
        TrainConfig(cam_augment="crop", cam_augment_source="teacher")
    with pytest.raises(ConfigError, match="cam_augment_source"):
        TrainConfig(cam_augment="crop", cam_augment_teacher="t.pt")
    with pytest.raises(ConfigError, match="cam_augment_every"):
        TrainConfig(cam_augment_every=0)
    with pytest.raises(ConfigError, match="cam_crop_scale"):
        TrainConfig(cam_crop_scale=(0.9, 0.5))
    with pytest.raises(ConfigError, match="cam_crop_scale"):
        TrainConfig(cam_crop_scale=(0.1, 0.5))
    with pytest.raises(ConfigError, match="cam_erase_floor"):
        TrainConfig(cam_erase_floor=1.0)
    with pytest.raises(ConfigError, match="cam_weight"):
        TrainConfig(cam_augment="both", cam_weight=0.5)
    assert TrainConfig(cam_crop_scale=[0.6, 0.7]).cam_crop_scale == (0.6, 0.7)  # a YAML list


def test_tiny_fit_with_cam_augment_both_refreshes_and_trains(tmp_path, monkeypatch):
    calls = []
    original = CamAugmenter.refresh

    def counting(self, model, amp=False):
        calls.append(self.cams is None)
        original(self, model, amp)

    monkeypatch.setattr(CamAugmenter, "refresh", counting)
    extended = []
    original_extend = CamAugmenter.extend
    monkeypatch.setattr(CamAugmenter, "extend", lambda self, x, y, idx: extended.append(len(y)) or
                        original_extend(self, x, y, idx))
    cfg = TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=6, synthetic_size=64, input_size=64,
                      epochs=4, batch_size=8, val_every=4, cam_augment="both", cam_augment_every=2,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    run = fit(cfg, progress=False)
    assert calls == [True, False]  # before epochs 2 and 4 (1-based): after epoch 1, then every 2
    assert extended and all(n <= 8 for n in extended)  # epochs 2-4 only, one view per photo
    assert run.best_checkpoint.is_file() and np.isfinite(run.metrics["history"][-1]["train_loss"])
