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
