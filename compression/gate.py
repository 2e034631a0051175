"""The fidelity gate: an INT8 (or FP16) artifact must refer like the FP32 model it came from, with evidence.

Judged on the labelled val photos, at the artifact's operating point (docs/fidelity_gate.md gives the reasons):

- referral-decision agreement with FP32: one-sided 95% Clopper-Pearson lower bound >= 0.98;
- referable sensitivity and specificity, INT8 - FP32: one-sided 95% paired-bootstrap lower bound >= -0.02 each;
- referable AUC ratio INT8 / FP32 >= 0.99;
- grade agreement, QWK ratio, logit cosine and CAM correlation: reported, judged only when given a threshold.

For an artifact with a DME head (``DmeOutputs``) the referral judged is the one ``decide_batch`` makes: referable DR
*or* DME present, against the reference referral (grade >= 2 or a DME label of 1) on the photos where it is known;
the referable AUC stays the DR ranking. Two criteria are added: DME-present agreement with FP32 (one-sided 95%
Clopper-Pearson lower bound >= 0.98, every val photo) and DME AUC ratio INT8 / FP32 >= 0.99 (photos with a DME label).

Verdict ``passed``, ``failed``, or ``insufficient_evidence`` when nothing failed but the val set is too small for an
agreement bound to reach its threshold even if every decision agreed (or a required criterion cannot be estimated).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

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
)
from training.data.layouts import MISSING

REQUIRED = ("referral_agreement", "sensitivity_difference", "specificity_difference", "auc_ratio")
REQUIRED_DME = ("dme_agreement", "dme_auc_ratio")  # added for artifacts with a DME head


@dataclass(frozen=True, kw_only=True)
class GateThresholds:
    """What INT8 must show against FP32 on the val photos. Defaults and their reasons: docs/fidelity_gate.md."""

    min_referral_agreement: float = 0.98  # one-sided lower confidence bound (Clopper-Pearson)
    min_sensitivity_difference: float = -0.02  # one-sided lower bound of INT8 - FP32 (paired bootstrap)
    min_specificity_difference: float = -0.02
    min_auc_ratio: float = 0.99  # referable AUC, INT8 / FP32, point estimate
    min_dme_agreement: float = 0.98  # DME-present decisions, one-sided lower bound (Clopper-Pearson); DME head only
    min_dme_auc_ratio: float = 0.99  # DME AUC, INT8 / FP32, on the val photos with a DME label; DME head only
    min_grade_agreement: float | None = None  # one-sided lower bound; reported only unless set
    # Share of photos on which the two do not refer oppositely with both outside their uncertainty bands (a change
    # inside either band is a result already shown as "uncertain: refer or get a second read"); reported only unless set.
    min_clean_referral_agreement: float | None = None
    min_qwk_ratio: float | None = None  # QWK(INT8 vs truth) / QWK(FP32 vs truth)
    min_logit_cosine: float | None = None  # mean over photos
    min_cam_correlation: float | None = None  # mean Pearson r of the FP32-predicted grade's CAM
    confidence: float = 0.95  # of every one-sided bound (and of the two-sided intervals shown beside them)
    n_resamples: int = 2000  # paired bootstrap
    # Not judged by the gate: the agreement with FP32's referral decisions (grades without an operating point)
    # that accuracy-controlled mixed precision (nncf_ac) holds on the unlabelled tuning photos, which need no labels.
    tuning_agreement: float = 0.995

    def __post_init__(self) -> None:
        for name in ("min_referral_agreement", "min_grade_agreement", "min_dme_agreement",
                     "min_clean_referral_agreement"):
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
        for name in ("min_sensitivity_difference", "min_specificity_difference"):
            if not -1.0 <= getattr(self, name) <= 0.0:
                raise ConfigError(f"{name} is a non-inferiority margin and must be in [-1, 0], got {getattr(self, name)}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.n_resamples < 2000:
            raise ConfigError(f"n_resamples must be >= 2000 for a stable 95% bound, got {self.n_resamples}")

    def as_dict(self, dme: bool = False) -> dict[str, float]:
        """The thresholds a gate recorded; the DME ones only where the artifact has a DME head (``dme``)."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None and (dme or not f.name.startswith("min_dme_"))}


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
               photos_needed: int | None = None) -> GateCriterion:
    """A criterion is judged on its lower bound when it has one (evidence), else on its value."""
    def finite(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    value, bound = finite(value), finite(bound)
    if interval is not None and not all(math.isfinite(v) for v in interval):
        interval = None
    judged = bound if bound is not None else value
    margin = None if threshold is None or judged is None else judged - threshold
    passed = None if margin is None else margin >= -1e-12  # a bound equal to the threshold clears it
    return GateCriterion(name, value, bound, threshold, margin, passed, interval, n, method, photos_needed)


def _proportion(name: str, agree: int, n: int, threshold: float | None, confidence: float) -> GateCriterion:
    needed = None if threshold is None else 0 if threshold == 0 else photos_needed_for_lower_bound(threshold, confidence)
    if n == 0:
        return _criterion(name, None, threshold, n=0, photos_needed=needed)
    return _criterion(name, agree / n, threshold, bound=clopper_pearson_lower(agree, n, confidence),
                      interval=clopper_pearson_interval(agree, n, confidence), n=n,
                      method=f"Clopper-Pearson; bound one-sided {confidence:.0%}", photos_needed=needed)


def _difference(name: str, test: np.ndarray, ref: np.ndarray, threshold: float, thresholds: GateThresholds,
                seed: int) -> GateCriterion:
    if len(test) < 2:  # no (or one) photo of this class: the difference cannot be estimated
        return _criterion(name, None, threshold, n=len(test))
    boot = paired_bootstrap_difference(test, ref, confidence=thresholds.confidence,
                                       n_resamples=thresholds.n_resamples, seed=seed)
    return _criterion(name, boot.estimate, threshold, bound=boot.lower_bound, interval=(boot.low, boot.high),
                      n=boot.n, method=f"paired bootstrap ({boot.method}, {boot.n_resamples} resamples, seed {seed}); "
                      f"bound one-sided {thresholds.confidence:.0%}")


def _auc_ratio(name: str, finding: str, threshold: float, positive: np.ndarray, test_score: np.ndarray,
               ref_score: np.ndarray, thresholds: GateThresholds, seed: int) -> GateCriterion:
    """AUC of ``finding`` (referable, DME), INT8 / FP32, judged on the value (the ranking the operating point was
    chosen on); the bootstrap interval is shown."""
    value = _ratio(roc_auc(positive, test_score), roc_auc(positive, ref_score))
    if not math.isfinite(value) or min(positive.sum(), (~positive).sum()) < 2:
        return _criterion(name, value, threshold, n=len(positive))
    boot = paired_bootstrap_auc_ratio(positive, test_score, ref_score, thresholds.confidence,
                                      thresholds.n_resamples, seed)
    return _criterion(name, value, threshold, interval=(boot.low, boot.high), n=boot.n,
                      method=f"{finding} AUC, INT8 / FP32; stratified paired bootstrap ({boot.method}, "
                      f"{boot.n_resamples} resamples, seed {seed}); judged on the value")


def _dme_criteria(ref, test, dme: DmeOutputs, n: int, thresholds: GateThresholds,
                  seed: int) -> tuple[list[GateCriterion], dict[str, float]]:
    """DME-present agreement (every val photo; it needs no label) and the DME AUC ratio (photos with a DME label),
    with the DME figures of both models for the flat metrics."""
    labels = dme.checked_labels(n)
    labelled = labels != MISSING
    positive = labels[labelled] == 1
    agreement = _proportion("dme_agreement", int((ref.dme_present == test.dme_present).sum()), n,
                            thresholds.min_dme_agreement, thresholds.confidence)
    auc_ratio = _auc_ratio("dme_auc_ratio", "DME", thresholds.min_dme_auc_ratio, positive,
                           test.dme_probability[labelled], ref.dme_probability[labelled], thresholds, seed)
    ref_ss = binary_sensitivity_specificity(positive, ref.dme_present[labelled])
    test_ss = binary_sensitivity_specificity(positive, test.dme_present[labelled])
    metrics = {"dme_agreement": agreement.value or 0.0,
               "dme_auc": roc_auc(positive, test.dme_probability[labelled]),
               "dme_auc_fp32": roc_auc(positive, ref.dme_probability[labelled]),
               "dme_sensitivity": test_ss["sensitivity"], "dme_sensitivity_fp32": ref_ss["sensitivity"],
               "dme_specificity": test_ss["specificity"], "dme_specificity_fp32": ref_ss["specificity"],
               "dme_n_positive": float(test_ss["n_positive"]), "dme_n_negative": float(test_ss["n_negative"])}
    return [agreement, auc_ratio], metrics


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The manifest's JSON keeps numbers only: NaN (undefined, e.g. no referable photos) is left out."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")


def judge(ref_logits, ref_cam, test_logits, test_cam, y_true, operating_point: OperatingPoint,
          thresholds: GateThresholds = GateThresholds(), seed: int = 0,
          ref_operating_point: OperatingPoint | None = None, dme: DmeOutputs | None = None) -> GateResult:
    """The fidelity gate: ``test`` (INT8/FP16) against ``ref`` (FP32 of the same model) on labelled val photos.

    Args:
        ref_logits, ref_cam: FP32 outputs, (n, 5) and (n, 5, h, w) (CAMs may be None: not reported).
        test_logits, test_cam: the artifact's outputs on the same photos, same shapes.
        y_true: reference grades of the photos (None: only the label-free criteria; verdict at best
            ``insufficient_evidence``).
        operating_point: where the artifact refers (its temperature and threshold).
        thresholds: the criteria's thresholds (``GateThresholds``).
        seed: of the paired bootstrap.
        ref_operating_point: where FP32 refers, if it has its own point (default: the artifact's).
        dme: the DME head's logits, labels and points (artifacts with a DME head): referral is then judged as
            ``decide_batch`` takes it (referable DR or DME present), and DME agreement and AUC ratio are added.

    Returns:
        ``GateResult`` with status ``passed | failed | insufficient_evidence``, a flat ``metrics`` dict, the
        ``criteria`` table (value, interval, bound, threshold, margin, n each) and one failure line per reason.
    """
    ref_logits, test_logits = np.asarray(ref_logits, float), np.asarray(test_logits, float)
    if len(ref_logits) == 0:
        raise ValueError("the gate needs val photos: pass --val with a folder that has a labelled val split")
    metrics = compare(ref_logits, ref_cam, test_logits, test_cam)
    n = len(ref_logits)
    failures: list[str] = []
    non_finite = int((~np.isfinite(test_logits)).sum())
    if dme is not None:
        non_finite += int((~np.isfinite(np.asarray(dme.test_logits, float))).sum())
    if non_finite:  # a broken artifact (overflow, a bad scale): no statistic of its outputs means anything
        return GateResult("failed", _finite(metrics), thresholds.as_dict(dme is not None),
                          (f"the artifact produced {non_finite} non-finite logits on {n} val photos",))

    if dme is None:
        ref = decide_batch(ref_logits, ref_operating_point or operating_point)
        test = decide_batch(test_logits, operating_point)
    else:
        ref = decide_batch(ref_logits, ref_operating_point or operating_point, dme.ref_logits,
                           dme.ref_operating_point or dme.operating_point)
        test = decide_batch(test_logits, operating_point, dme.test_logits, dme.operating_point)
    ref_score, ref_refer = ref.referable_probability, ref.referable  # referral as the device takes it
    test_score, test_refer = test.referable_probability, test.referable
    criteria = [_proportion("referral_agreement", int((ref_refer == test_refer).sum()), n,
                            thresholds.min_referral_agreement, thresholds.confidence)]
    metrics.update({"referral_agreement": criteria[0].value or 0.0,
                    "val_photos_needed": float(criteria[0].photos_needed)})

    labelled = y_true is not None and len(y_true) > 0
    if labelled:
        y_true = np.asarray(y_true, int)
        if y_true.shape != (n,):
            raise ValueError(f"y_true must hold one grade per val photo ({n}), got shape {y_true.shape}")
        referable = is_referable(y_true)
        # The reference referral: referable DR, or (DME head) a DME label of 1; unknown for a non-referable photo
        # without a DME label, which then counts in neither sensitivity nor specificity.
        positive, known = referable, np.ones(n, bool)
        if dme is not None:
            dme_labels = dme.checked_labels(n)
            positive, known = referable | (dme_labels == 1), referable | (dme_labels != MISSING)
        ref_ss = binary_sensitivity_specificity(positive[known], ref_refer[known])
        test_ss = binary_sensitivity_specificity(positive[known], test_refer[known])
        auc_ref, auc_test = roc_auc(referable, ref_score), roc_auc(referable, test_score)
        qwk_ref = quadratic_weighted_kappa(y_true, ref_logits.argmax(1))
        qwk_test = quadratic_weighted_kappa(y_true, test_logits.argmax(1))
        criteria += [
            _difference("sensitivity_difference", test_refer[positive & known], ref_refer[positive & known],
                        thresholds.min_sensitivity_difference, thresholds, seed),
            _difference("specificity_difference", ~test_refer[~positive & known], ~ref_refer[~positive & known],
                        thresholds.min_specificity_difference, thresholds, seed),
            _auc_ratio("auc_ratio", "referable", thresholds.min_auc_ratio, referable, test_score, ref_score,
                       thresholds, seed),
        ]
        metrics.update({
            "sensitivity": test_ss["sensitivity"], "sensitivity_fp32": ref_ss["sensitivity"],
            "specificity": test_ss["specificity"], "specificity_fp32": ref_ss["specificity"],
            "n_positive": float(test_ss["n_positive"]), "n_negative": float(test_ss["n_negative"]),
            "auc": auc_test, "auc_fp32": auc_ref, "qwk": qwk_test, "qwk_fp32": qwk_ref,
        })
    else:
        criteria += [_criterion(name, None, getattr(thresholds, f"min_{name}")) for name in REQUIRED[1:]]
    required = REQUIRED
    if dme is not None:
        dme_criteria, dme_metrics = _dme_criteria(ref, test, dme, n, thresholds, seed)
        criteria += dme_criteria
        metrics.update(dme_metrics)
        required += REQUIRED_DME

    criteria.append(_proportion("grade_agreement", int((ref_logits.argmax(1) == test_logits.argmax(1)).sum()), n,
                                thresholds.min_grade_agreement, thresholds.confidence))
    clean_flips = int(((ref_refer != test_refer) & ~ref.uncertain & ~test.uncertain).sum())
    criteria.append(_proportion("clean_referral_agreement", n - clean_flips, n,
                                thresholds.min_clean_referral_agreement, thresholds.confidence))
    metrics["clean_referral_flips"] = float(clean_flips)
    if labelled:
        criteria.append(_criterion("qwk_ratio", _ratio(qwk_test, qwk_ref), thresholds.min_qwk_ratio, n=n,
                                   method="quadratic weighted kappa vs reference grades, INT8 / FP32"))
    criteria.append(_criterion("logit_cosine", metrics["logit_cosine"], thresholds.min_logit_cosine, n=n,
                               method="mean over photos"))
    if "cam_correlation" in metrics:
        criteria.append(_criterion("cam_correlation", metrics["cam_correlation"], thresholds.min_cam_correlation,
                                   n=n, method="mean Pearson r, CAM of the FP32 grade"))

    insufficient: list[str] = []
    for c in criteria:
        if c.name in required and c.passed is None:
            insufficient.append(f"{c.name}: cannot be estimated on these val photos (n={c.n}); needs "
                                + ("val photos with DME present and absent by their DME label"
                                   if c.name in REQUIRED_DME else
                                   "labelled photos of both referable and non-referable eyes"))
        elif c.passed is False:
            line = (f"{c.name} {'lower bound ' if c.bound is not None else ''}"
                    f"{c.bound if c.bound is not None else c.value:.4f} < {c.threshold:.4f} "
                    f"(off by {-c.margin:.4f}; value {c.value:.4f}, n={c.n})")
            if c.evidence_limited:
                insufficient.append(f"{line}: even perfect agreement needs {c.photos_needed} val photos; "
                                    f"needs {c.photos_needed - c.n} more val photos")
            else:
                failures.append(line)
    status = "failed" if failures else "insufficient_evidence" if insufficient else "passed"
    return GateResult(status, _finite(metrics), thresholds.as_dict(dme is not None), tuple(failures + insufficient),
                      tuple(criteria))


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
        table.add_row(c.name, number(c.value), interval, number(c.bound), number(c.threshold), margin,
                      "-" if c.n is None else str(c.n), f"[{style}]{verdict}[/]")
    if gate.failures:
        table.caption = "\n".join(gate.failures)
    return table
