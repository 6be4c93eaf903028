"""Accuracy helpers shared by probe and k-NN."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the k highest scores. scores: (N, C), labels: (N,)."""
    if len(labels) == 0:
        return float("nan")
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k] if k < scores.shape[1] else None
    if top is None:
        return 100.0
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())
