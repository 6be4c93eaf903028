"""Reference numbers on a store's features: scikit-learn logistic regression and numpy k-NN.

Uses the probe's own validation split, standardisation and selection criterion, so the
comparison is like for like: LogisticRegression (lbfgs) with C chosen by the lowest validation
loss on that split (ties: the stronger penalty), refit on the whole training split; a
plain-numpy weighted k-NN (exp(sim/T) votes) on L2-normalised features. What still differs:
lbfgs runs each fit to convergence, where the probe stops each head at its lowest validation
loss and retrains for that many epochs.

    python -m featcache.evaluation.baselines STORE.h5 [--features NAME] [--k 20]
                                                     [--temperature 0.07]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from featcache.evaluation.data import stratified_split
from featcache.evaluation.knn import HEADLINE_K, TEMPERATURE
from featcache.evaluation.probe import ProbeConfig
from featcache.store import Store

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def sklearn_probe(xtr, ytr, xte, yte, val_fraction=0.1, seed=0, grid=C_GRID):
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    fit, val = stratified_split(ytr, val_fraction, seed)
    start = time.perf_counter()
    losses, scores = {}, {}
    classes = np.unique(ytr)
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=1000).fit(xtr[fit], ytr[fit])
        losses[c] = log_loss(ytr[val], clf.predict_proba(xtr[val]), labels=classes)
        scores[c] = clf.score(xtr[val], ytr[val])
    best = min(grid, key=lambda c: (losses[c], c))  # as the probe: lowest validation loss
    clf = LogisticRegression(C=best, max_iter=1000).fit(xtr, ytr)
    return {
        "C": best,
        "val_loss": losses[best],
        "val_top1": 100 * scores[best],
        "test_top1": 100 * clf.score(xte, yte),
        "seconds": time.perf_counter() - start,
    }


def sklearn_logreg(xtr, ytr, xte, yte, cs, val_fraction=0.1, seed=0, tol=1e-6):
    """DINOv2's protocol in scikit-learn, the best it does: LogisticRegression (lbfgs) along
    the same grid of C from the strongest penalty, each fit warm-started from the last (as
    LogisticRegressionCV does), the best validation top-1 (ties: the stronger penalty) refit
    on every training row; the features as stored, the same split and stopping tolerance as
    featcache's."""
    xtr, xte = np.asarray(xtr, np.float64), np.asarray(xte, np.float64)
    fit, val = stratified_split(ytr, val_fraction, seed)
    start = time.perf_counter()
    clf = LogisticRegression(max_iter=1000, tol=tol, warm_start=True)
    scores = {}
    for c in sorted(cs):
        clf.set_params(C=c).fit(xtr[fit], ytr[fit])
        scores[c] = clf.score(xtr[val], ytr[val])
    best = max(sorted(cs), key=lambda c: (scores[c], -c))
    final = sklearn_refit(xtr, ytr, xte, yte, best, tol)
    return {**final, "C": best, "val_top1": 100 * scores[best],
            "seconds": time.perf_counter() - start}  # fmt: skip


def sklearn_refit(xtr, ytr, xte, yte, c, tol=1e-6, max_iter=1000) -> dict:
    """LogisticRegression (lbfgs) at one C on every training row: its test top-1, its
    iterations and its objective in featcache's terms (scikit-learn's / (C n): the mean
    cross-entropy + ||W||^2 / (2 C n)), to compare how near the optimum each side got."""
    xtr, xte = np.asarray(xtr, np.float64), np.asarray(xte, np.float64)
    final = LogisticRegression(C=c, max_iter=max_iter, tol=tol).fit(xtr, ytr)
    penalty = (final.coef_**2).sum() / (2 * c * len(ytr))
    return {
        "test_top1": 100 * final.score(xte, yte),
        "iterations": int(final.n_iter_.max()),
        "objective": log_loss(ytr, final.predict_proba(xtr), labels=final.classes_) + penalty,
    }


def numpy_knn(xtr, ytr, xte, yte, k, temperature, num_classes):
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sim = b @ a.T
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, 1) / temperature)
    votes = np.zeros((len(b), num_classes))
    for j in range(k):
        votes[np.arange(len(b)), ytr[idx[:, j]]] += w[:, j]
    return 100 * float((votes.argmax(1) == yte).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--features")
    p.add_argument("--k", type=int, default=HEADLINE_K)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    a = p.parse_args()
    store = Store(a.store)
    feat = a.features or store.default_feature()
    tr, te = store.load("train", feat), store.load("test", feat)
    cfg = ProbeConfig()
    out = {
        "store": a.store,
        "features": feat,
        "sklearn_logreg": sklearn_probe(
            tr.features, tr.labels, te.features, te.labels, cfg.val_fraction, cfg.seed
        ),
        "numpy_knn": {
            "k": a.k,
            "top1": numpy_knn(
                tr.features,
                tr.labels,
                te.features,
                te.labels,
                a.k,
                a.temperature,
                len(store.class_names),
            ),
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
