"""Weighted k-NN evaluation on cached features (Wu et al. 2018; DINO's eval_knn.py).

Features are L2-normalised; faiss finds the nearest training samples by inner product (cosine
similarity); each neighbour votes for its class with weight exp(sim / T).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from featcache.evaluation.metrics import classification_summary
from featcache.store import Store


@dataclass(frozen=True)
class KnnConfig:
    """The k-NN's method settings (what it reads is an argument of ``run_knn``)."""

    ks: tuple[int, ...] = (10, 20, 100, 200)
    # DINO's temperature for the vote weights exp(sim / T).
    temperature: float = 0.07
    # Queries searched at once; bounds memory to query_batch x max(k) results.
    query_batch: int = 8192

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--k needs positive integers, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(train: np.ndarray, queries: np.ndarray, k: int, query_batch: int = 8192):
    """Exact inner-product search: (sims (Q, k) descending, indices (Q, k))."""
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), query_batch):
        sims[s : s + query_batch], idx[s : s + query_batch] = index.search(
            queries[s : s + query_batch], k
        )
    return sims, idx


def weighted_vote(
    sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float
) -> np.ndarray:
    """Class scores (Q, C): each neighbour adds exp(sim / T) to its class."""
    weights = np.exp(sims / temperature)  # (Q, k)
    scores = np.zeros((len(sims), num_classes), np.float64)
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    np.add.at(scores, (rows, neighbour_labels.ravel()), weights.ravel())
    return scores


def knn_evaluate(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float,
    query_batch: int = 8192,
) -> list[dict]:
    """top-1, top-3, mean per-class top-1 and the top-1's 95% bootstrap interval (percent)
    of the weighted k-NN classifier, for each k."""
    if max(ks) > len(train):
        raise ValueError(
            f"k={max(ks)} exceeds the {len(train)} training samples; pass smaller --k values"
        )
    sims, idx = search(l2_normalize(train), l2_normalize(test), max(ks), query_batch)
    neighbour_labels = train_labels[idx]  # (Q, kmax)
    results = []
    for k in sorted(ks):
        scores = weighted_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
        results.append({"k": k, **classification_summary(scores, test_labels)})
    return results


def run_knn(store: str | Path | Store, cfg: KnnConfig, features: str | None = None) -> dict:
    """The k-NN of a store's test split by its train split; with the store's provenance."""
    store = store if isinstance(store, Store) else Store(store)
    feature, train, test = store.load_pair(features)
    start = time.perf_counter()
    results = knn_evaluate(
        train.features,
        train.labels,
        test.features,
        test.labels,
        len(store.class_names),
        cfg.ks,
        cfg.temperature,
        cfg.query_batch,
    )
    return {
        **store.provenance("knn", feature, cfg),
        "num_train": len(train.labels),
        "num_test": len(test.labels),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
