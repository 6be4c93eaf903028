"""The Python API: every stage as a function, every result as a typed record.

``featcache.extract(...)`` writes a store and returns it; ``probe``, ``knn``, ``cluster``,
``shots`` and ``retrieval`` take a store (a path or a ``Store``) or in-memory features
(``train=(x, y), test=(x, y)``), with the CLI's options as keyword arguments and the same
defaults (each method's config dataclass is the one place they are written). A result has its
headline numbers as attributes and ``to_dict()``, the JSON that the CLI writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from featcache.store import Store

Pair = tuple[np.ndarray, np.ndarray]  # (features (N, D), labels (N,))


@dataclass(frozen=True)
class Result:
    """A result: headline numbers as attributes; ``to_dict()`` is the CLI's JSON."""

    data: dict = field(repr=False)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.data)


@dataclass(frozen=True)
class ProbeResult(Result):
    top1: float = 0.0
    top3: float = 0.0
    loss: float = 0.0
    mean_per_class: float = 0.0
    top1_ci95: tuple[float, float] = (0.0, 0.0)
    weight_decay: float = 0.0
    epochs: int = 0

    @classmethod
    def of(cls, data: dict) -> ProbeResult:
        t, s = data["test"], data["selected"]
        return cls(
            data,
            t["top1"],
            t["top3"],
            t["loss"],
            t["mean_per_class"],
            tuple(t["top1_ci95"]),
            s["weight_decay"],
            s["epochs"],
        )


@dataclass(frozen=True)
class KnnResult(Result):
    top1: dict[int, float] = field(default_factory=dict)  # k -> percent
    top3: dict[int, float] = field(default_factory=dict)
    mean_per_class: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, data: dict) -> KnnResult:
        rows = data["results"]
        keys = ("top1", "top3", "mean_per_class")
        return cls(data, *({r["k"]: r[key] for r in rows} for key in keys))


@dataclass(frozen=True)
class ClusterResult(Result):
    nmi: float = 0.0
    ari: float = 0.0
    accuracy: float = 0.0
    clusters: int = 0

    @classmethod
    def of(cls, data: dict) -> ClusterResult:
        return cls(data, data["nmi"], data["ari"], data["accuracy"], data["clusters"])


@dataclass(frozen=True)
class ShotsResult(Result):
    weight_decay: float = 0.0
    # labelled images per class -> mean test top-1 of the probe and of k-NN over repeats
    probe_top1: dict[int, float] = field(default_factory=dict)
    knn_top1: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, data: dict) -> ShotsResult:
        rows = data["results"]
        return cls(
            data,
            data["weight_decay"],
            {r["labels_per_class"]: r["probe_top1_mean"] for r in rows},
            {r["labels_per_class"]: r["knn_top1_mean"] for r in rows},
        )


@dataclass(frozen=True)
class RetrievalResult(Result):
    map: float = 0.0  # test queries against the training gallery
    map_at_r: float = 0.0
    recall: dict[int, float] = field(default_factory=dict)
    loo_map: float = 0.0  # test leave-one-out
    loo_map_at_r: float = 0.0

    @classmethod
    def of(cls, data: dict) -> RetrievalResult:
        g, loo = data["train_gallery"], data["test_loo"]
        recall = {int(k): v for k, v in g["recall"].items()}
        return cls(data, g["map"], g["map_at_r"], recall, loo["map"], loo["map_at_r"])


# ---------------------------------------------------------------------------------------------


def _config(cls, options: dict):
    """A method's config from keyword options, naming any option it does not know; a size
    may be written as on the command line (``max_memory="2GiB"``)."""
    from featcache.io import parse_size

    if isinstance(options.get("max_memory"), str):
        options = {**options, "max_memory": parse_size(options["max_memory"])}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; {cls.__name__} takes {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def _source(store, train: Pair | None, test: Pair | None, features=None) -> Store | None:
    if store is not None and (train is not None or test is not None):
        raise TypeError("give a store, or train=(x, y) and test=(x, y), not both")
    if store is None and (train is None or test is None):
        raise TypeError("give a store, or train=(x, y) and test=(x, y)")
    if store is None:
        if features is not None:
            raise TypeError("features= names a store's feature set; in-memory features have one")
        return None
    return store if isinstance(store, Store) else Store(store)


def _arrays(pair: Pair) -> Pair:
    x, y = pair
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def _in_memory(train: Pair, test: Pair) -> tuple[Pair, Pair, int]:
    """float32 features and int64 labels of both splits, and the number of classes."""
    (xtr, ytr), (xte, yte) = _arrays(train), _arrays(test)
    return (xtr, ytr), (xte, yte), int(max(ytr.max(), yte.max())) + 1


def extract(backbone: str, dataset: str, out: str | Path, **options) -> Store:
    """Run ``backbone`` once over ``dataset`` into the store ``out`` (resuming unfinished
    work) and return it. Options: those of ``featcache extract``, as ``ExtractConfig``."""
    from featcache.extraction.extract import ExtractConfig
    from featcache.extraction.extract import extract as run

    per_class = options.pop("per_class", None)  # as --per-class: both splits
    if per_class is not None:
        options = {"train_per_class": per_class, "test_per_class": per_class, **options}
    cfg = _config(ExtractConfig, {"backbone": backbone, "dataset": dataset, "out": str(out),
                                  "progress": False, **options})  # fmt: skip
    return Store(run(cfg).path)


def probe(store=None, *, train: Pair = None, test: Pair = None, features=None, **options):
    """Linear probe (weight-decay sweep, early stopping, retrain) -> ``ProbeResult``."""
    from featcache.evaluation.probe import ProbeConfig, fit_probe, run_probe

    cfg = _config(ProbeConfig, options)
    source = _source(store, train, test, features)
    if source is not None:
        return ProbeResult.of(run_probe(source, cfg, features))
    if cfg.max_memory is not None:
        raise TypeError("max_memory bounds what is read from a store; these features are in memory")
    (xtr, ytr), (xte, yte), num_classes = _in_memory(train, test)
    return ProbeResult.of(fit_probe(xtr, ytr, xte, yte, num_classes, cfg))


def knn(store=None, *, train: Pair = None, test: Pair = None, features=None, **options):
    """Weighted k-NN classification (faiss) -> ``KnnResult``."""
    from featcache.evaluation.knn import KnnConfig, knn_evaluate, run_knn

    cfg = _config(KnnConfig, options)
    source = _source(store, train, test, features)
    if source is not None:
        return KnnResult.of(run_knn(source, cfg, features))
    if cfg.max_memory is not None:
        raise TypeError("max_memory bounds what is read from a store; these features are in memory")
    (xtr, ytr), (xte, yte), num_classes = _in_memory(train, test)
    rows = knn_evaluate(xtr, ytr, xte, yte, num_classes, cfg.ks, cfg.temperature, cfg.query_batch)
    return KnnResult.of({"results": rows})


def cluster(store=None, *, features=None, split: str = "test", x=None, y=None, **options):
    """k-means scored by NMI, ARI and cluster accuracy -> ``ClusterResult``; on a store's
    ``split``, or on ``x`` (N, D) and labels ``y``."""
    from featcache.evaluation.cluster import ClusterConfig, cluster_features, run_cluster

    cfg = _config(ClusterConfig, options)
    if (store is None) == (x is None or y is None):
        raise TypeError("give a store, or x and y")
    if store is not None:
        return ClusterResult.of(run_cluster(store, cfg, features, split))
    x, y = _arrays((x, y))
    return ClusterResult.of(cluster_features(x, y, cfg))


def shots(store=None, *, train: Pair = None, test: Pair = None, features=None, **options):
    """Label efficiency: probe and k-NN with k labelled images per class -> ``ShotsResult``.
    ``probe`` takes a dict of probe options."""
    from featcache.evaluation.probe import ProbeConfig
    from featcache.studies.shots import ShotsConfig, run_shots, shots_features

    if isinstance(options.get("probe"), dict):
        options["probe"] = _config(ProbeConfig, options["probe"])
    cfg = _config(ShotsConfig, options)
    source = _source(store, train, test, features)
    if source is not None:
        return ShotsResult.of(run_shots(source, cfg, features))
    return ShotsResult.of(shots_features(*_in_memory(train, test), cfg))


def retrieval(store=None, *, train: Pair = None, test: Pair = None, features=None, **options):
    """Retrieval by class: test vs the training gallery, and test leave-one-out (mAP, mAP@R,
    recall@k) -> ``RetrievalResult``."""
    from featcache.evaluation.retrieval import RetrievalConfig, run_retrieval
    from featcache.evaluation.retrieval import retrieval as compute

    cfg = _config(RetrievalConfig, options)
    source = _source(store, train, test, features)
    if source is not None:
        return RetrievalResult.of(run_retrieval(source, cfg, features))
    train, test, _ = _in_memory(train, test)
    return RetrievalResult.of(compute(train, test, cfg))
