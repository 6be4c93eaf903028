"""Stage 1: run a frozen backbone once over a dataset into an HDF5 store.

uint8 images are decoded by loader workers, moved to the device as uint8, upscaled there by
interpolation and normalised per the registry; the backbone runs in inference mode under
autocast; finished shards are committed as they complete, so a rerun resumes.
"""

from __future__ import annotations

import functools
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
    rank_device,
    release_freed_memory,
    resolve_device,
    resolve_precision,
)
from featcache.distributed import Distributed
from featcache.errors import BadImageError, DatasetError
from featcache.extraction.augment import Augment, view_uniforms
from featcache.extraction.preprocess import Preprocess
from featcache.store import DTYPES, ShardedWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str
    dataset: str
    out: str
    weights: str | None = None
    data_root: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    # Class-balanced subset sizes per split (None: every image). --per-class sets both.
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    # Loader processes decoding images while the model runs; 0 decodes in the main process;
    # None: 1 on the CPU, up to 8 with a GPU (device.default_workers).
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
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if self.views < 1:
            raise ValueError(f"--views counts the clean image too: at least 1, got {self.views}")
        Augment.from_ops(self.augment)  # validates the names
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class ExtractResult:
    path: Path
    images: int  # images run through the backbone in this call (0 if already complete)
    seconds: float
    resumed_images: int = 0  # images found in shards from an earlier run
    skipped: dict[str, list[str]] = field(default_factory=dict)
    forward_images: int = 0  # images through the backbone, augmented views included

    @property
    def images_per_second(self) -> float:
        """Backbone throughput: forward images (views included) per second."""
        return self.forward_images / self.seconds if self.seconds > 0 else 0.0


class _Images(torch.utils.data.Dataset):
    """Decodes split images to uint8 arrays; errors travel back as values, not exceptions."""

    def __init__(self, split: Split, preprocess: Preprocess):
        self.split, self.preprocess = split, preprocess

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess.prepare(self.split.load(i)), None
        except BadImageError as exc:
            return i, None, (exc.path, exc.reason)


def _collate(items):
    """Group a batch by image shape so each group stacks; errors are passed along."""
    order = [i for i, _, _ in items]
    errors = [(i, e) for i, _, e in items if e is not None]
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


def image_loader(split: Split, preprocess: Preprocess, batches, workers: int, device):
    """Batches ``(order, [(positions, uint8 (b, 3, h, w))], errors)`` of a split's images,
    decoded by ``workers`` processes, in the order of ``batches`` (lists of indices)."""
    return torch.utils.data.DataLoader(
        _Images(split, preprocess),
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
        },
    }


def prepare_splits(cfg: ExtractConfig) -> dict[str, Split]:
    available = load_dataset(cfg.dataset, cfg.data_root, cfg.splits)
    per_class = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    splits = {}
    for name in cfg.splits:
        if name not in available:
            raise DatasetError(
                f"dataset {cfg.dataset} has no '{name}' split (it has: {sorted(available)}); "
                "pass --splits with the ones it has"
            )
        splits[name] = balanced_subset(available[name], per_class.get(name), cfg.seed)
    return splits


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run the extraction described by ``cfg``; resumes from shards of an interrupted run."""
    get_spec(cfg.backbone, cfg.weights)  # unknown names fail before any data is touched
    device = rank_device(resolve_device(cfg.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that use the current device use this one
    precision = resolve_precision(cfg.precision, device)
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_workers(device))
    if device.type == "cpu":
        keep_freed_memory()
    splits = prepare_splits(cfg)
    # Loaded before any file is made (a failed load leaves nothing behind); the loaded spec
    # is the one fingerprinted, as weights may refine it (e.g. a SimCLR encoder's width).
    model, preprocess = load_backbone(cfg.backbone, cfg.weights)
    fields = fingerprint_fields(cfg, model.spec, splits, precision)
    writer = ShardedWriter(Path(cfg.out), fields, overwrite=cfg.overwrite)
    if writer.complete:
        log.info("%s is already complete with the same fingerprint; nothing to do", cfg.out)
        return ExtractResult(Path(cfg.out), images=0, seconds=0.0)
    dist = Distributed.from_env(device)
    try:
        if dist.rank == 0:
            writer.begin()
        dist.barrier()  # rank 0 has recorded the spec
        if dist.rank != 0:
            writer.begin(dist.rank)
        return _run(cfg, model, preprocess, splits, writer, device, precision, dist)
    finally:
        writer.close()


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


def _run(cfg, model, preprocess, splits, writer: ShardedWriter, device, precision, dist):
    spec = model.spec
    model = for_inference(model, device, _memory_format(cfg), cfg.compile, cfg.freeze)

    plan = {name: _shards(len(s), cfg.shard_size) for name, s in splits.items()}
    pending = {
        name: [
            (i, r) for i, r in enumerate(shards) if dist.owns(i) and not writer.has_shard(name, i)
        ]
        for name, shards in plan.items()
    }
    total = sum(len(r) for shards in plan.values() for i, r in enumerate(shards) if dist.owns(i))
    todo = sum(len(r) for shards in pending.values() for _, r in shards)
    # Every rank's images of this run (for the speed recorded in the store).
    todo_world = sum(
        len(r)
        for name, shards in plan.items()
        for i, r in enumerate(shards)
        if not writer.has_shard(name, i)
    )
    if todo < total:
        log.info("resuming: %d of %d images already extracted", total - todo, total)

    bar = tqdm(total=total, initial=total - todo, unit="img", disable=not cfg.progress)
    start = time.perf_counter()
    skipped: dict[str, list[str]] = {}
    with inference_backends(device, precision):
        for name, shards in pending.items():
            if shards:
                skipped[name] = _extract_split(
                    cfg, splits[name], shards, model, preprocess, writer, device, precision, bar
                )
    seconds = time.perf_counter() - start
    bar.close()

    meta = {
        "class_names": next(iter(splits.values())).class_names,
        "config": {**asdict(cfg), "splits": list(cfg.splits)},
        "extraction": {
            "device": str(device),
            "precision": precision,
            "torch": torch.__version__,
            # This run's dataset images (all ranks; augmented views not counted) over its wall
            # time; a resumed run counts only what it extracted itself.
            "run_images": todo_world,
            "run_seconds": seconds,
            "images_per_second": todo_world / seconds if todo_world and seconds > 0 else None,
        },
        "backbone_spec": spec.to_dict(),
    }
    dist.barrier()  # every rank's shards are committed
    path = Path(cfg.out)
    if dist.rank == 0:
        writer.assemble({n: len(p) for n, p in plan.items()}, meta)
    dist.barrier()  # the store is in place for every rank
    forwards = sum(
        len(r) * (cfg.views if name == "train" else 1)
        for name, shards in pending.items()
        for _, r in shards
    )
    return ExtractResult(
        path,
        images=todo,
        seconds=seconds,
        resumed_images=total - todo,
        skipped=skipped,
        forward_images=forwards,
    )


def _extract_split(cfg, split, shards, model, preprocess, writer, device, precision, bar):
    """Extract the pending shards of one split; returns the ids skipped as unreadable."""
    batches = [
        list(r[i : i + cfg.batch_size]) for _, r in shards for i in range(0, len(r), cfg.batch_size)
    ]
    loader = image_loader(split, preprocess, batches, cfg.workers, device)
    n_views = cfg.views if split.name == "train" else 1  # test splits stay clean
    augment = Augment.from_ops(cfg.augment) if n_views > 1 else None
    empty = {f"features/{k}": (0, w) for k, w in model.spec.features}
    if n_views > 1:
        empty |= {f"views/{k}": (0, n_views - 1, w) for k, w in model.spec.features}
    shard_iter = iter(shards)
    index, rng = next(shard_iter)
    if cfg.workers:
        release_freed_memory()  # before the loader forks its workers
    heap = HeapGuard()
    # What every batch's forward shares; a compiled model gets one batch shape.
    forward = functools.partial(
        _forward,
        model,
        preprocess,
        device=device,
        precision=precision,
        memory_format=_memory_format(cfg),
        pad_to=cfg.batch_size if cfg.compile else None,
    )
    buf: dict[str, list] = defaultdict(list)
    got, bad, seen, shard_start, all_bad = [], [], 0, time.perf_counter(), []
    for order, groups, errors in loader:  # batches never cross shards and come in order
        for i, (path, reason) in errors:
            if not cfg.skip_bad:
                raise BadImageError(path, reason)
            log.warning("skipping unreadable image %s: %s", path, reason)
            bad.append(split.ids[i])
        if groups:
            ok = np.asarray([order[p] for pos, _ in groups for p in pos])  # group order
            perm = np.argsort(ok)  # back to index order
            got.extend(ok[perm].tolist())
            images = [g for _, g in groups]
            clean = forward(images)
            for k, v in clean.items():
                buf[f"features/{k}"].append(v[perm])
            if augment is not None:
                ids = [split.ids[i] for i in ok]
                sizes = [len(pos) for pos, _ in groups]
                views = [
                    forward(images, augment, torch.split(view_uniforms(cfg.seed, ids, v), sizes))
                    for v in range(1, n_views)
                ]
                for k in clean:
                    buf[f"views/{k}"].append(np.stack([view[k] for view in views], 1)[perm])
        seen += len(order)
        bar.update(len(order))
        if seen < len(rng):
            continue
        writer.write_shard(
            split.name,
            index,
            ids=[split.ids[i] for i in got],
            labels=split.labels[got],
            arrays={
                k: np.concatenate(buf[k]) if buf[k] else np.zeros(shape, np.float32)
                for k, shape in empty.items()
            },
            skipped=sorted(bad),
            seconds=time.perf_counter() - shard_start,
        )
        all_bad += bad
        heap.check()
        buf, got, bad, seen, shard_start = defaultdict(list), [], [], 0, time.perf_counter()
        index, rng = next(shard_iter, (None, None))
    return all_bad


@torch.inference_mode()
def _forward(
    model,
    preprocess,
    images,
    augment=None,
    uniforms=None,
    *,
    device,
    precision,
    memory_format,
    pad_to,
):
    """Named features (float32 numpy) of uint8 image groups, optionally augmented first.

    ``pad_to``: repeat the last image up to this batch size (outputs cut back), so that a
    compiled model sees one shape.
    """
    parts = []
    for j, group in enumerate(images):
        x = group.to(device, non_blocking=True)  # uint8 (b, 3, h, w): resized as uint8
        if augment is not None:
            x = augment(x.float() / 255, uniforms[j]) * 255  # views stay float
        parts.append(preprocess(x).contiguous(memory_format=memory_format))
    x = torch.cat(parts) if len(parts) > 1 else parts[0]
    n = len(x)
    if pad_to is not None and n < pad_to:
        x = torch.cat([x, x[-1:].expand(pad_to - n, *x.shape[1:])])
        x = x.contiguous(memory_format=memory_format)
    with autocast(device, precision):
        out = model(x)
    return {k: v[:n].float().cpu().numpy() for k, v in out.items()}
