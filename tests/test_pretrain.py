"""Fundus pretraining: task heads and their masks, the backbone file `train --init-from` starts from, config guards, CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from edge_runtime.errors import ConfigError
from training.config import TrainConfig
from training.data.layouts import MISSING, read_dme
from training.data.synthetic import write_synthetic_dataset
from training.models import create_model
from training.pretrain import PretrainConfig, PretrainNet, multitask_loss, pretrain


def with_dme_column(folder: Path, blank_every: int = 0) -> Path:
    """Give a synthetic labels.csv a ``dme`` column: edema on grade >= 3 photos; the first cell (and every
    ``blank_every``-th) blank, i.e. unlabelled."""
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "dme"])
        writer.writeheader()
        for i, row in enumerate(rows):
            blank = i == 0 or (blank_every and i % blank_every == 0)
            writer.writerow({**row, "dme": "" if blank else str(int(int(row["grade"]) >= 3))})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two small labelled folders: ``plain`` without DME labels, ``dme`` with them."""
    root = tmp_path_factory.mktemp("pretrain_data")
    plain = write_synthetic_dataset(root / "plain", n_per_grade=6, size=96, seed=1)
    dme = with_dme_column(write_synthetic_dataset(root / "dme", n_per_grade=6, size=96, seed=2))
    return Path(plain), Path(dme)


@pytest.fixture(scope="module")
def backbone(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_run")
    cfg = PretrainConfig(model="test_dr_tiny", data=tuple(str(f) for f in folders), input_size=48, epochs=2,
                         batch_size=8, device="cpu", out=str(out), cache_dir=str(out / "cache"))
    return pretrain(cfg, progress=False)


def test_read_dme_takes_the_column_and_leaves_blank_cells_unlabelled(folders):
    plain, dme = folders
    assert read_dme(plain) == {}
    labels = read_dme(dme)
    assert len(labels) == 29 and set(labels.values()) == {0, 1}  # 30 photos, the blank one left out


def test_heads_see_pooled_features_and_a_missing_label_adds_no_loss():
    torch.manual_seed(0)
    net = PretrainNet(create_model("test_dr_tiny")).eval()
    out = net(torch.randn(4, 3, 48, 48))
    assert out["grade"].shape == (4, 5) and out["abnormal"].shape == (4,) and out["dme"].shape == (4,)
    grade = torch.tensor([0, 1, 3, 4])
    # A batch from a folder without DME labels: the DME head gets neither loss nor gradient.
    losses = multitask_loss(out, grade, torch.full((4,), MISSING))
    assert losses["dme"].item() == 0.0
    losses["total"].backward()
    assert net.dme.weight.grad is None or not net.dme.weight.grad.any()
    # The same photos labelled "no edema" do train the DME head: the mask, not luck, made the 0 above.
    net.zero_grad()
    out = net(torch.randn(4, 3, 48, 48))
    labelled = multitask_loss(out, grade, torch.zeros(4, dtype=torch.long))
    assert labelled["dme"].item() > 0
    labelled["total"].backward()
    assert net.dme.weight.grad.abs().sum() > 0
    # Only the labelled rows count: one labelled row gives that row's loss, not a quarter of it.
    dme = torch.tensor([1, MISSING, MISSING, MISSING])
    one = multitask_loss(out, grade, dme)["dme"]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out["dme"][:1], torch.ones(1))
    assert torch.allclose(one, expected)
    # Abnormal is grade >= 1 and skips photos without a grade.
    ungraded = multitask_loss(out, torch.full((4,), MISSING), torch.full((4,), MISSING))
    assert ungraded["abnormal"].item() == 0.0 and ungraded["grade"].item() == 0.0


def test_pretrain_writes_a_timm_keyed_backbone_and_a_sidecar(backbone, folders):
    state = torch.load(backbone, map_location="cpu", weights_only=True)
    expected = create_model("test_dr_tiny").backbone.state_dict()
    assert state.keys() == expected.keys()
    sidecar = json.loads(backbone.with_suffix(".json").read_text())
    assert sidecar["model"] == "test_dr_tiny" and sidecar["self_supervised"] is None
    assert [d["dme_labels"] for d in sidecar["data"]] == [False, True]
    assert {"grade_qwk", "abnormal_auc", "dme_auc", "n_dme"} <= set(sidecar["val"])
    assert sidecar["val"]["n_dme"] > 0 and len(sidecar["history"]) >= 1
    # Only train photos trained: the run's train set is the folders' train split, val is reported apart.
    assert all(d["n_train"] > 0 and d["n_val"] > 0 for d in sidecar["data"])


def test_train_init_from_starts_from_exactly_the_pretrained_backbone(backbone, folders, tmp_path, monkeypatch):
    from training import train as train_module

    state = torch.load(backbone, map_location="cpu", weights_only=True)
    built = []
    real = train_module.create_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.backbone.state_dict().items()})
        return model

    monkeypatch.setattr(train_module, "create_model", spy)
    cfg = TrainConfig(model="test_dr_tiny", data=(str(folders[0]),), init_from=str(backbone), input_size=48, epochs=1,
                      batch_size=16, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    result = train_module.fit(cfg, progress=False)
    for key in ("conv_stem.weight", "bn1.running_mean"):
        assert torch.equal(built[0][key], state[key])
    assert result.metrics["backbone_init"] == "fundus"
    meta = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["meta"]
    assert meta["config"]["init_from"] == str(backbone) and meta["metrics"]["backbone_init"] == "fundus"


def test_init_from_is_exclusive_with_pretrained_file_and_must_exist(backbone, tmp_path):
    with pytest.raises(ConfigError, match="keep one"):
        TrainConfig(init_from=str(backbone), pretrained_file=str(backbone))
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig(init_from=str(tmp_path / "missing.pt"))
    assert TrainConfig(init_from=str(backbone)).backbone_init == "fundus"
    assert TrainConfig().backbone_init == "imagenet" and TrainConfig(pretrained=False).backbone_init == "random"


def test_a_backbone_of_another_model_is_refused(backbone, tmp_path):
    from training import train as train_module

    cfg = TrainConfig(model="tf_efficientnet_lite0", init_from=str(backbone), input_size=48, epochs=1,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="size mismatch"):  # pretrained_file's strict load; the CLI reports it
        train_module.create_model(cfg.model, pretrained=cfg.pretrained, pretrained_file=cfg.init_from)


@pytest.mark.parametrize("bad", [dict(data=()), dict(train_splits=("train", "val")), dict(train_splits=("test",)),
                                 dict(epochs=0), dict(lr=2.0), dict(task_weights=(0, 0, 0)), dict(model="nope")])
def test_pretrain_config_rejects(bad):
    with pytest.raises(ConfigError):
        PretrainConfig(**{"data": ("somewhere",), **bad})


def test_cli_pretrain_passes_flags_and_train_takes_init_from(monkeypatch, tmp_path, backbone):
    from typer.testing import CliRunner

    from retinaedge.cli import app
    from training import pretrain as pretrain_module
    from training import train as train_module

    captured = {}

    def fake_pretrain(cfg, progress=True):
        captured["cfg"] = cfg
        return backbone

    monkeypatch.setattr(pretrain_module, "pretrain", fake_pretrain)
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_dr_tiny", "--data", "a", "--data", "b",
                                      "--epochs", "3", "--input-size", "64", "--no-pretrained", "--max-minutes", "2",
                                      "--out", str(tmp_path / "p"), "--verbose"])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert (cfg.data, cfg.epochs, cfg.input_size, cfg.pretrained, cfg.max_minutes) == (("a", "b"), 3, 64, False, 2.0)
    assert "--init-from" in result.output

    def fake_fit(cfg, progress=True):
        captured["train"] = cfg
        return train_module.RunResult(tmp_path, tmp_path / "best.pt", {})

    monkeypatch.setattr(train_module, "fit", fake_fit)
    result = CliRunner().invoke(app, ["train", "--model", "test_dr_tiny", "--init-from", str(backbone),
                                      "--out", str(tmp_path / "t"), "--verbose"])
    assert result.exit_code == 0, result.output
    assert captured["train"].init_from == str(backbone)
    result = CliRunner().invoke(app, ["train", "--init-from", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "init_from backbone" in result.output
