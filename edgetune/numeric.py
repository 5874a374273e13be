"""Small NumPy helpers shared by the trainer, tuner, bench and the edge: softmax and confusion matrix.

Torch-free (the edge imports it); the one definition of each, so a fix lands everywhere.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (default: the last, i.e. per row of a batch), in float64.

    The maximum is subtracted first, so large logits (1e4) give finite probabilities, not NaN.
    """
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    out: np.ndarray = e / e.sum(axis=axis, keepdims=True)
    return out


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = how many samples of true class ``i`` were predicted as ``j`` (int64, rows = truth)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(preds, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"confusion matrix: {y.size} labels but {p.size} predictions")
    for name, a in (("label", y), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"confusion matrix: {name} {int(a.min() if a.min() < 0 else a.max())} is outside 0..{num_classes - 1}"
            )
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
