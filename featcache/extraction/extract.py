"""Stage 1: run a frozen backbone once over a dataset into an HDF5 store.

uint8 images of every split are decoded by one set of loader workers, moved to the device as
uint8, resized there as PIL resizes and normalised per the registry; the backbone runs in
inference mode under autocast at one batch shape; a shard's features stay on the device
until its last batch, then leave it in one copy and are written by a thread (shards.py), so
a rerun resumes from the shards committed. Every phase is timed (clock.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from featcache.backbones import BackboneSpec, get_spec, load_backbone, weights_identity
from featcache.datasets import Split, balanced_subset, dataset_identity, load_dataset
from featcache.device import (
    HeapGuard,
    autocast,
    default_workers,
    freezing_pays,
    inference_backends,
    keep_freed_memory,
    pads_batches,
    rank_device,
    release_freed_memory,
    resolve_device,
    resolve_precision,
    start_device,
)
from featcache.distributed import Distributed
from featcache.errors import ArgumentError, BadImageError, DatasetError
from featcache.extraction.clock import PhaseClock
from featcache.extraction.shards import Shard, ShardSink
from featcache.preprocessing import Preprocess
from featcache.preprocessing.augment import Augment, view_uniforms
from featcache.store import DTYPES, ShardedWriter, SplitLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str
    dataset: str
    out: str
    weights: str | None = None
    data_root: str | None = None
    # The store's splits; "test=validation" stores the dataset's validation split as test.
    splits: tuple[str, ...] = ("train", "test")
    # Inner layers whose features the same pass stores too: last, last4, all, indices or module
    # names (backbones.layers), as feature sets layer.<i>.cls, layer.<i>.patch_mean, ...
    layers: str | None = None
    # A Hugging Face dataset's columns (default: its Image and ClassLabel features).
    image_column: str | None = None
    label_column: str | None = None
    # Class-balanced subset sizes per split (None: every image). --per-class sets both.
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    # Loader processes decoding images while the model runs; 0 decodes in the main process;
    # None: none on the CPU, up to 8 with a GPU (device.default_workers).
    workers: int | None = None
    # Images per committed shard: the most work a crash can lose.
    shard_size: int = 1024
    # Views per training image (1: the clean image only); views 1.. are augmented with
    # `augment` (crop, flip, jitter, rotate, gray), seeded by (seed, sample id, view).
    views: int = 1
    augment: str = "crop,flip,jitter,rotate"
    skip_bad: bool = False
    overwrite: bool = False
    progress: bool = True
    channels_last: bool = True
    # TorchScript-freeze the model on the CPU where its entry says it pays (CNNs).
    freeze: bool = True
    # torch.compile the backbone instead of freezing it. Off by default: compiling takes
    # tens of seconds, so it pays on long runs only (BENCHMARKS.md, compile section).
    # Batches are padded to batch_size so that one compiled graph serves every batch.
    compile: bool = False
    # How features are stored: float32, or float16 (half the disk and memory; readers compute
    # in float32). Part of the fingerprint when not float32.
    dtype: str = "float32"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ArgumentError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ArgumentError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise ArgumentError(f"--workers must be 0 or more, got {self.workers}")
        if self.views < 1:
            raise ArgumentError(f"--views counts the clean image too: at least 1, got {self.views}")
        Augment.from_ops(self.augment)  # validates the names
        if self.dtype not in DTYPES:
            raise ArgumentError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class ExtractResult:
    path: Path
    images: int  # images run through the backbone in this call (0 if already complete)
    seconds: float  # the run clock: first batch submitted to the last shard committed
    resumed_images: int = 0  # images found in shards from an earlier run
    skipped: dict[str, list[str]] = field(default_factory=dict)
    forward_images: int = 0  # images through the backbone, augmented views included
    phases: dict[str, float] = field(default_factory=dict)  # clock.PHASES and total, seconds

    @property
    def images_per_second(self) -> float:
        """Backbone throughput: forward images (views included) per second of the run."""
        return self.forward_images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """What ``extract --json`` writes."""
        return {**asdict(self), "path": str(self.path), "images_per_second": self.images_per_second}


class _Images(torch.utils.data.Dataset):
    """Decodes images of several splits, keyed (split, index), to uint8 arrays; errors travel
    back as values, not exceptions."""

    def __init__(self, splits: dict[str, Split], preprocess: Preprocess):
        self.splits, self.preprocess = splits, preprocess

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def __getitem__(self, key: tuple[str, int]):
        split, i = key
        try:
            return key, self.preprocess.prepare(self.splits[split].load(i)), None
        except BadImageError as exc:
            return key, None, (exc.path, exc.reason)


def _collate(items):
    """Group a batch by image shape so each group stacks; errors are passed along."""
    order = [key for key, _, _ in items]
    errors = [(key, e) for key, _, e in items if e is not None]
    groups = defaultdict(list)
    for pos, (_, arr, _) in enumerate(items):
        if arr is not None:
            groups[arr.shape].append(pos)
    stacked = [
        (
            pos,
            torch.from_numpy(np.stack([items[p][1] for p in pos])).permute(0, 3, 1, 2).contiguous(),
        )
        for pos in groups.values()
    ]  # each (b, 3, h, w) uint8
    return order, stacked, errors


def image_loader(splits: dict[str, Split], preprocess: Preprocess, batches, workers: int, device):
    """Batches ``(order, [(positions, uint8 (b, 3, h, w))], errors)`` of images of several
    splits, decoded by ``workers`` processes (started once for every split), in the order of
    ``batches`` (lists of (split, index) keys)."""
    return torch.utils.data.DataLoader(
        _Images(splits, preprocess),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


# Bumped whenever this code's features for the same inputs change: part of the fingerprint, so
# that stores and shards of an older version are refused.
FEATURE_VERSION = 1


def fingerprint_fields(
    cfg: ExtractConfig, spec: BackboneSpec, splits: dict[str, Split], precision: str
) -> dict:
    """Everything that shapes the features; its hash is the store's fingerprint."""
    return {
        "feature_version": FEATURE_VERSION,
        "backbone": {
            "name": spec.name,
            "family": spec.family,
            "arch": spec.arch,
            "features": dict(spec.features),
            "default_feature": spec.default_feature,
        },
        "weights": weights_identity(spec, cfg.weights),
        "preprocess": spec.preprocess().to_dict(),  # derived from the entry
        "precision": precision,
        "views": {
            "count": cfg.views,
            "augment": Augment.from_ops(cfg.augment).to_dict() if cfg.views > 1 else None,
            "seed": cfg.seed,
        },
        "subset": {
            "train_per_class": cfg.train_per_class,
            "test_per_class": cfg.test_per_class,
            "seed": cfg.seed,
        },
        # Only where not float32, so that stores made before the option keep their fingerprint.
        **({"dtype": cfg.dtype} if cfg.dtype != "float32" else {}),
        # Last: these digests change with the subset too, which is the field to report first.
        "dataset": {
            "kind": dataset_identity(cfg.dataset),
            "splits": {name: s.identity() for name, s in splits.items()},
            # Where set (Hugging Face datasets): which image column the pixels came from.
            **({"image_column": cfg.image_column} if cfg.image_column else {}),
        },
    }


def prepare_splits(cfg: ExtractConfig) -> dict[str, Split]:
    """The store's splits (``dataset_splits``), class-balanced where asked."""
    splits = dataset_splits(
        cfg.dataset, cfg.data_root, cfg.splits, cfg.image_column, cfg.label_column
    )
    per_class = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    return {n: balanced_subset(s, per_class.get(n), cfg.seed) for n, s in splits.items()}


def dataset_splits(dataset: str, data_root, splits, image_column=None,
                   label_column=None) -> dict[str, Split]:  # fmt: skip
    """The store's splits named in ``splits`` (``--splits``), whole: each the dataset's split of
    that name, or of the name after ``=`` (``test=validation``)."""
    sources = dict(split_source(s) for s in splits)
    available = load_dataset(dataset, data_root, tuple(sources.values()), image_column,
                             label_column)  # fmt: skip
    for source in sources.values():
        if source not in available:
            raise DatasetError(
                f"dataset {dataset} has no '{source}' split (it has: {sorted(available)}); "
                "pass --splits with the ones it has (test=validation stores another as test)"
            )
    return {name: replace(available[source], name=name) for name, source in sources.items()}


def split_source(text: str) -> tuple[str, str]:
    """``"test=validation"`` -> (store's split, dataset's split); ``"test"`` -> both test."""
    name, _, source = text.partition("=")
    return name.strip(), (source or name).strip()


def extract(cfg: ExtractConfig, clock: PhaseClock | None = None) -> ExtractResult:
    """Run the extraction described by ``cfg``; resumes from shards of an interrupted run.

    ``clock`` times its phases (``featcache extract`` passes one that started with the
    process); they are recorded in the store, returned, and logged (``-v``).
    """
    clock = clock or PhaseClock()
    get_spec(cfg.backbone, cfg.weights)  # unknown names fail before any data is touched
    device = rank_device(resolve_device(cfg.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that use the current device use this one
    device_ready = start_device(device)  # CUDA's context is made while the model loads
    precision = resolve_precision(cfg.precision, device)
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_workers(device))
    if device.type == "cpu":
        keep_freed_memory()
    splits = prepare_splits(cfg)
    clock.mark("dataset")
    # Loaded before any file is made (a failed load leaves nothing behind); the loaded spec
    # is the one fingerprinted, as weights may refine it (e.g. a SimCLR encoder's width).
    model, preprocess = load_backbone(cfg.backbone, cfg.weights, cfg.layers)
    fields = fingerprint_fields(cfg, model.spec, splits, precision)
    writer = ShardedWriter(Path(cfg.out), fields, overwrite=cfg.overwrite)
    if writer.complete:
        log.info("%s is already complete with the same fingerprint; nothing to do", cfg.out)
        return ExtractResult(Path(cfg.out), images=0, seconds=0.0)
    dist = Distributed.from_env(device)
    layout = {name: _layout(cfg, model.spec, name, s) for name, s in splits.items()}
    attrs = {
        "class_names": next(iter(splits.values())).class_names,
        "backbone_spec": model.spec.to_dict(),
        # The order `info` lists feature sets in: the backbone's own, then layers by depth.
        "feature_order": [name for name, _ in model.spec.features],
    }
    try:
        if dist.rank == 0:
            writer.begin(layout, attrs)
        dist.barrier()  # rank 0 has recorded the spec and made the temporary store
        if dist.rank != 0:
            writer.begin(layout, attrs, dist.rank)
        clock.mark("model")
        device_ready.join()
        return _run(cfg, model, preprocess, splits, writer, device, precision, dist, clock)
    finally:
        writer.close()


def _layout(cfg: ExtractConfig, spec: BackboneSpec, name: str, split: Split) -> SplitLayout:
    """What the store holds for one split: features, and views of training images."""
    arrays = {f"features/{k}": (w,) for k, w in spec.features}
    if name == "train" and cfg.views > 1:
        arrays |= {f"views/{k}": (cfg.views - 1, w) for k, w in spec.features}
    id_bytes = max((len(i.encode()) for i in split.ids), default=1)
    return SplitLayout(rows=len(split), id_bytes=id_bytes, arrays=arrays)


class _Frozen(torch.nn.Module):
    """A TorchScript-frozen backbone that keeps the spec of the original."""

    def __init__(self, scripted, spec):
        super().__init__()
        self.scripted, self.spec = scripted, spec

    def forward(self, x):
        return self.scripted(x)


def frozen(model, memory_format: torch.memory_format = torch.channels_last) -> torch.nn.Module:
    """Trace and freeze for inference: BatchNorm folds into the convolutions.

    Traced in fp32 whatever the precision: autocast still applies when the frozen graph runs,
    and folding BatchNorm into fp32 weights before they are cast keeps bf16 features closer
    to fp32 (mean cosine 0.9979 for efficientnet-lite0 on CIFAR) than tracing under autocast,
    which folds into already-rounded weights (0.9940), at the same speed.
    """
    size = model.spec.input_size
    # The graph takes any batch size; a small example makes tracing 0.1 s instead of 1.2 s.
    example = torch.zeros(2, 3, size, size).contiguous(memory_format=memory_format)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python values in the graph
        traced = torch.jit.trace(model, example, strict=False, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    return _Frozen(frozen, model.spec)


def _memory_format(cfg: ExtractConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _shards(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def for_inference(
    model, device: torch.device, memory_format: torch.memory_format, compile: bool, freeze: bool
) -> torch.nn.Module:
    """The model on the device in its memory format, through torch.compile or, where its
    entry says it pays and the device supports it (device.freezing_pays), TorchScript-frozen."""
    spec = model.spec
    model = model.to(device=device, memory_format=memory_format)
    if compile:
        return torch.compile(model, dynamic=False)
    if freeze and spec.cpu_freeze and freezing_pays(device):
        return frozen(model, memory_format)
    return model


def _run(cfg, model, preprocess, splits, writer: ShardedWriter, device, precision, dist, clock):
    plan = {name: _shards(len(s), cfg.shard_size) for name, s in splits.items()}
    pending = [
        Shard(name, i, rows, tuple(writer.layout["splits"][name]["arrays"]), [])
        for name, shards in plan.items()
        for i, rows in enumerate(shards)
        if dist.owns(i) and not writer.has_shard(name, i, rows)
    ]
    total = sum(len(r) for shards in plan.values() for i, r in enumerate(shards) if dist.owns(i))
    todo = sum(len(s.rows) for s in pending)
    # Every rank's images of this run (for the speed recorded in the store).
    todo_world = sum(
        len(r)
        for name, shards in plan.items()
        for i, r in enumerate(shards)
        if not writer.has_shard(name, i, r)
    )
    if todo < total:
        log.info("resuming: %d of %d images already extracted", total - todo, total)

    step = _Step(cfg, model, preprocess, device, precision, splits, pending)
    clock.mark("device")
    bar = tqdm(total=total, initial=total - todo, unit="img", disable=not cfg.progress)
    with inference_backends(device, precision):
        skipped = _extract_shards(cfg, step, splits, pending, writer, device, bar)
    bar.close()
    seconds = clock.mark("run")

    meta = _meta(cfg, device, precision, todo_world, seconds)
    dist.barrier()  # every rank's shards are committed
    path = Path(cfg.out)
    if dist.rank == 0:
        clock.mark("assembly")  # the phases as of the store's last write
        meta["extraction"]["phases"] = clock.to_dict()
        writer.assemble(plan, meta)
    dist.barrier()  # the store is in place for every rank
    clock.mark("assembly")
    if log.isEnabledFor(logging.INFO):
        log.info("phases:\n%s", clock.table())
    forwards = sum(len(s.rows) * (cfg.views if s.split == "train" else 1) for s in pending)
    return ExtractResult(
        path,
        images=todo,
        seconds=seconds,
        resumed_images=total - todo,
        skipped=skipped,
        forward_images=forwards,
        phases=clock.to_dict(),
    )


def _meta(cfg: ExtractConfig, device, precision: str, images: int, seconds: float) -> dict:
    """The run's attributes of the store: its config, and where and how fast it ran (this
    run's dataset images, all ranks, augmented views not counted, over its run clock; a
    resumed run counts only what it extracted itself)."""
    return {
        "config": {**asdict(cfg), "splits": list(cfg.splits)},
        "extraction": {
            "device": str(device),
            "precision": precision,
            "torch": torch.__version__,
            "run_images": images,
            "run_seconds": seconds,
            "images_per_second": images / seconds if images and seconds > 0 else None,
        },
    }


class _Step:
    """One batch through the model: copy to the device, preprocessing (and augmented views),
    the forward; its features stay on the device. Made once per run: the model on the device
    (frozen or compiled), and on a GPU or when compiling, warmed up at the run's one batch
    shape, so that autotuning and compilation happen before the run's clock starts."""

    def __init__(self, cfg, model, preprocess, device, precision, splits, pending):
        self.model = for_inference(model, device, _memory_format(cfg), cfg.compile, cfg.freeze)
        self.preprocess, self.device, self.precision = preprocess, device, precision
        self.memory_format = _memory_format(cfg)
        self.views = cfg.views
        self.augment = Augment.from_ops(cfg.augment) if cfg.views > 1 else None
        self.seed = cfg.seed
        # One batch shape (the tail padded): autotuned once, one compiled graph.
        self.pad_to = cfg.batch_size if cfg.compile or pads_batches(device) else None
        if pending and (cfg.compile or device.type == "cuda"):
            first = pending[0]
            try:  # the first image's shape: CIFAR's 32x32 or the input size
                side = preprocess.prepare(splits[first.split].load(first.rows.start)).shape[:2]
            except BadImageError:
                side = (preprocess.input_size, preprocess.input_size)
            self.forward([torch.zeros((cfg.batch_size, 3, *side), dtype=torch.uint8)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    @torch.inference_mode()
    def forward(self, groups, views_of: list[str] | None = None, view: int = 0):
        """Named features (device tensors, rows in group order) of uint8 image groups; of
        their augmented view ``view`` when ``view`` > 0 (``views_of``: their sample ids)."""
        parts = []
        for j, group in enumerate(groups):
            x = group.to(self.device, non_blocking=True)  # uint8 (b, 3, h, w)
            if view:  # a view, rounded to uint8 as an image file would hold it
                ids = views_of[sum(len(g) for g in groups[:j]) :][: len(group)]
                u = view_uniforms(self.seed, ids, view)
                x = self.augment(x.float() / 255, u).mul_(255).round_().clamp_(0, 255).byte()
            parts.append(x)
        n = sum(len(x) for x in parts)
        if self.pad_to is not None and n < self.pad_to:  # repeat the last image; cut below
            last = parts[-1]
            parts[-1] = torch.cat([last, last[-1:].expand(self.pad_to - n, *last.shape[1:])])
        x = [self.preprocess(p, self.memory_format) for p in parts]
        x = torch.cat(x) if len(x) > 1 else x[0]
        with autocast(self.device, self.precision):
            out = self.model(x)
        return {k: v[:n] for k, v in out.items()}


def _extract_shards(cfg, step: _Step, splits, pending: list[Shard], writer, device, bar):
    """Extract the pending shards of every split with one loader; returns the ids skipped as
    unreadable, per split."""
    batches = [
        [(s.split, i) for i in s.rows[j : j + cfg.batch_size]]
        for s in pending
        for j in range(0, len(s.rows), cfg.batch_size)
    ]
    loader = image_loader(splits, step.preprocess, batches, cfg.workers, device)
    if cfg.workers:
        release_freed_memory()  # before the loader forks its workers
    heap = HeapGuard()
    sink = ShardSink(writer, device, max_rows=cfg.shard_size)
    skipped: dict[str, list[str]] = defaultdict(list)
    try:
        shards = iter(pending)
        shard, buffers, seen, started = None, None, 0, time.perf_counter()
        for order, groups, errors in loader:  # batches never cross shards and come in order
            if shard is None:
                shard = next(shards)
                shapes = {k: (*writer.layout["splits"][shard.split]["arrays"][k],)
                          for k in shard.arrays}  # fmt: skip
                buffers = sink.buffers(len(shard.rows), shapes)
            split = splits[shard.split]
            for (_, i), (path, reason) in errors:
                if not cfg.skip_bad:
                    raise BadImageError(path, reason)
                log.warning("skipping unreadable image %s: %s", path, reason)
                shard.skipped.append((i, split.ids[i]))
            if groups:
                _gather(step, shard, split, order, groups, buffers)
            seen += len(order)
            bar.update(len(order))
            if seen < len(shard.rows):
                continue
            shard.seconds = time.perf_counter() - started
            ids = [split.ids[i] for i in shard.rows]
            sink.submit(shard, ids, split.labels[shard.rows.start : shard.rows.stop], buffers)
            skipped[shard.split] += [i for _, i in shard.skipped]
            heap.check()
            shard, buffers, seen, started = None, None, 0, time.perf_counter()
    finally:
        sink.close()  # what is queued is written (finished work), then errors are raised
    return dict(skipped)


def _gather(step: _Step, shard: Shard, split: Split, order, groups, buffers: dict) -> None:
    """A batch's features into the shard's device buffers, at the rows of its images: a
    slice where they are consecutive (one image shape, no unreadable image), else by index."""
    rows = [order[p][1] - shard.rows.start for pos, _ in groups for p in pos]
    images = [g for _, g in groups]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        at = slice(rows[0], rows[0] + len(rows))

        def put(buffer, v):
            buffer[at].copy_(v)  # float32 from the model's dtype, in the copy
    else:
        at = torch.tensor(rows).to(step.device)

        def put(buffer, v):
            buffer.index_copy_(0, at, v.float())

    for k, v in step.forward(images).items():
        put(buffers[f"features/{k}"], v)
    if step.augment is not None and shard.split == "train":
        ids = [split.ids[order[p][1]] for pos, _ in groups for p in pos]
        for view in range(1, step.views):
            for k, v in step.forward(images, ids, view).items():
                put(buffers[f"views/{k}"][:, view - 1], v)
