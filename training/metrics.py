"""Training-side reports: the metrics themselves live in ``edge_runtime.metrics`` (re-exported here), the plots here."""
from __future__ import annotations

import numpy as np

from edge_runtime.contract import OperatingPoint
from edge_runtime.metrics import (  # noqa: F401 - re-exported for training code and notebooks
    confusion,
    is_referable,
    quadratic_weighted_kappa,
    referable_probability,
    roc_auc,
    screening_metrics,
)


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
