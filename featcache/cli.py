"""The featcache command line. The only place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from featcache import __version__
from featcache.device import DEVICES, PRECISIONS
from featcache.distributed import writes_results
from featcache.errors import FeatcacheError


def _friendly(fn):
    """Bad input ends in one clear line on stderr and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FeatcacheError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished shards are kept; rerun the command to resume", err=True
            )
            sys.exit(130)

    return wrapper


def _ints(value: str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {value!r}", param_hint=name
        ) from None


def _default(method: str, name: str):
    """A method's default, from its config dataclass (the one place defaults are written),
    read when first needed: a run or ``--help`` of that command (see ``_Option``), so that the
    CLI starts without importing every method's libraries. Tuples as comma-separated text."""

    def read():
        import importlib

        module, cls = _CONFIGS[method]
        value = getattr(importlib.import_module(module), cls).__dataclass_fields__[name].default
        return ",".join(map(str, value)) if isinstance(value, tuple) else value

    return read


class _Option(click.Option):
    """An option whose default may be a ``_default`` (a callable); its help shows the value."""

    def get_default(self, ctx, call=True):
        return super().get_default(ctx, call=True)


_option = functools.partial(click.option, cls=_Option)

_CONFIGS = {
    "extract": ("featcache.extraction.extract", "ExtractConfig"),
    "probe": ("featcache.evaluation.probe", "ProbeConfig"),
    "knn": ("featcache.evaluation.knn", "KnnConfig"),
    "cluster": ("featcache.evaluation.cluster", "ClusterConfig"),
    "retrieval": ("featcache.evaluation.retrieval", "RetrievalConfig"),
    "shots": ("featcache.studies.shots", "ShotsConfig"),
    "report": ("featcache.studies.report", "ReportConfig"),
}


def _write_json(result: dict, path: str | None) -> None:
    from featcache.io import write_atomic

    if path is not None:
        write_atomic(path, json.dumps(result, indent=1))


@click.group()
@click.version_option(__version__, prog_name="featcache")
@_option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Extract frozen-backbone features once into HDF5; probe and k-NN them in seconds."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("featcache").setLevel(logging.INFO)


@main.command()
def datasets() -> None:
    """List the standard datasets and the imagefolder:/csv: forms."""
    from featcache.datasets import describe

    click.echo(describe())


@main.command()
def backbones() -> None:
    """List the named backbones and the timm:/hf: prefixes that reach any other model."""
    from featcache.backbones import describe

    click.echo(describe())


@main.command()
@_option(
    "--backbone",
    required=True,
    help="A named entry, timm:NAME[.TAG] or hf:REPO (see `featcache backbones`).",
)
@_option(
    "--dataset",
    required=True,
    help="A standard dataset (cifar10, cifar100, ...), imagefolder:DIR or csv:FILE; "
    "see `featcache datasets`.",
)
@_option("--out", required=True, type=click.Path(dir_okay=False), help="Store to write.")
@_option("--weights", default=None, help="Local weights: directory or .safetensors file.")
@_option(
    "--data-root",
    default=None,
    help="Where standard datasets lie in torchvision's layout, or are downloaded (data/).",
)
@_option("--splits", default=_default("extract", "splits"), show_default=True)
@_option("--per-class", type=int, default=None, help="Images per class in every split.")
@_option("--train-per-class", type=int, default=None)
@_option("--test-per-class", type=int, default=None)
@_option(
    "--seed",
    type=int,
    default=_default("extract", "seed"),
    show_default=True,
    help="Seed of the subsets.",
)
@_option(
    "--device",
    type=click.Choice(DEVICES),
    default=_default("extract", "device"),
    show_default=True,
)
@_option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=_default("extract", "precision"),
    show_default=True,
)
@_option("--batch-size", type=int, default=_default("extract", "batch_size"), show_default=True)
@_option(
    "--workers",
    type=int,
    default=None,
    help="Image decoding processes [default: none on the CPU, up to 8 with a GPU].",
)
@_option("--shard-size", type=int, default=_default("extract", "shard_size"), show_default=True)
@_option(
    "--views",
    type=int,
    default=_default("extract", "views"),
    show_default=True,
    help="Views per training image, the clean one included.",
)
@_option(
    "--augment",
    default=_default("extract", "augment"),
    show_default=True,
    help="Augmentations of views 1.. (crop, flip, jitter, rotate, gray).",
)
@_option("--skip-bad", is_flag=True, help="Record unreadable images as skipped and go on.")
@_option("--overwrite", is_flag=True, help="Replace a store made with another spec.")
@_option("--no-progress", is_flag=True, help="No progress bar.")
@_option("--no-freeze", is_flag=True, help="Run the eager model (no TorchScript freezing).")
@_option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the backbone: pays on long runs (compiling takes tens of seconds).",
)
@_option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default=_default("extract", "dtype"),
    show_default=True,
    help="How features are stored: float16 halves disk and memory (readers use float32).",
)
@_option("--json", "json_out", default=None, help="Write the result, phases timed, as JSON.")
@_friendly
def extract(**kw) -> None:
    """Run a frozen backbone once over a dataset into an HDF5 feature store."""
    from featcache.extraction.clock import PhaseClock
    from featcache.extraction.extract import ExtractConfig
    from featcache.extraction.extract import extract as run

    clock = PhaseClock.since_process_start()

    per_class = kw.pop("per_class")
    cfg = ExtractConfig(
        backbone=kw["backbone"],
        dataset=kw["dataset"],
        out=kw["out"],
        weights=kw["weights"],
        data_root=kw["data_root"],
        splits=tuple(s.strip() for s in kw["splits"].split(",") if s.strip()),
        train_per_class=kw["train_per_class"] if kw["train_per_class"] is not None else per_class,
        test_per_class=kw["test_per_class"] if kw["test_per_class"] is not None else per_class,
        seed=kw["seed"],
        device=kw["device"],
        precision=kw["precision"],
        batch_size=kw["batch_size"],
        workers=kw["workers"],
        shard_size=kw["shard_size"],
        views=kw["views"],
        augment=kw["augment"],
        skip_bad=kw["skip_bad"],
        overwrite=kw["overwrite"],
        progress=not kw["no_progress"],
        freeze=not kw["no_freeze"],
        compile=kw["compile_model"],
        dtype=kw["dtype"],
    )
    result = run(cfg, clock)
    if writes_results():
        _write_json(result.to_dict(), kw["json_out"])
    if result.images == 0 and result.resumed_images == 0:
        click.echo(f"{result.path} is already complete (same fingerprint); nothing to do")
        return
    for split, ids in result.skipped.items():
        if ids:
            click.echo(f"skipped {len(ids)} unreadable images in {split} (recorded in the store)")
    resumed = f", {result.resumed_images} resumed from shards" if result.resumed_images else ""
    views = (
        f" ({result.forward_images} forward passes with views)"
        if result.forward_images != result.images
        else ""
    )
    click.echo(
        f"extracted {result.images} images{views} in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s){resumed} -> {result.path}"
    )


@main.command()
@_option("--store", required=True, type=click.Path(dir_okay=False))
@_option("--features", default=None, help="Feature set (default: the backbone's first).")
@_option("--weight-decays", default=None, help="Comma-separated sweep grid.")
@_option("--val-fraction", type=float, default=_default("probe", "val_fraction"), show_default=True)
@_option(
    "--epochs",
    type=int,
    default=_default("probe", "max_epochs"),
    show_default=True,
    help="Most epochs per head.",
)
@_option("--patience", type=int, default=_default("probe", "patience"), show_default=True)
@_option("--batch-size", type=int, default=_default("probe", "batch_size"), show_default=True)
@_option("--lr", type=float, default=_default("probe", "lr"), show_default=True)
@_option("--seed", type=int, default=_default("probe", "seed"), show_default=True)
@_option(
    "--device", type=click.Choice(DEVICES), default=_default("probe", "device"), show_default=True
)
@_option(
    "--views/--no-views",
    default=_default("probe", "use_views"),
    show_default=True,
    help="Also train on the store's augmented views (extract --views K).",
)
@_option(
    "--shots", default=None, help="Label efficiency: labelled images per class, e.g. 1,5,10,100."
)
@_option(
    "--label-fraction",
    default=None,
    help="Label efficiency: fractions of the labels, e.g. 0.01,0.1,1.0.",
)
@_option(
    "--repeats",
    type=int,
    default=_default("shots", "repeats"),
    show_default=True,
    help="Label efficiency: random labelled subsets per budget.",
)
@_option(
    "--max-memory",
    default=None,
    help="Hold at most about SIZE of features at once (e.g. 2GiB): the store is read in chunks.",
)
@_option("--json", "json_out", default=None, help="Write the full result as JSON.")
@_option("--plot", default=None, help="Write per-epoch curves as PNG.")
@_friendly
def probe(**kw) -> None:
    """Train linear heads on a store's features (weight-decay sweep, early stopping)."""
    import featcache.api as api
    from featcache.evaluation.probe import plot_probe

    options = dict(
        val_fraction=kw["val_fraction"],
        max_epochs=kw["epochs"],
        patience=kw["patience"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        seed=kw["seed"],
        device=kw["device"],
        use_views=kw["views"],
        max_memory=kw["max_memory"],
    )
    if kw["weight_decays"]:
        try:
            options["weight_decays"] = tuple(float(v) for v in kw["weight_decays"].split(","))
        except ValueError:
            raise click.BadParameter(kw["weight_decays"], param_hint="--weight-decays") from None
    if kw["shots"] or kw["label_fraction"]:
        if kw["max_memory"]:
            raise click.UsageError("--max-memory bounds the probe only, not --shots studies")
        return _label_efficiency({**options, "max_memory": None}, kw)
    result = api.probe(kw["store"], features=kw["features"], **options).to_dict()
    if not writes_results():
        return
    _write_json(result, kw["json_out"])
    if kw["plot"]:
        plot_probe(result, kw["plot"])
    t, sel = result["test"], result["selected"]
    lo, hi = t["top1_ci95"]
    click.echo(
        f"probe {result['backbone']}/{result['features']}: test top-1 {t['top1']:.2f}% "
        f"(95% CI {lo:.2f}-{hi:.2f})  top-3 {t['top3']:.2f}%  mean per-class "
        f"{t['mean_per_class']:.2f}%  loss {t['loss']:.4f}  (weight decay "
        f"{sel['weight_decay']:g}, {sel['epochs']} epochs, {result['views']} views/image, "
        f"{result['seconds']:.1f} s)"
    )


def _label_efficiency(probe_options: dict, kw) -> None:
    import featcache.api as api

    try:
        fractions = tuple(float(v) for v in (kw["label_fraction"] or "").split(",") if v)
    except ValueError:
        raise click.BadParameter(kw["label_fraction"], param_hint="--label-fraction") from None
    result = api.shots(
        kw["store"],
        features=kw["features"],
        shots=_ints(kw["shots"], "--shots") or (),
        fractions=fractions,
        repeats=kw["repeats"],
        seed=kw["seed"],
        probe=probe_options,
    ).to_dict()
    _write_json(result, kw["json_out"])
    click.echo(
        f"label efficiency {result['backbone']}/{result['features']} "
        f"(weight decay {result['weight_decay']:g}, {kw['repeats']} repeats):"
    )
    for r in result["results"]:
        click.echo(
            f"  {r['kind']} {r['value']:<6g} ({r['labels_per_class']}/class)  "
            f"probe {r['probe_top1_mean']:.2f} +- {r['probe_top1_std']:.2f}%  "
            f"k-NN {r['knn_top1_mean']:.2f} +- {r['knn_top1_std']:.2f}%"
        )


@main.command()
@_option("--store", required=True, type=click.Path(dir_okay=False))
@_option("--features", default=None, help="Feature set (default: the backbone's first).")
@_option("--split", default="test", show_default=True)
@_option("--clusters", type=int, default=None, help="Default: the number of classes.")
@_option("--restarts", type=int, default=_default("cluster", "restarts"), show_default=True)
@_option("--seed", type=int, default=_default("cluster", "seed"), show_default=True)
@_option("--json", "json_out", default=None, help="Write the result as JSON.")
@_friendly
def cluster(**kw) -> None:
    """Label-free check: k-means on the features, scored by NMI, ARI and cluster accuracy."""
    import featcache.api as api

    json_out, features, split = kw.pop("json_out"), kw.pop("features"), kw.pop("split")
    result = api.cluster(kw.pop("store"), features=features, split=split, **kw).to_dict()
    _write_json(result, json_out)
    click.echo(
        f"k-means {result['backbone']}/{result['features']} ({result['clusters']} clusters, "
        f"{result['split']}): NMI {result['nmi']:.2f}  ARI {result['ari']:.2f}  "
        f"accuracy {result['accuracy']:.2f}%"
    )


@main.command()
@_option("--store", required=True, type=click.Path(dir_okay=False))
@_option("--features", default=None, help="Feature set (default: the backbone's first).")
@_option("--k", "ks", default=_default("knn", "ks"), show_default=True)
@_option("--temperature", type=float, default=_default("knn", "temperature"), show_default=True)
@_option(
    "--max-memory",
    default=None,
    help="Hold at most SIZE of features at once (e.g. 2GiB): the store is read in chunks, "
    "with exactly the in-memory result.",
)
@_option("--json", "json_out", default=None, help="Write the result as JSON.")
@_friendly
def knn(**kw) -> None:
    """Weighted k-NN classification of the test split by the train split (faiss)."""
    import featcache.api as api

    result = api.knn(
        kw["store"],
        features=kw["features"],
        ks=_ints(kw["ks"], "--k"),
        temperature=kw["temperature"],
        max_memory=kw["max_memory"],
    ).to_dict()
    if not writes_results():
        return
    _write_json(result, kw["json_out"])
    click.echo(f"k-NN {result['backbone']}/{result['features']} (T={kw['temperature']}):")
    for r in result["results"]:
        lo, hi = r["top1_ci95"]
        click.echo(
            f"  k={r['k']:<4d} top-1 {r['top1']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  "
            f"top-3 {r['top3']:.2f}%  mean per-class {r['mean_per_class']:.2f}%"
        )


@main.command()
@_option("--store", required=True, type=click.Path(dir_okay=False))
@_option("--features", default=None, help="Feature set (default: the backbone's first).")
@_option("--recall-at", default=_default("retrieval", "recall_at"), show_default=True)
@_option("--json", "json_out", default=None, help="Write the result as JSON.")
@_friendly
def retrieval(**kw) -> None:
    """Retrieval by class: test images query the training gallery, and each other."""
    import featcache.api as api

    result = api.retrieval(
        kw["store"], features=kw["features"], recall_at=_ints(kw["recall_at"], "--recall-at")
    ).to_dict()
    _write_json(result, kw["json_out"])
    click.echo(f"retrieval {result['backbone']}/{result['features']} (relevant: same class):")
    for name, title in (("train_gallery", "test vs train"), ("test_loo", "test leave-one-out")):
        r = result[name]
        recall = "  ".join(f"R@{k} {v:.2f}%" for k, v in r["recall"].items())
        click.echo(f"  {title:18s} mAP {r['map']:.2f}%  mAP@R {r['map_at_r']:.2f}%  {recall}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md",
              show_default=True)  # fmt: skip
@_option("--out", default=None, help="Write the table to a file (default: print it).")
@_friendly
def table(paths, fmt, out) -> None:
    """One table across stores (their results beside them) or result JSON files."""
    from featcache.io import write_atomic
    from featcache.studies.table import collect, render

    text = render(collect(list(paths)), fmt)
    if out:
        write_atomic(out, text)
        click.echo(f"table of {len(paths)} inputs -> {out}")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@_option("--json", "as_json", is_flag=True, help="Print the raw metadata as JSON.")
@_friendly
def info(store: str, as_json: bool) -> None:
    """Print a store's metadata."""
    from featcache.store import Store

    s = Store(store)
    if as_json:
        click.echo(json.dumps(s.info(), indent=1))
    else:
        click.echo(s.describe())


@main.group()
def pretrain() -> None:
    """Self-supervised pretraining stages whose encoders become backbones."""


@pretrain.command()
@_option(
    "--dataset",
    required=True,
    help="A standard dataset (cifar10, cifar100, ...), imagefolder:DIR or csv:FILE; "
    "see `featcache datasets`.",
)
@_option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@_option(
    "--data-root",
    default=None,
    help="Where standard datasets lie in torchvision's layout, or are downloaded (data/).",
)
@_option("--arch", type=click.Choice(["resnet18"]), default="resnet18", show_default=True)
@_option("--width", type=int, default=64, show_default=True, help="Stage-1 channels.")
@_option("--epochs", type=int, default=100, show_default=True)
@_option("--batch-size", type=int, default=512, show_default=True)
@_option("--lr", type=float, default=0.06, show_default=True, help="Per 256 images.")
@_option("--weight-decay", type=float, default=5e-4, show_default=True)
@_option("--warmup-epochs", type=float, default=10, show_default=True)
@_option("--temperature", type=float, default=0.5, show_default=True)
@_option("--knn-every", type=int, default=10, show_default=True)
@_option("--train-per-class", type=int, default=None)
@_option("--test-per-class", type=int, default=None)
@_option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@_option("--seed", type=int, default=0, show_default=True)
@_option(
    "--time-limit",
    type=float,
    default=None,
    help="Seconds of training: the schedule is sized during warm-up to end within them.",
)
@_option("--checkpoint-every", type=int, default=1, show_default=True, help="Epochs.")
@_friendly
def simclr(**kw) -> None:
    """SimCLR on a dataset's training images; RUN_DIR then serves as --weights."""
    from featcache.pretraining.simclr import SimCLRConfig
    from featcache.pretraining.simclr import pretrain as run

    result = run(SimCLRConfig(**kw))
    last = result["history"][-1] if result["history"] else {}
    knn_msg = f", k-NN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else ""
    click.echo(
        f"SimCLR: {len(result['history'])} epochs, last loss {last.get('loss', float('nan')):.4f}"
        f"{knn_msg} -> {result['out']} (extract with --backbone simclr-resnet18 "
        f"--weights {result['out']})"
    )


@main.command()
@_option(
    "--store",
    default=None,
    type=click.Path(dir_okay=False),
    help="Map the store's first test images with its own backbone into S.attention.npz "
    "beside it (the report shows them).",
)
@_option("--backbone", default=None, help="With --images: a ViT entry, e.g. dino-vits16.")
@_option("--weights", default=None, help="With --images: local weights (dir or file).")
@_option("--images", multiple=True, help="Image files or folders to map into --out.")
@_option("--max-images", type=int, default=4, show_default=True)
@_option("--out", default=None, help="PNG to write.")
@_friendly
def attention(store, backbone, weights, images, max_images, out) -> None:
    """The last block's CLS-to-patch attention of every head (DINO's visualisation)."""
    from featcache.extraction.attention import attention_maps, load_images, save_store_attention
    from featcache.studies.report import plot_attention

    if (store is None) == (not images):
        raise click.UsageError("give either --store S or --images (with --backbone and --out)")
    if store is not None:
        if backbone or weights:
            raise click.UsageError("--store maps with the store's own backbone and weights")
        path, shown, maps = save_store_attention(store, max_images)
        label = Path(store).stem
        click.echo(f"attention maps of {len(shown)} test images x {maps.shape[1]} heads -> {path}")
    else:
        if backbone is None or out is None:
            raise click.UsageError("--images needs --backbone and --out")
        shown, maps = attention_maps(backbone, weights, load_images(list(images), max_images))
        label = backbone
    if out is not None:
        plot_attention(shown, maps, out, f"{label}: last-block CLS attention per head")
        click.echo(f"attention maps of {len(shown)} images x {maps.shape[1]} heads -> {out}")


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_option("--out", required=True, help="HTML file to write.")
@_option(
    "--shots",
    default=_default("report", "shots"),
    show_default=True,
    help="Label-efficiency budgets.",
)
@_option("--repeats", type=int, default=_default("report", "repeats"), show_default=True)
@_friendly
def report(stores, out, shots, repeats) -> None:
    """One self-contained HTML page comparing stores (computes missing results)."""
    from featcache.studies.report import ReportConfig, build_report

    cfg = ReportConfig(
        stores=tuple(stores), out=out, shots=_ints(shots, "--shots") or (), repeats=repeats
    )
    path = build_report(cfg)
    click.echo(f"report of {len(stores)} stores -> {path}")
