"""Label efficiency: linear probe and k-NN with k labelled images per class (or a fraction).

For each budget and repeat, a class-balanced labelled subset of the training split is drawn;
a linear head (weight decay chosen once by the full probe's validation sweep, trained for the
full cosine schedule: a 1-shot subset leaves nothing to validate on) and a weighted k-NN use
only those labels; features are z-scored with the statistics of all training images, which are
unlabelled data every method may see. Reported: mean and standard deviation of test top-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.errors import ArgumentError
from featcache.evaluation.data import Splits
from featcache.evaluation.knn import HEADLINE_K, TEMPERATURE, knn_evaluate
from featcache.evaluation.metrics import topk_accuracy
from featcache.evaluation.probe import ProbeConfig, curvature, probe, train_head
from featcache.evaluation.rows import MemoryRows, standardise


@dataclass(frozen=True)
class ShotsConfig:
    """Label efficiency's settings (what it reads is the method's ``Splits``)."""

    shots: tuple[int, ...] = (1, 5, 10, 100)  # labelled images per class
    label_fractions: tuple[float, ...] = ()  # fractions of the labelled training split
    repeats: int = 5
    seed: int = 0
    k: int = HEADLINE_K  # k-NN neighbours (capped by the labelled set's size)
    temperature: float = TEMPERATURE
    # None: chosen by the full probe's validation sweep on the whole training split.
    weight_decay: float | None = None
    probe: ProbeConfig | None = None

    def __post_init__(self):
        if not self.shots and not self.label_fractions:
            raise ArgumentError("give --shots or --label-fraction")
        if any(s < 1 for s in self.shots):
            raise ArgumentError(f"--shots must be positive, got {self.shots}")
        if any(not 0 < f <= 1 for f in self.label_fractions):
            raise ArgumentError(f"--label-fractions must be in (0, 1], got {self.label_fractions}")
        if self.repeats < 1:
            raise ArgumentError(f"--repeats must be at least 1, got {self.repeats}")


def labelled_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ArgumentError(
                f"class {c} has {len(members)} training images, fewer than {per_class} shots"
            )
        out.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(out))


def shots(data: Splits, cfg: ShotsConfig) -> dict:
    """Label efficiency: for each budget and repeat, a probe and a k-NN that see only the
    labelled subset."""
    x_train, y_train = data.x("train"), data.labels["train"]
    x_test, y_test = data.x("test"), data.labels["test"]
    num_classes = data.num_classes
    pcfg = cfg.probe or ProbeConfig()
    wd = cfg.weight_decay
    if wd is None:  # the full probe's choice, on the clean images
        clean = Splits(data.labels, num_classes, data.width, arrays={"train": x_train,
                                                                   "test": x_test})  # fmt: skip
        wd = probe(clean, pcfg)["selected"]["weight_decay"]

    device = resolve_device(pcfg.device)
    xtr, xte = standardise(x_train, x_test)
    xtr_t = torch.as_tensor(xtr, device=device)
    xte_t = torch.as_tensor(xte, device=device)
    curv = curvature(xtr_t)
    min_class = int(np.bincount(y_train).min())
    budgets = [("shots", s, s) for s in cfg.shots]
    budgets += [("fraction", f, max(1, round(f * min_class))) for f in cfg.label_fractions]

    rows = []
    for kind, value, per_class in budgets:
        probe_acc, knn_acc = [], []
        for r in range(cfg.repeats):
            rng = np.random.default_rng([cfg.seed, r, per_class])
            idx = labelled_subset(y_train, per_class, rng)
            labelled = MemoryRows(xtr_t[idx], torch.as_tensor(y_train[idx], device=device))
            gen = torch.Generator().manual_seed(cfg.seed + r)
            with torch.no_grad():
                head, _ = train_head(labelled, num_classes, wd, pcfg.max_epochs, curv, pcfg, gen)
                scores = head.logits(xte_t)[0].cpu().numpy()
            probe_acc.append(topk_accuracy(scores, y_test, 1))
            k = min(cfg.k, len(idx))
            knn_acc.append(knn_evaluate(x_train[idx], y_train[idx], x_test, y_test, num_classes,
                                        (k,), cfg.temperature)[0]["top1"])  # fmt: skip
        rows.append(
            {
                "kind": kind,
                "value": value,
                "labels_per_class": per_class,
                "probe_top1_mean": float(np.mean(probe_acc)),
                "probe_top1_std": float(np.std(probe_acc)),
                "knn_top1_mean": float(np.mean(knn_acc)),
                "knn_top1_std": float(np.std(knn_acc)),
                "probe_top1": probe_acc,
                "knn_top1": knn_acc,
            }
        )
    return {
        "weight_decay": wd,
        "device": str(device),  # where the heads trained (the config may say "auto")
        "results": rows,
    }
