"""DINOv2's linear protocol (``probe --protocol logreg``): logistic regression by L-BFGS.

Oquab et al. (2023), ``dinov2/eval/log_regression.py``: multinomial logistic regression with
an L2 penalty, solved by L-BFGS in float64 (cuML on GPUs, scikit-learn's ``lbfgs`` on CPUs in
CLIP's paper), for 45 values of C from 1e-6 to 1e5 (log-spaced), the one with the best
validation top-1 refitted on every training row. The objective is scikit-learn's:
``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (the bias unpenalised), here divided by
``C * n`` (the same minimiser, better scaled). Features are z-scored with the training rows'
statistics, as the SGD probe's; the validation split is the probe's (``val_fraction``,
stratified, ``seed``). Each fit starts from the previous C's solution (the path runs from the
strongest penalty), as scikit-learn's ``LogisticRegressionCV`` does. On the GPU where there is
one, in float64 there too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featcache.device import rank_device, resolve_device
from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.metrics import per_class_accuracies, summary_from_predictions, topk_hits
from featcache.evaluation.rows import check_finite, standardise

# DINOv2's grid: C = 10 ** linspace(-6, 5, 45).
C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))
# L-BFGS stops when the gradient's largest entry is below this (scikit-learn's default: 1e-4).
TOLERANCE = 1e-6


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, start=None,
        max_iter: int = 1000, tol: float = 1e-10) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(W (D + 1, classes) with the bias last, L-BFGS iterations) minimising the mean
    cross-entropy + ||W[:-1]||^2 / (2 C n), from ``start`` (or zeros). ``x`` (n, D + 1) ends
    with a column of ones (``with_bias``). Loss and gradient written out (no autograd)."""
    n = len(x)
    w = start.clone() if start is not None else x.new_zeros(x.shape[1], classes)
    w.requires_grad_()
    onehot = F.one_hot(y, classes).to(x.dtype)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip
    penalty = 1.0 / (c * n)

    def closure():
        with torch.no_grad():
            z = x @ w
            lse = torch.logsumexp(z, 1)
            loss = (lse - (z * onehot).sum(1)).mean() + 0.5 * penalty * (w[:-1] ** 2).sum()
            z.sub_(lse[:, None]).exp_().sub_(onehot)  # softmax - onehot
            grad = x.T @ z / n
            grad[:-1] += penalty * w[:-1]
            w.grad = grad
        return loss

    opt.step(closure)
    return w.detach(), int(opt.state[w].get("n_iter", 0))


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)


def _scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w  # x with its column of ones


def _metrics(x, y, w) -> dict:
    logits = _scores(x, w)
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "top1": float((logits.argmax(1) == y).double().mean() * 100),
    }


def logreg(data: Splits, cfg, fit_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """The protocol on in-memory features (the probe's config, its validation split)."""
    if data.bounded:
        raise ArgumentError("--protocol logreg holds the features in memory: drop --max-memory")
    device = rank_device(resolve_device(cfg.device))
    for name in ("train", "test"):
        check_finite(data.x(name), name)
    xtr, xte = standardise(data.x("train"), data.x("test"))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    ytr = torch.as_tensor(data.labels["train"], device=device)
    xtr, xte = with_bias(t(xtr)), with_bias(t(xte))
    classes = data.num_classes
    xf, yf, xv, yv = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]

    sweep, w = [], None
    for c in sorted(cfg.cs):  # strongest penalty first: each fit starts from the last
        w, iterations = fit(xf, yf, classes, c, w, cfg.lbfgs_iterations, TOLERANCE)
        sweep.append({"C": c, "iterations": iterations, "val": _metrics(xv, yv, w)})
    # DINOv2's choice: the best validation top-1; ties go to the stronger penalty.
    chosen = max(range(len(sweep)), key=lambda i: (sweep[i]["val"]["top1"], -sweep[i]["C"]))
    c = sweep[chosen]["C"]
    final, iterations = fit(xtr, ytr, classes, c, None, cfg.lbfgs_iterations, TOLERANCE)
    y_test = data.labels["test"]
    logits = _scores(xte, final)
    loss = float(F.cross_entropy(logits, torch.as_tensor(y_test, device=device)))
    scores = logits.cpu().numpy()
    pred = scores.argmax(1)
    hit3 = topk_hits(scores, y_test, min(3, classes))
    return {
        "protocol": "logreg",
        "test": {**summary_from_predictions(pred, hit3, y_test, classes), "loss": loss},
        "per_class_top1": per_class_accuracies(pred, y_test, classes),
        "selected": {
            "C": c,
            # The same penalty as the SGD probe's weight decay (on the mean loss).
            "weight_decay": 1.0 / (c * len(ytr)),
            "epochs": iterations,  # L-BFGS iterations of the refit
            "val": sweep[chosen]["val"],
        },
        "sweep": sweep,
        "views": 1,
        "device": str(device),
        **{"num_fit": len(fit_idx), "num_val": len(val_idx), "num_test": len(y_test)},
    }
