"""Training-side reports: the metrics themselves live in ``edge_runtime.metrics`` (re-exported here), the plots here."""
from __future__ import annotations

import numpy as np

from edge_runtime.metrics import (  # noqa: F401 - re-exported for training code and notebooks
    confusion,
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
