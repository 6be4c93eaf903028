"""The featcache command line. The only place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from featcache import __version__
from featcache.device import DEVICES, PRECISIONS
from featcache.distributed import writes_results
from featcache.errors import FeatcacheError


def _friendly(fn):
    """Bad input (a FeatcacheError) ends in one clear line on stderr and exit code 1; any other
    exception is a bug and keeps its traceback. ``--debug`` (or FEATCACHE_DEBUG=1) shows the
    traceback of bad input too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as exc:
            if os.environ.get("FEATCACHE_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished shards are kept; rerun the command to resume", err=True
            )
            sys.exit(130)

    return wrapper


# Where each command's config dataclass lives: its fields are the command's options (by the
# same names) and their defaults the options' defaults.
CONFIGS = {
    "extract": ("featcache.extraction.extract", "ExtractConfig"),
    "probe": ("featcache.evaluation.probe", "ProbeConfig"),
    "knn": ("featcache.evaluation.knn", "KnnConfig"),
    "cluster": ("featcache.evaluation.cluster", "ClusterConfig"),
    "retrieval": ("featcache.evaluation.retrieval", "RetrievalConfig"),
    "shots": ("featcache.evaluation.shots", "ShotsConfig"),
    "report": ("featcache.studies.report", "ReportConfig"),
    "simclr": ("featcache.pretraining.simclr", "SimCLRConfig"),
    "attention": ("featcache.extraction.attention", "AttentionConfig"),
    "export": ("featcache.store.export", "ExportConfig"),
    "similarity": ("featcache.evaluation.similarity", "SimilarityConfig"),
    "zeroshot": ("featcache.evaluation.zeroshot", "ZeroshotConfig"),
}


def config_class(command: str) -> type:
    import importlib

    module, cls = CONFIGS[command]
    return getattr(importlib.import_module(module), cls)


def _default(command: str, name: str):
    """A config field's default (the one place defaults are written), read when first needed:
    a run or ``--help`` of that command (see ``_Option``), so that the CLI starts without
    importing every method's libraries. Tuples as comma-separated text."""

    def read():
        value = config_class(command).__dataclass_fields__[name].default
        return ",".join(map(str, value)) if isinstance(value, tuple) else value

    return read


class _Option(click.Option):
    """An option whose default may be a ``_default`` (a callable); its help shows the value."""

    def get_default(self, ctx, call=True):
        return super().get_default(ctx, call=True)


_option = functools.partial(click.option, cls=_Option)


def field_option(command: str, name: str, *aliases: str, **kw):
    """The option of config field ``name`` (``--max-epochs`` for ``max_epochs``), its default
    the field's, with the spellings users already type as ``aliases``."""
    flag = "--" + name.replace("_", "-")
    decls = (f"{flag}/--no-{flag[2:]}", *aliases) if kw.pop("flag", False) else (flag, *aliases)
    return _option(*decls, name, default=_default(command, name), show_default=True, **kw)


def options_of(command: str, kw: dict) -> dict:
    """The values of a command's config fields among its options, typed as the fields are:
    comma-separated text becomes a tuple of ints or floats."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(config_class(command)):
        if f.name not in kw:
            continue
        value = kw[f.name]
        if isinstance(value, str) and str(f.type).startswith("tuple["):
            item = {"float": float, "int": int}.get(str(f.type)[6:].split(",")[0], str)
            try:
                value = tuple(item(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise click.BadParameter(
                    f"expected comma-separated numbers, got {value!r}",
                    param_hint="--" + f.name.replace("_", "-"),
                ) from None
        out[f.name] = value
    return out


def _write_json(result: dict | list, path: str | None) -> None:
    from featcache.io import write_atomic

    if path is not None:
        write_atomic(path, json.dumps(result, indent=1))


@click.group()
@click.version_option(__version__, prog_name="featcache")
@_option("-v", "--verbose", is_flag=True, help="Log progress details (extract: its phases).")
@_option("--debug", is_flag=True, help="Show the traceback of every error.")
def main(verbose: bool, debug: bool) -> None:
    """Extract frozen-backbone features once into HDF5; probe and k-NN them in seconds."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("featcache").setLevel(logging.INFO)
    if debug:
        os.environ["FEATCACHE_DEBUG"] = "1"


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


def _data_options(command: str, out_type, out_help: str):
    """--dataset, --out and --data-root, which extraction and pretraining share."""

    def apply(fn):
        fn = field_option(command, "data_root",
                          help="Where standard datasets lie in torchvision's layout, or are "
                          "downloaded.")(fn)  # fmt: skip
        fn = _option("--out", "out", required=True, type=out_type, help=out_help)(fn)
        return _option("--dataset", "dataset", required=True,
                       help="A standard dataset (cifar10, cifar100, ...), imagefolder:DIR, "
                       "csv:FILE or wds:DIR (webdataset shards); see `featcache "
                       "datasets`.")(fn)  # fmt: skip

    return apply


def _run_options(command: str):
    """The subsets, seed, device and precision, which extraction and pretraining share."""

    def apply(fn):
        for name, kw in reversed([
            ("train_per_class", dict(type=int)), ("test_per_class", dict(type=int)),
            ("seed", dict(type=int)), ("device", dict(type=click.Choice(DEVICES))),
            ("precision", dict(type=click.Choice(PRECISIONS))),
        ]):  # fmt: skip
            fn = field_option(command, name, **kw)(fn)
        return fn

    return apply


@main.command()
@_option(
    "--backbone",
    "backbone",
    required=True,
    help="A named entry, timm:NAME[.TAG] or hf:REPO (see `featcache backbones`).",
)
@_data_options("extract", click.Path(dir_okay=False), "Store to write.")
@field_option("extract", "weights", help="Local weights: directory or .safetensors file.")
@field_option(
    "extract",
    "splits",
    help="The store's splits by the dataset's names; test=validation stores another as test.",
)
@field_option(
    "extract",
    "layers",
    help="Inner layers stored too, from the same pass: last, last4, all, indices (3,7,-1) "
    "or module names (blocks.3).",
)
@field_option("extract", "image_column", help="hfds: the image column [its Image feature].")
@field_option("extract", "label_column", help="hfds: the label column [its ClassLabel].")
@_option("--per-class", type=int, default=None, help="Images per class in every split.")
@_option(
    "--split-patterns",
    default=None,
    help="With --dataset wds: the shards of each split, 'train=PATTERN;test=PATTERN' "
    "(brace patterns, e.g. shards/train-{000..099}.tar).",
)
@_run_options("extract")
@field_option("extract", "batch_size", type=int)
@field_option(
    "extract",
    "workers",
    type=int,
    help="Image decoding processes [none on the CPU, up to 8 with a GPU].",
)
@field_option("extract", "shard_size", type=int)
@field_option(
    "extract", "views", type=int, help="Views per training image, the clean one included."
)
@field_option(
    "extract", "augment", help="Augmentations of views 1.. (crop, flip, jitter, rotate, gray)."
)
@field_option(
    "extract", "skip_bad", flag=True, help="Record unreadable images as skipped and go on."
)
@field_option("extract", "overwrite", flag=True, help="Replace a store made with another spec.")
@field_option("extract", "progress", flag=True, help="A progress bar.")
@field_option("extract", "channels_last", flag=True, help="Images in channels_last layout.")
@field_option("extract", "freeze", flag=True, help="TorchScript-freeze CNNs on the CPU.")
@field_option(
    "extract",
    "compile",
    flag=True,
    help="torch.compile the backbone: pays on long runs (compiling takes tens of seconds).",
)
@field_option(
    "extract",
    "dtype",
    type=click.Choice(["float32", "float16"]),
    help="How features are stored: float16 halves disk and memory (readers use float32).",
)
@_option("--json", "json_out", default=None, help="Write the result, phases timed, as JSON.")
@_friendly
def extract(**kw) -> None:
    """Run a frozen backbone once over a dataset into an HDF5 feature store."""
    import featcache.api as api
    from featcache.extraction.clock import PhaseClock

    clock = PhaseClock.since_process_start()
    per_class, json_out = kw.pop("per_class"), kw.pop("json_out")
    patterns = kw.pop("split_patterns")
    if patterns is not None:
        if kw["dataset"] not in ("wds", "wds:"):
            raise click.BadParameter(
                "goes with --dataset wds (the shards are the patterns')",
                param_hint="--split-patterns",
            )
        kw["dataset"] = f"wds:{patterns}"
    for split in ("train", "test"):
        if kw[f"{split}_per_class"] is None:
            kw[f"{split}_per_class"] = per_class
    options = options_of("extract", kw)
    args = [options.pop(k) for k in ("backbone", "dataset", "out")]
    result = api.extract(*args, clock=clock, **options).to_dict()
    if writes_results():
        _write_json(result, json_out)
    if result["images"] == 0 and result["resumed_images"] == 0:
        click.echo(f"{result['path']} is already complete (same fingerprint); nothing to do")
        return
    for split, ids in result["skipped"].items():
        if ids:
            click.echo(f"skipped {len(ids)} unreadable images in {split} (recorded in the store)")
    resumed = result["resumed_images"]
    resumed = f", {resumed} resumed from shards" if resumed else ""
    forwards = result["forward_images"]
    views = f" ({forwards} forward passes with views)" if forwards != result["images"] else ""
    click.echo(
        f"extracted {result['images']} images{views} in {result['seconds']:.1f} s "
        f"({result['images_per_second']:.1f} images/s){resumed} -> {result['path']}"
    )


def _store_options(fn):
    """--store and --features (what a method reads) and --json (where its result goes)."""
    fn = _option("--json", "json_out", default=None, help="Write the full result as JSON.")(fn)
    features = "Feature set (default: the backbone's first); all: each set (every layer)."
    fn = _option("--features", default=None, help=features)(fn)
    return _option("--store", required=True, type=click.Path(dir_okay=False))(fn)


def _evaluate(method: str, kw: dict, show, **extra) -> None:
    """``method`` through the API on ``--store``; where this process writes results (rank 0
    under torchrun), its JSON written (``--json``) and ``show(result, kw)`` printing it."""
    import featcache.api as api

    options = {**options_of(method, kw), **extra}
    result = api.evaluate(method, kw["store"], features=kw["features"], **options)
    if not writes_results():
        return
    many = isinstance(result, list)  # --features all: one result per feature set
    results = [r.to_dict() for r in (result if many else [result])]
    _write_json(results if many else results[0], kw["json_out"])
    for r in results:
        show(r, kw)


@main.command()
@_store_options
@field_option(
    "probe",
    "protocol",
    type=click.Choice(["sgd", "logreg"]),
    help="sgd: SGD heads, a weight-decay sweep; logreg: DINOv2's L-BFGS logistic regression "
    "over a grid of C.",
)
@field_option("probe", "weight_decays", help="The sweep's grid.")
@field_option("probe", "val_fraction", type=float)
@field_option("probe", "max_epochs", "--epochs", type=int, help="Most epochs per head.")
@field_option("probe", "patience", type=int)
@field_option("probe", "batch_size", type=int)
@field_option("probe", "lr", type=float)
@field_option("probe", "momentum", type=float)
@field_option("probe", "seed", type=int)
@field_option("probe", "device", type=click.Choice(DEVICES))
@field_option(
    "probe",
    "views",
    flag=True,
    help="Also train on the store's augmented views (extract --views K).",
)
@field_option("probe", "cv_below", type=int, help="Below this many training rows, choose "
              "by k-fold cross-validation (0: one validation split).")  # fmt: skip
@field_option("probe", "cv_folds", type=int, help="Folds of that cross-validation.")
@field_option("probe", "cs", help="logreg: the grid of C [DINOv2's 45, 1e-6 .. 1e5].")
@field_option("probe", "lbfgs_iterations", type=int, help="logreg: L-BFGS iterations per fit.")
@field_option("probe", "max_memory", help="Hold at most about SIZE of features at once "
              "(e.g. 2GiB): the store is read in chunks.")  # fmt: skip
@_option("--shots", default=None, help="Label efficiency: labelled images per class, e.g. 1,5,10.")
@_option(
    "--label-fractions",
    "--label-fraction",
    "label_fractions",
    default=None,
    help="Label efficiency: fractions of the labels, e.g. 0.01,0.1,1.0.",
)
@field_option("shots", "repeats", type=int, help="Label efficiency: labelled subsets per budget.")
@_option("--plot", default=None, help="Write per-epoch curves as PNG.")
@_friendly
def probe(**kw) -> None:
    """Train linear heads on a store's features (weight-decay sweep, early stopping); with
    --shots or --label-fractions, the label-efficiency study (the shots method)."""
    if kw["shots"] or kw["label_fractions"]:
        if kw["max_memory"]:
            raise click.UsageError("--max-memory bounds the probe only, not --shots studies")
        return _label_efficiency(kw)
    _evaluate("probe", kw, _show_probe)


def _show_probe(result: dict, kw: dict) -> None:
    if kw["plot"]:
        from featcache.evaluation.probe import plot_probe

        plot_probe(result, kw["plot"])
    t, sel = result["test"], result["selected"]
    lo, hi = t["top1_ci95"]
    if result.get("protocol") == "logreg":
        chosen = f"logreg: C {sel['C']:g}, {sel['epochs']} L-BFGS iterations"
    else:
        chosen = f"weight decay {sel['weight_decay']:g}, {sel['epochs']} epochs"
    click.echo(
        f"probe {result['backbone']}/{result['features']}: test top-1 {t['top1']:.2f}% "
        f"(95% CI {lo:.2f}-{hi:.2f})  top-3 {t['top3']:.2f}%  mean per-class "
        f"{t['mean_per_class']:.2f}%  loss {t['loss']:.4f}  ({chosen}, "
        f"{result['views']} views/image, {result['seconds']:.1f} s)"
    )


def _label_efficiency(kw: dict) -> None:
    probe = {k: v for k, v in options_of("probe", kw).items() if k != "max_memory"}
    shots = {k: kw[k] or "" for k in ("shots", "label_fractions")}
    _evaluate("shots", {**kw, **shots}, _show_shots, probe=probe, seed=kw["seed"])


def _show_shots(result: dict, kw: dict) -> None:
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
@_store_options
@field_option("cluster", "split")
@field_option("cluster", "clusters", type=int, help="Default: the number of classes.")
@field_option("cluster", "iterations", type=int)
@field_option("cluster", "restarts", type=int)
@field_option("cluster", "seed", type=int)
@_friendly
def cluster(**kw) -> None:
    """Label-free check: k-means on the features, scored by NMI, ARI and cluster accuracy."""
    _evaluate("cluster", kw, lambda r, kw: click.echo(
        f"k-means {r['backbone']}/{r['features']} ({r['clusters']} clusters, {r['split']}): "
        f"NMI {r['nmi']:.2f}  ARI {r['ari']:.2f}  accuracy {r['accuracy']:.2f}%"
    ))  # fmt: skip


@main.command()
@_store_options
@field_option("knn", "k", "--ks")
@field_option("knn", "temperature", type=float)
@field_option("knn", "query_batch", type=int)
@field_option("knn", "max_memory", help="Hold at most SIZE of features at once (e.g. 2GiB): "
              "the store is read in chunks, with exactly the in-memory result.")  # fmt: skip
@_friendly
def knn(**kw) -> None:
    """Weighted k-NN classification of the test split by the train split (faiss)."""
    _evaluate("knn", kw, _show_knn)


def _show_knn(result: dict, kw: dict) -> None:
    click.echo(f"k-NN {result['backbone']}/{result['features']} (T={kw['temperature']}):")
    for r in result["results"]:
        lo, hi = r["top1_ci95"]
        click.echo(
            f"  k={r['k']:<4d} top-1 {r['top1']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  "
            f"top-3 {r['top3']:.2f}%  mean per-class {r['mean_per_class']:.2f}%"
        )


@main.command()
@_store_options
@field_option("retrieval", "recall_at")
@field_option("retrieval", "query_batch", type=int)
@_friendly
def retrieval(**kw) -> None:
    """Retrieval by class: test images query the training gallery, and each other."""
    _evaluate("retrieval", kw, _show_retrieval)


def _show_retrieval(result: dict, kw: dict) -> None:
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


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@_option(
    "--out", required=True, type=click.Path(), help="Folder to write (made whole, then renamed)."
)
@field_option("export", "format", type=click.Choice(["npy", "parquet"]),
              help="npy: a .npy per split and feature set; parquet: clip-retrieval's img_emb/ "
              "and metadata/.")  # fmt: skip
@field_option("export", "features",
              help="Comma-separated feature sets, or all [npy: all; parquet: the "
              "default].")  # fmt: skip
@field_option("export", "dtype", type=click.Choice(["float32"]),
              help="Widen float16 features [as stored].")  # fmt: skip
@field_option("export", "shard_size", type=int, help="Rows per file (parquet layout).")
@field_option("export", "overwrite", flag=True, help="Replace a non-empty --out folder.")
@_friendly
def export(store: str, out: str, **kw) -> None:
    """Write a store's features as numpy files, or in clip-retrieval's layout (parquet)."""
    import featcache.api as api

    path = api.export(store, out, **options_of("export", kw))
    click.echo(f"exported {store} ({kw['format']}) -> {path}")


@main.command()
@_option("--store", required=True, type=click.Path(dir_okay=False))
@field_option("zeroshot", "templates", help="openai (CLIP's 18 for CIFAR) or a file, one "
              "template a line with {c} for the class name.")  # fmt: skip
@field_option("zeroshot", "classnames", help="A file of class names, one a line [the store's].")
@field_option("zeroshot", "weights", help="The store's weights, where they are local.")
@field_option("zeroshot", "split")
@_option("--json", "json_out", default=None, help="Write the full result as JSON.")
@_friendly
def zeroshot(store: str, json_out, **kw) -> None:
    """Zero-shot classification of a CLIP or SigLIP store's embed features (its own text
    tower; SigLIP's sigmoid scores)."""
    import featcache.api as api

    r = api.zeroshot(store, **options_of("zeroshot", kw)).to_dict()
    if not writes_results():
        return
    _write_json(r, json_out)
    t = r["test"]
    lo, hi = t["top1_ci95"]
    click.echo(
        f"zero-shot {r['backbone']} ({r['templates']} templates, {r['split']}): top-1 "
        f"{t['top1']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  top-5 {t['top5']:.2f}%  mean per-class "
        f"{t['mean_per_class']:.2f}%"
    )


@main.command()
@click.argument("sets", nargs=-1, required=True)
@field_option("similarity", "split")
@field_option(
    "similarity", "rsa_images", type=int, help="Images of the sample RBF CKA and RSA use."
)
@field_option("similarity", "min_images", type=int, help="Fewest images the sets must share.")
@field_option("similarity", "seed", type=int)
@_option("--json", "json_out", default=None, help="Write the matrices as JSON.")
@_option("--plot", default=None, help="Draw the matrices as heatmaps (PNG).")
@_friendly
def similarity(sets, json_out, plot, **kw) -> None:
    """CKA and RSA between feature sets: STORE (its default set), STORE:FEATURE,... or
    STORE:all (every set, e.g. every layer), matched by image id."""
    import featcache.api as api

    result = api.similarity(*sets, **options_of("similarity", kw)).to_dict()
    _write_json(result, json_out)
    if plot:
        from featcache.evaluation.similarity import plot_similarity

        plot_similarity(result, plot)
    names = result["sets"]
    click.echo(f"{result['images']} {result['split']} images in common "
               f"(RBF CKA and RSA on {result['sample_images']})")  # fmt: skip
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            values = "  ".join(f"{m} {result[m][i][j]:.4f}" for m in
                               ("linear_cka", "linear_cka_unbiased", "rbf_cka", "rsa"))  # fmt: skip
            click.echo(f"{names[i]} ~ {names[j]}: {values}")


@main.group()
def pretrain() -> None:
    """Self-supervised pretraining stages whose encoders become backbones."""


@pretrain.command()
@_data_options("simclr", click.Path(file_okay=False), "Run directory.")
@field_option("simclr", "arch", type=click.Choice(["resnet18"]))
@field_option("simclr", "width", type=int, help="Stage-1 channels.")
@field_option("simclr", "image_size", type=int)
@field_option("simclr", "epochs", type=int)
@field_option("simclr", "batch_size", type=int)
@field_option("simclr", "lr", type=float, help="Per 256 images.")
@field_option("simclr", "weight_decay", type=float)
@field_option("simclr", "warmup_epochs", type=float)
@field_option("simclr", "temperature", type=float)
@field_option("simclr", "knn_every", type=int)
@_run_options("simclr")
@field_option(
    "simclr",
    "time_limit",
    type=float,
    help="Seconds of training: the schedule is sized during warm-up to end within them.",
)
@field_option("simclr", "checkpoint_every", type=int, help="Epochs.")
@_friendly
def simclr(**kw) -> None:
    """SimCLR on a dataset's training images; RUN_DIR then serves as --weights."""
    from featcache.pretraining.simclr import SimCLRConfig
    from featcache.pretraining.simclr import pretrain as run

    result = run(SimCLRConfig(**options_of("simclr", kw)))
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
@field_option("attention", "max_images", type=int)
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
@_option("--out", "out", required=True, help="HTML file to write.")
@field_option("report", "k", "--ks", help="The k-NN's k.")
@field_option("report", "shots", help="Label-efficiency budgets.")
@field_option("report", "repeats", type=int)
@field_option("report", "tsne_points", type=int)
@field_option("report", "seed", type=int)
@_friendly
def report(**kw) -> None:
    """One self-contained HTML page comparing stores (computes missing results)."""
    from featcache.studies.report import ReportConfig, build_report

    path = build_report(ReportConfig(**options_of("report", kw)))
    click.echo(f"report of {len(kw['stores'])} stores -> {path}")
