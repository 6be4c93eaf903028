"""One self-contained HTML page comparing stores: a table and plots, images embedded.

Results are read from JSON files beside each store (``S.probe.json``, ``S.probe-noviews.json``,
``S.knn.json``, ``S.cluster.json``, ``S.shots.json``, as written by ``--json``) when they were
computed from this store with a config that covers what the report shows; the others are
computed and saved there, so a second report is instant. Attention maps come from
``S.attention.npz`` (``featcache attention --store S``). Stage 2: the report reads stores and
the files beside them, never a dataset or a model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.errors import ArgumentError
from featcache.evaluation.knn import HEADLINE_K, KS
from featcache.io import check_output, write_atomic
from featcache.store import Store, attention_path, result_path
from featcache.studies.table import read_result, render, row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    stores: tuple[str, ...]
    out: str
    k: tuple[int, ...] = KS  # the k-NN's k
    shots: tuple[int, ...] = (1, 5, 10)
    repeats: int = 3
    tsne_points: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not self.stores:
            raise ArgumentError("give at least one store")


def read_attention(store: Store) -> tuple[np.ndarray, np.ndarray] | str:
    """(images, maps) saved beside a store, or why there are none (a sentence)."""
    path = attention_path(store.path)
    hint = f"run `featcache attention --store {store.path}` to add them"
    if not path.is_file():
        return f"no attention maps yet: {hint}"
    try:
        with np.load(path, allow_pickle=False) as saved:  # never unpickles
            if str(saved["fingerprint"]) != store.fingerprint:
                return f"{path.name} belongs to another version of the store: {hint}"
            return saved["images"], saved["maps"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__}: {exc}): {hint}"


def plot_attention(images: np.ndarray, maps: np.ndarray, path, title: str) -> None:
    """One row per image: the image, then each head's map laid over it."""
    plt = _plt()
    b, heads = maps.shape[:2]
    fig, axes = plt.subplots(b, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * b), squeeze=False)
    size = images.shape[1]
    for i in range(b):
        axes[i, 0].imshow(images[i])
        for h in range(heads):
            axes[i, h + 1].imshow(images[i])
            axes[i, h + 1].imshow(  # one cell per patch, stretched over the image
                maps[i, h],
                cmap="inferno",
                alpha=0.7,
                extent=(0, size, size, 0),
                interpolation="nearest",
            )
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# Config fields that do not change a result (where it ran, how it was batched or chunked).
_INCIDENTAL = ("device", "query_batch", "max_memory")


def _same(config: dict, wanted) -> bool:
    want = json.loads(json.dumps(asdict(wanted)))  # tuples as the JSON's lists
    return _covers(config, want)


def _covers(config: dict, want: dict) -> bool:
    """``config`` has every setting of ``want`` but the incidental ones, nested included."""
    for k, v in want.items():
        if k in _INCIDENTAL:
            continue
        got = config.get(k)
        if isinstance(v, dict) and isinstance(got, dict):
            if not _covers(got, v):
                return False
        elif got != v:
            return False
    return True


def _of(store: Store, result, feature: str, covers) -> bool:
    """Whether a kept result was computed from this store version, on ``feature``, with a
    config that ``covers`` what the report shows."""
    return (
        isinstance(result, dict)
        and result.get("fingerprint") == store.fingerprint
        and result.get("features") == feature
        and covers(result.get("config", {}))
    )


def _cached(store: Store, kind: str, fresh, compute):
    """The result (or list of results) kept beside the store where ``fresh`` says it still
    holds; else computed now and saved there (atomically)."""
    path = result_path(store.path, kind)
    if path.is_file():
        result = read_result(path)
        if result is not None and fresh(result):
            return result
        log.info("%s was computed from another store version or config; recomputing", path)
    result = compute()
    write_atomic(path, json.dumps(result, indent=1))
    return result


def gather(store: Store, cfg: ReportConfig) -> dict:
    """Every result the report shows for one store."""
    from featcache.evaluation.cluster import ClusterConfig
    from featcache.evaluation.knn import KnnConfig
    from featcache.evaluation.methods import run
    from featcache.evaluation.probe import ProbeConfig
    from featcache.evaluation.retrieval import RetrievalConfig
    from featcache.evaluation.shots import ShotsConfig

    n_train = store.sizes.get("train", 0)
    ks = tuple(k for k in cfg.k if k <= n_train) or (min(n_train, 1),)
    min_class = int(np.bincount(store.read("train", "labels")).min())
    shots = tuple(k for k in cfg.shots if k <= min_class)
    probe, knn, cluster = ProbeConfig(), KnnConfig(k=ks), ClusterConfig()
    gallery = min(n_train, store.sizes.get("test", 0) - 1)  # the smaller of the two protocols
    retrieval = RetrievalConfig(recall_at=tuple(k for k in (1, 5, 10) if k <= gallery) or (1,))

    def knn_covers(c: dict) -> bool:  # every k the report shows, the same vote otherwise
        return set(ks) <= set(c.get("k", ())) and _same({**c, "k": list(ks)}, knn)

    def cached(kind, config, covers=None, method=None):
        covers = covers or (lambda c: _same(c, config))
        feature = store.default_feature()
        return _cached(store, kind, lambda r: _of(store, r, feature, covers),
                       lambda: run(store, method or kind, config))  # fmt: skip

    out = {
        "probe": cached("probe", probe),
        "knn": cached("knn", knn, knn_covers),
        "cluster": cached("cluster", cluster),
        "retrieval": cached("retrieval", retrieval),
    }
    if shots:
        shots_cfg = ShotsConfig(shots=shots, repeats=cfg.repeats, probe=probe)

        def shots_covers(c: dict) -> bool:  # every budget shown, the same protocol otherwise
            return set(shots) <= set(c.get("shots", ())) and _same(
                {**c, "shots": list(shots)}, shots_cfg
            )

        out["shots"] = cached("shots", shots_cfg, shots_covers)
    if store.num_views > 1:
        out["probe-noviews"] = cached("probe-noviews", ProbeConfig(views=False), method="probe")
    return out


def layer_knn(store: Store) -> list[dict] | None:
    """k-NN (k = HEADLINE_K) on each inner layer's feature set of a store extracted with
    --layers (None without layers): cached beside the store as ``S.knn-layers.json``, a list
    with one result per set (``featcache knn --features all`` writes the same kind of list)."""
    from featcache.evaluation.knn import KnnConfig
    from featcache.evaluation.methods import run

    sets = [f for f in store.feature_sets if f.startswith("layer.")]
    if not sets:
        return None
    knn = KnnConfig(k=(min(HEADLINE_K, store.sizes.get("train", 1)),))

    def fresh(kept) -> bool:  # one result per set, in depth order, each still holding
        return (
            isinstance(kept, list)
            and len(kept) == len(sets)
            and all(_of(store, r, f, lambda c: _same(c, knn)) for r, f in zip(kept, sets))
        )

    return _cached(store, "knn-layers", fresh,
                   lambda: [run(store, "knn", knn, feature) for feature in sets])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_curves(names, results) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, r in zip(names, results):
        ep = [e["epoch"] for e in r["probe"]["epochs"]]
        for ax, metric in zip(axes, ("top1", "top3", "loss")):
            for part, style in (("train", "--"), ("val", "-")):
                ax.plot(
                    ep,
                    [e[part][metric] for e in r["probe"]["epochs"]],
                    style,
                    label=f"{name} {part}",
                )
    for ax, metric in zip(axes, ("top-1 (%)", "top-3 (%)", "loss")):
        ax.set(xlabel="epoch", title=f"probe {metric} per epoch (chosen weight decay)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_knn(names, results) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, r in zip(names, results):
        rows = r["knn"]["results"]
        ax.plot([x["k"] for x in rows], [x["top1"] for x in rows], "o-", label=name)
    ax.set(xscale="log", xlabel="k", ylabel="top-1 (%)", title="weighted k-NN accuracy against k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_depth(names, layers) -> str:
    """k-NN top-1 of every inner layer against its depth: a line per store and kind (CLS,
    patch mean, pooled)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, results in zip(names, layers):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in results or []:
            _, depth, kind = r["features"].split(".", 2)
            if depth.isdigit():
                lines.setdefault(kind, []).append((int(depth), r["results"][0]["top1"]))
        for kind, points in lines.items():
            ax.plot(*zip(*sorted(points)), "o-", label=f"{name} {kind}")
    ax.set(xlabel="layer (block or stage index)", ylabel="top-1 (%)",
           title="k-NN accuracy of each layer (extract --layers)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_shots(names, results) -> str | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    drawn = False
    for name, r in zip(names, results):
        if "shots" not in r:
            continue
        rows = [x for x in r["shots"]["results"] if x["kind"] == "shots"]
        x = [row["labels_per_class"] for row in rows]
        for ax, key in zip(axes, ("probe", "knn")):
            ax.errorbar(
                x,
                [row[f"{key}_top1_mean"] for row in rows],
                yerr=[row[f"{key}_top1_std"] for row in rows],
                marker="o",
                capsize=3,
                label=name,
            )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("linear probe", "k-NN")):
        ax.set(
            xscale="log",
            xlabel="labelled images per class",
            ylabel="test top-1 (%)",
            title=f"label efficiency: {title} (mean +- std over repeats)",
        )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_tsne(store: Store, name: str, points: int, seed: int) -> str:
    from sklearn.manifold import TSNE

    plt = _plt()
    test = store.load("test", store.default_feature())
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(test.labels))[:points])
    x = test.features[idx]
    perplexity = float(min(30, max(2, (len(idx) - 1) / 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        (x - x.mean(0)) / (x.std(0) + 1e-6)
    )
    fig, ax = plt.subplots(figsize=(5, 4.4))
    y = test.labels[idx]
    for c, cname in enumerate(store.class_names):
        m = y == c
        ax.scatter(emb[m, 0], emb[m, 1], s=4, label=cname)
    ax.set(title=f"t-SNE of test features: {name}", xticks=[], yticks=[])
    ax.legend(fontsize=6, markerscale=3, loc="best")
    fig.tight_layout()
    return _png(fig)


def fig_per_class(names, results, class_names) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(class_names) * max(1, len(names))), 3.8))
    width = 0.8 / len(names)
    for i, (name, r) in enumerate(zip(names, results)):
        acc = r["probe"]["per_class_top1"]
        ax.bar(np.arange(len(acc)) + i * width, acc, width, label=name)
    ax.set_xticks(
        np.arange(len(class_names)) + 0.4 - width / 2, class_names, rotation=30, fontsize=8
    )
    ax.set(ylabel="test top-1 (%)", title="per-class accuracy of the linear probe")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_attention(store: Store, images: np.ndarray, maps: np.ndarray) -> str:
    buf = io.BytesIO()
    plot_attention(
        images, maps, buf, f"{store.fields['backbone']['name']}: last-block CLS attention"
    )
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------
# Page


_SELF_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const rows = document.querySelectorAll('#summary tbody tr').length;
  document.getElementById('selfcheck').textContent =
    JSON.stringify({images: imgs.length, broken: broken, rows: rows});
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; } .note { color: #666; font-size: 13px; }
#selfcheck { display: none; }
</style>"""


def _attention_section(name: str, store: Store) -> list[str]:
    """A ViT store's attention maps (made by `featcache attention --store`), or why none."""
    if not (store.backbone_spec.get("attention") or attention_path(store.path).exists()):
        return []
    saved = read_attention(store)  # (images, maps), or why there are none
    if isinstance(saved, str):
        body = f'<p class="note">{html.escape(saved)}</p>'
    else:
        png = fig_attention(store, *saved)
        body = f'<img alt="attention {html.escape(name)}" src="data:image/png;base64,{png}">'
    return [f"<h2>Attention maps: {html.escape(name)}</h2>", body]


def build_report(cfg: ReportConfig) -> Path:
    out = check_output(cfg.out)
    stores = [Store(s) for s in cfg.stores]
    names = [s.path.stem for s in stores]
    results = [gather(s, cfg) for s in stores]
    class_names = stores[0].class_names
    ks = sorted({x["k"] for r in results for x in r["knn"]["results"]})

    sections = [
        "<h2>Summary</h2>",
        render([row(s, r) for s, r in zip(stores, results)], "html", tuple(ks)),
        '<p class="note">Accuracies in percent on the test split, the same table as '
        "<code>featcache table</code>. Probe: linear head on z-scored features, weight decay "
        "chosen on a stratified validation split; 95% bootstrap interval over test images. "
        "k-NN: weighted vote exp(sim/T). Retrieval: test images against the training "
        "gallery. k-means: as many clusters as classes, labels used only to score.</p>",
        "<h2>Per-epoch curves of the linear probe</h2>",
        f'<img alt="probe curves" src="data:image/png;base64,{fig_curves(names, results)}">',
        "<h2>k-NN accuracy against k</h2>",
        f'<img alt="knn against k" src="data:image/png;base64,{fig_knn(names, results)}">',
    ]
    layers = [layer_knn(s) for s in stores]
    if any(layers):
        sections += [
            f"<h2>Accuracy by depth (k-NN, k={HEADLINE_K})</h2>",
            f'<img alt="accuracy by depth" src="data:image/png;base64,{fig_depth(names, layers)}">',
        ]
    shots_png = fig_shots(names, results)
    if shots_png:
        sections += [
            "<h2>Label efficiency</h2>",
            f'<img alt="label efficiency" src="data:image/png;base64,{shots_png}">',
        ]
    sections.append("<h2>t-SNE of test features</h2>")
    for name, store in zip(names, stores):
        png = fig_tsne(store, name, cfg.tsne_points, cfg.seed)
        sections.append(
            f'<img alt="t-SNE {html.escape(name)}" style="max-width:32%" '
            f'src="data:image/png;base64,{png}">'
        )
    sections += [
        "<h2>Per-class accuracy</h2>",
        f'<img alt="per-class accuracy" '
        f'src="data:image/png;base64,{fig_per_class(names, results, class_names)}">',
    ]
    for name, store in zip(names, stores):
        sections += _attention_section(name, store)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>featcache report</title>"
        f"{_STYLE}</head><body><h1>featcache report</h1>"
        f'<p class="note">featcache {__version__}; stores: '
        + ", ".join(html.escape(str(s.path)) for s in stores)
        + "</p>"
        + "".join(sections)
        + '<div id="selfcheck">pending</div>'
        + _SELF_CHECK
        + "</body></html>"
    )
    write_atomic(out, page)
    return out
