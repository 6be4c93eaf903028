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
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featcache.device import rank_device, resolve_device
from featcache.distributed import Distributed
from featcache.evaluation.metrics import classification_summary, per_class_accuracies
from featcache.store import Store

TRAIN_CURVE_SAMPLES = 10_000
MIN_FULL_STEPS = 10  # epochs of fewer steps use a proportionally smaller step size
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's method settings (what it reads is an argument of ``run_probe``)."""

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
    use_views: bool = True
    # Bytes of features held at once (None: the splits in memory): the store is then read a
    # chunk of rows at a time (evaluation/streaming.py).
    max_memory: int | None = None

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError(f"weight decays must be non-negative, got {self.weight_decays}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--epochs, --batch-size and --lr must be positive")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"--max-memory must be positive, got {self.max_memory}")


def _non_finite(a: np.ndarray, rows: int = 65536) -> int:
    """How many values of ``a`` are NaN or inf, in chunks (no copy the size of ``a``)."""
    chunks = (a[i : i + rows] for i in range(0, len(a), rows))
    return sum(int(c.size - np.isfinite(c).sum()) for c in chunks)


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(fit_idx, val_idx): ``fraction`` of every class (at least one sample) held out."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(fraction * len(members)))
        if n_val >= len(members):
            raise ValueError(
                f"class {c} has {len(members)} training samples: too few to hold out validation"
            )
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _metrics(logits: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per-head loss/top-1/top-3 (percent), all heads at once. logits: (S, N, C), y: (N,)."""
    s, n, c = logits.shape
    loss = F.cross_entropy(logits.reshape(s * n, c), y.repeat(s), reduction="none").view(s, n)
    hits = logits.topk(min(3, c), dim=2).indices == y.view(1, n, 1)  # (S, N, 3)
    top1 = hits[:, :, 0].double().mean(1) * 100  # exact percentages (not float32 ones)
    top3 = hits.any(2).double().mean(1) * 100
    return [
        {"loss": float(a), "top1": float(b), "top3": float(t)}
        for a, b, t in zip(loss.mean(1).tolist(), top1.tolist(), top3.tolist())
    ]


class _Heads:
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,sdc->snc", x, self.W) + self.b[:, None, :]  # (S, N, C)

    def epoch(self, x, y, epoch: int, epochs: int, active: torch.Tensor) -> None:
        """One epoch over in-memory rows, in an order drawn from the heads' generator."""
        n, bs = len(y), self.cfg.batch_size
        steps = math.ceil(n / bs)
        order = torch.randperm(n, generator=self.gen).to(x.device)
        classes = self.W.shape[2]
        batches = (  # one-hot per batch: (N, C) would be 5 GB for ImageNet-1k's train split
            (x[idx], F.one_hot(y[idx], classes).float())
            for idx in (order[i * bs : (i + 1) * bs] for i in range(steps))
        )
        self.run(batches, steps, epoch, epochs, active)

    def run(self, batches, steps: int, epoch: int, epochs: int, active: torch.Tensor) -> None:
        """One epoch of ``steps`` minibatches ``(x (B, D), onehot (B, C))`` on the cosine
        schedule."""
        m = self.cfg.momentum
        for step, (xb, onehot_b) in enumerate(batches):
            t = (epoch * steps + step) / (epochs * steps)
            lr = self.step_size * active * 0.5 * (1 + math.cos(math.pi * t))  # (S,)
            # Gradient of the mean cross-entropy: x^T (softmax - onehot) / B, per head.
            err = (self.logits(xb).softmax(-1) - onehot_b) / len(xb)  # (S, B, C)
            gW = torch.einsum("nd,snc->sdc", xb, err) + self.wd[:, None, None] * self.W
            gb = err.sum(1)
            self.vW.mul_(m).add_(gW)
            self.vb.mul_(m).add_(gb)
            self.W.sub_(lr[:, None, None] * self.vW)
            self.b.sub_(lr[:, None] * self.vb)

    def evaluate(self, x, y) -> list[dict]:
        return _metrics(self.logits(x), y)


def train_head(
    x, y, num_classes, weight_decay, epochs, curvature, cfg: ProbeConfig, gen, monitor=None
):
    """One head trained for ``epochs`` of the cosine schedule sized by ``cfg.max_epochs``.

    Returns the head and its per-epoch metrics on ``monitor`` (x, y) when given.
    """
    head = _Heads(x.shape[1], num_classes, (weight_decay,), curvature, cfg, x.device, gen)
    ones = torch.ones(1, device=x.device)
    curve = []
    for epoch in range(epochs):
        head.epoch(x, y, epoch, cfg.max_epochs, ones)
        if monitor is not None:
            curve.append({"epoch": epoch + 1, "train": head.evaluate(*monitor)[0]})
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


def standardise(train: np.ndarray, *others: np.ndarray):
    """New arrays z-scored with the training rows' mean and std (one copy each)."""
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True) + 1e-6
    out = [a - mean for a in (train, *others)]
    for a in out:
        a /= std
    return out


def scaled_step(cfg: ProbeConfig, rows: int) -> ProbeConfig:
    """Early stopping looks once per epoch; when an epoch is only a few steps (small training
    sets) a full step size moves too far between looks, so it shrinks with the step count."""
    steps = math.ceil(rows / cfg.batch_size)
    return replace(cfg, lr=cfg.lr * min(1.0, steps / MIN_FULL_STEPS))


def run_sweep(heads: _Heads, cfg: ProbeConfig, epoch_fn, evaluate_fn, dist: Distributed):
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
        raise ValueError(
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


@torch.no_grad()
def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    cfg: ProbeConfig,
    train_views: np.ndarray | None = None,
    dist: Distributed | None = None,
) -> dict:
    """The whole protocol on in-memory features; returns the result dict (no I/O).

    ``train_views`` (N, V, D): augmented views of the training images. Heads then train on
    the clean images and all their views; validation and test use clean images only.
    ``dist``: under torchrun each rank trains a share of the weight decays (``run_sweep``).
    """
    dist = dist or Distributed()
    device = rank_device(resolve_device(cfg.device))
    for name, a in (("training", x_train), ("test", x_test), ("view", train_views)):
        bad = 0 if a is None else _non_finite(a)
        if bad:
            raise ValueError(
                f"the {name} features hold {bad} non-finite values (NaN or inf): no probe can "
                "be trained on them; extract the store again (--precision fp32 if it was fp16)"
            )
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    xtr, xte, *xviews = standardise(
        np.asarray(x_train, np.float32),
        np.asarray(x_test, np.float32),
        *([np.asarray(train_views, np.float32)] if train_views is not None else []),
    )
    fit_idx, val_idx = stratified_split(y_train, cfg.val_fraction, cfg.seed)

    def t(a, dtype=torch.float32):
        return torch.as_tensor(a, dtype=dtype, device=device)

    def with_views(idx=None):  # training rows (None: all): the clean images, then their views
        if not xviews:
            if idx is None:  # the split itself, not a copy
                return t(xtr), t(y_train, torch.long)
            return t(xtr[idx]), t(y_train[idx], torch.long)
        idx = np.arange(len(y_train)) if idx is None else idx
        v = xviews[0][idx]  # (n, V, D)
        x = np.concatenate([xtr[idx], v.reshape(-1, v.shape[-1])])
        y = np.concatenate([y_train[idx], np.repeat(y_train[idx], v.shape[1])])
        return t(x), t(y, torch.long)

    # Training curves are measured on at most TRAIN_CURVE_SAMPLES fit images (a fixed
    # subset): enough for a curve, and the sweep no longer spends its time evaluating.
    curve_idx = fit_idx[:: max(1, len(fit_idx) // TRAIN_CURVE_SAMPLES)]
    xf, yf = t(xtr[curve_idx]), t(y_train[curve_idx], torch.long)
    xv, yv = t(xtr[val_idx]), t(y_train[val_idx], torch.long)
    xf_all, yf_all = with_views(fit_idx)

    # 1. The sweep: all heads on the same batches, each with its own early stopping.
    curv = curvature(t(xtr))
    cfg = scaled_step(cfg, len(yf_all))
    share = cfg.weight_decays[dist.share(len(cfg.weight_decays))]
    heads = _Heads(xf.shape[1], num_classes, share, curv, cfg, device, gen)
    sweep, chosen, curves = run_sweep(
        heads,
        cfg,
        lambda epoch, active: heads.epoch(xf_all, yf_all, epoch, cfg.max_epochs, active),
        lambda: (heads.evaluate(xf, yf), heads.evaluate(xv, yv)),
        dist,
    )

    # 2. Retrain the chosen setting on the whole training split: the same schedule, stopped
    #    at the epoch where its validation loss was lowest.
    wd, epochs = cfg.weight_decays[chosen], sweep[chosen]["best_epoch"]
    xf_all = yf_all = None  # the fit rows' copy, released before the whole split's
    every = slice(None, None, max(1, len(y_train) // TRAIN_CURVE_SAMPLES))
    xa, ya = t(xtr[every]), t(y_train[every], torch.long)
    xa_all, ya_all = with_views()
    final, final_curve = train_head(
        xa_all, ya_all, num_classes, wd, epochs, curv, cfg, retrain_generator(cfg), (xa, ya)
    )
    test_logits = final.logits(t(xte))[0]
    loss = _metrics(test_logits[None], t(y_test, torch.long))[0]["loss"]
    if not math.isfinite(loss):
        raise ValueError(
            f"the head retrained with weight decay {wd:g} for {epochs} epochs diverged (its test "
            "loss is not finite): lower --lr"
        )
    test = {**classification_summary(test_logits.cpu().numpy(), y_test), "loss": loss}
    pred = test_logits.argmax(1).cpu().numpy()
    return {
        "test": test,
        "per_class_top1": per_class_accuracies(pred, y_test, num_classes),
        **sweep_result(cfg, sweep, chosen, curves, final_curve),
        "views": 1 + (xviews[0].shape[1] if xviews else 0),
        "device": str(device),  # where the heads trained (the config may say "auto")
        "num_fit": len(fit_idx),
        "num_val": len(val_idx),
        "num_test": len(y_test),
    }


def sweep_result(cfg: ProbeConfig, sweep, chosen: int, curves, final_curve) -> dict:
    """The part of a probe's result that describes its sweep and the retrained head."""
    wd, epochs = cfg.weight_decays[chosen], sweep[chosen]["best_epoch"]
    return {
        "selected": {"weight_decay": wd, "epochs": epochs, "val": sweep[chosen]["val"]},
        "step_size": cfg.lr,
        "sweep": sweep,
        "epochs": curves[chosen],
        "final_epochs": final_curve,
    }


def run_probe(store: str | Path | Store, cfg: ProbeConfig, features: str | None = None) -> dict:
    """The probe on a store's train and test splits (``features``: the backbone's first set
    by default); the result carries the store's provenance.

    Under torchrun each rank trains a share of the weight decays and gathers the others'
    sweep, so every rank holds the one-process result (rank 0 writes it).
    """
    store = store if isinstance(store, Store) else Store(store)
    feature = store.pair_feature(features)
    if cfg.max_memory is not None and cfg.use_views and store.num_views > 1:
        raise ValueError("--max-memory does not train on augmented views: pass --no-views with it")
    dist = Distributed.from_env()
    if cfg.max_memory is not None:
        from featcache.evaluation.streaming import fit_probe_streamed

        start = time.perf_counter()
        result = fit_probe_streamed(store, feature, cfg, dist)
    else:
        train, test = store.load("train", feature), store.load("test", feature)
        views = store.load_views("train", feature) if cfg.use_views else None
        start = time.perf_counter()
        result = fit_probe(train.features, train.labels, test.features, test.labels,
                           len(store.class_names), cfg, views, dist)  # fmt: skip
    seconds = time.perf_counter() - start
    return {**store.provenance("probe", feature, cfg), "seconds": seconds, **result}


def plot_probe(result: dict, path: str) -> None:
    """Per-epoch train/val curves of the chosen head, plus the validation loss of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
