"""SimCLR pretraining (Chen et al. 2020, https://arxiv.org/abs/2002.05709) as its own stage.

A CIFAR-style ResNet-18 (3x3 stem, no max-pool) with a width option, a two-layer projection
head used for the loss only, NT-Xent over the 2B views of a batch, and SimCLR's CIFAR
augmentations applied to whole uint8 batches on the torch device. Every epoch is checkpointed
atomically (one safetensors file holding model, head, optimiser state and the JSON config), so
rerunning the same command resumes. The finished encoder is a backbone: ``featcache extract
--backbone simclr-resnet18 --weights RUN_DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featcache import __version__
from featcache.backbones.loading import load_tensors, save_tensors
from featcache.backbones.simclr_encoder import (
    CIFAR_MEAN,
    CIFAR_STD,
    ResNetCifar,
    export_encoder,
)
from featcache.datasets import balanced_subset, load_dataset
from featcache.device import autocast, keep_freed_memory, resolve_device, resolve_precision
from featcache.errors import ArgumentError, FeatcacheError
from featcache.evaluation.knn import HEADLINE_K, TEMPERATURE, knn_evaluate
from featcache.io import check_output
from featcache.preprocessing import Preprocess, to_rgb
from featcache.preprocessing.augment import N_PARAMS, Augment

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


# ---------------------------------------------------------------------------------------------
# Model (the encoder is a backbone: backbones/simclr_encoder.py)


def projection_head(dim: int, out: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, out)
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: for each of the 2B views, its pair is the positive, the other 2B-2 negatives.

    z1, z2: (B, D) projections of the two views of the same B images.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    b = len(z1)
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, positives)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class SimCLRConfig:
    dataset: str
    out: str
    data_root: str | None = None
    arch: str = "resnet18"
    # Channels of the first stage (64: standard ResNet-18; 16-32 trains on a CPU).
    width: int = 64
    epochs: int = 100
    batch_size: int = 512
    # Peak learning rate for batch 256 (scaled linearly with the batch), SGD with momentum.
    lr: float = 0.06
    weight_decay: float = 5e-4
    warmup_epochs: float = 10
    temperature: float = 0.5
    # Evaluate k-NN (k=20) on the test split every N epochs (0: never).
    knn_every: int = 10
    image_size: int = 32  # CIFAR's native size: no upscaling
    # Where training runs ("auto": a GPU when there is one; bf16 where it is native).
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    # Optional class-balanced subset of the training images (None: all).
    train_per_class: int | None = None
    test_per_class: int | None = None
    # Seconds of training (None: no limit). During warm-up, whose step sizes do not depend on
    # the schedule's length, the cosine schedule is sized from the last epoch's time to end
    # within them (at most `epochs` epochs), so that a time-limited run still anneals; the run
    # also stops at the first epoch end past them, stays resumable, and exports that epoch.
    time_limit: float | None = None
    # Epochs between checkpoints (92 MB for the standard width with its momentum); the last
    # epoch is always checkpointed.
    checkpoint_every: int = 1

    def __post_init__(self):
        if self.arch != "resnet18":
            raise ArgumentError(f"unknown --arch {self.arch!r}; available: resnet18")
        if self.width < 1 or self.batch_size < 2 or self.epochs < 0:
            raise ArgumentError("--width must be >= 1, --batch-size >= 2 and --epochs >= 0")
        if self.temperature <= 0:
            raise ArgumentError(f"--temperature must be positive, got {self.temperature}")
        if self.checkpoint_every < 1:
            raise ArgumentError(
                f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"
            )

    def identity(self) -> dict:
        """Fields that must match for a rerun to resume this run (epochs may grow)."""
        d = asdict(self)
        drop = ("epochs", "device", "knn_every", "time_limit", "checkpoint_every", "out")
        for k in (*drop, "data_root"):
            d.pop(k)
        return d


def load_images(spec: str, data_root, split: str, per_class, seed: int, size: int):
    """All images of a split as uint8 (N, 3, size, size) and their labels (N,)."""
    splits = load_dataset(spec, data_root, (split,))
    if split not in splits:
        raise FeatcacheError(f"dataset {spec} has no '{split}' split (it has: {sorted(splits)})")
    s = balanced_subset(splits[split], per_class, seed)
    prep = Preprocess(size, "bilinear", CIFAR_MEAN, CIFAR_STD, crop_pct=1.0)
    arrays = []
    for i in range(len(s)):
        img = to_rgb(s.load(i))
        if img.size != (size, size):  # small squares are upscaled, the rest resized and cropped
            img = (
                img.resize((size, size), Image.Resampling.BILINEAR)
                if not prep.needs_cpu_resize(*img.size)
                else Image.fromarray(prep.prepare(img))
            )
        arrays.append(np.asarray(img, np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(s.labels)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, device, precision, batch: int = 1024):
    """Encoder features of uint8 images (no augmentation), as float32 numpy."""
    was = encoder.training
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalise(images[i : i + batch].to(device).float() / 255)
        with autocast(device, precision):
            out.append(encoder(x).float().cpu())
    encoder.train(was)
    return torch.cat(out).numpy()


class _Run:
    """One SimCLR run's state (encoder, head, optimiser, batch-order RNG, history, planned
    epochs) and its checkpoint, from which a rerun of the same command resumes."""

    def __init__(self, cfg: SimCLRConfig, out: Path, device):
        self.cfg, self.device, self.ckpt = cfg, device, out / CHECKPOINT
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.encoder = ResNetCifar(cfg.width).to(device, memory_format=torch.channels_last)
        self.head = projection_head(self.encoder.dim).to(device)
        self.params = list(self.encoder.parameters()) + list(self.head.parameters())
        self.lr = cfg.lr * cfg.batch_size / 256
        self.opt = torch.optim.SGD(
            self.params, lr=self.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
        self.history: list[dict] = []
        self.epoch = 0
        self.planned = cfg.epochs  # the schedule's epochs (fewer where time_limit sizes it)
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed while saving
            stale.unlink()
        if self.ckpt.exists():
            self._resume()
        else:
            self.save()  # the random init: a random-encoder baseline is one --epochs 0 away

    def _resume(self) -> None:
        tensors, meta = load_tensors(self.ckpt)
        if meta["identity"] != json.loads(json.dumps(self.cfg.identity())):
            raise FeatcacheError(
                f"{self.ckpt.parent} holds a run with another config; use another --out or "
                f"delete {self.ckpt}"
            )
        enc = {k[4:]: v for k, v in tensors.items() if k.startswith("enc.")}
        self.encoder.load_state_dict(enc)
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        for i, p in enumerate(self.params):
            self.opt.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].to(self.device)
        self.epoch, self.history = meta["epoch"], meta["history"]
        if meta["config"]["epochs"] == self.cfg.epochs:  # the same command: the same schedule
            self.planned = meta.get("planned_epochs", self.cfg.epochs)
        self.gen.set_state(tensors["rng"])
        log.info("resuming %s at epoch %d", self.ckpt.parent, self.epoch)

    def save(self) -> None:
        tensors = {f"enc.{k}": v for k, v in self.encoder.state_dict().items()}
        tensors |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for i, p in enumerate(self.params):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            tensors[f"opt.{i}"] = buf if buf is not None else torch.zeros_like(p)
        tensors["rng"] = self.gen.get_state()
        meta = {
            "identity": self.cfg.identity(),
            "config": asdict(self.cfg),
            "epoch": self.epoch,
            "planned_epochs": self.planned,
            "history": self.history,
            "featcache_version": __version__,
        }
        save_tensors(self.ckpt, tensors, meta)

    def step_size(self, it: int, steps: int) -> float:
        """Linear warm-up, then a cosine to zero at the end of the planned epochs."""
        total, warm = self.planned * steps, self.cfg.warmup_epochs * steps
        if it < warm:
            return self.lr * it / warm
        return self.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, total - warm)))

    def train_epoch(self, images, steps: int, augment: Augment, scaler, precision) -> dict:
        """One epoch of NT-Xent over two augmented views of every batch."""
        cfg, t0 = self.cfg, time.perf_counter()
        order = torch.randperm(len(images), generator=self.gen).to(self.device)
        losses = []
        for step in range(steps):
            lr = self.step_size(self.epoch * steps + step, steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, b = images[idx].float() / 255, len(idx)
            v1 = augment(x, torch.rand(b, N_PARAMS, generator=self.gen))
            v2 = augment(x, torch.rand(b, N_PARAMS, generator=self.gen))
            views = normalise(torch.cat([v1, v2])).contiguous(memory_format=torch.channels_last)
            with autocast(self.device, precision):
                z = self.head(self.encoder(views))
            loss = nt_xent(z[:b], z[b:], cfg.temperature)
            self.opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(self.opt)
            scaler.update()
            losses.append(loss.detach())  # no host sync per step
        self.epoch += 1
        loss = float(torch.stack(losses).mean())
        return {"epoch": self.epoch, "loss": loss, "lr": lr, "seconds": time.perf_counter() - t0}


def pretrain(cfg: SimCLRConfig) -> dict:
    """Train (or resume) a SimCLR run; returns the history."""
    out = check_output(cfg.out)
    out.mkdir(exist_ok=True)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, train=True)
    if device.type == "cpu":
        keep_freed_memory()
    run = _Run(cfg, out, device)
    images = partial(load_images, cfg.dataset, cfg.data_root, seed=cfg.seed, size=cfg.image_size)
    train_x, train_y = images("train", cfg.train_per_class)
    test = images("test", cfg.test_per_class) if cfg.knn_every else None
    # The uint8 images live on the device (150 MB for CIFAR-10's 50,000): batches are indexed
    # there, with no host copy per step.
    train_x = train_x.to(device)
    steps = len(train_x) // cfg.batch_size
    if steps == 0:
        raise FeatcacheError(f"--batch-size {cfg.batch_size} exceeds the {len(train_x)} images")
    augment, started = Augment(), time.perf_counter()
    # fp16 (GPUs without bf16) needs loss scaling; bf16 and fp32 pass through it untouched.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run.encoder.train(), run.head.train()
    first = run.epoch
    while run.epoch < min(cfg.epochs, run.planned):
        record = run.train_epoch(train_x, steps, augment, scaler, precision)
        elapsed = time.perf_counter() - started
        if cfg.time_limit is not None:
            # Size the schedule to end within the limit, checkpoints and k-NN included: freely
            # while warming up (its step sizes do not depend on the schedule's length), after
            # that only shorter, when epochs slow down (a loaded machine), so that the cosine
            # still reaches zero at the last epoch.
            per_epoch = max(elapsed / (run.epoch - first), record["seconds"])
            fit = max(run.epoch, run.epoch + int((cfg.time_limit - elapsed) // per_epoch))
            warming = run.epoch <= cfg.warmup_epochs
            run.planned = min(cfg.epochs if warming else run.planned, fit)
        last = run.epoch >= run.planned
        if test is not None and (run.epoch % cfg.knn_every == 0 or last):
            record["knn_top1"] = _monitor(run.encoder, train_x, train_y, test, device, precision)
        run.history.append(record)
        log.info("epoch %d of %d: %s", run.epoch, run.planned, record)
        out_of_time = cfg.time_limit is not None and (
            time.perf_counter() - started > cfg.time_limit  # the k-NN's time included
        )
        if last or out_of_time or run.epoch % cfg.checkpoint_every == 0:
            run.save()
        if out_of_time and not last:
            log.info("time limit reached after epoch %d", run.epoch)
            break
    export_encoder(out, run.encoder, cfg.image_size, asdict(cfg))
    (out / "history.json").write_text(json.dumps(run.history, indent=1))
    if run.history:
        plot_history(run.history, out / "curves.png")
    return {"history": run.history, "out": str(out)}


def _monitor(encoder, train_x, train_y, test, device, precision) -> float:
    """k-NN top-1 (DINO's weighted vote) of the test images by the training images."""
    ftr = embed(encoder, train_x, device, precision)
    fte = embed(encoder, test[0], device, precision)
    classes = int(train_y.max()) + 1
    ks = (HEADLINE_K,)
    r = knn_evaluate(ftr, train_y.numpy(), fte, test[1].numpy(), classes, ks, TEMPERATURE)
    return r[0]["top1"]


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([h["epoch"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="epoch", title="NT-Xent loss")
    knn = [h for h in history if "knn_top1" in h]
    ax[1].plot([h["epoch"] for h in knn], [h["knn_top1"] for h in knn], "o-")
    ax[1].set(xlabel="epoch", title="k-NN top-1 (k=20, %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
