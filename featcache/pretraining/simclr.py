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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featcache import __version__
from featcache.datasets import balanced_subset, load_dataset
from featcache.device import autocast, keep_freed_memory, resolve_device, resolve_precision
from featcache.errors import FeatcacheError, WeightsError
from featcache.evaluation.knn import knn_evaluate
from featcache.extraction.augment import N_PARAMS, Augment
from featcache.io import write_atomic
from featcache.preprocessing import Preprocess, to_rgb

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CHECKPOINT = "checkpoint.safetensors"
ENCODER = "encoder.safetensors"


# ---------------------------------------------------------------------------------------------
# Model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool; ``width`` channels at stage 1.

    width=64 is the standard ResNet-18 (512-d features); smaller widths train on a CPU.
    """

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))  # (B, dim)


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
    # Optional class-balanced subset of the training images (None: all).
    train_per_class: int | None = None
    test_per_class: int | None = None
    image_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
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
            raise ValueError(f"unknown --arch {self.arch!r}; available: resnet18")
        if self.width < 1 or self.batch_size < 2 or self.epochs < 0:
            raise ValueError("--width must be >= 1, --batch-size >= 2 and --epochs >= 0")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")

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


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, save(cpu, metadata={"featcache": json.dumps(meta)}))


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["featcache"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def pretrain(cfg: SimCLRConfig) -> dict:
    """Train (or resume) a SimCLR run; returns the history."""
    out = Path(cfg.out)
    if not out.parent.is_dir():
        raise FeatcacheError(f"--out {out}: directory {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, train=True)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    encoder = ResNetCifar(cfg.width).to(device, memory_format=torch.channels_last)
    head = projection_head(encoder.dim).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)

    history: list[dict] = []
    start_epoch = 0
    planned = cfg.epochs  # the schedule's epochs (fewer where time_limit sizes it)
    ckpt = out / CHECKPOINT
    for stale in out.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed while saving
        stale.unlink()
    if ckpt.exists():
        tensors, meta = _load_checkpoint(ckpt)
        if meta["identity"] != json.loads(json.dumps(cfg.identity())):
            raise FeatcacheError(
                f"{out} holds a run with another config; use another --out or delete {ckpt}"
            )
        encoder.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("enc.")})
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        for i, p in enumerate(params):
            opt.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].to(device)
        start_epoch, history = meta["epoch"], meta["history"]
        if meta["config"]["epochs"] == cfg.epochs:  # the same command resumes the same schedule
            planned = meta.get("planned_epochs", cfg.epochs)
        gen.set_state(tensors["rng"])
        log.info("resuming %s at epoch %d", out, start_epoch)

    train_x, train_y = load_images(
        cfg.dataset, cfg.data_root, "train", cfg.train_per_class, cfg.seed, cfg.image_size
    )
    test_data = None
    if cfg.knn_every:
        test_data = load_images(
            cfg.dataset, cfg.data_root, "test", cfg.test_per_class, cfg.seed, cfg.image_size
        )
    # The uint8 images live on the device (150 MB for CIFAR-10's 50,000): batches are indexed
    # there, with no host copy per step.
    train_x = train_x.to(device)
    n = len(train_x)
    steps = n // cfg.batch_size
    if steps == 0:
        raise FeatcacheError(f"--batch-size {cfg.batch_size} exceeds the {n} training images")
    total, warm = planned * steps, cfg.warmup_epochs * steps
    augment = Augment()
    # fp16 (GPUs without bf16) needs loss scaling; bf16 and fp32 pass through it untouched.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    started = time.perf_counter()

    def save(epoch: int) -> None:
        tensors = {f"enc.{k}": v for k, v in encoder.state_dict().items()}
        tensors |= {f"head.{k}": v for k, v in head.state_dict().items()}
        for i, p in enumerate(params):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            tensors[f"opt.{i}"] = buf if buf is not None else torch.zeros_like(p)
        tensors["rng"] = gen.get_state()
        meta = {
            "identity": cfg.identity(),
            "config": asdict(cfg),
            "epoch": epoch,
            "planned_epochs": planned,
            "history": history,
            "featcache_version": __version__,
        }
        _save_checkpoint(ckpt, tensors, meta)

    if start_epoch == 0 and not ckpt.exists():
        save(0)  # the random init, so that a random-encoder baseline is one --epochs 0 away
    encoder.train(), head.train()
    for epoch in range(start_epoch, cfg.epochs):
        if epoch >= planned:
            break
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        losses = []
        for step in range(steps):
            it = epoch * steps + step
            cur = lr * (
                it / warm
                if it < warm
                else 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, total - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = cur
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = train_x[idx].float() / 255
            b = len(idx)
            v1 = augment(x, torch.rand(b, N_PARAMS, generator=gen))
            v2 = augment(x, torch.rand(b, N_PARAMS, generator=gen))
            views = normalise(torch.cat([v1, v2])).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                z = head(encoder(views))
            loss = nt_xent(z[:b], z[b:], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())  # no host sync per step
        record = {
            "epoch": epoch + 1,
            "loss": float(torch.stack(losses).mean()),
            "lr": cur,
            "seconds": time.perf_counter() - t0,
        }
        if cfg.time_limit is not None and (epoch + 1) * steps <= warm:
            elapsed = time.perf_counter() - started
            per_epoch = elapsed / (epoch + 1 - start_epoch)  # checkpoints and k-NN included
            fit = int((cfg.time_limit - elapsed) // per_epoch)
            planned = max(epoch + 1, min(cfg.epochs, epoch + 1 + fit))
            total = planned * steps
        last = epoch + 1 >= planned
        if test_data is not None and ((epoch + 1) % cfg.knn_every == 0 or last):
            ftr = embed(encoder, train_x, device, precision)
            fte = embed(encoder, test_data[0], device, precision)
            r = knn_evaluate(
                ftr, train_y.numpy(), fte, test_data[1].numpy(), int(train_y.max()) + 1, (20,), 0.07
            )
            record["knn_top1"] = r[0]["top1"]
        history.append(record)
        log.info("epoch %d of %d: %s", epoch + 1, planned, record)
        out_of_time = cfg.time_limit is not None and time.perf_counter() - started > cfg.time_limit
        if last or out_of_time or (epoch + 1) % cfg.checkpoint_every == 0:
            save(epoch + 1)
        if out_of_time and not last:
            log.info("time limit reached after epoch %d", epoch + 1)
            break

    export_encoder(out, encoder, cfg)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        plot_history(history, out / "curves.png")
    return {"history": history, "out": str(out)}


def export_encoder(out: Path, encoder: nn.Module, cfg: SimCLRConfig) -> None:
    """The encoder as a backbone: safetensors weights with its spec in the metadata."""
    spec = {
        "arch": cfg.arch,
        "width": cfg.width,
        "dim": encoder.dim,
        "image_size": cfg.image_size,
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
    }
    _save_checkpoint(out / ENCODER, encoder.state_dict(), {"spec": spec, "config": asdict(cfg)})


def read_encoder(path: Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The tensors and spec of an encoder exported by ``pretrain`` (RUN_DIR or its file).

    The backbone registry builds the model from them (entry ``simclr-resnet18``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER
    if not path.is_file():
        raise FeatcacheError(f"{path} not found: pass the RUN_DIR of `featcache pretrain simclr`")
    from safetensors import SafetensorError

    try:
        tensors, meta = _load_checkpoint(path)
        return tensors, meta["spec"], path
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"--weights {path}: not a valid safetensors file from `featcache pretrain simclr` "
            f"({type(exc).__name__}: {exc})"
        ) from exc


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
