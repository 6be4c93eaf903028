"""Label-free check: k-means on the features, scored against the labels afterwards.

faiss spherical k-means with as many clusters as classes on L2-normalised features; labels are
used only to score: NMI, adjusted Rand index and cluster accuracy (the best one-to-one matching
of clusters to classes, found by the Hungarian algorithm).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from featcache.knn import l2_normalize
from featcache.store import Store


@dataclass(frozen=True)
class ClusterConfig:
    store: str
    features: str | None = None
    split: str = "test"
    clusters: int | None = None  # default: the number of classes
    iterations: int = 50
    restarts: int = 5  # k-means runs; the one with the lowest objective is kept
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError("--iterations and --restarts must be positive")
        if self.clusters is not None and self.clusters < 2:
            raise ValueError(f"--clusters must be at least 2, got {self.clusters}")


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
        raise ValueError(f"{k} clusters for {len(x)} samples: pass fewer --clusters")
    km = faiss.Kmeans(
        x.shape[1], k, niter=iterations, nredo=restarts, seed=seed, spherical=True, verbose=False
    )
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def run_cluster(cfg: ClusterConfig) -> dict:
    store = Store(cfg.store)
    feature = cfg.features or store.default_feature()
    split = store.load(cfg.split, feature)
    k = cfg.clusters or len(store.class_names)
    start = time.perf_counter()
    assignment = kmeans(split.features, k, cfg.iterations, cfg.restarts, cfg.seed)
    return {
        **store.provenance("cluster", feature, asdict(cfg)),
        "split": cfg.split,
        "clusters": k,
        "nmi": float(100 * normalized_mutual_info_score(split.labels, assignment)),
        "ari": float(100 * adjusted_rand_score(split.labels, assignment)),
        "accuracy": cluster_accuracy(split.labels, assignment),
        "seconds": time.perf_counter() - start,
    }
