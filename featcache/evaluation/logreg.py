"""DINOv2's linear protocol (``probe --protocol logreg``): logistic regression by L-BFGS.

Oquab et al. (2023), ``dinov2/eval/log_regression.py``: multinomial logistic regression with
an L2 penalty, solved by L-BFGS in float64 (cuML on GPUs, scikit-learn's ``lbfgs`` on CPUs in
CLIP's paper), for 45 values of C from 1e-6 to 1e5 (log-spaced), the one with the best
validation top-1 refitted on every training row. The objective is scikit-learn's:
``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (the bias unpenalised), here divided by
``C * n`` (the same minimiser, better scaled; with two classes scikit-learn fits one binary
weight vector instead, whose penalty counts differently). Features are fitted as stored, as
DINOv2 and CLIP fit them (z-scoring would move the optimum of a given C, and the published numbers
with it); the validation split is the probe's (``val_fraction``, stratified, ``seed``), or
below ``cv_below`` training rows its k folds. Each fit starts from the previous C's solution
(the path runs from the strongest penalty), as scikit-learn's ``LogisticRegressionCV`` does.
SciPy's L-BFGS-B drives it, on the rows centred, turned onto their principal axes and scaled
(``Problem``: the same minimiser, far better conditioned); the loss and gradient are computed
on the GPU where there is one, in float64 there too.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Solution(NamedTuple):
    weights: torch.Tensor  # (D + 1, classes), the bias last
    iterations: int  # L-BFGS's
    objective: float  # the mean cross-entropy + ||W||^2 / (2 C n) at the weights


class Problem:
    """One set of fit rows, prepared for L-BFGS: the rows centred and turned onto the principal
    axes of their covariance, and each axis scaled by its curvature, so that L-BFGS sees a
    problem far better conditioned than the features as stored give it.

    The minimiser is the same: centring moves only the unpenalised bias (``b' = b + mean @
    W``), turning the weights by an orthogonal matrix keeps ``||W||^2``, and scaling is a change
    of variables (a preconditioner); ``fit`` takes and returns weights in the features' own
    terms. Each axis's scale is 1 / sqrt(its variance x the softmax's curvature + the
    penalty), approximately the inverse square root of the Hessian on the axes (the classes'
    coupling left out; the softmax's mean curvature is 1 / classes at W = 0, and is measured
    at the start point when warm-started). On the 45,000 x 384 fit rows of BENCHMARKS.md's
    ``logreg`` section no C took more than 27 iterations; the plain problem stopped
    unconverged at 1,000 for every C >= 100 on a fifth of them (its ``probe`` section).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, overwrite: bool = False):
        """``x`` (n, D) where the fit runs, ``y`` (n,) labels. The problem holds the rows
        turned (n x min(n, D), float64); ``overwrite`` lets it centre ``x`` in place (a copy
        the caller no longer needs), else the centred rows are a temporary copy."""
        owned = overwrite or x.dtype != torch.float64  # a conversion is a copy of our own
        x = x.to(torch.float64)
        self.mean = x.mean(0)
        centred = x.sub_(self.mean) if owned else x - self.mean
        self.variances, self.axes = _principal_axes(centred)
        self.rotated = centred @ self.axes  # (n, r)
        del centred
        self.onehot = F.one_hot(y, classes).to(x.dtype)

    def fit(self, c: float, start=None, max_iter: int = 1000, tol: float = 1e-10) -> Solution:
        """The weights W (D + 1, classes) with the bias last minimising the mean
        cross-entropy + ||W[:-1]||^2 / (2 C n), from ``start`` (such a W) or zeros. SciPy's
        L-BFGS-B drives (scikit-learn's solver and stopping rules: the largest entry of the
        gradient below ``tol``, or no relative progress; and the same for the
        preconditioned gradient, whichever comes first); the loss and its gradient are
        computed where the rows lie (the GPU where there is one)."""
        from scipy.optimize import minimize
        from threadpoolctl import threadpool_limits

        x, onehot = self.rotated, self.onehot
        (n, r), classes = x.shape, onehot.shape[1]
        penalty = 1.0 / (c * n)
        inward = None if start is None else self._inward(start)
        # The softmax's curvature where the fit starts: 1 / classes at W = 0, toward 0 as the
        # predictions saturate (large C on separable rows: 4x fewer iterations there).
        softness = 1.0 / classes
        if inward is not None:
            prob = torch.softmax(torch.addmm(inward[-1], x, inward[:-1]), 1)
            softness = max(float((1 - (prob**2).sum(1)).mean()) / max(classes - 1, 1), 1e-8)
        curvature = self.variances.new_full((r + 1,), softness)
        curvature[:-1] *= self.variances
        curvature[:-1] += penalty
        scale = curvature.rsqrt()[:, None]  # the bias's row last: variance 1, no penalty

        last = {}  # the latest point evaluated and its gradient, for ``converged``

        def loss_and_grad(flat: np.ndarray):
            w = torch.from_numpy(flat).to(x.device).view(r + 1, classes) * scale
            z = torch.addmm(w[-1], x, w[:-1])
            lse = torch.logsumexp(z, 1)
            loss = (lse - (z * onehot).sum(1)).mean() + 0.5 * penalty * (w[:-1] ** 2).sum()
            z.sub_(lse[:, None]).exp_().sub_(onehot)  # softmax - onehot
            grad = torch.cat([x.T @ z / n + penalty * w[:-1], z.mean(0, keepdim=True)])
            last.update(x=flat.copy(), grad=grad)
            return float(loss), (grad * scale).cpu().numpy().ravel()

        def converged(intermediate_result):
            """scikit-learn's rule, on the gradient in the features' own terms: it ends the
            large values of C on separable rows (few rows, many features), whose optimum lies
            far out where the curvature is tiny, where scikit-learn's own fit ends them."""
            if np.array_equal(intermediate_result.x, last["x"]):
                if float(self._outward_gradient(last["grad"]).abs().max()) <= tol:
                    raise StopIteration

        v0 = x.new_zeros(r + 1, classes) if start is None else inward / scale
        opts = {"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50}
        # SciPy's BLAS on one thread: its small vector work, interleaved with torch's threaded
        # loss, otherwise has two thread pools spin against each other (40x slower on 2 cores).
        with torch.no_grad(), threadpool_limits(1, user_api="blas"):
            out = minimize(
                loss_and_grad, v0.cpu().numpy().ravel(), jac=True, method="L-BFGS-B",
                options=opts, callback=converged,
            )  # fmt: skip
        w = torch.from_numpy(out.x).to(x.device).view(r + 1, classes) * scale
        return Solution(self._outward(w), int(out.nit), float(out.fun))

    def _inward(self, w: torch.Tensor) -> torch.Tensor:
        """Weights in the features' terms -> on the axes, with the centred rows' bias."""
        return torch.cat([self.axes.T @ w[:-1], (w[-1] + self.mean @ w[:-1])[None]])

    def _outward(self, w: torch.Tensor) -> torch.Tensor:
        weights = self.axes @ w[:-1]
        return torch.cat([weights, (w[-1] - self.mean @ weights)[None]])

    def _outward_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """A gradient on the axes (with the centred rows' bias) -> in the features' terms."""
        return torch.cat([self.axes @ g[:-1] + self.mean[:, None] * g[-1], g[-1:]])


def _principal_axes(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variances (r,), axes (D, r)) of the centred rows, from the smaller of the D x D
    covariance and the n x n Gram matrix: with fewer rows than features the axes span the
    rows (r <= n), and the optimum has no weight outside them (its gradient there is the
    penalty's alone)."""
    n, d = centred.shape
    if d <= n:
        variances, axes = torch.linalg.eigh(centred.T @ centred / n)
        return variances.clamp_min(0), axes
    # The thin SVD's axes are orthonormal to rounding (the Gram matrix's eigenvectors mapped
    # back would not be, at small variances: the penalty would move).
    _, singular, axes = torch.linalg.svd(centred, full_matrices=False)
    return singular**2 / n, axes.T


def logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` (n, D) through W (D + 1, classes), the bias last."""
    return torch.addmm(w[-1], x, w[:-1])


def _metrics(x, y, w) -> dict:
    z = logits(x, w)
    return {
        "loss": float(F.cross_entropy(z, y)),
        "top1": float((z.argmax(1) == y).double().mean() * 100),
    }


def _sweep(xtr, ytr, classes: int, splits, cfg) -> list[dict]:
    """Each C's validation loss and top-1, averaged over ``splits`` (one split or the folds,
    as (fit rows, validation rows)); with folds, their spread too."""
    cs = sorted(cfg.cs)
    runs = []  # per split, per C (strongest penalty first: each fit starts from the last)
    for fit_idx, val_idx in splits:
        problem = Problem(xtr[fit_idx], ytr[fit_idx], classes, overwrite=True)  # once a split
        xv, yv = xtr[val_idx], ytr[val_idx]
        w, path = None, []
        for c in cs:
            w, iterations, _ = problem.fit(c, w, cfg.lbfgs_iterations, TOLERANCE)
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
    xtr = torch.tensor(data.x("train"), dtype=torch.float64, device=device)  # ours: see refit
    xte = torch.as_tensor(data.x("test"), dtype=torch.float64, device=device)
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
    # The refit is xtr's last use: centred in place, the rows are held twice, not three times.
    final = Problem(xtr, ytr, classes, overwrite=True).fit(c, None, cfg.lbfgs_iterations, TOLERANCE)
    y_test = data.labels["test"]
    z = logits(xte, final.weights)
    loss = float(F.cross_entropy(z, torch.as_tensor(y_test, device=device)))
    scores = z.cpu().numpy()
    return {
        "protocol": "logreg",
        "test": {**classification_summary(scores, y_test), "loss": loss},
        "per_class_top1": per_class_accuracies(scores.argmax(1), y_test, classes),
        "selected": {
            "C": c,
            # The same penalty as the SGD probe's weight decay (on the mean loss).
            "weight_decay": 1.0 / (c * len(ytr)),
            "epochs": final.iterations,  # L-BFGS iterations of the refit
            "objective": final.objective,  # scikit-learn's, divided by C n
            "val": sweep[chosen]["val"],
            **({"cv": sweep[chosen]["cv"]} if "cv" in sweep[chosen] else {}),
        },
        "sweep": sweep,
        "views": 1,
        "device": str(device),
        **counts,
        "num_test": len(y_test),
    }
