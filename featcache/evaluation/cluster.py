"""Label-free check: k-means on the features, scored against the labels afterwards.

faiss spherical k-means with as many clusters as classes on L2-normalised features; labels are
used only to score: NMI, adjusted Rand index and cluster accuracy (the best one-to-one matching
of clusters to classes, found by the Hungarian algorithm).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.knn import l2_normalize


@dataclass(frozen=True)
class ClusterConfig:
    """k-means' settings (what it reads is the method's ``Splits``)."""

    split: str = "test"  # the split clustered
    clusters: int | None = None  # default: the number of classes
    iterations: int = 50
    restarts: int = 5  # k-means runs; the one with the lowest objective is kept
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1 or self.restarts < 1:
            raise ArgumentError("--iterations and --restarts must be positive")
        if self.clusters is not None and self.clusters < 2:
            raise ArgumentError(f"--clusters must be at least 2, got {self.clusters}")


def cluster_accuracy(labels: np.ndarray, assignment: np.ndarray) -> float:
    """Percent correct under the best one-to-one mapping of clusters to classes."""
    n = max(labels.max(), assignment.max()) + 1
    counts = np.zeros((n, n), np.int64)  # (cluster, class)
    np.add.at(counts, (assignment, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(100.0 * counts[rows, cols].sum() / len(labels))


def kmeans(x: np.ndarray, k: int, iterations: int, restarts: int, seed: int) -> np.ndarray:
    """Cluster index of each row of x (spherical k-means on normalised rows)."""
    x = l2_normalize(x)
    if k > len(x):
        raise ArgumentError(f"{k} clusters for {len(x)} samples: pass fewer --clusters")
    km = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=restarts, seed=seed, spherical=True, verbose=False
    )
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def cluster_features(
    x: np.ndarray, labels: np.ndarray, cfg: ClusterConfig, num_classes: int | None = None
) -> dict:
    """k-means on ``x`` with ``cfg.clusters`` clusters (default: one per class), scored by
    NMI, ARI and cluster accuracy (percent)."""
    k = cfg.clusters or num_classes or int(labels.max()) + 1
    assignment = kmeans(x, k, cfg.iterations, cfg.restarts, cfg.seed)
    return {
        "clusters": k,
        "nmi": float(100 * normalized_mutual_info_score(labels, assignment)),
        "ari": float(100 * adjusted_rand_score(labels, assignment)),
        "accuracy": cluster_accuracy(labels, assignment),
    }


def cluster(data: Splits, cfg: ClusterConfig) -> dict:
    """k-means on one split (as many clusters as there are classes, by default)."""
    x, labels = data.x(cfg.split), data.labels[cfg.split]
    return {"split": cfg.split, **cluster_features(x, labels, cfg, data.num_classes)}
