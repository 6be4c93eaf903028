"""DINOv2's linear protocol (``probe --protocol logreg``): logistic regression by L-BFGS.

Oquab et al. (2023), ``dinov2/eval/log_regression.py``: multinomial logistic regression with
an L2 penalty, solved by L-BFGS in float64 (cuML on GPUs, scikit-learn's ``lbfgs`` on CPUs in
CLIP's paper), for 45 values of C from 1e-6 to 1e5 (log-spaced), the one with the best
validation top-1 refitted on every training row. The objective is scikit-learn's:
``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (the bias unpenalised), here divided by
``C * n`` (the same minimiser, better scaled). Features are fitted as stored, as DINOv2 and
CLIP fit them (z-scoring would move the optimum of a given C, and the published numbers
with it); the validation split is the probe's (``val_fraction``, stratified, ``seed``), or
below ``cv_below`` training rows its k folds. Each fit starts from the previous C's solution
(the path runs from the strongest penalty), as scikit-learn's ``LogisticRegressionCV`` does.
SciPy's L-BFGS-B drives it; the loss and gradient are computed on the GPU where there is one,
in float64 there too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featcache.device import rank_device, resolve_device
from featcache.errors import ArgumentError
from featcache.evaluation.data import (
    Splits,
    stratified_folds,
    stratified_split,
    uses_cv,
    validation,
)
from featcache.evaluation.metrics import classification_summary, per_class_accuracies
from featcache.evaluation.rows import check_finite

# DINOv2's grid: C = 10 ** linspace(-6, 5, 45).
C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))
# L-BFGS stops when the gradient's largest entry is below this (scikit-learn's default: 1e-4).
TOLERANCE = 1e-6


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, start=None,
        max_iter: int = 1000, tol: float = 1e-10) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(W (D + 1, classes) with the bias last, L-BFGS iterations) minimising the mean
    cross-entropy + ||W[:-1]||^2 / (2 C n), from ``start`` (or zeros). ``x`` (n, D + 1) ends
    with a column of ones (``with_bias``). SciPy's L-BFGS-B drives (scikit-learn's solver,
    its stopping rules: the gradient's largest entry below ``tol``, or no relative progress);
    the loss and its gradient are computed where ``x`` lies (the GPU where there is one)."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    n, shape = len(x), (x.shape[1], classes)
    onehot = F.one_hot(y, classes).to(x.dtype)
    penalty = 1.0 / (c * n)

    def loss_and_grad(flat: np.ndarray):
        w = torch.from_numpy(flat).to(x.device).view(shape)
        z = x @ w
        lse = torch.logsumexp(z, 1)
        loss = (lse - (z * onehot).sum(1)).mean() + 0.5 * penalty * (w[:-1] ** 2).sum()
        z.sub_(lse[:, None]).exp_().sub_(onehot)  # softmax - onehot
        grad = x.T @ z / n
        grad[:-1] += penalty * w[:-1]
        return float(loss), grad.cpu().numpy().ravel()

    w0 = start.cpu().numpy().ravel() if start is not None else np.zeros(shape[0] * shape[1])
    opts = {"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50}
    # SciPy's BLAS on one thread: its small vector work, interleaved with torch's threaded
    # loss, otherwise has two thread pools spin against each other (40x slower on 2 cores).
    with torch.no_grad(), threadpool_limits(1, user_api="blas"):
        out = minimize(loss_and_grad, w0, jac=True, method="L-BFGS-B", options=opts)
    return torch.from_numpy(out.x).to(x.device).view(shape), int(out.nit)


def with_bias(x, dtype=torch.float64, device=None) -> torch.Tensor:
    """``x`` (n, D) with a column of ones after it, (n, D + 1) in ``dtype``: one copy (a
    conversion and then a concatenation would hold two)."""
    out = torch.ones((len(x), x.shape[1] + 1), dtype=dtype, device=device)
    out[:, :-1] = torch.as_tensor(x)
    return out


def _metrics(x, y, w) -> dict:
    logits = x @ w
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "top1": float((logits.argmax(1) == y).double().mean() * 100),
    }


def _sweep(xtr, ytr, classes: int, splits, cfg) -> list[dict]:
    """Each C's validation loss and top-1, averaged over ``splits`` (one split or the folds,
    as (fit rows, validation rows)); with folds, their spread too."""
    cs = sorted(cfg.cs)
    runs = []  # per split, per C (strongest penalty first: each fit starts from the last)
    for fit_idx, val_idx in splits:
        xf, yf, xv, yv = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]  # once a split
        w, path = None, []
        for c in cs:
            w, iterations = fit(xf, yf, classes, c, w, cfg.lbfgs_iterations, TOLERANCE)
            path.append({"iterations": iterations, "val": _metrics(xv, yv, w)})
        runs.append(path)
    sweep = []
    for i, c in enumerate(cs):
        losses = [r[i]["val"]["loss"] for r in runs]
        top1 = [r[i]["val"]["top1"] for r in runs]
        sweep.append({"C": c, "iterations": runs[0][i]["iterations"], **validation(losses, top1)})
    return sweep


def logreg(data: Splits, cfg) -> dict:
    """The protocol on in-memory features, with the probe's config: C chosen on the probe's
    validation split, or below ``cv_below`` training rows by its k-fold cross-validation
    (the best mean validation top-1 over the folds)."""
    if data.bounded:
        raise ArgumentError("--protocol logreg holds the features in memory: drop --max-memory")
    device = rank_device(resolve_device(cfg.device))
    for name in ("train", "test"):
        check_finite(data.x(name), name)
    ytr = torch.as_tensor(data.labels["train"], device=device)
    xtr = with_bias(data.x("train"), device=device)
    xte = with_bias(data.x("test"), device=device)
    classes, y_np = data.num_classes, data.labels["train"]
    folds = uses_cv(cfg, y_np)
    if folds:
        fold = stratified_folds(y_np, folds, cfg.seed)
        splits = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(folds)]
        counts = {"num_fit": len(y_np), "num_val": 0, "cv_folds": folds}
    else:
        splits = [stratified_split(y_np, cfg.val_fraction, cfg.seed)]
        counts = {"num_fit": len(splits[0][0]), "num_val": len(splits[0][1])}

    sweep = _sweep(xtr, ytr, classes, splits, cfg)
    # DINOv2's choice: the best (mean) validation top-1; ties go to the stronger penalty.
    chosen = max(range(len(sweep)), key=lambda i: (sweep[i]["val"]["top1"], -sweep[i]["C"]))
    c = sweep[chosen]["C"]
    final, iterations = fit(xtr, ytr, classes, c, None, cfg.lbfgs_iterations, TOLERANCE)
    y_test = data.labels["test"]
    logits = xte @ final
    loss = float(F.cross_entropy(logits, torch.as_tensor(y_test, device=device)))
    scores = logits.cpu().numpy()
    return {
        "protocol": "logreg",
        "test": {**classification_summary(scores, y_test), "loss": loss},
        "per_class_top1": per_class_accuracies(scores.argmax(1), y_test, classes),
        "selected": {
            "C": c,
            # The same penalty as the SGD probe's weight decay (on the mean loss).
            "weight_decay": 1.0 / (c * len(ytr)),
            "epochs": iterations,  # L-BFGS iterations of the refit
            "val": sweep[chosen]["val"],
            **({"cv": sweep[chosen]["cv"]} if "cv" in sweep[chosen] else {}),
        },
        "sweep": sweep,
        "views": 1,
        "device": str(device),
        **counts,
        "num_test": len(y_test),
    }
