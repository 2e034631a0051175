"""Training-side reports: the metrics themselves live in ``edge_runtime.metrics`` (re-exported here), the plots here."""
from __future__ import annotations

import numpy as np

from edge_runtime.contract import OperatingPoint
from edge_runtime.decision import decide_batch
from edge_runtime.metrics import (  # noqa: F401 - re-exported for training code and notebooks
    auc_interval,
    binary_auc_interval,
    binary_sensitivity_specificity,
    confusion,
    is_referable,
    quadratic_weighted_kappa,
    qwk_interval,
    referable_probability,
    roc_auc,
    screening_metrics,
)

from .data.layouts import MISSING


def report_at(point: OperatingPoint, y: np.ndarray, logits: np.ndarray, auc_ci: bool = True,
              dme_labels: np.ndarray | None = None, dme_logits: np.ndarray | None = None,
              dme_point: OperatingPoint | None = None) -> dict:
    """Screening metrics of ``logits`` decided at ``point`` (decide_batch), each with n and a 95% interval, plus how
    many photos fell in the uncertain band. ``auc_ci=False`` skips the AUC and QWK bootstraps (per-epoch validation).

    With a DME head's ``dme_logits`` (and its photos' ``dme_labels``, ``MISSING`` where unknown) the report gains
    ``dme``: AUC and sensitivity/specificity at ``dme_point`` (default 0.5) on the labelled photos, and
    ``referred``: photos referred for referable DR or DME, the rule the device applies.

    Photos whose grade is ``MISSING`` (blank or coarse) are left out of the grade figures (``split_report``)."""
    if (np.asarray(y) == MISSING).any():
        return split_report(point, y, logits, auc_ci, dme_labels, dme_logits, dme_point)
    if dme_logits is not None and dme_point is None:
        dme_point = OperatingPoint()
    decisions = decide_batch(logits, point, dme_logits, dme_point)
    metrics = screening_metrics(y, decisions.probabilities, point.threshold)
    if auc_ci:
        metrics["referable_auc_ci"] = auc_interval(y, decisions.referable_probability)
        metrics["qwk_ci"] = qwk_interval(y, decisions.probabilities.argmax(1))
    metrics["uncertain"] = int(decisions.uncertain.sum())
    metrics["operating_point"] = point.describe()
    if decisions.dme_probability is not None:
        labels = np.full(len(y), MISSING) if dme_labels is None else np.asarray(dme_labels)
        metrics["dme"] = dme_metrics(labels, decisions.dme_probability, decisions.dme_present, auc_ci)
        metrics["dme"]["operating_point"] = dme_point.describe()
        metrics["referred"] = int(decisions.referable.sum())
    return metrics


def split_report(point: OperatingPoint, y: np.ndarray, logits: np.ndarray, auc_ci: bool = True,
                 dme_labels: np.ndarray | None = None, dme_logits: np.ndarray | None = None,
                 dme_point: OperatingPoint | None = None) -> dict:
    """``report_at`` on a split where some photos have no single grade (``MISSING``: a blank or coarse grade):
    the grade figures on the graded photos (``n_without_grade`` says how many were left out), the DME figures and
    the referral count on every photo. A fully graded split gives exactly ``report_at``'s report."""
    y = np.asarray(y)
    graded = y != MISSING
    if graded.all():
        return report_at(point, y, logits, auc_ci, dme_labels, dme_logits, dme_point)
    if not graded.any():
        raise ValueError(f"none of the {len(y)} photos has a grade: grade figures and the referral point need some")
    labels = np.full(len(y), MISSING) if dme_labels is None else np.asarray(dme_labels)
    dme = {} if dme_logits is None else dict(dme_labels=labels[graded], dme_logits=dme_logits[graded],
                                             dme_point=dme_point)
    metrics = report_at(point, y[graded], logits[graded], auc_ci, **dme)
    metrics["n_without_grade"] = int((~graded).sum())
    if dme_logits is not None:
        dme_point = dme_point or OperatingPoint()
        decisions = decide_batch(logits, point, dme_logits, dme_point)
        metrics["dme"] = {**dme_metrics(labels, decisions.dme_probability, decisions.dme_present, auc_ci),
                          "operating_point": dme_point.describe()}
        metrics["referred"] = int(decisions.referable.sum())
    return metrics


def dme_metrics(labels: np.ndarray, probability: np.ndarray, present: np.ndarray, auc_ci: bool = True) -> dict:
    """DME head on the photos with a DME label: AUC (bootstrap interval with ``auc_ci``), sensitivity and
    specificity of ``present`` with 95% Wilson intervals and n; ``n_missing`` photos had no label."""
    labelled = labels != MISSING
    positive, probability, present = labels[labelled] == 1, probability[labelled], present[labelled]
    at_point = binary_sensitivity_specificity(positive, present)
    return {"n": int(labelled.sum()), "n_missing": int((~labelled).sum()), "auc": roc_auc(positive, probability),
            **({"auc_ci": binary_auc_interval(positive, probability)} if auc_ci else {}), **at_point}


def save_confusion_png(cm: list[list[int]], path: str, title: str = "Confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("reference grade")
    ax.set_title(title)
    ax.set_xticks(range(cm.shape[0]))
    ax.set_yticks(range(cm.shape[0]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_roc_png(y_true, referable_score, point: OperatingPoint, path: str, title: str = "Referable DR") -> None:
    """ROC of the calibrated referable probability with the operating point (and its uncertainty band) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    positive, score = is_referable(y_true), np.asarray(referable_score, float)
    fpr, tpr, _ = roc_curve(positive, score)
    referred = score >= point.threshold
    sens, spec = referred[positive].mean(), (~referred[~positive]).mean()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(positive, score):.3f} (n+={positive.sum()}, n-={(~positive).sum()})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    if point.uncertain_band is not None:
        low, high = point.uncertain_band
        band = [(1 - (~(score >= t)[~positive]).mean(), (score >= t)[positive].mean()) for t in (high, low)]
        ax.plot(*zip(*band, strict=True), c="orange", lw=6, alpha=0.5, label="uncertain band")
    ax.scatter([1 - spec], [sens], c="red", zorder=3, label=f"threshold {point.threshold:.3f} ({point.rule})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
