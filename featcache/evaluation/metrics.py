"""Accuracy helpers shared by probe and k-NN: top-k, mean per class, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its k highest scores. scores: (N, C), labels: (N,)."""
    if k >= scores.shape[1]:
        return np.ones(len(labels), bool)
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the k highest scores."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * topk_hits(scores, labels, k).mean())


def per_class_accuracies(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Percent correct of each class (NaN for a class that the labels do not hold)."""
    return [
        float(100.0 * (pred[labels == c] == c).mean()) if (labels == c).any() else float("nan")
        for c in range(num_classes)
    ]


def mean_per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Percent correct per class, averaged over the classes that the labels hold."""
    return float(np.nanmean(per_class_accuracies(pred, labels, num_classes)))


def bootstrap_interval(
    correct: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the accuracy (percent) over the test images.

    ``correct``: (N,) booleans. Each resample draws N images with replacement (numpy's
    default_rng(seed)); the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of
    the resampled accuracies.
    """
    rng = np.random.default_rng(seed)
    hits = np.asarray(correct, dtype=np.float64)
    accuracy = np.concatenate(  # 100 resamples at a time: memory stays at 100 x N indices
        [
            100.0
            * hits[rng.integers(0, len(hits), size=(min(100, resamples - s), len(hits)))].mean(
                axis=1
            )
            for s in range(0, resamples, 100)
        ]
    )
    tail = (1 - level) / 2
    return [float(np.quantile(accuracy, tail)), float(np.quantile(accuracy, 1 - tail))]


def classification_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    """top-1, top-3, mean per-class top-1 and the top-1's 95% bootstrap interval (percent)."""
    hit3 = topk_hits(scores, labels, min(3, scores.shape[1]))
    return summary_from_predictions(scores.argmax(axis=1), hit3, labels, scores.shape[1])


def summary_from_predictions(
    pred: np.ndarray, hit3: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict:
    """The same summary from each row's predicted class and whether its label is in its
    top 3: what a probe scored chunk by chunk keeps."""
    correct = pred == labels
    return {
        "top1": float(100.0 * correct.mean()),
        "top3": float(100.0 * np.asarray(hit3).mean()),
        "mean_per_class": mean_per_class_accuracy(pred, labels, num_classes),
        "top1_ci95": bootstrap_interval(correct),
    }


def head_metrics(logits: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per-head loss/top-1/top-3 (percent), all heads at once. logits: (S, N, C), y: (N,)."""
    s, n, c = logits.shape
    loss = F.cross_entropy(logits.reshape(s * n, c), y.repeat(s), reduction="none").view(s, n)
    hits = logits.topk(min(3, c), dim=2).indices == y.view(1, n, 1)  # (S, N, 3)
    top1 = hits[:, :, 0].double().mean(1) * 100  # exact percentages (not float32 ones)
    top3 = hits.any(2).double().mean(1) * 100
    return [
        {"loss": float(a), "top1": float(b), "top3": float(t)}
        for a, b, t in zip(loss.mean(1).tolist(), top1.tolist(), top3.tolist())
    ]
