"""Regularisation options of the training recipe: label smoothing, EMA of the weights, stochastic depth."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from edge_runtime.errors import ConfigError
from training.config import TrainConfig
from training.data.layouts import UNLABELLED
from training.train import labelled_loss


def _tiny_cfg(tmp_path, **overrides) -> TrainConfig:
    """test_dr_tiny on 30 synthetic photos: a fit takes a few seconds on a CPU."""
    return TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=6, synthetic_size=64, input_size=48,
                       batch_size=8, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), **overrides)


def test_label_smoothing_moves_the_loss_by_the_known_amount_and_ignores_unlabelled_rows():
    # Row 0: the grade-0 logit leads by 2; row 1 is uniform; row 2 has no grade and must add nothing.
    logits = torch.tensor([[2.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0], [9.0, -9, 3, 1, 0]], dtype=torch.float64)
    target = torch.tensor([0, 3, UNLABELLED])
    eps = 0.1
    nll_0 = math.log(math.exp(2) + 4) - 2
    spread_0 = math.log(math.exp(2) + 4) - 2 / 5  # mean over the grades of -log p_k
    by_hand = ((1 - eps) * nll_0 + eps * spread_0 + math.log(5)) / 2  # a uniform row costs log 5 either way
    smoothed = labelled_loss(logits, target, None, label_smoothing=eps)
    assert smoothed.item() == pytest.approx(by_hand, abs=1e-12)
    assert (smoothed - labelled_loss(logits, target, None)).item() == pytest.approx(eps * (spread_0 - nll_0) / 2, abs=1e-12)
    # Class-weighted, on random logits: PyTorch's own label smoothing over the labelled rows.
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, UNLABELLED, 4, 1, UNLABELLED, 3, 3])
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    rows = target != UNLABELLED
    expected = F.cross_entropy(logits[rows], target[rows], weight=weight, label_smoothing=0.2)
    torch.testing.assert_close(labelled_loss(logits, target, weight, label_smoothing=0.2), expected)


def test_label_smoothing_off_keeps_the_loss_bit_identical_and_an_unlabelled_batch_gives_zero():
    torch.manual_seed(1)
    logits = torch.randn(6, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, UNLABELLED])
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0])
    assert torch.equal(labelled_loss(logits, target, weight, label_smoothing=0.0), labelled_loss(logits, target, weight))
    alone = labelled_loss(logits, torch.full((6,), UNLABELLED), weight, label_smoothing=0.3)
    alone.backward()
    assert alone.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=0.1, loss="focal"), "cross-entropy loss only.*loss: ce"),
])
def test_label_smoothing_config_errors_name_the_valid_range(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)
    TrainConfig(label_smoothing=0.1)
    TrainConfig(loss="focal")


def _drop_paths(model: torch.nn.Module) -> list[float]:
    from timm.layers import DropPath

    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def test_drop_path_is_identity_in_eval_and_stochastic_in_training():
    from training.models import create_model

    # The Lite0 student (random init, 64 px): test_dr_tiny has no residual blocks, so drop path never fires there.
    torch.manual_seed(0)
    plain = create_model("tf_efficientnet_lite0", drop_rate=0.0)  # no head dropout: only drop path adds noise
    deep = create_model("tf_efficientnet_lite0", drop_rate=0.0, drop_path_rate=0.5)
    assert _drop_paths(plain) == [] and max(_drop_paths(deep)) > 0
    deep.load_state_dict(plain.state_dict())  # drop path adds no weights: same keys, same weights
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), deep.eval()(x))
        plain.train(), deep.train()
        assert torch.equal(plain(x), plain(x))  # batch-statistics BatchNorm alone is deterministic...
        assert not torch.allclose(plain(x), deep(x))  # ...so the difference is the dropped residual branches


def test_fit_builds_the_backbone_with_the_configured_drop_path_rate(tmp_path, monkeypatch):
    from training import train as train_module

    built = []

    class Built(Exception):
        """Stops fit once the model exists: the rate is what this test checks, not training."""

    real_create_model = train_module.create_model

    def spy(*args, **kwargs):
        built.append(real_create_model(*args, **kwargs))
        raise Built

    monkeypatch.setattr(train_module, "create_model", spy)
    with pytest.raises(Built):
        train_module.fit(_tiny_cfg(tmp_path, drop_path_rate=0.25), progress=False)
    rates = _drop_paths(built[0])
    # timm scales the rate linearly with block index i / n_blocks (block 0 gets none, so no DropPath module).
    assert rates and max(rates) == pytest.approx(0.25 * (len(rates)) / (len(rates) + 1))


@pytest.mark.parametrize("bad, match", [
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\)"),
    (dict(ema_decay=1.0), r"ema_decay must be in \(0, 1\)"),
    (dict(ema_decay=0.0), r"ema_decay must be in \(0, 1\)"),
])
def test_ema_and_drop_path_config_errors_name_the_valid_range(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)
    TrainConfig(ema_decay=0.999, drop_path_rate=0.2)


def test_ema_weights_are_validated_selected_and_saved_as_best(tmp_path, monkeypatch):
    from training import train as train_module

    updates, validated = [], []
    real_update, real_predict = ModelEmaV3.update, train_module.predict

    def spy_update(self, model, step=None):
        updates.append((self, {k: v.clone() for k, v in self.module.state_dict().items()}))
        return real_update(self, model, step)

    monkeypatch.setattr(ModelEmaV3, "update", spy_update)
    monkeypatch.setattr(train_module, "predict", lambda model, *a, **k: validated.append(model) or real_predict(model, *a, **k))
    # Validated once, after epoch 2: best.pt and last.pt then come from the same step.
    result = train_module.fit(_tiny_cfg(tmp_path, epochs=2, val_every=2, ema_decay=0.5), progress=False)
    best = torch.load(result.best_checkpoint, weights_only=False)
    last = torch.load(result.out_dir / "last.pt", weights_only=False)
    ema, before_last_update = updates[-1]
    assert len(updates) == last["scheduler"]["last_epoch"] and {id(e) for e, _ in updates} == {id(ema)}  # every step
    assert validated and all(model is ema.module for model in validated)  # model selection and the operating point
    raw, saved = last["model_state"], best["model_state"]
    for key, value in saved.items():
        assert torch.equal(value, last["ema_state"][key]), key
        if value.is_floating_point():  # decay 0.5 after the last optimizer step, BatchNorm running stats included
            torch.testing.assert_close(value, 0.5 * before_last_update[key] + 0.5 * raw[key])
        else:  # num_batches_tracked is copied, not averaged
            assert torch.equal(value, raw[key]), key
    differs = [k for k in raw if not torch.equal(raw[k], saved[k])]
    assert any(k.endswith(".running_var") for k in differs) and any(k.endswith(".weight") for k in differs)
    assert best["meta"]["ema_weights"] and not last["meta"]["ema_weights"] and best["meta"]["config"]["ema_decay"] == 0.5


@pytest.mark.parametrize("first_ema_decay", [0.5, None])
def test_resume_restores_the_ema_or_starts_it_from_the_resumed_weights(tmp_path, monkeypatch, first_ema_decay):
    from training.train import fit

    fit(_tiny_cfg(tmp_path, epochs=1, ema_decay=first_ema_decay), progress=False)
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    resumed_from = []
    real_update = ModelEmaV3.update

    def spy_update(self, model, step=None):
        if not resumed_from:
            resumed_from.append({k: v.clone() for k, v in self.module.state_dict().items()})
        return real_update(self, model, step)

    monkeypatch.setattr(ModelEmaV3, "update", spy_update)
    fit(_tiny_cfg(tmp_path, epochs=2, ema_decay=0.5, resume=True), progress=False)
    expected = first["ema_state"] if first_ema_decay else first["model_state"]
    assert all(torch.equal(resumed_from[0][k], v) for k, v in expected.items())
    if first_ema_decay:  # an EMA rebuilt from the resumed raw weights would not match
        assert not all(torch.equal(resumed_from[0][k], v) for k, v in first["model_state"].items())


def test_stability_loss_is_zero_for_a_noise_blind_model_and_positive_for_a_noise_sensitive_one():
    from edge_runtime.contract import PreprocessPolicy
    from training.train import stability_loss

    policy = PreprocessPolicy(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.zeros(4, 3, 8, 8)
    blind = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    torch.nn.init.zeros_(blind[2].weight)  # outputs ignore the input: noise changes nothing
    assert stability_loss(blind, x, blind(x), 1.0, policy).item() == pytest.approx(0.0, abs=1e-7)
    pixel = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))  # reads every pixel
    torch.manual_seed(0)
    small, large = (stability_loss(pixel, x, pixel(x), levels, policy).item() for levels in (0.5, 8.0))
    assert 0 < small < large  # more noise, larger divergence
    logits = pixel(x)
    stability_loss(pixel, x, logits, 4.0, policy).backward()
    assert pixel[1].weight.grad.abs().sum() > 0  # it trains the model


def test_stability_training_fits_and_its_settings_are_validated(tmp_path):
    from training.train import fit

    run = fit(_tiny_cfg(tmp_path, epochs=1, stability_weight=2.0, stability_noise=2.0), progress=False)
    assert run.best_checkpoint.is_file() and math.isfinite(run.metrics["history"][-1]["train_loss"])
    with pytest.raises(ConfigError, match="stability_weight"):
        TrainConfig(stability_weight=-1)
    with pytest.raises(ConfigError, match="stability_noise"):
        TrainConfig(stability_noise=0)


def test_cpu_bf16_autocast_trains_where_the_cpu_has_bf16_units_and_is_recorded(tmp_path):
    from training.train import cpu_has_native_bf16, fit

    run = fit(_tiny_cfg(tmp_path, epochs=1, cpu_amp=True), progress=False)
    assert math.isfinite(run.metrics["history"][-1]["train_loss"])
    assert run.metrics["autocast"] == ("bfloat16" if cpu_has_native_bf16() else "off")
    plain = fit(_tiny_cfg(tmp_path / "plain", epochs=1), progress=False)
    assert plain.metrics["autocast"] == "off"  # opt-in: a CPU run's numbers do not change by default
