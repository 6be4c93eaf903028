"""Retrieval metrics on cached features: a query's relevant images are those of its class.

Two protocols: test images query the training gallery, and test images query the rest of the
test split (leave-one-out). Features are L2-normalised and ranked by faiss (inner product =
cosine similarity), a batch of queries at a time, so memory stays bounded by ``query_batch``
times the gallery size. Metrics, in percent, averaged over queries with at least one relevant
image in the gallery:

- mAP: the mean over queries of average precision over the whole ranking;
- mAP@R (Musgrave et al. 2020): average precision over the first R results, R the number of
  relevant images, normalised by R;
- recall@k: the share of queries with a relevant image among the first k (metric learning's
  Recall@K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.knn import l2_normalize

# Bytes held per batch of queries: the ranking (similarities, indices) and the arrays of the
# metrics computed from it, about 32 bytes per (query, gallery image).
BATCH_BYTES = 512 << 20


@dataclass(frozen=True)
class RetrievalConfig:
    recall_at: tuple[int, ...] = (1, 5, 10)
    # Queries ranked at once; default: as many as BATCH_BYTES allow.
    query_batch: int | None = None

    def __post_init__(self):
        if not self.recall_at or min(self.recall_at) < 1:
            raise ArgumentError(f"recall@k needs positive k, got {self.recall_at}")


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    cfg: RetrievalConfig,
    leave_one_out: bool = False,
) -> dict:
    """mAP, mAP@R and recall@k (percent) of ``queries`` against ``gallery``.

    ``leave_one_out``: the queries are the gallery, and each query's own entry is removed
    from its ranking.
    """
    import faiss

    if leave_one_out and len(queries) != len(gallery):
        raise ArgumentError("leave-one-out needs the queries to be the gallery")
    n = len(gallery) - int(leave_one_out)
    if max(cfg.recall_at) > n:
        raise ArgumentError(f"recall@{max(cfg.recall_at)} exceeds the gallery's {n} images")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(l2_normalize(gallery))
    q = l2_normalize(queries)
    batch = cfg.query_batch or max(1, BATCH_BYTES // (32 * (n + 1)))
    ap, ap_r, hits = [], [], {k: [] for k in cfg.recall_at}
    for s in range(0, len(q), batch):
        _, idx = index.search(q[s : s + batch], n + int(leave_one_out))
        if leave_one_out:  # drop each query's own entry, wherever ties put it
            own = idx == np.arange(s, s + len(idx))[:, None]
            idx = idx[~own].reshape(len(idx), n)
        relevant = gallery_labels[idx] == query_labels[s : s + batch, None]  # (B, n) ranked
        total = relevant.sum(1)
        keep = total > 0
        relevant, total = relevant[keep], total[keep]
        precision = relevant.cumsum(1, dtype=np.float32) / np.arange(1, n + 1, dtype=np.float32)
        ap.append((precision * relevant).sum(1) / total)
        first_r = np.arange(n)[None, :] < total[:, None]
        ap_r.append((precision * relevant * first_r).sum(1) / total)
        for k in cfg.recall_at:
            hits[k].append(relevant[:, :k].any(1))
    if not sum(len(a) for a in ap):
        raise ArgumentError(
            "no query has a relevant image in the gallery (each class has a single image "
            "there): retrieval metrics are undefined"
        )
    mean = lambda parts: float(100.0 * np.concatenate(parts).mean())  # noqa: E731
    return {
        "map": mean(ap),
        "map_at_r": mean(ap_r),
        "recall": {str(k): mean(hits[k]) for k in cfg.recall_at},
        "queries": int(sum(len(a) for a in ap)),
    }


def retrieval(data: Splits, cfg: RetrievalConfig) -> dict:
    """Both protocols: test queries against the training gallery, and test leave-one-out."""
    xtr, ytr, xte, yte = data.x("train"), data.labels["train"], data.x("test"), data.labels["test"]
    return {
        "num_train": len(ytr),
        "num_test": len(yte),
        "train_gallery": retrieval_metrics(xte, yte, xtr, ytr, cfg),
        "test_loo": retrieval_metrics(xte, yte, xte, yte, cfg, leave_one_out=True),
    }
