"""Consistency under re-capture: each step also runs a copy of the batch drawn from the fidelity gate's own frozen
nuisance model (``edge_runtime.nuisance.NuisanceModel``: sensor noise, exposure, white balance, a small shift and
rotation, a JPEG re-encode) and penalises how far the two outputs part.

The gate measures a model's referral noise floor D0 under exactly these draws; training against the same model
(not a look-alike) is what makes a lower D0 an honest target. The perturbation runs on the uint8 crop a device
would see (the augmented batch rounded back to 8 bits), one photo at a time through OpenCV: about 5 ms of CPU a
224-px fundus crop, against about 95 ms for Lite0's forward and backward pass per photo on this 2-core CPU (10.5
photos/s); the second forward and backward pass, not the draw, is what doubles a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.nuisance import NuisanceModel, to_rgb8
from edge_runtime.preprocess import normalize

REFERABLE_MIN_GRADE = 2


def referable_log_odds(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log P(grade >= 2) - log P(grade < 2) per photo, at ``temperature``."""
    log_p = F.log_softmax(logits / temperature, 1)
    return torch.logsumexp(log_p[:, REFERABLE_MIN_GRADE:], 1) - torch.logsumexp(log_p[:, :REFERABLE_MIN_GRADE], 1)


def symmetric_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(KL(p || q) + KL(q || p)) / 2 per row, from log-probabilities over the last axis; gradients reach both."""
    p, q = log_p.exp(), log_q.exp()
    return 0.5 * ((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1))


def binary_log_probs(logit: torch.Tensor) -> torch.Tensor:
    """(n,) logits of a yes/no finding -> (n, 2) log-probabilities of (no, yes)."""
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], -1)


@dataclass(frozen=True)
class ReferralCentre:
    """Where the margin term is centred: the referral threshold and temperature of the latest val-chosen point."""

    threshold: float = 0.5
    temperature: float = 1.0

    @property
    def log_odds(self) -> float:
        return float(np.log(self.threshold) - np.log1p(-self.threshold))


class NuisanceConsistency:
    """Perturbed copies of training batches from the gate's nuisance model, and the consistency loss on them.

    ``target``: ``grade`` compares the five-grade distributions, ``referable`` the referable probability alone;
    a DME head's probability is compared too. ``margin_weight`` adds the squared difference of the referable
    log-odds weighted 1 + 9 exp(-|clean log-odds - the threshold's|), as QAT's margin-aware term: a referral flips
    only where the two views straddle the threshold, so photos near it count up to ten times more."""

    def __init__(self, policy: PreprocessPolicy, weight: float, target: str = "grade", margin_weight: float = 0.0,
                 seed: int = 0, nuisance: NuisanceModel | None = None):
        if target not in ("grade", "referable"):
            raise ValueError(f"consistency target must be grade | referable, got {target!r}")
        self.policy, self.weight, self.target, self.margin_weight = policy, weight, target, margin_weight
        # The gate's frozen defaults; only the seed differs, so the draws are new per run and per epoch.
        self.nuisance = nuisance or NuisanceModel(seed=seed)
        self.centre = ReferralCentre()

    def perturbed(self, x: torch.Tensor, keys: np.ndarray, draw: int) -> torch.Tensor:
        """One nuisance draw of every photo of a normalised batch (photo i seeded by ``keys[i]`` and ``draw``)."""
        rgb = to_rgb8(x.detach().float().cpu().numpy(), self.policy)
        moved = normalize(self.nuisance.perturb_rgb8(rgb, keys, draw), self.policy)
        return torch.from_numpy(moved).to(x.device, x.dtype).contiguous(memory_format=_memory_format(x))

    def loss(self, clean_logits: torch.Tensor, moved_logits: torch.Tensor, clean_dme: torch.Tensor | None = None,
             moved_dme: torch.Tensor | None = None) -> torch.Tensor:
        """weight x symmetric KL (grade or referable, plus DME) + margin_weight x the margin-aware term."""
        clean_logits, moved_logits = clean_logits.float(), moved_logits.float()
        clean_odds, moved_odds = referable_log_odds(clean_logits), referable_log_odds(moved_logits)
        if self.target == "grade":
            kl = symmetric_kl(F.log_softmax(clean_logits, 1), F.log_softmax(moved_logits, 1))
        else:
            kl = symmetric_kl(binary_log_probs(clean_odds), binary_log_probs(moved_odds))
        if clean_dme is not None and moved_dme is not None:
            kl = kl + symmetric_kl(binary_log_probs(clean_dme.float()), binary_log_probs(moved_dme.float()))
        loss = self.weight * kl.mean()
        if self.margin_weight > 0:
            t = self.centre.temperature
            at_point_clean, at_point_moved = referable_log_odds(clean_logits, t), referable_log_odds(moved_logits, t)
            near = 1 + 9 * torch.exp(-(at_point_clean.detach() - self.centre.log_odds).abs())
            loss = loss + self.margin_weight * (near * (at_point_clean - at_point_moved) ** 2).mean()
        return loss


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
