import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_runtime.errors import ConfigError
from training.config import TrainConfig, resolve_config
from training.metrics import quadratic_weighted_kappa, roc_auc, screening_metrics


def test_layering_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 3, "lr": 0.01}))
    cfg = resolve_config(TrainConfig, path, {"lr": 0.02, "batch_size": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.02, TrainConfig().batch_size)


def test_unknown_keys_suggest_close_matches(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean.*epochs"):
        resolve_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="hinge")


def test_metrics_known_values():
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0
    assert quadratic_weighted_kappa([0, 0, 4, 4], [4, 4, 0, 0]) < 0
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    m = screening_metrics([0, 2, 3], [[0.9, 0.1, 0, 0, 0], [0.1, 0.1, 0.8, 0, 0], [0.6, 0.1, 0.1, 0.1, 0.1]])
    assert m["referable_sensitivity"] == 0.5 and m["referable_specificity"] == 1.0


def test_training_writes_checkpoint_metadata_and_reports(tiny_run):
    import torch

    out = tiny_run.out_dir
    for name in ("best.pt", "last.pt", "metrics.json", "config.yaml", "confusion_val.png"):
        assert (out / name).is_file(), name
    meta = torch.load(tiny_run.best_checkpoint, weights_only=False)["meta"]
    for key in ("model_name", "input_size", "preprocess", "class_names", "metrics", "data_fingerprint", "created_at"):
        assert key in meta
    assert set(tiny_run.metrics["val"]) >= {"qwk", "per_grade_recall", "referable_auc", "confusion_matrix"}
    assert tiny_run.metrics["device"] == "cpu"  # resolved from the config's "auto"


def test_resume_continues_from_last(tmp_path, synthetic_dir):
    from training.train import fit

    base = dict(model="test_dr_tiny", data=(str(synthetic_dir),), pretrained=False, input_size=48, batch_size=16,
                out=str(tmp_path), cache_dir=str(tmp_path / "cache"), patience=10)
    fit(TrainConfig(epochs=1, **base), progress=False)
    resumed = fit(TrainConfig(epochs=2, resume=True, **base), progress=False)
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]


@pytest.mark.slow  # two torchrun ranks start torch twice: ~40 s
def test_torchrun_two_cpu_processes(tmp_path, synthetic_dir):
    """DDP with the gloo backend: two CPU ranks train one model on tiny data."""
    from .faults import free_port

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "retinaedge.cli", "train", "--model", "test_dr_tiny", "--data", str(synthetic_dir), "--no-pretrained",
           "--input-size", "48", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()


def test_training_chooses_the_operating_point_on_val_and_evaluate_reports_it(tiny_run, synthetic_dir, tmp_path):
    """The checkpoint records a val-chosen point; re-deciding the val photos at it reproduces its recorded numbers."""
    import torch

    from training.checkpoint import CheckpointMeta
    from training.evaluate import choose_point_for_checkpoint, evaluate

    meta = torch.load(tiny_run.best_checkpoint, weights_only=False)["meta"]
    point = CheckpointMeta.from_dict(meta).operating_point
    assert point.rule == "sensitivity" and point.target == 0.90 and point.n_positive > 0
    val = tiny_run.metrics["val"]
    assert val["referable_threshold"] == point.threshold
    assert val["referable_sensitivity"] == point.sensitivity >= 0.90
    assert val["n_positive"] == point.n_positive

    metrics = evaluate(tiny_run.best_checkpoint, synthetic_dir, "val", cache_dir=str(tmp_path / "c"), out=tmp_path)
    assert metrics["referable_sensitivity"] == point.sensitivity
    assert Path(metrics["roc_png"]).stat().st_size > 1000
    low, high = metrics["referable_auc_ci"]
    assert low <= metrics["referable_auc"] <= high

    copy = tmp_path / "best.pt"
    copy.write_bytes(tiny_run.best_checkpoint.read_bytes())
    youden, dme_point = choose_point_for_checkpoint(copy, [synthetic_dir], "val", rule="youden",
                                                    cache_dir=str(tmp_path / "c"))
    assert youden.rule == "youden" and youden.target is None and dme_point is None  # no DME head
    assert CheckpointMeta.from_dict(torch.load(copy, weights_only=False)["meta"]).operating_point == youden
    # Per folder: two cameras with the same photos weigh alike, so the folder-weighted threshold is the pooled one.
    import shutil

    twin = tmp_path / "twin_camera"
    shutil.copytree(synthetic_dir, twin)
    pooled, _ = choose_point_for_checkpoint(copy, [synthetic_dir], "val", cache_dir=str(tmp_path / "c"))
    weighted, _ = choose_point_for_checkpoint(copy, [synthetic_dir, twin], "val", cache_dir=str(tmp_path / "c"),
                                              per_folder=True)
    assert weighted.threshold == pytest.approx(pooled.threshold) and weighted.n_positive == 2 * pooled.n_positive


def test_checkpoint_metadata_is_a_validated_record():
    from edge_runtime.contract import PreprocessPolicy
    from training.checkpoint import CheckpointMeta
    from training.errors import CheckpointError

    meta = CheckpointMeta("tf_efficientnet_lite0", PreprocessPolicy(input_size=224), data_fingerprint="1a2b3c4d5e")
    again = CheckpointMeta.from_dict(meta.to_dict())
    assert again == meta and again.input_size == 224 and again.model_version("int8") == "tf_efficientnet_lite0-1a2b3c4d-int8"
    old = CheckpointMeta.from_dict({"model_name": "m", "preprocess": {"input_size": 64}, "referable_threshold": 0.3})
    assert old.operating_point.threshold == 0.3 and not old.operating_point.chosen_on_data
    with pytest.raises(CheckpointError, match="unknown meta field.*'bogus'"):
        CheckpointMeta.from_dict({**meta.to_dict(), "bogus": 1})
    with pytest.raises(CheckpointError, match="no 'preprocess'"):
        CheckpointMeta.from_dict({"model_name": "m"})
    with pytest.raises(CheckpointError, match="threshold"):
        CheckpointMeta.from_dict({**meta.to_dict(), "operating_point": {"threshold": 2.0}})


SHIPPED_TRAIN_CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "training" / "configs").glob("*.yaml")
                               if p.name != "demo.yaml")  # demo.yaml holds DemoPlan sizes, not a TrainConfig


@pytest.mark.parametrize("path", SHIPPED_TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_configs_resolve_to_registered_models(path):
    from training.models import get_model_cfg

    cfg = resolve_config(TrainConfig, path)  # unknown keys and invalid values raise ConfigError
    assert get_model_cfg(cfg.model).name == cfg.model
    assert all(folder.startswith("../shared/data/") for folder in cfg.data), cfg.data


STUDY18_CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs" / "study18").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDY18_CONFIGS, ids=lambda p: p.name)
def test_study18_configs_resolve(path, tmp_path):
    """The YAMLs of docs/studies/2026-11-25_heads_camaug_init.md: pre_*.yaml are PretrainConfigs; a
    fine-tuning run's init_from names the backbone a pretraining YAML of the same folder writes (stood in for
    here, since it exists only after that run)."""
    from training.models import get_model_cfg
    from training.pretrain import PretrainConfig

    if path.name.startswith("pre_"):
        cfg = resolve_config(PretrainConfig, path)
    else:
        init_from = (yaml.safe_load(path.read_text()) or {}).get("init_from")
        overrides = {}
        if init_from:
            pretrain = Path(init_from).parent.name
            assert (path.parent / f"{pretrain}.yaml").is_file(), f"{init_from} is written by no {pretrain}.yaml"
            overrides["init_from"] = str(tmp_path / "backbone.pt")
            (tmp_path / "backbone.pt").write_bytes(b"")
        cfg = resolve_config(TrainConfig, path, overrides)
    assert get_model_cfg(cfg.model).name == cfg.model
    assert all(folder.startswith("../shared/data/") for folder in cfg.data), cfg.data


def test_distill_cli_takes_a_local_imagenet_file(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import compression.distill as distill_module
    from retinaedge.cli import app

    captured = {}

    def fake_distill(cfg, progress=True):
        captured["cfg"] = cfg
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(distill_module, "distill", fake_distill)
    CliRunner().invoke(app, ["distill", "--teacher", "t.pt", "--pretrained-file", "w.pth", "--out", str(tmp_path)])
    assert captured["cfg"].pretrained_file == "w.pth"


def test_cli_set_reaches_every_config_key_as_its_yaml_value():
    from edge_runtime.errors import ConfigError
    from retinaedge.cli._common import yaml_overrides
    from training.config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig, None, yaml_overrides(["label_smoothing=0.1", "data=[a, b]", "ema_decay=0.999"]))
    assert cfg.label_smoothing == 0.1 and cfg.data == ("a", "b") and cfg.ema_decay == 0.999
    with pytest.raises(ConfigError, match="label_smooth"):  # an unknown key is named, never dropped
        resolve_config(TrainConfig, None, yaml_overrides(["label_smooth=0.1"]))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        yaml_overrides(["label_smoothing"])
