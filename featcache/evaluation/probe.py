"""Linear probe on cached features: a weight-decay sweep trained together, then a retrain.

Protocol:
1. standardise features with the training split's mean and std;
2. carve a stratified validation split from train;
3. train one linear head per weight decay, all at once on the same mini-batches (SGD with
   momentum, cosine schedule), each stopped early at its lowest validation loss;
4. pick the weight decay with the lowest validation loss; retrain it on the whole training split
   for its best epoch count; report test top-1, top-3 and loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from featcache.device import rank_device, resolve_device
from featcache.distributed import Distributed
from featcache.errors import ArgumentError
from featcache.evaluation.data import (
    Splits,
    stratified_folds,
    stratified_split,
    uses_cv,
    validation,
)
from featcache.evaluation.logreg import C_GRID, logreg
from featcache.evaluation.metrics import per_class_accuracies, summary_from_predictions
from featcache.evaluation.rows import (
    MemoryRows,
    StoreRows,
    check_finite,
    standardise,
    statistics,
)

TRAIN_CURVE_SAMPLES = 10_000
MIN_FULL_STEPS = 10  # epochs of fewer steps use a proportionally smaller step size
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
PROTOCOLS = ("sgd", "logreg")


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's settings (what it reads is the method's ``Splits``)."""

    # "sgd": linear heads by SGD, a weight-decay sweep with early stopping (DINO's linear
    # protocol, trained as featcache trains it); "logreg": DINOv2's logistic regression by
    # L-BFGS over a grid of C (evaluation/logreg.py).
    protocol: str = "sgd"
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    # Fraction of each training class held out to choose the weight decay and epoch count.
    val_fraction: float = 0.1
    max_epochs: int = 100
    # Epochs without a better validation loss before a head stops (all heads: training stops).
    patience: int = 10
    batch_size: int = 256
    # Peak step size of the cosine schedule, in units of 1 / (curvature + weight decay), so
    # one value suits every store.
    lr: float = 0.5
    momentum: float = 0.9
    seed: int = 0
    # Where the heads train: "auto" takes the GPU when there is one (the device check compares
    # its numbers with the CPU's).
    device: str = "auto"
    # Train on the augmented views cached in the store too (extract --views K), if any.
    views: bool = True
    # Bytes of features held at once (None: the splits in memory): the store is then read a
    # chunk of rows at a time (evaluation/streaming.py).
    max_memory: int | None = None
    # Below this many training rows, choose the regularisation by stratified k-fold cross-
    # validation (the same cv_folds folds for every candidate) rather than by one validation
    # split, whose few images' noise the choice would follow; 0: always one split.
    cv_below: int = 20_000
    cv_folds: int = 5
    # logreg: the grid of C (DINOv2's 45 values, 1e-6 .. 1e5) and L-BFGS's iterations per fit.
    cs: tuple[float, ...] = C_GRID
    lbfgs_iterations: int = 1000

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ArgumentError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ArgumentError(f"weight decays must be non-negative, got {self.weight_decays}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ArgumentError("--epochs, --batch-size and --lr must be positive")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ArgumentError(f"--max-memory must be positive, got {self.max_memory}")
        if self.protocol not in PROTOCOLS:
            raise ArgumentError(
                f"--protocol is one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.cv_folds < 2 or self.cv_below < 0:
            raise ArgumentError("--cv-folds must be at least 2 and --cv-below at least 0")
        if not self.cs or min(self.cs) <= 0 or self.lbfgs_iterations < 1:
            raise ArgumentError("--cs must be positive values, --lbfgs-iterations at least 1")

    @property
    def reads_views(self) -> bool:
        """Whether the store's augmented views are loaded: the SGD heads train on them; the
        logreg protocol fits the images alone."""
        return self.views and self.protocol == "sgd"


class Heads:
    """S linear heads trained together: W (S, D, C), b (S, C), one weight decay each.

    SGD with heavy-ball momentum, written out so that each head gets its own step size:
    ``lr / (L + wd)``, where L bounds the curvature of the softmax loss (half the largest
    eigenvalue of the feature covariance). That makes ``lr`` a dimensionless number that suits
    any store, and every head converges towards its own regularised optimum.
    """

    def __init__(self, dim, classes, weight_decays, curvature, cfg: ProbeConfig, device, gen):
        s = len(weight_decays)
        self.W = torch.zeros(s, dim, classes, device=device)
        self.b = torch.zeros(s, classes, device=device)
        self.vW, self.vb = torch.zeros_like(self.W), torch.zeros_like(self.b)
        self.wd = torch.tensor(weight_decays, device=device, dtype=torch.float32)
        self.step_size = cfg.lr / (curvature + self.wd)  # (S,)
        self.cfg, self.gen = cfg, gen

    def logits(self, x: torch.Tensor, which: slice = slice(None)) -> torch.Tensor:
        """(S, N, C): every head's logits, or those of ``which`` heads."""
        return torch.einsum("nd,sdc->snc", x, self.W[which]) + self.b[which][:, None, :]

    def part(self, heads: slice) -> _HeadsPart:
        """Some of the heads, for evaluation (``logits`` of those alone)."""
        return _HeadsPart(self, heads)

    def run(self, batches, steps: int, epoch: int, epochs: int, active: torch.Tensor) -> None:
        """One epoch of ``steps`` minibatches ``(x (B, D), onehot (B, C))`` on the cosine
        schedule."""
        m = self.cfg.momentum
        for step, (xb, onehot_b, *weight) in enumerate(batches):
            t = (epoch * steps + step) / (epochs * steps)
            lr = self.step_size * active * 0.5 * (1 + math.cos(math.pi * t))  # (S,)
            # Gradient of the mean cross-entropy: x^T (softmax - onehot) / B, per head; with
            # per-head row weights (S, B) (cross-validation: a fold's own rows), their mean.
            err = self.logits(xb).softmax(-1) - onehot_b  # (S, B, C)
            if weight:
                w = weight[0]
                err = err * (w / w.sum(1, keepdim=True).clamp_min(1))[:, :, None]
            else:
                err = err / len(xb)
            gW = torch.einsum("nd,snc->sdc", xb, err) + self.wd[:, None, None] * self.W
            gb = err.sum(1)
            self.vW.mul_(m).add_(gW)
            self.vb.mul_(m).add_(gb)
            self.W.sub_(lr[:, None, None] * self.vW)
            self.b.sub_(lr[:, None] * self.vb)


def train_head(rows, num_classes, weight_decay, epochs, curvature, cfg: ProbeConfig, gen,
               monitor=None):  # fmt: skip
    """One head trained on a row set for ``epochs`` of the cosine schedule sized by
    ``cfg.max_epochs``. Returns the head and its per-epoch metrics on ``monitor`` (rows)."""
    width = next(rows.chunks_on_device())[0].shape[1]
    device = next(rows.chunks_on_device())[0].device
    head = Heads(width, num_classes, (weight_decay,), curvature, cfg, device, gen)
    ones, steps, curve = torch.ones(1, device=device), rows.steps(cfg.batch_size), []
    for epoch in range(epochs):
        head.run(rows.batches(gen, cfg.batch_size, num_classes), steps, epoch, cfg.max_epochs,
                 ones)  # fmt: skip
        if monitor is not None:
            curve.append({"epoch": epoch + 1, "train": monitor.evaluate(head)[0]})
    return head, curve


def retrain_generator(cfg: ProbeConfig) -> torch.Generator:
    """The retrain's batch order: its own stream, not the sweep's generator, whose state
    depends on how long the sweep ran (and so on which heads a rank trained)."""
    return torch.Generator().manual_seed(cfg.seed + 1)


def curvature(x: torch.Tensor, iters: int = 30) -> float:
    """Half the largest eigenvalue of x^T x / n (power iteration): bounds the softmax Hessian."""
    v = torch.ones(x.shape[1], device=x.device) / math.sqrt(x.shape[1])
    for _ in range(iters):
        v = x.T @ (x @ v) / len(x)
        v = v / v.norm().clamp_min(1e-12)
    return 0.5 * float(v @ (x.T @ (x @ v)) / len(x))


def scaled_step(cfg: ProbeConfig, rows: int) -> ProbeConfig:
    """Early stopping looks once per epoch; when an epoch is only a few steps (small training
    sets) a full step size moves too far between looks, so it shrinks with the step count."""
    steps = math.ceil(rows / cfg.batch_size)
    return replace(cfg, lr=cfg.lr * min(1.0, steps / MIN_FULL_STEPS))


def run_sweep(heads: Heads, cfg: ProbeConfig, epoch_fn, evaluate_fn, dist: Distributed):
    """Train every head, each stopped at its lowest validation loss (``patience``).

    ``heads`` holds this rank's share of ``cfg.weight_decays`` (``dist.share``): all of them
    in one process. ``epoch_fn(epoch, active)`` trains one epoch; ``evaluate_fn()`` returns
    per-head metrics (train monitor, validation). Every epoch draws its batch order from the
    same generator whatever the heads, so a head's path does not depend on its companions.
    Returns the whole sweep's rows, gathered from every rank, the chosen head (lowest
    validation loss; ties: the stronger weight decay) and each head's per-epoch curve.
    """
    s = len(heads.wd)
    best_loss = [math.inf] * s
    best_epoch = [0] * s
    diverged: list[int | None] = [None] * s  # first epoch with a non-finite validation loss
    active = torch.ones(s, device=heads.W.device)
    curves: list[list[dict]] = [[] for _ in range(s)]
    for epoch in range(cfg.max_epochs):
        if not active.any():
            break
        epoch_fn(epoch, active)
        train_m, val_m = evaluate_fn()
        for h in range(s):
            if not active[h]:
                continue
            curves[h].append({"epoch": epoch + 1, "train": train_m[h], "val": val_m[h]})
            if not math.isfinite(val_m[h]["loss"]) and diverged[h] is None:
                diverged[h] = epoch + 1
            if val_m[h]["loss"] < best_loss[h]:
                best_loss[h], best_epoch[h] = val_m[h]["loss"], epoch + 1
            elif epoch + 1 - best_epoch[h] >= cfg.patience:
                active[h] = 0.0
    parts = dist.all_gather((best_loss, best_epoch, diverged, curves))
    best_loss, best_epoch, diverged, curves = ([x for p in parts for x in p[i]] for i in range(4))
    if not any(math.isfinite(v) for v in best_loss):
        raise ArgumentError(
            "no weight decay reached a finite validation loss: "
            + ", ".join(f"{wd:g} from epoch {e}" for wd, e in zip(cfg.weight_decays, diverged))
            + "; the steps diverged: lower --lr"
        )
    sweep = [
        {
            "weight_decay": wd,
            "best_epoch": best_epoch[h],
            "val": curves[h][best_epoch[h] - 1]["val"],
        }
        for h, wd in enumerate(cfg.weight_decays)
    ]
    chosen = min(range(len(sweep)), key=lambda h: (best_loss[h], -cfg.weight_decays[h]))
    return sweep, chosen, curves


class _Source:
    """A probe's rows: z-scored in memory on the device, or read from the store in chunks."""

    def __init__(self, data: Splits, cfg: ProbeConfig, device):
        self.data, self.device, self.width = data, device, data.width
        if data.bounded:
            chunk = max(cfg.batch_size, cfg.max_memory // 4 // (4 * data.width))  # + copies
            self.scale, self.curvature = statistics(data, chunk, device)
            self.chunk = chunk
            return
        views = data.views if cfg.views else None
        for name, a in (("training", data.x("train")), ("test", data.x("test")), ("view", views)):
            if a is not None:
                check_finite(a, name)
        xtr, xte, *xviews = standardise(data.x("train"), data.x("test"),
                                        *([views] if views is not None else []))  # fmt: skip
        self.x = {"train": xtr, "test": xte}
        self.views = xviews[0] if xviews else None
        self.curvature = curvature(torch.as_tensor(xtr, device=device))

    def rows(self, split: str, idx=None, views: bool = False):
        """Rows ``idx`` (None: all) of a split; with ``views``, their augmented views too
        (the clean images first)."""
        labels = self.data.labels[split]
        idx = np.arange(len(labels)) if idx is None else idx
        if self.data.bounded:
            return StoreRows(self.data, split, idx, self.scale, self.chunk, self.device)
        x, y = self.x[split][idx], labels[idx]
        if views and self.views is not None:
            v = self.views[idx]  # (n, V, D)
            x = np.concatenate([x, v.reshape(-1, v.shape[-1])])
            y = np.concatenate([y, np.repeat(y, v.shape[1])])
        t = torch.as_tensor
        return MemoryRows(t(x, dtype=torch.float32, device=self.device),
                          t(y, dtype=torch.long, device=self.device))  # fmt: skip


@torch.no_grad()
def probe(data: Splits, cfg: ProbeConfig, dist: Distributed | None = None) -> dict:
    """The probe's protocol on a split's features, in memory or in chunks (``max_memory``):

    1. z-score with the training split's mean and std;
    2. choose the weight decay: one head per weight decay trained together (``run_sweep``),
       each stopped early at its lowest validation loss, on a stratified validation split
       (``split_sweep``; under torchrun each rank trains a share of them), or below
       ``cv_below`` training rows by k-fold cross-validation (``cv_sweep``);
    3. retrain the chosen weight decay on the whole training split for its best epoch count,
       with augmented views where the store has them (``views``);
    4. score the test split: top-1 (with its bootstrap interval), top-3, per class, loss.
    """
    y_train = data.labels["train"]
    if cfg.protocol == "logreg":  # DINOv2's protocol, chosen as the SGD probe's is
        return logreg(data, cfg)
    dist = dist or Distributed()
    device = rank_device(resolve_device(cfg.device))
    if data.bounded and cfg.views and data.store.num_views > 1:
        raise ArgumentError(
            "--max-memory does not train on augmented views: pass --no-views with it"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    source, classes = _Source(data, cfg, device), data.num_classes
    folds = uses_cv(cfg, y_train, data.bounded)
    if folds:
        cfg = replace(cfg, cv_folds=folds)
    sweep_of = cv_sweep if folds else split_sweep
    cfg, sweep, chosen, curves, counts = sweep_of(source, y_train, cfg, classes, gen, dist)

    wd, epochs = cfg.weight_decays[chosen], sweep[chosen]["best_epoch"]
    every = np.arange(len(y_train))[:: max(1, len(y_train) // TRAIN_CURVE_SAMPLES)]
    final, final_curve = train_head(
        source.rows("train", views=True), classes, wd, epochs, source.curvature, cfg,
        retrain_generator(cfg), source.rows("train", every),
    )  # fmt: skip
    test = source.rows("test")
    loss = test.evaluate(final)[0]["loss"]
    if not math.isfinite(loss):
        raise ArgumentError(
            f"the head retrained with weight decay {wd:g} for {epochs} epochs diverged (its test "
            "loss is not finite): lower --lr"
        )
    pred, hit3 = test.predict(final)
    y_test = data.labels["test"]
    views = getattr(source, "views", None)
    return {
        "protocol": "sgd",
        "test": {**summary_from_predictions(pred, hit3, y_test, classes), "loss": loss},
        "per_class_top1": per_class_accuracies(pred, y_test, classes),
        **sweep_result(cfg, sweep, chosen, curves, final_curve),
        "views": 1 + (views.shape[1] if views is not None else 0),
        "device": str(device),  # where the heads trained (the config may say "auto")
        **counts,
        "num_test": len(y_test),
    }


def split_sweep(source, y_train, cfg: ProbeConfig, classes: int, gen, dist: Distributed):
    """The weight decays' heads trained together on a stratified split's fit rows (with views),
    each stopped at its lowest validation loss. Returns (the config with its step size scaled
    to the fit rows, the sweep's rows, the chosen one, its curves, the rows' counts)."""
    fit_idx, val_idx = stratified_split(y_train, cfg.val_fraction, cfg.seed)
    # Training curves on at most TRAIN_CURVE_SAMPLES fit images (a fixed subset): enough for
    # a curve, and the sweep no longer spends its time evaluating.
    monitor = source.rows("train", fit_idx[:: max(1, len(fit_idx) // TRAIN_CURVE_SAMPLES)])
    val, fit = source.rows("train", val_idx), source.rows("train", fit_idx, views=True)
    cfg = scaled_step(cfg, len(fit))
    share = cfg.weight_decays[dist.share(len(cfg.weight_decays))]
    heads = Heads(source.width, classes, share, source.curvature, cfg, source.device, gen)
    steps = fit.steps(cfg.batch_size)
    sweep, chosen, curves = run_sweep(
        heads, cfg,
        lambda epoch, active: heads.run(fit.batches(gen, cfg.batch_size, classes), steps, epoch,
                                        cfg.max_epochs, active),
        lambda: (monitor.evaluate(heads), val.evaluate(heads)),
        dist,
    )  # fmt: skip
    return cfg, sweep, chosen, curves, {"num_fit": len(fit_idx), "num_val": len(val_idx)}


@dataclass
class _HeadsPart:
    heads: Heads
    which: slice

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads.logits(x, self.which)


def cv_sweep(source, y_train, cfg: ProbeConfig, classes: int, gen, dist: Distributed):
    """k-fold cross-validation of the weight decays: the heads of every fold and weight decay
    (folds x decays) train together on the same minibatches of all the training rows (views
    included), each head's gradient over its fold's training rows only, each stopped at its
    lowest loss on its fold's held-out clean images. The weight decay of the lowest mean loss
    over the folds wins (ties: the stronger), for the mean of its folds' best epochs. Returns what
    ``split_sweep`` returns; the chosen row carries the folds' mean and spread (``cv``)."""
    k, wds, n = cfg.cv_folds, cfg.weight_decays, len(y_train)
    fold = torch.as_tensor(stratified_folds(y_train, k, cfg.seed), device=source.device)
    rows = source.rows("train", views=True)  # the clean rows first, then their views
    x, y = rows.x, rows.y
    fold = torch.cat([fold, fold.repeat_interleave((len(y) - n) // n)])  # a view: its image's
    cfg = scaled_step(cfg, len(y) * (k - 1) // k)  # each head's rows: all but its fold's
    head_fold = torch.arange(k, device=source.device).repeat_interleave(len(wds))  # (k * S,)
    heads = Heads(source.width, classes, wds * k, source.curvature, cfg, source.device, gen)
    clean = fold[:n]  # held-out rows are clean images only
    held_out = [MemoryRows(x[:n][clean == f], y[:n][clean == f]) for f in range(k)]
    every = max(1, n // TRAIN_CURVE_SAMPLES)
    monitor = MemoryRows(x[:n:every], y[:n:every])

    def own(idx):  # (k * S, B): a head trains on the rows outside its fold
        return (fold[idx][None, :] != head_fold[:, None]).float()

    def evaluate():  # each fold's held-out rows by its own heads (folds x decays, in order)
        s = len(wds)
        own_heads = [part.evaluate(heads.part(slice(f * s, (f + 1) * s)))
                     for f, part in enumerate(held_out)]  # fmt: skip
        return monitor.evaluate(heads), [m for fold_heads in own_heads for m in fold_heads]

    steps = rows.steps(cfg.batch_size)
    every_head = replace(cfg, weight_decays=wds * k)
    runs, _, curves = run_sweep(
        heads, every_head,
        lambda epoch, active: heads.run(rows.batches(gen, cfg.batch_size, classes, own), steps,
                                        epoch, cfg.max_epochs, active),
        evaluate, Distributed(),  # every rank trains every head (small data)
    )  # fmt: skip
    sweep = []
    for i, wd in enumerate(wds):
        mine = [runs[f * len(wds) + i] for f in range(k)]
        losses = [r["val"]["loss"] for r in mine]
        top1 = [r["val"]["top1"] for r in mine]
        sweep.append({
            "weight_decay": wd,
            "best_epoch": max(1, round(float(np.mean([r["best_epoch"] for r in mine])))),
            **validation(losses, top1),
        })  # fmt: skip
    chosen = min(range(len(wds)), key=lambda i: (sweep[i]["val"]["loss"], -wds[i]))
    return cfg, sweep, chosen, curves[: len(wds)], {"num_fit": n, "num_val": 0, "cv_folds": k}


def sweep_result(cfg: ProbeConfig, sweep, chosen: int, curves, final_curve) -> dict:
    """The part of a probe's result that describes its sweep and the retrained head."""
    wd, epochs = cfg.weight_decays[chosen], sweep[chosen]["best_epoch"]
    return {
        "selected": {
            "weight_decay": wd,
            "epochs": epochs,
            "val": sweep[chosen]["val"],
            **({"cv": sweep[chosen]["cv"]} if "cv" in sweep[chosen] else {}),
        },
        "step_size": cfg.lr,
        "sweep": sweep,
        "epochs": curves[chosen],
        "final_epochs": final_curve,
    }


def plot_probe(result: dict, path: str) -> None:
    """Per-epoch train/val curves of the chosen head, plus the validation loss of the sweep
    (logreg: validation top-1 and loss against C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("protocol") == "logreg":
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        cs = [s["C"] for s in result["sweep"]]
        for ax, metric in zip(axes, ("top1", "loss")):
            ax.semilogx(cs, [s["val"][metric] for s in result["sweep"]], "o-")
            ax.axvline(result["selected"]["C"], color="r", ls=":")
            ax.set(xlabel="C", title=f"validation {metric} (logreg)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    epochs = [e["epoch"] for e in result["epochs"]]
    for ax, metric in zip(axes, ("loss", "top1", "top3")):
        for part in ("train", "val"):
            ax.plot(epochs, [e[part][metric] for e in result["epochs"]], label=part)
        ax.axhline(result["test"][metric], color="k", ls=":", label="test (retrained)")
        ax.set_xlabel("epoch")
        ax.set_title(metric + (" (%)" if metric != "loss" else ""))
        ax.legend()
    wds = [max(s["weight_decay"], 1e-7) for s in result["sweep"]]
    axes[3].semilogx(wds, [s["val"]["loss"] for s in result["sweep"]], "o-")
    axes[3].axvline(max(result["selected"]["weight_decay"], 1e-7), color="r", ls=":")
    axes[3].set_xlabel("weight decay (0 drawn at 1e-7)")
    axes[3].set_title("best val loss per weight decay")
    fig.suptitle(f"linear probe: {result['backbone']} / {result['features']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
