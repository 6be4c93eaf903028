"""Weighted k-NN evaluation on cached features (Wu et al. 2018; DINO's eval_knn.py).

Features are L2-normalised; faiss finds the nearest training samples by inner product (cosine
similarity); each neighbour votes for its class with weight exp(sim / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from featcache.distributed import Distributed
from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.metrics import classification_summary

# DINO's temperature for the vote weights exp(sim / T), and the k that tables report.
TEMPERATURE = 0.07
HEADLINE_K = 20
KS = (10, HEADLINE_K, 100, 200)  # the k evaluated by default


@dataclass(frozen=True)
class KnnConfig:
    """The k-NN's settings (what it reads is the method's ``Splits``)."""

    k: tuple[int, ...] = KS
    temperature: float = TEMPERATURE
    # Queries searched at once; bounds memory to query_batch x max(k) results.
    query_batch: int = 8192
    # Bytes of features held at once (None: both splits in memory). The store is then read in
    # chunks and the top-k of each training chunk merged: exactly the in-memory result.
    max_memory: int | None = None

    def __post_init__(self):
        if not self.k or min(self.k) < 1:
            raise ArgumentError(f"--k needs positive integers, got {self.k}")
        if self.temperature <= 0:
            raise ArgumentError(f"--temperature must be positive, got {self.temperature}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ArgumentError(f"--max-memory must be positive, got {self.max_memory}")


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
        raise ArgumentError(
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


def knn(data: Splits, cfg: KnnConfig, dist: Distributed | None = None) -> dict:
    """The k-NN of the test split by the training split, for each k.

    Under torchrun each rank searches a share of the queries and gathers the others'
    neighbours, so every rank holds the one-process result (rank 0 writes it).
    """
    dist = dist or Distributed()
    n_train, n_test = data.size("train"), data.size("test")
    if max(cfg.k) > n_train:
        raise ArgumentError(
            f"k={max(cfg.k)} exceeds the {n_train} training samples; pass smaller --k values"
        )
    find = neighbours if cfg.max_memory is None else neighbours_bounded
    parts = dist.all_gather(find(data, cfg, dist.share(n_test)))
    sims, idx = (np.concatenate(p) for p in zip(*parts))
    results = vote(sims, data.labels["train"][idx], data.labels["test"], data.num_classes,
                   cfg.k, cfg.temperature)  # fmt: skip
    return {"num_train": n_train, "num_test": n_test, "results": results}


def neighbours(data: Splits, cfg: KnnConfig, queries: slice):
    """(sims, indices) of the test rows ``queries`` among the whole train split in memory."""
    train = data.rows("train", 0, data.size("train"))
    train = l2_normalize(train, copy="train" in data.arrays)  # never a store's copy twice
    test = l2_normalize(data.rows("test", queries.start, queries.stop))
    return search(train, test, max(cfg.k), cfg.query_batch)


def neighbours_bounded(data: Splits, cfg: KnnConfig, queries: slice):
    """The same with at most ``cfg.max_memory`` bytes of features held at once.

    Half the budget holds a chunk of training features, a quarter a chunk of queries (with
    their running top-k); each query chunk meets every training chunk, and the top-k of each
    is merged into the running one, so the neighbours are the in-memory search's.
    """
    kmax, n_train, width = max(cfg.k), data.size("train"), data.width
    train_rows = max(kmax, cfg.max_memory // 2 // (4 * width))
    query_rows = max(1, cfg.max_memory // 4 // (4 * width + 12 * kmax))
    sims, idx = [], []
    for q0 in range(queries.start, queries.stop, query_rows):
        q1 = min(q0 + query_rows, queries.stop)
        chunk_queries = l2_normalize(data.rows("test", q0, q1), copy="test" in data.arrays)
        best_s = np.full((len(chunk_queries), 0), -np.inf, np.float32)
        best_i = np.zeros((len(chunk_queries), 0), np.int64)
        for t0 in range(0, n_train, train_rows):
            part = data.rows("train", t0, t0 + train_rows)
            chunk = l2_normalize(part, copy="train" in data.arrays)
            s, i = search(chunk, chunk_queries, min(kmax, len(chunk)), cfg.query_batch)
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i + t0], axis=1)
            # Stable: equal similarities keep the earlier training row first, as faiss does.
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :kmax]
            best_s = np.take_along_axis(best_s, order, 1)
            best_i = np.take_along_axis(best_i, order, 1)
            del chunk, part  # not held while the next chunk is read
        sims.append(best_s)
        idx.append(best_i)
    if not sims:  # more ranks than queries
        return np.zeros((0, kmax), np.float32), np.zeros((0, kmax), np.int64)
    return np.concatenate(sims), np.concatenate(idx)
