"""The FP32 model's own noise floor under a frozen re-capture nuisance model, and a candidate's excess over it.

A grader would call two captures of one eye "the same photo" although no two are bit-identical: the sensor noise,
exposure, white balance, framing and JPEG encoding all move. ``NuisanceModel`` (``edge_runtime.nuisance``, re-exported
here) is one frozen, documented model of that variation (docs/reference/fidelity_gate.md gives each default's
reason). Each gate photo gets K seeded draws of it; the same draws go to FP32 and to the candidate (INT8/FP16), and
each model's referral fraction over the draws is recorded per photo: q_i (FP32), r_i (candidate).

- Noise floor D0 = mean_i 2 q_i (1 - q_i): how often two independent re-captures disagree under FP32 itself.
- Candidate disagreement D1 = mean_i r_i (1 - q_i) + q_i (1 - r_i): how often FP32 on one re-capture and the
  candidate on another disagree.
- Excess E = D1 - D0. A flip where FP32 is itself a coin toss (q_i = 0.5) costs nothing; one where FP32 is sure
  (q_i in {0, 1}) costs fully.

Means are over the gate set with every folder (camera) weighted equally, so an easy folder cannot dilute a hard
one; intervals come from a bootstrap that resamples patients within each folder (a patient's photos move together).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_runtime.nuisance import NuisanceModel, to_rgb8  # noqa: F401 - the one nuisance model, re-exported


class ClusteredBootstrap:
    """Folder-weighted means of per-photo values, and their bootstrap distribution resampling patients (clusters)
    within each folder (stratum): each resample keeps every folder's weight, and a patient's photos move together.

    Built once per gate set; ``means(values)`` gives the point estimates and ``resampled(values)`` the
    (n_resamples, ...) distribution for any stack of per-photo values, all from one seeded set of resamples."""

    def __init__(self, folders: np.ndarray, patients: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> None:
        folders, patients = np.asarray(folders).astype(str), np.asarray(patients).astype(str)
        if folders.shape != patients.shape or folders.ndim != 1:
            raise ValueError(f"one folder and one patient per photo, got shapes {folders.shape} and {patients.shape}")
        self.n = len(folders)
        self.n_resamples = n_resamples
        rng = np.random.default_rng(seed)
        self._strata = []  # per folder: (photo -> cluster index matrix, resampled cluster counts)
        for folder in np.unique(folders):
            rows = np.flatnonzero(folders == folder)
            _, cluster = np.unique(np.char.add(folder + "/", patients[rows]), return_inverse=True)
            m = int(cluster.max()) + 1
            membership = np.zeros((m, len(rows)))
            membership[cluster, np.arange(len(rows))] = 1.0
            counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_resamples).astype(float)
            self._strata.append((rows, membership, counts))

    def means(self, values: np.ndarray) -> np.ndarray:
        """Folder-weighted mean over photos (axis 0) of ``values`` (n, ...)."""
        values = np.asarray(values, float)
        return np.mean([values[rows].mean(0) for rows, _, _ in self._strata], axis=0)

    def resampled(self, values: np.ndarray) -> np.ndarray:
        """(n_resamples, ...) folder-weighted means of ``values`` over the resampled patients."""
        values = np.asarray(values, float)
        flat = values.reshape(self.n, -1)
        per_folder = []
        for rows, membership, counts in self._strata:
            sums = counts @ (membership @ flat[rows])  # (B, k): each drawn patient brings all its photos
            photos = counts @ membership.sum(1)  # (B,)
            per_folder.append(sums / photos[:, None])
        return np.mean(per_folder, axis=0).reshape((self.n_resamples,) + values.shape[1:])


@dataclass(frozen=True)
class NoiseFloor:
    """FP32's noise floor and a candidate's excess over it on one gate set, folder-weighted, with bootstrap bounds."""

    d0: float  # FP32 vs FP32 on two independent draws
    d0_interval: tuple[float, float]  # two-sided, at the gate's confidence
    d1: float  # FP32 vs candidate
    excess: float  # E = D1 - D0
    excess_interval: tuple[float, float]
    excess_upper: float  # one-sided upper bound of E at the gate's confidence
    ratio: float  # D1 / D0 (inf when D0 = 0 < D1; 1 when both are 0)
    n: int
    draws: int
    method: str


def noise_floor(q: np.ndarray, r: np.ndarray, bootstrap: ClusteredBootstrap, confidence: float = 0.95,
                draws: int = 0) -> NoiseFloor:
    """D0, D1 and E from per-photo referral fractions ``q`` (FP32) and ``r`` (candidate) over the same draws."""
    q, r = np.asarray(q, float), np.asarray(r, float)
    if q.shape != r.shape or q.shape != (bootstrap.n,):
        raise ValueError(f"q and r must be one fraction per gate photo ({bootstrap.n}), got {q.shape} and {r.shape}")
    if ((q < 0) | (q > 1) | (r < 0) | (r > 1)).any():
        raise ValueError("q and r are referral fractions and must lie in [0, 1]")
    per_photo = np.stack([2 * q * (1 - q), r * (1 - q) + q * (1 - r)], axis=1)
    d0, d1 = bootstrap.means(per_photo)
    boot = bootstrap.resampled(per_photo)
    tail = 1 - confidence
    excess_boot = boot[:, 1] - boot[:, 0]
    d0_low, d0_high = np.quantile(boot[:, 0], [tail / 2, 1 - tail / 2])
    e_low, e_high = np.quantile(excess_boot, [tail / 2, 1 - tail / 2])
    ratio = d1 / d0 if d0 > 0 else (1.0 if d1 == 0 else math.inf)
    return NoiseFloor(float(d0), (float(d0_low), float(d0_high)), float(d1), float(d1 - d0),
                      (float(e_low), float(e_high)), float(np.quantile(excess_boot, confidence)), float(ratio),
                      bootstrap.n, int(draws),
                      f"folder-weighted; percentile bootstrap resampling patients within folders "
                      f"({bootstrap.n_resamples} resamples); bound one-sided {confidence:.0%}")


@dataclass(frozen=True)
class ScoreShift:
    """Mean and RMS of (candidate - FP32) referable logit over the draws, in units of sigma_W."""

    sigma_w: float  # FP32's pooled within-photo SD of its referable logit under the draws
    mean: float  # folder-weighted mean shift / sigma_W
    interval: tuple[float, float]  # two-sided interval of the mean at 1 - 2 (1 - confidence) (90% for 95%)
    rms: float  # sqrt(folder-weighted mean of squared differences) / sigma_W
    n: int
    method: str


def score_shift(ref_logit: np.ndarray, test_logit: np.ndarray, bootstrap: ClusteredBootstrap,
                confidence: float = 0.95) -> ScoreShift:
    """Systematic drift of the candidate's referable logit against FP32's own spread under the nuisance draws.

    ``ref_logit``, ``test_logit``: (n, K) referable logits of each photo's K draws. The ratio shift / sigma_W is
    bootstrapped as one statistic (both move with the resampled patients)."""
    ref_logit, test_logit = np.asarray(ref_logit, float), np.asarray(test_logit, float)
    if ref_logit.shape != test_logit.shape or ref_logit.ndim != 2 or ref_logit.shape[1] < 2:
        raise ValueError(f"referable logits must be (n, K >= 2) of one shape, got {ref_logit.shape} and "
                         f"{test_logit.shape}")
    diff = test_logit - ref_logit
    per_photo = np.stack([ref_logit.var(1, ddof=1), diff.mean(1), (diff ** 2).mean(1)], axis=1)
    variance, shift, square = bootstrap.means(per_photo)
    boot = bootstrap.resampled(per_photo)
    sigma = math.sqrt(variance)
    if sigma == 0:  # FP32 does not move at all under the draws: no scale to judge a shift on
        return ScoreShift(0.0, math.inf if shift else 0.0, (math.inf, math.inf) if shift else (0.0, 0.0),
                          math.inf if square else 0.0, bootstrap.n, "sigma_W = 0")
    ratios = boot[:, 1] / np.sqrt(np.maximum(boot[:, 0], 1e-300))
    tail = 1 - confidence
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return ScoreShift(sigma, float(shift / sigma), (float(low), float(high)), float(math.sqrt(square) / sigma),
                      bootstrap.n, f"folder-weighted; percentile bootstrap of shift / sigma_W resampling patients "
                      f"within folders ({bootstrap.n_resamples} resamples); {1 - 2 * tail:.0%} interval")


def referable_logit(probability: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of the calibrated P(referable), clipped away from 0 and 1 so a sure photo stays finite."""
    p = np.clip(np.asarray(probability, float), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)
