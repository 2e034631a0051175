"""The fidelity gate: may an INT8 (or FP16) artifact screen in place of the FP32 model it was made from?

Judged on the gate set (every graded val photo of the folders given, each folder weighted equally) at the parent's
operating point, against two references (docs/reference/fidelity_gate.md gives every default's anchor and reason):

- the labels, for clinical non-inferiority: candidate - FP32 referable sensitivity and specificity, one-sided 95%
  lower bound (Tango's score interval for paired proportions) >= -0.05 and folder-weighted point estimate >= -0.02;
  referable AUC ratio candidate / FP32 >= 0.99;
- FP32's own noise floor under a frozen re-capture nuisance model (``compression.noise_floor``): K >= 16 seeded
  draws of each photo give each model's referral fraction, q_i (FP32) and r_i (candidate); the excess
  disagreement E = D1 - D0 must have a one-sided 95% upper bound <= 0.02 and D1 / D0 <= 1.5; no photo labelled
  referable that FP32 refers on every draw may be un-referred by the candidate on most of its draws (hard flips);
  the mean referable-logit shift must lie inside +-0.5 sigma_W (90% interval) and its RMS <= 1 sigma_W, sigma_W being
  FP32's own within-photo spread under the draws.

An artifact with a DME head is judged on the device's referral (referable DR *or* DME present) and, with the same
design, on the DME-present decision (``dme_*`` criteria). Below the minimum evidence (600 photos, 150 referable,
16 draws by default) the verdict is ``insufficient_evidence`` with how many more are needed. Single-draw referral
agreement, grade agreement, QWK ratio, logit cosine and CAM correlation are reported beside them; the previous
gate (referral agreement's Clopper-Pearson bound >= 0.98, sensitivity/specificity bounds >= -0.02) is the named
profile ``strict`` (``GateThresholds.profile("strict")``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from compression.noise_floor import (
    ClusteredBootstrap,
    NuisanceModel,
    noise_floor,
    referable_logit,
    score_shift,
)
from edge_runtime.contract import GateCriterion, GateResult, OperatingPoint
from edge_runtime.decision import decide_batch
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import (
    binary_sensitivity_specificity,
    clopper_pearson_interval,
    clopper_pearson_lower,
    is_referable,
    paired_bootstrap_auc_ratio,
    paired_bootstrap_difference,
    photos_needed_for_lower_bound,
    quadratic_weighted_kappa,
    roc_auc,
    tango_interval,
    tango_lower,
)
from training.data.layouts import MISSING

AGREEMENTS = ("min_referral_agreement", "min_grade_agreement", "min_dme_agreement", "min_clean_referral_agreement")
MARGINS = ("min_sensitivity_difference", "min_specificity_difference", "min_sensitivity_difference_point",
           "min_specificity_difference_point")


@dataclass(frozen=True, kw_only=True)
class GateThresholds:
    """What a candidate must show against FP32 on the gate set; ``None`` leaves a criterion reported, not judged.
    Defaults and their reasons: docs/reference/fidelity_gate.md. ``GateThresholds.profile("strict")``: the previous gate."""

    # Clinical non-inferiority at the operating point, candidate - FP32 (on the photos' labels).
    min_sensitivity_difference: float | None = -0.05  # one-sided lower bound (Tango score interval, pooled)
    min_sensitivity_difference_point: float | None = -0.02  # folder-weighted point estimate
    min_specificity_difference: float | None = -0.05
    min_specificity_difference_point: float | None = -0.02
    min_auc_ratio: float | None = 0.99  # referable AUC, candidate / FP32, point estimate
    # Against FP32's own noise floor under the nuisance draws (compression.noise_floor).
    max_excess_disagreement: float | None = 0.02  # one-sided upper bound of E = D1 - D0 (clustered bootstrap)
    max_disagreement_ratio: float | None = 1.5  # D1 / D0, point estimate
    max_hard_flips: int | None = 0  # stable referable photos (q = 1, label referable) the candidate un-refers
    max_score_shift: float | None = 0.5  # |mean referable-logit shift| / sigma_W, both ends of its 90% interval
    max_score_rms: float | None = 1.0  # RMS referable-logit difference / sigma_W, point estimate
    # DME head only: the DME-present decision under the same design.
    min_dme_auc_ratio: float | None = 0.99  # DME AUC, candidate / FP32, on the photos with a DME label
    # Reported only unless set (the strict profile sets referral and DME agreement).
    min_referral_agreement: float | None = None  # single-draw referral agreement, one-sided CP lower bound
    min_dme_agreement: float | None = None
    min_grade_agreement: float | None = None
    # Share of photos on which the two do not refer oppositely with both outside their uncertainty bands.
    min_clean_referral_agreement: float | None = None
    min_qwk_ratio: float | None = None  # QWK(candidate vs truth) / QWK(FP32 vs truth)
    min_logit_cosine: float | None = None  # mean over photos
    min_cam_correlation: float | None = None  # mean Pearson r of the FP32-predicted grade's CAM
    # Minimum evidence: below it the verdict is insufficient_evidence, whatever the numbers.
    min_gate_photos: int = 600  # graded photos in the gate set
    min_gate_referable: int = 150  # of them labelled referable
    min_draws: int = 16  # nuisance draws per photo
    confidence: float = 0.95  # of every one-sided bound (and of the two-sided intervals shown beside them)
    n_resamples: int = 2000  # every bootstrap
    # The interval of the sensitivity/specificity differences: "tango" (score interval, holds with 0-3 discordant
    # pairs) or "bootstrap" (the strict profile's paired BCa bootstrap, exactly [0, 0] when no decision changed).
    difference_interval: str = "tango"
    # Not judged by the gate: the agreement with FP32's referral decisions (grades without an operating point)
    # that accuracy-controlled mixed precision (nncf_ac) holds on the unlabelled tuning photos, which need no labels.
    tuning_agreement: float = 0.995

    def __post_init__(self) -> None:
        for name in AGREEMENTS:
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} is judged on a lower confidence bound, which never reaches 1: it must be "
                                  f"in [0, 1), got {value}")
        if not 0.0 <= self.tuning_agreement <= 1.0:
            raise ConfigError(f"tuning_agreement must be in [0, 1], got {self.tuning_agreement}")
        for name in ("min_logit_cosine", "min_cam_correlation"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ConfigError(f"{name} is a mean cosine/correlation and must be in [-1, 1], got {value}")
        for name in MARGINS:
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 0.0:
                raise ConfigError(f"{name} is a non-inferiority margin and must be in [-1, 0], got {value}")
        for name in ("min_auc_ratio", "min_dme_auc_ratio", "min_qwk_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} is a ratio to FP32 and must be in [0, 1], got {value}")
        for name in ("max_excess_disagreement", "max_score_shift", "max_score_rms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.max_disagreement_ratio is not None and not self.max_disagreement_ratio >= 1.0:
            raise ConfigError(f"max_disagreement_ratio compares D1 with D0 (an unchanged model gives 1) and must be "
                              f">= 1, got {self.max_disagreement_ratio}")
        for name in ("max_hard_flips", "min_gate_photos", "min_gate_referable", "min_draws"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
                raise ConfigError(f"{name} is a count and must be an integer >= 0, got {value!r}")
        if self.min_draws == 1:
            raise ConfigError("min_draws must be 0 (no noise floor judged) or >= 2: one draw has no spread")
        if self.difference_interval not in ("tango", "bootstrap"):
            raise ConfigError(f"difference_interval must be tango|bootstrap, got {self.difference_interval!r}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.n_resamples < 2000:
            raise ConfigError(f"n_resamples must be >= 2000 for a stable 95% bound, got {self.n_resamples}")

    @classmethod
    def profile(cls, name: str, **overrides) -> GateThresholds:
        """A named set of thresholds (``GATE_PROFILES``), with any field overridden."""
        if name not in GATE_PROFILES:
            raise ConfigError(f"unknown gate profile {name!r}; known: {', '.join(GATE_PROFILES)}")
        try:
            return replace(GATE_PROFILES[name], **overrides)
        except TypeError as exc:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"gate thresholds: {exc}; the fields are {known}") from exc

    @property
    def judges_noise_floor(self) -> bool:
        """Whether any criterion needs the nuisance draws."""
        return self.min_draws > 0 and any(getattr(self, name) is not None for name in (
            "max_excess_disagreement", "max_disagreement_ratio", "max_hard_flips", "max_score_shift",
            "max_score_rms"))

    def as_dict(self, dme: bool = False) -> dict[str, float]:
        """The thresholds a gate recorded; the DME ones only where the artifact has a DME head (``dme``)."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)
                if isinstance(getattr(self, f.name), (int, float)) and (dme or not f.name.startswith("min_dme_"))}


GATE_PROFILES: dict[str, GateThresholds] = {
    "default": GateThresholds(),
    # The gate before the noise floor: every referral change counted against a 0.98 agreement bound, and 2-point
    # bounds on sensitivity and specificity; no noise floor, and the evidence asked by the agreement bound (149).
    "strict": GateThresholds(
        min_sensitivity_difference=-0.02, min_sensitivity_difference_point=None, min_specificity_difference=-0.02,
        min_specificity_difference_point=None, max_excess_disagreement=None, max_disagreement_ratio=None,
        max_hard_flips=None, max_score_shift=None, max_score_rms=None, min_referral_agreement=0.98,
        min_dme_agreement=0.98, min_gate_photos=0, min_gate_referable=0, min_draws=0, difference_interval="bootstrap"),
}


@dataclass(frozen=True)
class DmeOutputs:
    """The DME head's part of the gate: both models' DME logits on the val photos, the photos' DME labels and
    where each model decides "DME present"."""

    ref_logits: np.ndarray  # FP32, (n,) or (n, 1)
    test_logits: np.ndarray  # the artifact's, same photos
    labels: np.ndarray | None  # 0/1 per val photo, MISSING where it has none; None: no photo has one
    operating_point: OperatingPoint  # the artifact's DME point (temperature, threshold)
    ref_operating_point: OperatingPoint | None = None  # FP32's, if it has its own (default: the artifact's)

    def checked_labels(self, n: int) -> np.ndarray:
        """One label per val photo: 0, 1 or MISSING."""
        labels = np.full(n, MISSING) if self.labels is None else np.asarray(self.labels, int)
        if labels.shape != (n,) or not np.isin(labels, (0, 1, MISSING)).all():
            raise ValueError(f"DME labels must be one 0/1 (or MISSING={MISSING}) per val photo ({n}), got shape "
                             f"{labels.shape} and values {sorted(set(labels.ravel().tolist()))[:5]}")
        return labels


@dataclass(frozen=True)
class Draws:
    """Both models' outputs on the same K nuisance draws of every gate photo (``compression.noise_floor``)."""

    ref_logits: np.ndarray  # FP32, (K, n, 5)
    test_logits: np.ndarray  # the candidate's, same draws
    ref_dme: np.ndarray | None = None  # (K, n) DME logits; models with a DME head
    test_dme: np.ndarray | None = None
    nuisance: NuisanceModel = field(default_factory=NuisanceModel)  # what made the draws (recorded)

    def __post_init__(self) -> None:
        for name in ("ref_logits", "test_logits", "ref_dme", "test_dme"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, float))
        if self.ref_logits.shape != self.test_logits.shape or self.ref_logits.ndim != 3:
            raise ValueError(f"draw logits must be (K, n, 5) of one shape, got {self.ref_logits.shape} and "
                             f"{self.test_logits.shape}")
        if (self.ref_dme is None) != (self.test_dme is None):
            raise ValueError("DME draws must be given for both models or neither")
        if self.ref_dme is not None:
            k, n = self.ref_logits.shape[:2]
            for dme in (self.ref_dme, self.test_dme):
                if dme.reshape(k, n, -1).shape[2] != 1:
                    raise ValueError(f"DME draw logits must be (K, n) or (K, n, 1), got {dme.shape}")

    @property
    def k(self) -> int:
        return self.ref_logits.shape[0]


@dataclass(frozen=True)
class GateSet:
    """Where each gate photo comes from: its folder (camera; every folder weighs the same) and its patient
    (bootstrap cluster). ``None``: one folder / every photo its own patient."""

    folders: np.ndarray | None = None
    patients: np.ndarray | None = None

    def resolved(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        folders = np.full(n, "val") if self.folders is None else np.asarray(self.folders).astype(str)
        patients = np.arange(n).astype(str) if self.patients is None else np.asarray(self.patients).astype(str)
        if folders.shape != (n,) or patients.shape != (n,):
            raise ValueError(f"the gate set names one folder and one patient per photo ({n}), got "
                             f"{folders.shape} and {patients.shape}")
        return folders, patients


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def cam_correlation(cam_a: np.ndarray, cam_b: np.ndarray, grades: np.ndarray) -> float:
    """Mean Pearson correlation of the predicted grade's CAM between two models (same resolution)."""
    rows = np.arange(len(grades))
    a = cam_a[rows, grades].reshape(len(grades), -1)
    b = cam_b[rows, grades].reshape(len(grades), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    corr = np.where(den > 1e-12, (a * b).sum(1) / np.maximum(den, 1e-12), 1.0)
    return float(corr.mean())


def compare(ref_logits, ref_cam, test_logits, test_cam) -> dict[str, float]:
    """Label-free numerical fidelity of ``test`` outputs against ``ref`` (FP32) on the same photos: the parity
    check of every artifact (FP32/FP16 too), and the reported-only part of the gate."""
    ref_logits, test_logits = np.asarray(ref_logits, float), np.asarray(test_logits, float)
    if ref_logits.shape != test_logits.shape or ref_logits.ndim != 2:
        raise ValueError(f"logits of the two models must be (n, 5) of one shape, got {ref_logits.shape} and "
                         f"{test_logits.shape}")
    ref_grade, test_grade = ref_logits.argmax(1), test_logits.argmax(1)
    metrics = {
        "n": float(len(ref_grade)),
        "agreement": float((ref_grade == test_grade).mean()),
        "max_abs_logit_diff": float(np.abs(ref_logits - test_logits).max()),
        "logit_cosine": _cosine(ref_logits, test_logits),
    }
    if ref_cam is not None and test_cam is not None:
        if np.shape(ref_cam) != np.shape(test_cam):
            raise ValueError(f"CAMs of the two models must have one shape, got {np.shape(ref_cam)} and "
                             f"{np.shape(test_cam)}")
        metrics["cam_correlation"] = cam_correlation(np.asarray(ref_cam), np.asarray(test_cam), ref_grade)
    return metrics


def _criterion(name: str, value: float | None, threshold: float | None, *, bound: float | None = None,
               interval: tuple[float, float] | None = None, n: int | None = None, method: str = "",
               photos_needed: int | None = None, direction: str = "min") -> GateCriterion:
    """A criterion is judged on its bound when it has one (evidence), else on its value; ``direction`` "min" must
    reach the threshold, "max" must stay at or below it."""
    def finite(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    raw = bound if bound is not None else value
    value, bound = finite(value), finite(bound)
    if interval is not None and not all(math.isfinite(v) for v in interval):
        interval = None
    judged = bound if bound is not None else value
    if judged is None and direction == "max" and raw is not None and math.isinf(raw) and raw > 0:
        judged = math.inf  # e.g. D1 / D0 with D0 = 0 < D1: infinitely above any maximum
    if threshold is None or judged is None:
        margin = None
    else:
        margin = judged - threshold if direction == "min" else threshold - judged
    passed = None if margin is None else margin >= -1e-12  # a bound equal to the threshold clears it
    # An infinite miss (D0 = 0 < D1) keeps passed = False; JSON has no infinity, so its margin is left out.
    return GateCriterion(name, value, bound, threshold, finite(margin), passed, interval, n, method, photos_needed,
                         direction)


def _proportion(name: str, agree: int, n: int, threshold: float | None, confidence: float) -> GateCriterion:
    needed = None if threshold is None else 0 if threshold == 0 else photos_needed_for_lower_bound(threshold, confidence)
    if n == 0:
        return _criterion(name, None, threshold, n=0, photos_needed=needed)
    return _criterion(name, agree / n, threshold, bound=clopper_pearson_lower(agree, n, confidence),
                      interval=clopper_pearson_interval(agree, n, confidence), n=n,
                      method=f"Clopper-Pearson; bound one-sided {confidence:.0%}", photos_needed=needed)


def _paired_difference(name: str, test: np.ndarray, ref: np.ndarray, threshold: float | None,
                       thresholds: GateThresholds, seed: int) -> GateCriterion:
    """Candidate - FP32 share of 1s on the same photos (0/1 each), Tango's score interval and one-sided bound
    (or the strict profile's paired bootstrap)."""
    n, confidence = len(test), thresholds.confidence
    if n < 2:  # no (or one) photo of this class: the difference cannot be estimated
        return _criterion(name, None, threshold, n=n)
    if thresholds.difference_interval == "bootstrap":
        boot = paired_bootstrap_difference(test, ref, confidence=confidence, n_resamples=thresholds.n_resamples,
                                           seed=seed)
        return _criterion(name, boot.estimate, threshold, bound=boot.lower_bound, interval=(boot.low, boot.high),
                          n=boot.n, method=f"paired bootstrap ({boot.method}, {boot.n_resamples} resamples, seed "
                          f"{seed}); bound one-sided {confidence:.0%}")
    gained, lost = int((test & ~ref).sum()), int((ref & ~test).sum())
    return _criterion(name, (gained - lost) / n, threshold, bound=tango_lower(gained, lost, n, confidence),
                      interval=tango_interval(gained, lost, n, confidence), n=n,
                      method=f"pooled; Tango score interval ({gained} gained, {lost} lost of {n}); bound one-sided "
                      f"{confidence:.0%}")


def _weighted_difference(name: str, test: np.ndarray, ref: np.ndarray, folders: np.ndarray,
                         threshold: float | None) -> GateCriterion:
    """Candidate - FP32 share of 1s, the mean of each folder's difference (folders with a photo of this class)."""
    if len(test) < 2:
        return _criterion(name, None, threshold, n=len(test))
    per_folder = [float(test[folders == f].mean() - ref[folders == f].mean()) for f in np.unique(folders)]
    return _criterion(name, float(np.mean(per_folder)), threshold, n=len(test),
                      method=f"folder-weighted point estimate ({len(per_folder)} folders); judged on the value")


def _auc_ratio(name: str, finding: str, threshold: float | None, positive: np.ndarray, test_score: np.ndarray,
               ref_score: np.ndarray, thresholds: GateThresholds, seed: int) -> GateCriterion:
    """AUC of ``finding`` (referable, DME), candidate / FP32, judged on the value (the ranking the operating
    point was chosen on); the bootstrap interval is shown."""
    value = _ratio(roc_auc(positive, test_score), roc_auc(positive, ref_score))
    if not math.isfinite(value) or min(positive.sum(), (~positive).sum()) < 2:
        return _criterion(name, value, threshold, n=len(positive))
    boot = paired_bootstrap_auc_ratio(positive, test_score, ref_score, thresholds.confidence,
                                      thresholds.n_resamples, seed)
    return _criterion(name, value, threshold, interval=(boot.low, boot.high), n=boot.n,
                      method=f"{finding} AUC, candidate / FP32; stratified paired bootstrap ({boot.method}, "
                      f"{boot.n_resamples} resamples, seed {seed}); judged on the value")


@dataclass(frozen=True)
class _Decision:
    """One binary decision (the referral, or DME present) of both models: on the clean gate photos, against the
    labels, and (with draws) on every nuisance draw."""

    prefix: str  # "" for the referral, "dme_" for DME present
    positive: np.ndarray  # (n,) label says the decision should be yes
    known: np.ndarray  # (n,) the label is known
    ref: np.ndarray  # (n,) FP32's decision on the clean photo
    test: np.ndarray
    ref_draws: np.ndarray | None = None  # (n, K) FP32's decision on each draw
    test_draws: np.ndarray | None = None
    ref_logit: np.ndarray | None = None  # (n, K) the score behind it, as a logit
    test_logit: np.ndarray | None = None


def _clinical(d: _Decision, folders: np.ndarray, thresholds: GateThresholds, seed: int) -> list[GateCriterion]:
    """Non-inferiority against the labels at the operating point: sensitivity and specificity differences."""
    pos, neg = d.positive & d.known, ~d.positive & d.known
    c = (thresholds, seed)
    return [
        _paired_difference(f"{d.prefix}sensitivity_difference", d.test[pos], d.ref[pos],
                           thresholds.min_sensitivity_difference, *c),
        _weighted_difference(f"{d.prefix}sensitivity_difference_point", d.test[pos], d.ref[pos], folders[pos],
                             thresholds.min_sensitivity_difference_point),
        _paired_difference(f"{d.prefix}specificity_difference", ~d.test[neg], ~d.ref[neg],
                           thresholds.min_specificity_difference, *c),
        _weighted_difference(f"{d.prefix}specificity_difference_point", ~d.test[neg], ~d.ref[neg], folders[neg],
                             thresholds.min_specificity_difference_point),
    ]


def _noise_floor(d: _Decision, boot: ClusteredBootstrap, k: int,
                 thresholds: GateThresholds) -> tuple[list[GateCriterion], dict[str, float]]:
    """Excess disagreement over FP32's noise floor, hard flips and the score shift, from the draws."""
    p, conf = d.prefix, thresholds.confidence
    q, r = d.ref_draws.mean(1), d.test_draws.mean(1)
    floor = noise_floor(q, r, boot, conf, k)
    stable_pos = d.positive & d.known & (q == 1)
    stable_neg = ~d.positive & d.known & (q == 0)
    hard, soft = int((stable_pos & (r < 0.5)).sum()), int((stable_neg & (r > 0.5)).sum())
    shift = score_shift(d.ref_logit, d.test_logit, boot, conf)
    far_end = max(abs(shift.interval[0]), abs(shift.interval[1]))
    criteria = [
        _criterion(f"{p}noise_floor", floor.d0, None, interval=floor.d0_interval, n=floor.n,
                   method=f"D0 = mean 2 q (1 - q) over {k} draws; {floor.method}"),
        _criterion(f"{p}excess_disagreement", floor.excess, thresholds.max_excess_disagreement,
                   bound=floor.excess_upper, interval=floor.excess_interval, n=floor.n, direction="max",
                   method=f"E = D1 - D0 (D1 = {floor.d1:.4f}); {floor.method}"),
        _criterion(f"{p}disagreement_ratio", floor.ratio, thresholds.max_disagreement_ratio, n=floor.n,
                   direction="max", method="D1 / D0, folder-weighted; judged on the value"),
        _criterion(f"{p}hard_flips", float(hard), thresholds.max_hard_flips, n=int(stable_pos.sum()),
                   direction="max", method=f"labelled positive, FP32 positive on all {k} draws, candidate negative "
                   f"on most; {soft} such flips of {int(stable_neg.sum())} stable negatives (reported)"),
        _criterion(f"{p}score_shift", shift.mean, thresholds.max_score_shift, bound=far_end, interval=shift.interval,
                   n=shift.n, direction="max", method=f"mean (candidate - FP32) logit / sigma_W (sigma_W = "
                   f"{shift.sigma_w:.4f}); bound: the farther end of the interval from 0; {shift.method}"),
        _criterion(f"{p}score_rms", shift.rms, thresholds.max_score_rms, n=shift.n, direction="max",
                   method="RMS (candidate - FP32) logit / sigma_W over photos and draws; judged on the value"),
    ]
    metrics = {f"{p}noise_floor_d0": floor.d0, f"{p}disagreement_d1": floor.d1, f"{p}excess_disagreement": floor.excess,
               f"{p}hard_flips": float(hard), f"{p}stable_negative_flips": float(soft), f"{p}sigma_w": shift.sigma_w}
    return criteria, metrics


def _per_folder(d: _Decision, folders: np.ndarray) -> dict[str, float]:
    """Each folder's figures, flat (``folder:<name>:<figure>``): n, referable n, D0, D1, E, hard flips and both
    models' sensitivity and specificity at the operating point."""
    out: dict[str, float] = {}
    for folder in np.unique(folders):
        rows = folders == folder
        pos, neg = rows & d.positive & d.known, rows & ~d.positive & d.known
        figures = {"n": float(rows.sum()), "n_positive": float(pos.sum()), "n_negative": float(neg.sum())}
        if pos.any():
            figures.update(sensitivity=float(d.test[pos].mean()), sensitivity_fp32=float(d.ref[pos].mean()))
        if neg.any():
            figures.update(specificity=float(1 - d.test[neg].mean()), specificity_fp32=float(1 - d.ref[neg].mean()))
        if d.ref_draws is not None:
            q, r = d.ref_draws[rows].mean(1), d.test_draws[rows].mean(1)
            d0, d1 = float(np.mean(2 * q * (1 - q))), float(np.mean(r * (1 - q) + q * (1 - r)))
            stable = (d.positive & d.known)[rows] & (q == 1)
            figures.update(d0=d0, d1=d1, excess=d1 - d0, hard_flips=float((stable & (r < 0.5)).sum()))
        out.update({f"folder:{folder}:{d.prefix}{k}": v for k, v in figures.items()})
    return out


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The manifest's JSON keeps numbers only: NaN (undefined, e.g. no referable photos) is left out."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")


def _draw_decisions(logits: np.ndarray, point: OperatingPoint, dme: np.ndarray | None,
                    dme_point: OperatingPoint | None):
    """decide_batch over (K, n, ...) draws: the (n, K) referral, DR logit, DME decision and DME logit."""
    k, n = logits.shape[:2]
    batch = decide_batch(logits.reshape(k * n, -1), point, None if dme is None else dme.reshape(k * n), dme_point)

    def per_photo(values):
        return None if values is None else np.asarray(values).reshape(k, n).T

    dme_logit = None if dme is None else per_photo(dme.reshape(k * n) / dme_point.temperature)
    return (per_photo(batch.referable), per_photo(referable_logit(batch.referable_probability)),
            per_photo(batch.dme_present), dme_logit)


def judge(ref_logits, ref_cam, test_logits, test_cam, y_true, operating_point: OperatingPoint,
          thresholds: GateThresholds = GateThresholds(), seed: int = 0,
          ref_operating_point: OperatingPoint | None = None, dme: DmeOutputs | None = None,
          draws: Draws | None = None, gate_set: GateSet | None = None) -> GateResult:
    """The fidelity gate: ``test`` (INT8/FP16) against ``ref`` (FP32 of the same model) on the labelled gate set.

    Args:
        ref_logits, ref_cam: FP32 outputs on the clean gate photos, (n, 5) and (n, 5, h, w) (CAMs may be None).
        test_logits, test_cam: the candidate's outputs on the same photos, same shapes.
        y_true: reference grades of the photos (None: only the label-free criteria; verdict at best
            ``insufficient_evidence``).
        operating_point: where the candidate refers (temperature, threshold, band): the parent's by default.
        thresholds: the criteria's thresholds (``GateThresholds``; ``GateThresholds.profile("strict")``).
        seed: of every bootstrap.
        ref_operating_point: where FP32 refers, if it has its own point (default: the candidate's).
        dme: the DME head's logits, labels and points (artifacts with a DME head): referral is then judged as
            ``decide_batch`` takes it (referable DR or DME present), and the DME-present decision is judged too.
        draws: both models' logits on the same nuisance draws of every photo (the noise-floor criteria need them).
        gate_set: each photo's folder and patient (default: one folder, one patient per photo).

    Returns:
        ``GateResult`` with status ``passed | failed | insufficient_evidence``, a flat ``metrics`` dict (with
        ``folder:<name>:<figure>`` per folder), the ``criteria`` table and one failure line per reason.
    """
    ref_logits, test_logits = np.asarray(ref_logits, float), np.asarray(test_logits, float)
    if len(ref_logits) == 0:
        raise ValueError("the gate needs val photos: pass --val with a folder that has a labelled val split")
    metrics = compare(ref_logits, ref_cam, test_logits, test_cam)
    n = len(ref_logits)
    folders, patients = (gate_set or GateSet()).resolved(n)
    if draws is not None and draws.ref_logits.shape[1:] != ref_logits.shape:
        raise ValueError(f"draws must be (K, {n}, 5) for the {n} gate photos, got {draws.ref_logits.shape}")
    recorded = thresholds.as_dict(dme is not None)
    non_finite = int((~np.isfinite(test_logits)).sum())
    if dme is not None:
        non_finite += int((~np.isfinite(np.asarray(dme.test_logits, float))).sum())
    if draws is not None:
        non_finite += int((~np.isfinite(draws.test_logits)).sum())
    if non_finite:  # a broken artifact (overflow, a bad scale): no statistic of its outputs means anything
        return GateResult("failed", _finite(metrics), recorded,
                          (f"the artifact produced {non_finite} non-finite logits on {n} val photos",))

    ref_point = ref_operating_point or operating_point
    ref_dme_point = None if dme is None else dme.ref_operating_point or dme.operating_point
    if dme is None:
        ref = decide_batch(ref_logits, ref_point)
        test = decide_batch(test_logits, operating_point)
    else:
        ref = decide_batch(ref_logits, ref_point, dme.ref_logits, ref_dme_point)
        test = decide_batch(test_logits, operating_point, dme.test_logits, dme.operating_point)
    ref_score, ref_refer = ref.referable_probability, ref.referable  # referral as the device takes it
    test_score, test_refer = test.referable_probability, test.referable

    labelled = y_true is not None and len(y_true) > 0
    referable = np.zeros(n, bool)
    if labelled:
        y_true = np.asarray(y_true, int)
        if y_true.shape != (n,):
            raise ValueError(f"y_true must hold one grade per val photo ({n}), got shape {y_true.shape}")
        referable = is_referable(y_true)
    # The reference referral: referable DR, or (DME head) a DME label of 1; unknown for a non-referable photo
    # without a DME label, which then counts in neither sensitivity nor specificity.
    dme_labels = None if dme is None else dme.checked_labels(n)
    positive, known = referable, np.full(n, labelled)
    if dme_labels is not None:
        positive = referable | (dme_labels == 1)
        known = labelled & (referable | (dme_labels != MISSING))
    referral = _Decision("", positive, known, ref_refer, test_refer)
    dme_decision = None if dme is None else _Decision("dme_", dme_labels == 1, dme_labels != MISSING,
                                                      ref.dme_present, test.dme_present)
    with_draws = draws is not None and draws.k >= 2
    if with_draws:
        ref_d = _draw_decisions(draws.ref_logits, ref_point, draws.ref_dme, ref_dme_point)
        test_d = _draw_decisions(draws.test_logits, operating_point, draws.test_dme,
                                 None if dme is None else dme.operating_point)
        referral = replace(referral, ref_draws=ref_d[0], test_draws=test_d[0], ref_logit=ref_d[1],
                           test_logit=test_d[1])
        if dme_decision is not None and ref_d[2] is not None:
            dme_decision = replace(dme_decision, ref_draws=ref_d[2], test_draws=test_d[2], ref_logit=ref_d[3],
                                   test_logit=test_d[3])

    criteria: list[GateCriterion] = []
    boot = ClusteredBootstrap(folders, patients, thresholds.n_resamples, seed) if with_draws else None
    for decision in (referral, dme_decision):
        if decision is None:
            continue
        criteria += _clinical(decision, folders, thresholds, seed)
        auc_name = f"{decision.prefix}auc_ratio"
        if decision is referral:
            criteria.append(_auc_ratio(auc_name, "referable", thresholds.min_auc_ratio, referable, test_score,
                                       ref_score, thresholds, seed) if labelled else
                            _criterion(auc_name, None, thresholds.min_auc_ratio))
        else:
            labelled_dme = dme_labels != MISSING
            criteria.append(_auc_ratio(auc_name, "DME", thresholds.min_dme_auc_ratio, dme_labels[labelled_dme] == 1,
                                       test.dme_probability[labelled_dme], ref.dme_probability[labelled_dme],
                                       thresholds, seed))
        if decision.ref_draws is not None:
            floor_criteria, floor_metrics = _noise_floor(decision, boot, draws.k, thresholds)
            criteria += floor_criteria
            metrics.update(floor_metrics)
        elif thresholds.judges_noise_floor:
            criteria += [_criterion(f"{decision.prefix}{name}", None, getattr(thresholds, f"max_{name}"),
                                    direction="max") for name in ("excess_disagreement", "disagreement_ratio",
                                                                  "hard_flips", "score_shift", "score_rms")]
        metrics.update(_per_folder(decision, folders))

    # Reported beside them (judged only where a threshold is set, e.g. the strict profile).
    criteria.append(_proportion("referral_agreement", int((ref_refer == test_refer).sum()), n,
                                thresholds.min_referral_agreement, thresholds.confidence))
    if dme is not None:
        criteria.append(_proportion("dme_agreement", int((ref.dme_present == test.dme_present).sum()), n,
                                    thresholds.min_dme_agreement, thresholds.confidence))
    criteria.append(_proportion("grade_agreement", int((ref_logits.argmax(1) == test_logits.argmax(1)).sum()), n,
                                thresholds.min_grade_agreement, thresholds.confidence))
    clean_flips = int(((ref_refer != test_refer) & ~ref.uncertain & ~test.uncertain).sum())
    criteria.append(_proportion("clean_referral_agreement", n - clean_flips, n,
                                thresholds.min_clean_referral_agreement, thresholds.confidence))
    if labelled:
        qwk_ref = quadratic_weighted_kappa(y_true, ref_logits.argmax(1))
        qwk_test = quadratic_weighted_kappa(y_true, test_logits.argmax(1))
        criteria.append(_criterion("qwk_ratio", _ratio(qwk_test, qwk_ref), thresholds.min_qwk_ratio, n=n,
                                   method="quadratic weighted kappa vs reference grades, candidate / FP32"))
        ref_ss = binary_sensitivity_specificity(positive[known], ref_refer[known])
        test_ss = binary_sensitivity_specificity(positive[known], test_refer[known])
        metrics.update({
            "sensitivity": test_ss["sensitivity"], "sensitivity_fp32": ref_ss["sensitivity"],
            "specificity": test_ss["specificity"], "specificity_fp32": ref_ss["specificity"],
            "n_positive": float(test_ss["n_positive"]), "n_negative": float(test_ss["n_negative"]),
            "auc": roc_auc(referable, test_score), "auc_fp32": roc_auc(referable, ref_score),
            "qwk": qwk_test, "qwk_fp32": qwk_ref})
    if dme is not None:
        metrics.update(_dme_metrics(ref, test, dme_labels))
    criteria.append(_criterion("logit_cosine", metrics["logit_cosine"], thresholds.min_logit_cosine, n=n,
                               method="mean over photos"))
    if "cam_correlation" in metrics:
        criteria.append(_criterion("cam_correlation", metrics["cam_correlation"], thresholds.min_cam_correlation,
                                   n=n, method="mean Pearson r, CAM of the FP32 grade"))
    metrics.update({"clean_referral_flips": float(clean_flips), "gate_photos": float(n),
        "gate_referable": float(referable.sum()), "draws": float(draws.k if draws is not None else 0),
        "gate_folders": float(len(np.unique(folders)))})
    agreement = next(c for c in criteria if c.name == "referral_agreement")
    metrics["referral_agreement"] = agreement.value or 0.0
    if agreement.photos_needed is not None:
        metrics["val_photos_needed"] = float(agreement.photos_needed)
    if draws is not None:
        recorded.update({f"nuisance_{k}": float(v) for k, v in draws.nuisance.as_dict().items()
                         if not isinstance(v, tuple)})

    failures, insufficient = _verdict_lines(criteria, thresholds)
    evidence = _evidence_lines(n, int(referable.sum()), labelled, draws, thresholds)
    if _below_minimum(n, int(referable.sum()), draws, thresholds):  # what is missing first, then what it showed
        return GateResult("insufficient_evidence", _finite(metrics), recorded,
                          tuple(evidence + insufficient + failures), tuple(criteria))
    status = "failed" if failures else "insufficient_evidence" if insufficient else "passed"
    return GateResult(status, _finite(metrics), recorded, tuple(failures + insufficient), tuple(criteria))


def _dme_metrics(ref, test, labels: np.ndarray) -> dict[str, float]:
    """Both models' DME figures on the photos with a DME label, for the flat metrics."""
    labelled = labels != MISSING
    positive = labels[labelled] == 1
    ref_ss = binary_sensitivity_specificity(positive, ref.dme_present[labelled])
    test_ss = binary_sensitivity_specificity(positive, test.dme_present[labelled])
    return {"dme_agreement": float((ref.dme_present == test.dme_present).mean()),
            "dme_auc": roc_auc(positive, test.dme_probability[labelled]),
            "dme_auc_fp32": roc_auc(positive, ref.dme_probability[labelled]),
            "dme_sensitivity": test_ss["sensitivity"], "dme_sensitivity_fp32": ref_ss["sensitivity"],
            "dme_specificity": test_ss["specificity"], "dme_specificity_fp32": ref_ss["specificity"],
            "dme_n_positive": float(test_ss["n_positive"]), "dme_n_negative": float(test_ss["n_negative"])}


def _below_minimum(n: int, referable: int, draws: Draws | None, thresholds: GateThresholds) -> bool:
    short_of_draws = thresholds.judges_noise_floor and (draws is None or draws.k < thresholds.min_draws)
    return n < thresholds.min_gate_photos or referable < thresholds.min_gate_referable or short_of_draws


def _evidence_lines(n: int, referable: int, labelled: bool, draws: Draws | None,
                    thresholds: GateThresholds) -> list[str]:
    """What the minimum evidence still lacks, one line each."""
    lines = []
    if n < thresholds.min_gate_photos:
        lines.append(f"gate set: {n} photos < {thresholds.min_gate_photos}; needs {thresholds.min_gate_photos - n} "
                     f"more graded val photos")
    if referable < thresholds.min_gate_referable:
        lines.append(f"gate set: {referable} referable photos < {thresholds.min_gate_referable}; needs "
                     f"{thresholds.min_gate_referable - referable} more referable val photos"
                     + ("" if labelled else " (the photos have no grades)"))
    if thresholds.judges_noise_floor and (draws is None or draws.k < thresholds.min_draws):
        have = 0 if draws is None else draws.k
        lines.append(f"nuisance draws: {have} per photo < {thresholds.min_draws}; the noise-floor criteria need "
                     f"{thresholds.min_draws} draws of every gate photo for both models")
    return lines


def _verdict_lines(criteria: list[GateCriterion], thresholds: GateThresholds) -> tuple[list[str], list[str]]:
    """One line per failed criterion, and one per judged criterion that cannot be estimated or lacks photos."""
    failures, insufficient = [], []
    for c in criteria:
        if c.threshold is not None and c.passed is None:
            insufficient.append(f"{c.name}: cannot be estimated on these val photos (n={c.n}); needs "
                                + ("val photos with DME present and absent by their DME label"
                                   if c.name.startswith("dme_") else
                                   "the nuisance draws of both models" if c.direction == "max" else
                                   "labelled photos of both referable and non-referable eyes"))
        elif c.passed is False:
            judged = c.bound if c.bound is not None else c.value
            relation = "<" if c.direction == "min" else ">"
            kind = "" if c.bound is None else "lower bound " if c.direction == "min" else "bound "
            shown = "inf" if judged is None else f"{judged:.4f}"
            off = "inf" if c.margin is None else f"{-c.margin:.4f}"
            line = (f"{c.name} {kind}{shown} {relation} {c.threshold:.4f} (off by {off}; value "
                    f"{'-' if c.value is None else f'{c.value:.4f}'}, n={c.n})")
            if c.evidence_limited:
                insufficient.append(f"{line}: even perfect agreement needs {c.photos_needed} val photos; "
                                    f"needs {c.photos_needed - c.n} more val photos")
            else:
                failures.append(line)
    return failures, insufficient


def criteria_table(gate: GateResult, title: str = "fidelity gate"):
    """The gate's criteria as a rich Table: criterion, value, 95% interval, bound, threshold, margin, n, verdict."""
    from rich.table import Table

    def number(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    verdict_style = {"passed": "green", "failed": "red", "insufficient_evidence": "yellow"}
    table = Table(title=f"{title}: [{verdict_style.get(gate.status, 'white')}]{gate.status}[/]")
    for column in ("criterion", "value", "interval", "bound", "threshold", "margin", "n", "verdict"):
        table.add_column(column, justify="left" if column in ("criterion", "verdict") else "right")
    for c in gate.criteria:
        verdict = "reported" if c.threshold is None else "n/a" if c.passed is None else "pass" if c.passed else "FAIL"
        if c.evidence_limited:
            verdict = f"needs {c.photos_needed - c.n} more photos"
        style = {"pass": "green", "FAIL": "red"}.get(verdict, "yellow" if verdict != "reported" else "dim")
        interval = "-" if c.interval is None else f"[{c.interval[0]:.4f}, {c.interval[1]:.4f}]"
        margin = "-" if c.margin is None else f"{c.margin:+.4f}"
        threshold = "-" if c.threshold is None else f"{'>=' if c.direction == 'min' else '<='} {c.threshold:.4f}"
        table.add_row(c.name, number(c.value), interval, number(c.bound), threshold, margin,
                      "-" if c.n is None else str(c.n), f"[{style}]{verdict}[/]")
    if gate.failures:
        table.caption = "\n".join(gate.failures)
    return table


def folder_figures(gate: GateResult) -> dict[str, dict[str, float]]:
    """The per-folder figures of ``gate.metrics`` (``folder:<name>:<figure>``), by folder."""
    out: dict[str, dict[str, float]] = {}
    for key, value in gate.metrics.items():
        if key.startswith("folder:"):
            _, folder, figure = key.split(":", 2)
            out.setdefault(folder, {})[figure] = value
    return out


def folder_table(gate: GateResult, title: str = "per folder"):
    """Each folder's n, referable n, D0, D1, E, hard flips, and both models' sensitivity and specificity."""
    from rich.table import Table

    columns = ("n", "n_positive", "d0", "d1", "excess", "hard_flips", "sensitivity_fp32", "sensitivity",
               "specificity_fp32", "specificity")
    table = Table(title=title)
    table.add_column("folder")
    for column in columns:
        table.add_column(column, justify="right")
    for folder, figures in sorted(folder_figures(gate).items()):
        table.add_row(folder, *("-" if c not in figures else f"{figures[c]:.0f}" if c in (
            "n", "n_positive", "hard_flips") else f"{figures[c]:.4f}" for c in columns))
    return table
