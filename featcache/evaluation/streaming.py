"""The linear probe on a store larger than memory: features read a chunk of rows at a time.

The protocol is the in-memory probe's (``probe.fit_probe``): z-scoring with the training
split's statistics, the same stratified validation split, all weight decays trained together
with early stopping, the chosen one retrained on the whole training split. What differs: the
statistics and the curvature come from one streaming pass (the curvature exactly, from the
second-moment matrix, where the in-memory probe uses 30 power iterations); minibatches are
drawn from one chunk at a time (chunks in a shuffled order, rows shuffled within each); the
validation and test splits are scored chunk by chunk. At most about ``max_memory`` bytes of
features are held at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from featcache.device import rank_device, resolve_device
from featcache.distributed import Distributed
from featcache.evaluation.metrics import per_class_accuracies, summary_from_predictions
from featcache.evaluation.probe import (
    TRAIN_CURVE_SAMPLES,
    ProbeConfig,
    _Heads,
    _metrics,
    retrain_generator,
    run_sweep,
    scaled_step,
    stratified_split,
    sweep_result,
)
from featcache.store import Store

# Rows scored at once: bounds the logits (heads x rows x classes) of an evaluation.
EVAL_ROWS = 4096


class _Rows:
    """Selected rows of one split, read from the store a chunk at a time and z-scored."""

    def __init__(self, store: Store, split: str, feature: str, labels, rows, scale, chunk):
        self.store, self.split, self.feature = store, split, feature
        self.labels = labels  # the split's, shared by its row sets
        self.mean, self.std = scale
        self.device = None
        n = store.sizes[split]
        selected = np.zeros(n, bool)
        selected[rows] = True
        # (start, stop, positions of the selected rows within the chunk)
        self.chunks = [
            (a, min(a + chunk, n), np.flatnonzero(selected[a : a + chunk]))
            for a in range(0, n, chunk)
        ]
        self.chunks = [c for c in self.chunks if len(c[2])]

    def raw(self, start: int, stop: int, pick: np.ndarray) -> np.ndarray:
        """The selected rows of a chunk, as read: a fresh float32 array (or the first rows of
        one, holding the chunk's memory)."""
        x = self.store.rows(self.split, self.feature, start, stop)
        if len(pick) == len(x):
            return x
        # Gathered in place, a slice at a time, rather than into a second array: pick is
        # strictly increasing (flatnonzero), so pick[j] >= j and no row is overwritten
        # before it is read.
        for i in range(0, len(pick), EVAL_ROWS):
            part = pick[i : i + EVAL_ROWS]
            x[i : i + len(part)] = x[part]
        return x[: len(pick)]

    def read(self, start: int, stop: int, pick: np.ndarray, device):
        """The selected rows of a chunk, standardised, and their labels, on ``device``."""
        x = self.raw(start, stop, pick)
        x -= self.mean  # in place: a chunk is held once, not once per operation
        x /= self.std
        x = torch.as_tensor(x, dtype=torch.float32, device=device)
        y = torch.as_tensor(self.labels[start:stop][pick], dtype=torch.long, device=device)
        return x, y

    def steps(self, batch_size: int) -> int:
        return sum(math.ceil(len(pick) / batch_size) for _, _, pick in self.chunks)

    def batches(self, gen, batch_size: int, classes: int, device):
        """Minibatches (x, onehot): chunks in a shuffled order, rows shuffled within each."""
        # One chunk (a budget that holds the split): the in-memory probe's order exactly.
        chunks = torch.randperm(len(self.chunks), generator=gen) if len(self.chunks) > 1 else [0]
        for c in list(chunks):
            x, y = self.read(*self.chunks[c], device)
            order = torch.randperm(len(y), generator=gen).to(device)
            for i in range(0, len(y), batch_size):
                idx = order[i : i + batch_size]
                yield x[idx], F.one_hot(y[idx], classes).float()  # (B, C): never (N, C)

    def evaluate(self, heads: _Heads, device) -> list[dict]:
        """Per-head loss, top-1 and top-3 over all the rows, as ``_metrics`` gives them."""
        total, parts = 0, []
        for chunk in self.chunks:
            x, y = self.read(*chunk, device)
            for i in range(0, len(y), EVAL_ROWS):  # logits (S, rows, C) of a slice at a time
                parts.append((len(y[i : i + EVAL_ROWS]), _metrics(heads.logits(
                    x[i : i + EVAL_ROWS]), y[i : i + EVAL_ROWS])))  # fmt: skip
            total += len(y)
        return [
            {k: sum(n * m[h][k] for n, m in parts) / total for k in ("loss", "top1", "top3")}
            for h in range(len(parts[0][1]))
        ]

    def predict(self, heads: _Heads, device):
        """The first head's predicted class and top-3 hits of every row, in row order."""
        preds, hits3 = [], []
        for chunk in self.chunks:
            x, y = self.read(*chunk, device)
            for i in range(0, len(y), EVAL_ROWS):
                logits = heads.logits(x[i : i + EVAL_ROWS])[0]
                top = logits.topk(min(3, logits.shape[1]), dim=1).indices
                preds.append(top[:, 0].cpu().numpy())
                hits3.append((top == y[i : i + EVAL_ROWS, None]).any(1).cpu().numpy())
        return np.concatenate(preds), np.concatenate(hits3)


def _statistics(rows: _Rows):
    """Mean and std (as ``probe.standardise``) of the training features, and the curvature
    bound (half the largest eigenvalue of the z-scored second-moment matrix), in one pass."""
    total, s, ss = 0, 0.0, 0.0
    for start, stop, pick in rows.chunks:
        chunk = rows.raw(start, stop, pick)
        for i in range(0, len(chunk), EVAL_ROWS):  # in float64 a slice at a time
            x = chunk[i : i + EVAL_ROWS].astype(np.float64)
            s, ss = s + x.sum(0), ss + x.T @ x
        total += len(chunk)
    mean = s / total
    second = ss / total - np.outer(mean, mean)  # covariance
    std = np.sqrt(np.clip(np.diag(second), 0, None)) + 1e-6
    scaled = second / np.outer(std, std)
    curvature = 0.5 * float(np.linalg.eigvalsh(scaled)[-1])
    return (mean.astype(np.float32)[None], std.astype(np.float32)[None]), curvature


@torch.no_grad()
def fit_probe_streamed(store: Store, feature: str, cfg: ProbeConfig, dist: Distributed) -> dict:
    """The probe with at most about ``cfg.max_memory`` bytes of features held at once;
    under torchrun each rank trains a share of the weight decays (``probe.run_sweep``)."""
    device = rank_device(resolve_device(cfg.device))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    width = store.fields["backbone"]["features"][feature]
    chunk = max(cfg.batch_size, cfg.max_memory // 4 // (4 * width))  # with room for the copies
    y_train, y_test = store.read("train", "labels"), store.read("test", "labels")
    classes = len(store.class_names)
    everything = np.arange(len(y_train))

    labels = {"train": y_train, "test": y_test}

    def rows(split, selected, scale):
        return _Rows(store, split, feature, labels[split], selected, scale, chunk)

    scale, curv = _statistics(rows("train", everything, (0.0, 1.0)))
    fit_idx, val_idx = stratified_split(y_train, cfg.val_fraction, cfg.seed)
    fit, val = rows("train", fit_idx, scale), rows("train", val_idx, scale)
    # Training curves on a fixed subset of at most TRAIN_CURVE_SAMPLES fit rows, as in memory.
    curve_idx = fit_idx[:: max(1, len(fit_idx) // TRAIN_CURVE_SAMPLES)]
    monitor = rows("train", curve_idx, scale)

    cfg = scaled_step(cfg, len(fit_idx))
    share = cfg.weight_decays[dist.share(len(cfg.weight_decays))]
    heads = _Heads(width, classes, share, curv, cfg, device, gen)
    steps = fit.steps(cfg.batch_size)
    sweep, chosen, curves = run_sweep(
        heads,
        cfg,
        lambda epoch, active: heads.run(
            fit.batches(gen, cfg.batch_size, classes, device),
            steps,
            epoch,
            cfg.max_epochs,
            active,
        ),  # fmt: skip
        lambda: (monitor.evaluate(heads, device), val.evaluate(heads, device)),
        dist,
    )

    wd, epochs = cfg.weight_decays[chosen], sweep[chosen]["best_epoch"]
    whole = rows("train", everything, scale)
    whole_monitor = rows(
        "train", everything[:: max(1, len(everything) // TRAIN_CURVE_SAMPLES)], scale
    )
    gen = retrain_generator(cfg)
    final = _Heads(width, classes, (wd,), curv, cfg, device, gen)
    ones, steps, final_curve = torch.ones(1, device=device), whole.steps(cfg.batch_size), []
    for epoch in range(epochs):
        batches = whole.batches(gen, cfg.batch_size, classes, device)
        final.run(batches, steps, epoch, cfg.max_epochs, ones)
        final_curve.append({"epoch": epoch + 1, "train": whole_monitor.evaluate(final, device)[0]})
    test = rows("test", np.arange(len(y_test)), scale)
    loss = test.evaluate(final, device)[0]["loss"]
    if not math.isfinite(loss):
        raise ValueError(
            f"the head retrained with weight decay {wd:g} for {epochs} epochs diverged (its test "
            "loss is not finite): lower --lr"
        )
    pred, hit3 = test.predict(final, device)
    return {
        "test": {**summary_from_predictions(pred, hit3, y_test, classes), "loss": loss},
        "per_class_top1": per_class_accuracies(pred, y_test, classes),
        **sweep_result(cfg, sweep, chosen, curves, final_curve),
        "views": 1,
        "device": str(device),
        "num_fit": len(fit_idx),
        "num_val": len(val_idx),
        "num_test": len(y_test),
    }
