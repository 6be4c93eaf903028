"""Retrieval metrics against a plain numpy computation (full similarity matrix, one query at a
time, the textbook definitions)."""

import numpy as np
import pytest

from featcache.evaluation.data import Splits
from featcache.evaluation.retrieval import RetrievalConfig, retrieval, retrieval_metrics


def _reference(q, ql, g, gl, ks, leave_one_out):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(q.astype(np.float64)) @ unit(g.astype(np.float64)).T
    ap, ap_r, recall = [], [], {k: [] for k in ks}
    for i in range(len(q)):
        s, labels = sims[i], gl
        if leave_one_out:
            s, labels = np.delete(s, i), np.delete(labels, i)
        relevant = labels[np.argsort(-s, kind="stable")] == ql[i]
        r = relevant.sum()
        if r == 0:
            continue
        ranks = np.flatnonzero(relevant) + 1  # of the 1st, 2nd, ... relevant image
        precision = np.arange(1, r + 1) / ranks
        ap.append(precision.mean())
        ap_r.append(precision[ranks <= r].sum() / r)
        for k in ks:
            recall[k].append(relevant[:k].any())
    return {
        "map": 100 * np.mean(ap),
        "map_at_r": 100 * np.mean(ap_r),
        "recall": {str(k): 100 * np.mean(v) for k, v in recall.items()},
        "queries": len(ap),
    }


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))

    def draw(labels):
        return (centres[labels] + 1.2 * rng.normal(size=(len(labels), 16))).astype(np.float32)

    ytr = rng.integers(0, 4, 90)
    yte = np.concatenate([rng.integers(0, 3, 30), [3]])  # class 3: one test image only
    return (draw(ytr), ytr), (draw(yte), yte)


@pytest.mark.parametrize("batch", [None, 7])
def test_both_protocols_equal_a_numpy_reference(features, batch):
    (xtr, ytr), (xte, yte) = features
    cfg = RetrievalConfig(recall_at=(1, 5, 10), query_batch=batch)
    got = retrieval(Splits.in_memory((xtr, ytr), (xte, yte)), cfg)
    want = {
        "train_gallery": _reference(xte, yte, xtr, ytr, (1, 5, 10), False),
        "test_loo": _reference(xte, yte, xte, yte, (1, 5, 10), True),
    }
    assert got["test_loo"]["queries"] == 30  # the lone class-3 image has nothing to find
    assert got["train_gallery"]["queries"] == 31
    for protocol in want:
        for key in ("map", "map_at_r"):
            assert got[protocol][key] == pytest.approx(want[protocol][key], abs=1e-4), key
        assert got[protocol]["recall"] == pytest.approx(want[protocol]["recall"], abs=1e-9)
    # Not a metric that could pass by accident: the features do separate the classes.
    assert 40 < got["train_gallery"]["map"] < 100


def test_a_perfect_ranking_scores_100_and_a_query_never_finds_itself():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 classes, identical within
    y = np.repeat(np.arange(3), 4)
    got = retrieval_metrics(x, y, x, y, RetrievalConfig(recall_at=(1, 3)), leave_one_out=True)
    assert got["map"] == got["map_at_r"] == 100.0 and got["recall"] == {"1": 100.0, "3": 100.0}
    # One image per class: leaving itself out, a query has nothing relevant left.
    with pytest.raises(ValueError, match="no query has a relevant image"):
        retrieval_metrics(x[::4], y[::4], x[::4], y[::4], RetrievalConfig((1,)), True)


def test_recall_beyond_the_gallery_is_refused(features):
    (xtr, ytr), (xte, yte) = features
    with pytest.raises(ValueError, match="recall@100 exceeds the gallery's 90"):
        retrieval_metrics(xte, yte, xtr, ytr, RetrievalConfig(recall_at=(100,)))
