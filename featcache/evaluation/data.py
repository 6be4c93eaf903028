"""What every evaluation method reads: the features of both splits and their labels.

``Splits`` holds them in memory (arrays given to the API, or a store's split read whole), or
leaves them in the store, to be read a chunk of rows at a time (``max_memory``): a method
asks for ``x(split)`` or for ``rows(split, start, stop)`` and works either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.errors import ArgumentError
from featcache.store import Store

Pair = tuple[np.ndarray, np.ndarray]  # (features (N, D), labels (N,))


@dataclass
class Splits:
    labels: dict[str, np.ndarray]  # split -> (N,) int64
    num_classes: int
    width: int
    store: Store | None = None  # where features not in memory are read from
    feature: str | None = None  # the store's feature set
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N, D) float32
    views: np.ndarray | None = None  # (N, V, D) augmented views of the training images

    @classmethod
    def in_memory(cls, train: Pair | None, test: Pair, views=None) -> Splits:
        """float32 features and int64 labels given as (x, y) pairs (``train`` may be None
        for the methods that read one split)."""
        pairs = {"test": test} | ({"train": train} if train is not None else {})
        arrays = {s: np.asarray(x, np.float32) for s, (x, _) in pairs.items()}
        labels = {s: np.asarray(y, np.int64) for s, (_, y) in pairs.items()}
        classes = int(max(y.max(initial=-1) for y in labels.values())) + 1
        width = arrays["test"].shape[1]
        return cls(labels, classes, width, arrays=arrays,
                   views=None if views is None else np.asarray(views, np.float32))  # fmt: skip

    @classmethod
    def of_store(cls, store: Store, feature: str, splits=("train", "test"), load=True,
                 views=False) -> Splits:  # fmt: skip
        """A store's splits: read whole now (``load``), or left there to be read in chunks;
        with the training split's augmented views (``views``, when it has them)."""
        for split in splits:
            store.check(split, feature)
        labels = {s: store.read(s, "labels") for s in splits}
        width = store.fields["backbone"]["features"].get(feature)
        data = cls(labels, len(store.class_names), width, store=store, feature=feature)
        if load:
            data.arrays = {s: store.load(s, feature).features for s in splits}
            data.width = next(iter(data.arrays.values())).shape[1]
            if views and "train" in splits:
                data.views = store.load_views("train", feature)
        return data

    def size(self, split: str) -> int:
        return len(self.labels[split])

    def x(self, split: str) -> np.ndarray:
        """A split's features (N, D) float32, read whole on first use."""
        if split not in self.arrays:
            self.arrays[split] = self.store.load(split, self.feature).features
        return self.arrays[split]

    def rows(self, split: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a split: a view of the array in memory, else a fresh array
        read from the store (which the caller may change in place)."""
        if split in self.arrays:
            return self.arrays[split][start:stop]
        return self.store.rows(split, self.feature, start, stop)

    @property
    def bounded(self) -> bool:
        """Whether the features stay in the store, read a chunk at a time."""
        return not self.arrays


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(fit_idx, val_idx): ``fraction`` of every class (at least one sample) held out."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(fraction * len(members)))
        if n_val >= len(members):
            raise ArgumentError(
                f"class {c} has {len(members)} training samples: too few to hold out validation"
            )
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold (0 .. folds - 1): every class dealt round-robin over the folds in a
    seeded order, so that each fold holds 1/folds of every class."""
    rng = np.random.default_rng([seed, folds])
    fold = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < folds:
            raise ArgumentError(
                f"class {c} has {len(members)} training samples: too few for {folds} folds "
                "(lower --cv-folds, or --cv-below 0 for one validation split)"
            )
        fold[members] = np.arange(len(members)) % folds
    return fold


def uses_cv(cfg, labels: np.ndarray, bounded: bool = False) -> int:
    """The folds a probe chooses its regularisation by: ``cfg.cv_folds`` (at most the
    smallest class's images) below ``cfg.cv_below`` training rows in memory; 0 for one
    validation split (a store read in chunks, ``max_memory``, is chosen on one split)."""
    if bounded or len(labels) >= cfg.cv_below:
        return 0
    smallest = int(np.bincount(labels).min()) if len(labels) else 0  # a missing class: 0
    folds = min(cfg.cv_folds, smallest)
    return folds if folds >= 2 else 0


def validation(losses: list[float], top1: list[float]) -> dict:
    """A candidate's validation loss and top-1 (``val``), the means over its folds; with more
    than one fold their mean and spread too (``cv``)."""
    val = {"loss": float(np.mean(losses)), "top1": float(np.mean(top1))}
    return {"val": val, **({"cv": fold_summary(losses, top1)} if len(losses) > 1 else {})}


def fold_summary(losses: list[float], top1: list[float]) -> dict:
    """The folds' mean and spread (population std) of a candidate's held-out loss and top-1."""
    return {
        "folds": len(losses),
        "loss_mean": float(np.mean(losses)),
        "loss_std": float(np.std(losses)),
        "top1_mean": float(np.mean(top1)),
        "top1_std": float(np.std(top1)),
    }
