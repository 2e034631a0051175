"""Training-side reports: the metrics themselves live in ``edge_runtime.metrics`` (re-exported here), the plots here."""
from __future__ import annotations

import numpy as np

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


def save_roc_png(y_true, referable_scores, path: str, operating_point=None, title: str = "Referable DR ROC") -> None:
    """ROC of P(grade >= 2) against referable/not, with the operating point marked (and its 95% Wilson intervals
    as error bars when the point carries them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    positive = is_referable(y_true)
    fpr, tpr, _ = roc_curve(positive, np.asarray(referable_scores, float))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc(positive, referable_scores):.3f} "
                            f"(n={len(positive)}, {int(positive.sum())} referable)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    op = operating_point
    if op is not None and op.sensitivity is not None and op.specificity is not None:
        x, y = 1 - op.specificity, op.sensitivity
        xerr = None if op.specificity_ci is None else [[x - (1 - op.specificity_ci[1])], [(1 - op.specificity_ci[0]) - x]]
        yerr = None if op.sensitivity_ci is None else [[y - op.sensitivity_ci[0]], [op.sensitivity_ci[1] - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color="crimson", capsize=3,
                    label=f"{op.rule} {op.target if op.target is not None else ''} @ {op.threshold:.3f}: "
                          f"sens {y:.2f}, spec {op.specificity:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
