"""The Python API: every stage as a function, every result as a typed record.

``featcache.extract(...)`` writes a store (its result's ``store``); ``probe``, ``knn``,
``cluster``, ``shots`` and ``retrieval`` (the table of ``featcache.evaluation.methods``) take a
store (a path or a ``Store``) or in-memory features (``train=(x, y), test=(x, y)``), with the
CLI's options as keyword arguments, by the same names and with the same defaults (each
method's config dataclass is the one place they are written). A result has its headline
numbers as attributes and ``to_dict()``, the JSON that the CLI writes.
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
    top1: float = 0.0  # test accuracies in percent
    top3: float = 0.0
    loss: float = 0.0  # test cross-entropy
    mean_per_class: float = 0.0
    top1_ci95: tuple[float, float] = (0.0, 0.0)  # percentile bootstrap over test images
    weight_decay: float = 0.0  # the sweep's choice
    epochs: int = 0  # of the retrained head

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
    k: int = 0  # the k of the headline numbers: 20 where it was run, else the smallest
    top1: float = 0.0
    top3: float = 0.0
    mean_per_class: float = 0.0
    top1_ci95: tuple[float, float] = (0.0, 0.0)
    top1_at: dict[int, float] = field(default_factory=dict)  # every k -> top-1 (percent)

    @classmethod
    def of(cls, data: dict) -> KnnResult:
        from featcache.evaluation.knn import HEADLINE_K

        rows = {r["k"]: r for r in data["results"]}
        k = HEADLINE_K if HEADLINE_K in rows else min(rows)
        r = rows[k]
        return cls(data, k, r["top1"], r["top3"], r["mean_per_class"], tuple(r["top1_ci95"]),
                   {k: r["top1"] for k, r in rows.items()})  # fmt: skip


@dataclass(frozen=True)
class ClusterResult(Result):
    nmi: float = 0.0  # percent, as ari and accuracy (Hungarian matching)
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


@dataclass(frozen=True)
class ExtractResult(Result):
    """An extraction: the store it made and what it took (``extract --json``)."""

    path: str = ""
    images: int = 0
    images_per_second: float = 0.0
    skipped: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    @classmethod
    def of(cls, data: dict) -> ExtractResult:
        return cls(data, data["path"], data["images"], data["images_per_second"],
                   data["skipped"], data["phases"])  # fmt: skip

    @property
    def store(self) -> Store:
        return Store(self.path)


@dataclass(frozen=True)
class ZeroshotResult(Result):
    top1: float = 0.0  # percent, as top5 and mean_per_class (mean per-class recall)
    top5: float = 0.0
    mean_per_class: float = 0.0
    top1_ci95: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def of(cls, data: dict) -> ZeroshotResult:
        t = data["test"]
        return cls(data, t["top1"], t["top5"], t["mean_per_class"], tuple(t["top1_ci95"]))


@dataclass(frozen=True)
class SimilarityResult(Result):
    sets: tuple[str, ...] = ()  # "store:feature" of each set, the matrices' order
    images: int = 0  # images the sets share (linear CKA reads them all)

    def matrix(self, measure: str = "linear_cka") -> np.ndarray:
        """linear_cka, linear_cka_unbiased, rbf_cka or rsa, as a (sets, sets) array."""
        return np.asarray(self.data[measure])

    @classmethod
    def of(cls, data: dict) -> SimilarityResult:
        return cls(data, tuple(data["sets"]), data["images"])


RESULTS = {
    "zeroshot": ZeroshotResult,
    "probe": ProbeResult,
    "knn": KnnResult,
    "cluster": ClusterResult,
    "shots": ShotsResult,
    "retrieval": RetrievalResult,
}


# ---------------------------------------------------------------------------------------------


def config(cls, options: dict):
    """A config from keyword options (the CLI's option names), naming any option it does
    not know; a size may be written as on the command line (``max_memory="2GiB"``), a
    tuple as a list, and a nested config (shots' ``probe``) as a dict."""
    from featcache.io import parse_size

    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; {cls.__name__} takes {sorted(known)}")
    values = {}
    for name, value in options.items():
        if name == "max_memory" and isinstance(value, str):
            value = parse_size(value)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict) and name == "probe":
            from featcache.evaluation.probe import ProbeConfig

            value = config(ProbeConfig, value)
        values[name] = value
    return cls(**values)


def evaluate(method: str, store=None, train: Pair = None, test: Pair = None, features=None,
             **options):  # fmt: skip
    """Any method of the table (``featcache.evaluation.methods``) on a store, or on in-memory
    ``train=(x, y), test=(x, y)`` pairs: its typed result; with ``features="all"``, a list of
    them, one per feature set of the store (every layer of an ``extract --layers`` store)."""
    from featcache.evaluation.methods import METHODS, run, run_in_memory

    if method not in METHODS:
        raise TypeError(f"unknown method {method!r}; the methods: {sorted(METHODS)}")
    m = METHODS[method]
    cfg = config(m.config, options)
    if store is not None and (train is not None or test is not None):
        raise TypeError("give a store, or train=(x, y) and test=(x, y), not both")
    if store is not None:
        if features == "all":  # every feature set (every layer), in the store's order
            from featcache.store import open_store

            store = open_store(store)
            return [RESULTS[method].of(run(store, method, cfg, f)) for f in store.feature_sets]
        return RESULTS[method].of(run(store, method, cfg, features))
    if test is None or (train is None and m.pair):
        raise TypeError(
            "give a store, or train=(x, y) and test=(x, y)" + ("" if m.pair else " (or test only)")
        )
    if features is not None:
        raise TypeError("features= names a store's feature set; in-memory features have one")
    return RESULTS[method].of(run_in_memory(method, cfg, train, test))


def extract(backbone: str, dataset: str, out: str | Path, clock=None, **options) -> ExtractResult:
    """Run ``backbone`` once over ``dataset`` into the store ``out`` (resuming unfinished
    work): the extraction's result, whose ``store`` is the store. Options: those of
    ``featcache extract``, as ``ExtractConfig``; ``per_class`` sets both splits' subsets."""
    from featcache.extraction.extract import ExtractConfig
    from featcache.extraction.extract import extract as run

    per_class = options.pop("per_class", None)
    if per_class is not None:
        options = {"train_per_class": per_class, "test_per_class": per_class, **options}
    cfg = config(ExtractConfig, {"backbone": backbone, "dataset": dataset, "out": str(out),
                                 "progress": False, **options})  # fmt: skip
    return ExtractResult.of(run(cfg, clock).to_dict())


def export(store: str | Path | Store, out: str | Path, **options) -> Path:
    """Write a store's features to the folder ``out`` (``format="npy"`` or ``"parquet"``,
    clip-retrieval's layout) -> ``out``. Options: ``featcache export``'s, as ``ExportConfig``."""
    from featcache.store.export import ExportConfig
    from featcache.store.export import export as run

    return run(store, out, config(ExportConfig, options))


def zeroshot(store: str | Path | Store, **options) -> ZeroshotResult:
    """CLIP's zero-shot classification (Radford et al. 2021, as CLIP_benchmark runs it) of a
    CLIP or SigLIP store's ``embed`` features: class names through prompt templates
    (``templates="openai"``, CLIP's 18 for CIFAR, or a file) into the text tower of the
    store's own weights (``weights=`` where they are local), the classifier written beside the
    store; SigLIP's classes scored by its sigmoid (Zhai et al. 2023) with its logit bias;
    top-1, top-5, mean per-class recall. Options: ``featcache zeroshot``'s, as
    ``ZeroshotConfig``."""
    from featcache.evaluation.methods import METHODS, run
    from featcache.extraction.zeroshot import write_head
    from featcache.store import open_store

    cfg = config(METHODS["zeroshot"].config, options)
    store = open_store(store)
    write_head(store, cfg.templates, cfg.classnames, cfg.weights)
    return ZeroshotResult.of(run(store, "zeroshot", cfg, "embed"))


def similarity(*sets: str | Path, **options) -> SimilarityResult:
    """Linear CKA (Kornblith et al. 2019, biased and unbiased HSIC), RBF CKA (median
    bandwidth) and RSA (Spearman between correlation-distance RDMs) between every pair of
    feature sets: ``"a.h5"`` (its default set), ``"a.h5:cls,patch_mean"``, ``"a.h5:all"``.
    Images are matched by id. Options: ``featcache similarity``'s, as ``SimilarityConfig``."""
    from featcache.evaluation.methods import METHODS, compare

    cfg = config(METHODS["similarity"].config, options)
    return SimilarityResult.of(compare([str(s) for s in sets], "similarity", cfg))


def probe(store=None, *, train=None, test=None, features=None, **options) -> ProbeResult:
    """Linear probe -> ``ProbeResult``: DINO-style SGD heads (a weight-decay sweep with early
    stopping, then a retrain; Caron et al. 2021), or with ``protocol="logreg"`` DINOv2's
    logistic regression by L-BFGS over 45 values of C (Oquab et al. 2023); chosen by 5-fold
    cross-validation below ``cv_below`` training rows. Options: ``featcache probe``'s, as
    ``ProbeConfig``."""
    return evaluate("probe", store, train, test, features, **options)


def knn(store=None, *, train=None, test=None, features=None, **options) -> KnnResult:
    """Weighted k-NN classification as DINO's eval_knn.py (faiss, T = 0.07) -> ``KnnResult``.
    Options: ``featcache knn``'s, as ``KnnConfig``."""
    return evaluate("knn", store, train, test, features, **options)


def cluster(store=None, *, train=None, test=None, features=None, **options) -> ClusterResult:
    """k-means with as many clusters as classes, scored by NMI, ARI and cluster accuracy, on
    the ``split`` option's split (default test) -> ``ClusterResult``."""
    return evaluate("cluster", store, train, test, features, **options)


def shots(store=None, *, train=None, test=None, features=None, **options) -> ShotsResult:
    """Label efficiency: probe and k-NN with k labelled images per class -> ``ShotsResult``.
    ``probe`` takes a dict of probe options."""
    return evaluate("shots", store, train, test, features, **options)


def retrieval(store=None, *, train=None, test=None, features=None, **options) -> RetrievalResult:
    """Retrieval by class (Musgrave et al. 2020's mAP@R, mAP, recall@k): test vs the training
    gallery, and test leave-one-out -> ``RetrievalResult``."""
    return evaluate("retrieval", store, train, test, features, **options)
