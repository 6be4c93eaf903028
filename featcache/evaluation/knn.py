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

from featcache.distributed import Distributed
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
    # Bytes of features held at once (None: both splits in memory). The store is then read in
    # chunks and the top-k of each training chunk merged: exactly the in-memory result.
    max_memory: int | None = None

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--k needs positive integers, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"--max-memory must be positive, got {self.max_memory}")


NORM_ROWS = 65536  # rows whose norms are taken at once


def l2_normalize(x: np.ndarray, copy: bool = True) -> np.ndarray:
    """Rows scaled to unit length, as float32; ``copy=False`` scales a float32 ``x`` in place
    (for arrays read from a store, which no one else holds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.empty((len(x), 1), np.float32)
    for i in range(0, len(x), NORM_ROWS):  # norm squares its input: a slice's copy at a time
        norms[i : i + NORM_ROWS] = np.linalg.norm(x[i : i + NORM_ROWS], axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    if copy:
        return x / norms
    x /= norms
    return x


def search(train: np.ndarray, queries: np.ndarray, k: int, query_batch: int = 8192):
    """Exact inner-product search: (sims (Q, k) descending, indices (Q, k)).

    faiss's brute-force kernel on the arrays as they are: an IndexFlatIP would hold a copy of
    ``train`` (the search an index runs is this same kernel).
    """
    train = np.ascontiguousarray(train, dtype=np.float32)
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), query_batch):
        sims[s : s + query_batch], idx[s : s + query_batch] = faiss.knn(
            queries[s : s + query_batch], train, k, metric=faiss.METRIC_INNER_PRODUCT
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
    return vote(sims, train_labels[idx], test_labels, num_classes, ks, temperature)


def vote(sims, neighbour_labels, test_labels, num_classes: int, ks, temperature: float):
    """The summary of each k from the neighbours' similarities and labels (Q, max k)."""
    results = []
    for k in sorted(ks):
        scores = weighted_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
        results.append({"k": k, **classification_summary(scores, test_labels)})
    return results


def run_knn(store: str | Path | Store, cfg: KnnConfig, features: str | None = None) -> dict:
    """The k-NN of a store's test split by its train split; with the store's provenance.

    Under torchrun each rank searches a share of the queries and gathers the others'
    neighbours, so every rank holds the one-process result (rank 0 writes it).
    """
    store = store if isinstance(store, Store) else Store(store)
    feature = store.pair_feature(features)
    n_train, n_test = store.sizes["train"], store.sizes["test"]
    if max(cfg.ks) > n_train:
        raise ValueError(
            f"k={max(cfg.ks)} exceeds the {n_train} training samples; pass smaller --k values"
        )
    dist = Distributed.from_env()
    start = time.perf_counter()
    find = neighbours if cfg.max_memory is None else neighbours_bounded
    parts = dist.all_gather(find(store, feature, cfg, dist.share(n_test)))
    sims, idx = (np.concatenate(p) for p in zip(*parts))
    train_labels = store.read("train", "labels")
    results = vote(sims, train_labels[idx], store.read("test", "labels"),
                   len(store.class_names), cfg.ks, cfg.temperature)  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        **store.provenance("knn", feature, cfg),
        "num_train": n_train,
        "num_test": n_test,
        "seconds": seconds,
        "results": results,
    }


def neighbours(store: Store, feature: str, cfg: KnnConfig, queries: slice):
    """(sims, indices) of the test rows ``queries`` among the whole train split in memory."""
    train = l2_normalize(store.load("train", feature).features, copy=False)
    test = l2_normalize(store.rows("test", feature, queries.start, queries.stop), copy=False)
    return search(train, test, max(cfg.ks), cfg.query_batch)


def neighbours_bounded(store: Store, feature: str, cfg: KnnConfig, queries: slice):
    """The same with at most ``cfg.max_memory`` bytes of features held at once.

    Half the budget holds a chunk of training features, a quarter a chunk of queries (with
    their running top-k); each query chunk meets every training chunk, and the top-k of each
    is merged into the running one, so the neighbours are the in-memory search's.
    """
    kmax, n_train = max(cfg.ks), store.sizes["train"]
    width = store.fields["backbone"]["features"][feature]
    train_rows = max(kmax, cfg.max_memory // 2 // (4 * width))
    query_rows = max(1, cfg.max_memory // 4 // (4 * width + 12 * kmax))
    sims, idx = [], []
    for q0 in range(queries.start, queries.stop, query_rows):
        q1 = min(q0 + query_rows, queries.stop)
        chunk_queries = l2_normalize(store.rows("test", feature, q0, q1), copy=False)
        best_s = np.full((len(chunk_queries), 0), -np.inf, np.float32)
        best_i = np.zeros((len(chunk_queries), 0), np.int64)
        for t0 in range(0, n_train, train_rows):
            chunk = l2_normalize(store.rows("train", feature, t0, t0 + train_rows), copy=False)
            s, i = search(chunk, chunk_queries, min(kmax, len(chunk)), cfg.query_batch)
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i + t0], axis=1)
            # Stable: equal similarities keep the earlier training row first, as faiss does.
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :kmax]
            best_s = np.take_along_axis(best_s, order, 1)
            best_i = np.take_along_axis(best_i, order, 1)
            del chunk  # not held while the next chunk is read
        sims.append(best_s)
        idx.append(best_i)
    if not sims:  # more ranks than queries
        return np.zeros((0, kmax), np.float32), np.zeros((0, kmax), np.int64)
    return np.concatenate(sims), np.concatenate(idx)
