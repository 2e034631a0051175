"""Distillation: ensemble teachers on the training device, cached outputs, unlabelled photos, leak guards."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compression import distill as distill_module
from compression.distill import (
    Teacher,
    distill,
    distillation_photos,
    ensemble,
    load_teachers,
    model_outputs,
    teacher_targets,
)
from compression.errors import DistillationConfigError
from edge_runtime.errors import ConfigError
from training.config import TrainConfig, resolve_config
from training.data.dataset import cache_images
from training.data.layouts import UNLABELLED, Sample, select
from training.train import labelled_loss, load_samples

CPU = torch.device("cpu")


def _teacher_copy(source: Path, out: Path, temperature: float, input_size: int | None = None) -> Path:
    """A copy of a trained checkpoint with another calibration temperature (and input size: the tiny model is
    fully convolutional, so the same weights read 48-px photos)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint["meta"]["operating_point"]["temperature"] = temperature
    if input_size:
        checkpoint["meta"]["preprocess"]["input_size"] = input_size
    torch.save(checkpoint, out)
    return out


def _photo_folder(folder: Path, n: int, seed: int = 11) -> Path:
    """A flat folder of fundus photos with names no labelled photo has (no layout, no labels)."""
    import cv2

    from training.data.synthetic import generate_fundus

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"clinic_{i:03d}.png"), generate_fundus(i % 5, 96, rng).image)
    return folder


def _cfg(synthetic_dir, tmp_path, **kwargs) -> TrainConfig:
    values = dict(model="test_dr_tiny", data=(str(synthetic_dir),), pretrained=False, input_size=48, epochs=1,
                  batch_size=16, cam_weight=0.5, out=str(tmp_path / "student"), cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**{**values, **kwargs})


class _Calls:
    """Wraps training.train.predict as compression.distill sees it: counts forward passes and records devices."""

    def __init__(self, monkeypatch):
        self.devices: list[tuple[torch.device, torch.device]] = []
        real = distill_module.predict

        def spy(model, loader, device, with_cam=False):
            self.devices.append((device, next(model.parameters()).device))
            return real(model, loader, device, with_cam)

        monkeypatch.setattr(distill_module, "predict", spy)

    @property
    def count(self) -> int:
        return len(self.devices)


def test_ensemble_is_the_mean_of_calibrated_logits_and_cams_on_the_finest_grid():
    sharp = (np.array([[2.0, 4.0, 0.0, 0.0, 0.0]]), np.full((1, 5, 4, 4), 4.0))  # T = 2
    coarse = (np.array([[1.0, 0.0, 0.0, 0.0, 0.5]]), np.full((1, 5, 2, 2), 3.0))  # T = 0.5
    logits, cams = ensemble([sharp, coarse], [2.0, 0.5])
    # (z1 / 2 + z2 / 0.5) / 2 = ([1, 2, 0, 0, 0] + [2, 0, 0, 0, 1]) / 2
    np.testing.assert_allclose(logits, [[1.5, 1.0, 0.0, 0.0, 0.5]])
    assert cams.shape == (1, 5, 4, 4)  # the sharper member's grid
    np.testing.assert_allclose(cams, (4.0 / 2 + 3.0 / 0.5) / 2)


def test_two_tiny_teachers_give_mean_calibrated_logits_and_cached_outputs(tiny_run, synthetic_dir, tmp_path,
                                                                          monkeypatch):
    hot = _teacher_copy(tiny_run.best_checkpoint, tmp_path / "hot.pt", temperature=2.0)
    cold = _teacher_copy(tiny_run.best_checkpoint, tmp_path / "cold.pt", temperature=0.5)
    cfg = _cfg(synthetic_dir, tmp_path, teacher=(str(hot), str(cold)))
    photos = select(load_samples(cfg), "train")[:20]
    teachers = load_teachers(cfg.teacher)
    policy = teachers[0].meta.preprocess
    raw_logits, raw_cams = model_outputs(teachers[0].model, cache_images(photos, policy, None, False), policy, CPU, 8)

    calls = _Calls(monkeypatch)
    targets = teacher_targets(teachers, photos, cfg, CPU)
    assert calls.count == 2  # one pass per member
    # Same weights, T = 2 and 0.5: (z / 2 + z / 0.5) / 2 = 1.25 z
    np.testing.assert_allclose(targets["teacher_logits"], 1.25 * raw_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets["teacher_cam"], 1.25 * raw_cams, rtol=1e-5, atol=1e-5)

    again = teacher_targets(load_teachers(cfg.teacher), photos, cfg, CPU)
    assert calls.count == 2  # the second run reads the cache
    np.testing.assert_array_equal(again["teacher_logits"], targets["teacher_logits"])
    moved = Path(shutil.copy(hot, tmp_path / "moved.pt"))  # identity is the checkpoint's bytes, not its path
    teacher_targets([Teacher.load(moved)], photos, cfg, CPU)
    assert calls.count == 2
    small = _teacher_copy(tiny_run.best_checkpoint, tmp_path / "small.pt", temperature=2.0, input_size=40)
    teacher_targets([Teacher.load(small)], photos, cfg, CPU)  # another preprocessing policy: computed anew
    teacher_targets([Teacher.load(hot)], photos[:10], cfg, CPU)  # another photo list: computed anew
    assert calls.count == 4
    assert all(asked == held == CPU for asked, held in calls.devices)


def test_unlabelled_rows_have_no_cross_entropy_term():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 2, 4, 1, UNLABELLED, UNLABELLED, 3, UNLABELLED])
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0, 1.0])
    rows = target != UNLABELLED
    expected = F.cross_entropy(logits[rows], target[rows], weight=weight)
    torch.testing.assert_close(labelled_loss(logits, target, weight), expected)
    alone = labelled_loss(logits, torch.full((8,), UNLABELLED), weight)
    alone.backward()
    assert float(alone.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0  # a batch of unlabelled photos: 0, no NaN
    log_p = F.log_softmax(logits[rows], 1).gather(1, target[rows][:, None]).squeeze(1)
    focal = ((1 - log_p.exp()) ** 2 * -log_p * weight[target[rows]]).mean()
    torch.testing.assert_close(labelled_loss(logits, target, weight, focal_gamma=2.0), focal)


def test_unlabelled_photos_train_without_their_labels(synthetic_dir, tmp_path, monkeypatch):
    """The unlabelled photos carry a fake grade 4: if fit used it, CE and the class weights would see it."""
    from training import train as train_module
    from training.train import class_weights, fit

    extra = [Sample(p, 4, p.stem) for p in sorted(_photo_folder(tmp_path / "clinic", 12).iterdir())]
    cfg = _cfg(synthetic_dir, tmp_path)
    labelled = select(load_samples(cfg), cfg.train_splits)
    weighted_on: list[np.ndarray] = []
    monkeypatch.setattr(train_module, "class_weights", lambda grades: weighted_on.append(grades) or class_weights(grades))
    seen: list[tuple] = []

    def spy_loss(logits, cam, y, ce_loss, batch_extra, x):
        seen.append((logits.detach(), y.clone(), float(ce_loss.detach()), batch_extra["row"].clone()))
        return ce_loss + 0.0 * cam.sum()

    rows = np.arange(len(labelled) + len(extra))
    fit(cfg, extra_loss=spy_loss, extra_targets={"row": rows}, progress=False, unlabelled=extra)
    assert len(weighted_on) == 1 and len(weighted_on[0]) == len(labelled) and (weighted_on[0] >= 0).all()
    weight = class_weights(np.array([s.grade for s in labelled]))
    unlabelled_rows = 0
    for logits, y, ce, row in seen:
        assert ((y == UNLABELLED) == (row >= len(labelled))).all()  # the appended rows, and only they
        mask = y != UNLABELLED
        unlabelled_rows += int((~mask).sum())
        expected = F.cross_entropy(logits[mask], y[mask], weight=weight) if mask.any() else torch.tensor(0.0)
        assert ce == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert unlabelled_rows > 0


def test_ensemble_distillation_on_the_training_device_with_unlabelled_photos(tiny_run, synthetic_dir, tmp_path,
                                                                              monkeypatch):
    from training.models import load_checkpoint

    big = _teacher_copy(tiny_run.best_checkpoint, tmp_path / "big.pt", temperature=1.5)
    small = _teacher_copy(tiny_run.best_checkpoint, tmp_path / "small.pt", temperature=0.8, input_size=40)
    clinic = _photo_folder(tmp_path / "clinic", 6)
    cfg = _cfg(synthetic_dir, tmp_path, teacher=(str(big), str(small)), unlabelled=(str(clinic),), device="cpu")
    asked: list[str] = []
    real_resolve = distill_module.resolve_device
    monkeypatch.setattr(distill_module, "resolve_device", lambda name: asked.append(name) or real_resolve(name))
    calls = _Calls(monkeypatch)

    run, report = distill(cfg, progress=False)

    assert asked and set(asked) == {"cpu"}
    assert calls.count >= 5 and all(device == held == CPU for device, held in calls.devices)
    samples = load_samples(cfg)
    n_calib = len(select(samples, "calib"))
    assert report["photos"]["unlabelled_sources"] == {"calib split": n_calib, str(clinic): 6}
    assert report["photos"]["labelled"] == len(select(samples, "train"))
    assert [m["temperature"] for m in report["teachers"]] == [1.5, 0.8]
    assert {m["input_size"] for m in report["teachers"]} == {64, 40}
    assert set(report) >= {"student", "teacher", "teachers", "agreement", "cam_correlation", "device"}
    assert -1 <= report["cam_correlation"] <= 1 and 0 <= report["agreement"] <= 1
    assert (run.out_dir / "distill_report.json").is_file()
    meta = load_checkpoint(run.best_checkpoint)[1]
    assert [t["sha256"] for t in meta.distillation["teachers"]] == [distill_module.file_digest(p) for p in (big, small)]
    assert meta.distillation["photos"]["unlabelled"] == n_calib + 6


def test_val_and_test_photos_never_join_the_unlabelled_photos(synthetic_dir, tmp_path):
    cfg = TrainConfig(data=(str(synthetic_dir),), teacher=("t.pt",), cache_dir=str(tmp_path / "cache"))
    samples = load_samples(cfg)
    held_out = select(samples, ("val", "test"))
    for overlapping in (synthetic_dir, synthetic_dir / "images"):  # the folder itself, or one inside it
        with pytest.raises(DistillationConfigError, match="overlaps the labelled data folder"):
            distillation_photos(TrainConfig(data=cfg.data, teacher=("t.pt",), unlabelled=(str(overlapping),)), samples)

    folder = _photo_folder(tmp_path / "mixed", 3)
    shutil.copy(held_out[0].path, folder / "renamed_copy.png")  # same bytes, new name
    shutil.copy(folder / "clinic_000.png", folder / f"{held_out[1].path.stem}.png")  # a held-out photo's name
    photos = distillation_photos(TrainConfig(data=cfg.data, teacher=("t.pt",), unlabelled=(str(folder),)), samples)
    assert sorted(s.path.name for s in photos.unlabelled if s.path.parent == folder) == [
        "clinic_000.png", "clinic_001.png", "clinic_002.png"]
    assert photos.excluded == {"same bytes": 1, "same file name": 1}
    assert {s.split for s in photos.unlabelled} == {"calib", None}  # the calib split, and the folder's photos
    assert all(s.grade == UNLABELLED for s in photos.unlabelled if s.split is None)

    judged_on_calib = TrainConfig(data=cfg.data, teacher=("t.pt",), val_split="calib")
    assert distillation_photos(judged_on_calib, samples).unlabelled == []  # calib photos judge this run: left out
    assert distillation_photos(TrainConfig(data=cfg.data, teacher=("t.pt",), distill_on_calib=False),
                               samples).unlabelled == []


@pytest.mark.realdata
def test_a_reprocessed_copy_of_the_labelled_data_leaks_no_val_test_patient(shared_data):
    """eyepacs_256 holds re-processed copies of eyepacs_full photos (other bytes): patients are what match."""
    cfg = TrainConfig(data=(str(shared_data / "eyepacs_full"),), teacher=("t.pt",),
                      unlabelled=(str(shared_data / "eyepacs_256"),))
    samples = load_samples(cfg)
    photos = distillation_photos(cfg, samples)
    held_out = {s.patient for s in select(samples, ("val", "test"))}
    assert photos.unlabelled and not {s.patient for s in photos.unlabelled} & held_out
    assert sum(photos.excluded.values()) > 0


def test_distillation_config_is_checked_before_any_work(tmp_path):
    assert TrainConfig(teacher="a.pt").teacher == ("a.pt",)  # a single path, as for data
    assert TrainConfig(teacher=None).teacher == ()
    config = tmp_path / "distill.yaml"
    config.write_text("teacher: [a.pt, b.pt]\nunlabelled: clinic\ndistill_on_calib: false\n")
    cfg = resolve_config(TrainConfig, config)
    assert (cfg.teacher, cfg.unlabelled, cfg.distill_on_calib) == (("a.pt", "b.pt"), ("clinic",), False)
    assert cfg.teacher_batch == 4 * cfg.batch_size
    with pytest.raises(ConfigError, match="more than once"):
        TrainConfig(teacher=("a.pt", "a.pt"))
    with pytest.raises(ConfigError, match="need a teacher"):
        TrainConfig(unlabelled=("clinic",))
    with pytest.raises(ConfigError, match="teacher_batch_size"):
        TrainConfig(teacher_batch_size=0)
    with pytest.raises(DistillationConfigError, match="at least one teacher"):
        distill(TrainConfig(out=str(tmp_path / "none")), progress=False)
    with pytest.raises(DistillationConfigError, match="missing.pt not found"):
        distill(TrainConfig(teacher=(str(tmp_path / "missing.pt"),), out=str(tmp_path / "none")), progress=False)
    assert not (tmp_path / "none").exists()  # nothing was trained or written


def test_cli_distill_takes_repeated_teachers_and_unlabelled_folders(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from retinaedge.cli import app

    captured = {}
    metrics = {"qwk": 0.5, "referable_sensitivity": 0.9, "referable_specificity": 0.8, "referable_auc": 0.85}

    def fake_distill(cfg, progress=True):
        captured["cfg"] = cfg
        members = [{"model": "m", "temperature": 1.0, "checkpoint": t, **metrics} for t in cfg.teacher]
        report = {"split": "test", "n": 3, "student": metrics, "teacher": metrics, "teachers": members,
                  "agreement": 1.0, "cam_correlation": 0.5, "device": "cpu",
                  "photos": {"labelled": 2, "unlabelled": 1, "unlabelled_sources": {"u": 1}}}
        return None, report

    monkeypatch.setattr(distill_module, "distill", fake_distill)
    result = CliRunner().invoke(app, ["distill", "--teacher", "a.pt", "--teacher", "b.pt", "--unlabelled", "u1",
                                      "--unlabelled", "u2", "--no-distill-on-calib", "--out", str(tmp_path / "o"),
                                      "--grade-head", "ordinal", "--verbose"])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert (cfg.teacher, cfg.unlabelled, cfg.distill_on_calib) == (("a.pt", "b.pt"), ("u1", "u2"), False)
    assert cfg.grade_head == "ordinal"
    assert "ensemble" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_outputs_and_distillation_on_cuda(tiny_run, synthetic_dir, tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    cfg = _cfg(synthetic_dir, tmp_path, teacher=(str(tiny_run.best_checkpoint),), device="cuda")
    photos = select(load_samples(cfg), "train")[:32]
    teacher = Teacher.load(tiny_run.best_checkpoint)
    on_gpu, on_cpu = teacher.outputs(photos, cfg, cuda), teacher.outputs(photos, cfg, CPU)  # bf16 vs fp32 caches
    assert next(teacher.model.parameters()).device == CPU  # device memory given back to the student
    scale = float(np.abs(on_cpu[0]).max())
    np.testing.assert_allclose(on_gpu[0], on_cpu[0], atol=0.05 * scale)
    calls = _Calls(monkeypatch)
    run, report = distill(cfg, progress=False)
    assert report["device"] == "cuda" and calls.count >= 3
    assert all(asked.type == held.type == "cuda" for asked, held in calls.devices)


def test_an_ensembles_referral_point_leaves_out_val_photos_without_a_grade(tmp_path):
    """A folder with DME-only rows (no grade) in its val split: the ensemble's point is chosen on the graded photos
    alone, the same point as on those photos without the ungraded ones."""
    from compression.distill import _ensemble_point
    from training.data.layouts import MISSING, Sample

    rng = np.random.default_rng(0)
    grades = [0, 0, 1, 2, 3, 4] * 10
    graded = [Sample(tmp_path / f"g{i}.jpg", g, f"p{i}", "val", source="a") for i, g in enumerate(grades)]
    ungraded = [Sample(tmp_path / f"u{i}.jpg", MISSING, f"q{i}", "val", source="b") for i in range(12)]
    for sample in graded + ungraded:  # the point's fingerprint reads the files
        sample.path.write_bytes(sample.path.name.encode())

    class Member:
        temperature = 1.0

        def __init__(self, shift: float) -> None:
            self.shift = shift

        def outputs(self, samples, cfg, device):
            logits = np.stack([np.eye(5)[max(s.grade, 0)] * 2 + self.shift for s in samples]).astype(np.float32)
            logits += rng.normal(0, 0.5, logits.shape).astype(np.float32)
            return logits, np.zeros((len(samples), 5, 2, 2), np.float32)

    cfg = TrainConfig(model="test_dr_tiny", pretrained=False)
    point = _ensemble_point([Member(0.0), Member(0.1)], graded + ungraded, cfg, torch.device("cpu"))
    assert point.n_positive == sum(g >= 2 for g in grades) and point.n_negative == sum(g < 2 for g in grades)
