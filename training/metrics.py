"""Screening metrics: quadratic weighted kappa, per-grade recall, referable sensitivity/specificity/AUC."""
from __future__ import annotations

import numpy as np

from edge_runtime.contract import NUM_GRADES, REFERABLE_MIN_GRADE


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int = NUM_GRADES) -> np.ndarray:
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def quadratic_weighted_kappa(y_true, y_pred, k: int = NUM_GRADES) -> float:
    observed = confusion(y_true, y_pred, k).astype(float)
    n = observed.sum()
    if n == 0:
        return float("nan")
    weights = np.subtract.outer(np.arange(k), np.arange(k)) ** 2 / (k - 1) ** 2
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    denominator = (weights * expected).sum()
    return 1.0 if denominator == 0 else float(1 - (weights * observed).sum() / denominator)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when one class is absent."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    sorted_scores = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(sorted_scores):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def referable_probability(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs)[:, REFERABLE_MIN_GRADE:].sum(axis=1)


def screening_metrics(y_true, probs, referable_threshold: float = 0.5) -> dict:
    """All metrics reported by training, distillation, export parity and benchmarks."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    y_pred = probs.argmax(1)
    ref_true = y_true >= REFERABLE_MIN_GRADE
    ref_score = referable_probability(probs)
    ref_pred = ref_score >= referable_threshold
    cm = confusion(y_true, y_pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(1)
    tp, fn = int((ref_pred & ref_true).sum()), int((~ref_pred & ref_true).sum())
    tn, fp = int((~ref_pred & ~ref_true).sum()), int((ref_pred & ~ref_true).sum())
    return {
        "n": int(len(y_true)),
        "qwk": quadratic_weighted_kappa(y_true, y_pred),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "per_grade_recall": [None if np.isnan(r) else float(r) for r in recall],
        "referable_sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "referable_specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "referable_auc": roc_auc(ref_true, ref_score),
        "confusion_matrix": cm.tolist(),
    }


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
