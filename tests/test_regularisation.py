"""Regularisation options of the training recipe (issue 15): label smoothing, EMA of the weights, stochastic depth."""
import math

import pytest
import torch
import torch.nn.functional as F

from edge_runtime.errors import ConfigError
from training.config import TrainConfig
from training.data.layouts import UNLABELLED
from training.train import labelled_loss


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
    cfg = TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=3, synthetic_size=64, input_size=64,
                      drop_path_rate=0.25, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    with pytest.raises(Built):
        train_module.fit(cfg, progress=False)
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
