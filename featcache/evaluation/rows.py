"""The rows a probe trains and scores on, in memory or read from a store a chunk at a time.

One interface, two sources, one protocol (``probe.probe``): a row set gives its epoch's
minibatches (``batches``), per-head metrics (``evaluate``) and the first head's predictions
(``predict``). ``MemoryRows`` holds z-scored features on the device; ``StoreRows`` reads a
chunk of rows at a time, z-scores it in place, and never holds more (``max_memory``): its
minibatches come from one chunk at a time (chunks in a shuffled order, rows shuffled within
each), so with one chunk (a budget that holds the split) they are the in-memory ones.
Both score ``EVAL_ROWS`` rows at a time, so their metrics are the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.metrics import head_metrics

# Rows scored at once: bounds the logits (heads x rows x classes) of an evaluation.
EVAL_ROWS = 4096


class _RowSet:
    """What both sources share: scoring and predicting over ``(x, y)`` chunks."""

    def chunks_on_device(self):  # yields (x (n, D) float32, y (n,) long) on the device
        raise NotImplementedError

    def evaluate(self, heads) -> list[dict]:
        """Per-head loss, top-1 and top-3 over all the rows (``head_metrics``)."""
        total, parts = 0, []
        for x, y in self.chunks_on_device():
            for i in range(0, len(y), EVAL_ROWS):  # logits (S, rows, C) of a slice at a time
                xs, ys = x[i : i + EVAL_ROWS], y[i : i + EVAL_ROWS]
                parts.append((len(ys), head_metrics(heads.logits(xs), ys)))
            total += len(y)
        return [
            {k: sum(n * m[h][k] for n, m in parts) / total for k in ("loss", "top1", "top3")}
            for h in range(len(parts[0][1]))
        ]

    def predict(self, heads) -> tuple[np.ndarray, np.ndarray]:
        """The first head's predicted class and top-3 hits of every row, in row order."""
        preds, hits3 = [], []
        for x, y in self.chunks_on_device():
            for i in range(0, len(y), EVAL_ROWS):
                logits = heads.logits(x[i : i + EVAL_ROWS])[0]
                top = logits.topk(min(3, logits.shape[1]), dim=1).indices
                preds.append(top[:, 0].cpu().numpy())
                hits3.append((top == y[i : i + EVAL_ROWS, None]).any(1).cpu().numpy())
        return np.concatenate(preds), np.concatenate(hits3)


class MemoryRows(_RowSet):
    """Rows held on the device, z-scored."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def chunks_on_device(self):
        yield self.x, self.y

    def steps(self, batch_size: int) -> int:
        return math.ceil(len(self.y) / batch_size)

    def batches(self, gen, batch_size: int, classes: int, weights=None):
        """Minibatches (x, onehot) in an order drawn from ``gen``; with ``weights(idx)``, the
        heads' weights of those rows (S, B) too (cross-validation: a fold's own rows)."""
        order = torch.randperm(len(self.y), generator=gen).to(self.x.device)
        for i in range(0, len(self.y), batch_size):
            idx = order[i : i + batch_size]
            batch = self.x[idx], F.one_hot(self.y[idx], classes).float()  # (B, C): never (N, C)
            yield (*batch, weights(idx)) if weights is not None else batch


class StoreRows(_RowSet):
    """Selected rows of one split, read from the store a chunk at a time and z-scored."""

    def __init__(self, data: Splits, split: str, rows, scale, chunk: int, device):
        self.data, self.split, self.device = data, split, device
        self.labels = data.labels[split]
        self.mean, self.std = scale
        n = data.size(split)
        selected = np.zeros(n, bool)
        selected[rows] = True
        # (start, stop, positions of the selected rows within the chunk)
        self.chunks = [
            (a, min(a + chunk, n), np.flatnonzero(selected[a : a + chunk]))
            for a in range(0, n, chunk)
        ]
        self.chunks = [c for c in self.chunks if len(c[2])]

    def __len__(self) -> int:
        return sum(len(pick) for _, _, pick in self.chunks)

    def raw(self, start: int, stop: int, pick: np.ndarray) -> np.ndarray:
        """The selected rows of a chunk, as read: a fresh float32 array (or the first rows of
        one, holding the chunk's memory)."""
        x = self.data.rows(self.split, start, stop)
        if self.split in self.data.arrays:
            x = x.copy()  # a view of the caller's array: changed in place below
        if len(pick) == len(x):
            return x
        # Gathered in place, a slice at a time, rather than into a second array: pick is
        # strictly increasing (flatnonzero), so pick[j] >= j and no row is overwritten
        # before it is read.
        for i in range(0, len(pick), EVAL_ROWS):
            part = pick[i : i + EVAL_ROWS]
            x[i : i + len(part)] = x[part]
        return x[: len(pick)]

    def read(self, start: int, stop: int, pick: np.ndarray):
        """The selected rows of a chunk, standardised, and their labels, on the device."""
        x = self.raw(start, stop, pick)
        x -= self.mean  # in place: a chunk is held once, not once per operation
        x /= self.std
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        y = self.labels[start:stop][pick]
        return x, torch.as_tensor(y, dtype=torch.long, device=self.device)

    def chunks_on_device(self):
        for chunk in self.chunks:
            yield self.read(*chunk)

    def steps(self, batch_size: int) -> int:
        return sum(math.ceil(len(pick) / batch_size) for _, _, pick in self.chunks)

    def batches(self, gen, batch_size: int, classes: int):
        """Minibatches (x, onehot): chunks in a shuffled order, rows shuffled within each."""
        # One chunk (a budget that holds the split): the in-memory probe's order exactly.
        chunks = torch.randperm(len(self.chunks), generator=gen) if len(self.chunks) > 1 else [0]
        for c in list(chunks):
            yield from MemoryRows(*self.read(*self.chunks[c])).batches(gen, batch_size, classes)


def check_finite(a: np.ndarray, name: str, where: str = "") -> None:
    """Refuse features with NaN or inf, by count, read in slices (no copy the size of ``a``)."""
    slices = (a[i : i + EVAL_ROWS] for i in range(0, len(a), EVAL_ROWS))
    bad = sum(int(c.size - np.isfinite(c).sum()) for c in slices)
    if bad:
        raise ArgumentError(
            f"the {name} features hold {bad} non-finite values (NaN or inf){where}: no probe "
            "can be trained on them; extract the store again (--precision fp32 if it was fp16)"
        )


def statistics(data: Splits, chunk: int, device):
    """Mean and std (as ``standardise``) of the training features, and the curvature
    bound (half the largest eigenvalue of the z-scored second-moment matrix), in one pass."""
    rows = StoreRows(data, "train", np.arange(data.size("train")), (0.0, 1.0), chunk, device)
    total, s, ss = 0, 0.0, 0.0
    for start, stop, pick in rows.chunks:
        part = rows.raw(start, stop, pick)
        check_finite(part, "training", f" in rows {start}-{stop}")
        for i in range(0, len(part), EVAL_ROWS):  # in float64 a slice at a time
            x = part[i : i + EVAL_ROWS].astype(np.float64)
            s, ss = s + x.sum(0), ss + x.T @ x
        total += len(part)
    mean = s / total
    second = ss / total - np.outer(mean, mean)  # covariance
    std = np.sqrt(np.clip(np.diag(second), 0, None)) + 1e-6
    scaled = second / np.outer(std, std)
    curvature = 0.5 * float(np.linalg.eigvalsh(scaled)[-1])
    return (mean.astype(np.float32)[None], std.astype(np.float32)[None]), curvature


def standardise(train: np.ndarray, *others: np.ndarray):
    """New arrays z-scored with the training rows' mean and std (one copy each)."""
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True) + 1e-6
    out = [a - mean for a in (train, *others)]
    for a in out:
        a /= std
    return out
