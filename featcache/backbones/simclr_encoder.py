"""Encoders trained by ``featcache pretrain simclr``, as backbones (``--weights RUN_DIR``): the
architecture (a CIFAR ResNet) and the encoder file, which pretraining writes and the
registry reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featcache.backbones.layers import Blocks
from featcache.backbones.loading import load_strict, load_tensors, save_tensors
from featcache.backbones.registry import BackboneSpec, family
from featcache.errors import FeatcacheError, WeightsError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
ENCODER = "encoder.safetensors"  # in RUN_DIR


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


def export_encoder(out: Path, encoder: ResNetCifar, image_size: int, config: dict) -> None:
    """The encoder as a backbone: safetensors weights with its spec (and the run's config)
    in the metadata."""
    spec = {
        "arch": "resnet18",
        "width": encoder.stem[0].out_channels,
        "dim": encoder.dim,
        "image_size": image_size,
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
    }
    save_tensors(Path(out) / ENCODER, encoder.state_dict(), {"spec": spec, "config": config})


def read_encoder(path: Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The tensors and spec of an encoder exported by ``pretrain`` (RUN_DIR or its file)."""
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER
    if not path.is_file():
        raise FeatcacheError(f"{path} not found: pass the RUN_DIR of `featcache pretrain simclr`")
    from safetensors import SafetensorError

    try:
        tensors, meta = load_tensors(path)
        return tensors, meta["spec"], path
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"--weights {path}: not a valid safetensors file from `featcache pretrain simclr` "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _pooled(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pooled": model(x)}  # globally pooled last stage (B, 8 x width)


def _random_encoder(spec: BackboneSpec, root: Path) -> Path:
    path = root / spec.name
    path.mkdir(exist_ok=True)
    export_encoder(path, ResNetCifar(64), spec.input_size, {"random": True})  # standard width
    return path


def _stages(model: nn.Module) -> Blocks:
    """Its four stages, read by forward hooks."""
    return Blocks(tuple(f"layers.{i}" for i in range(len(model.layers))), 0)


@family("simclr-cifar", random_weights=_random_encoder, blocks=_stages)
def _build_simclr(spec: BackboneSpec, weights: Path):
    """An encoder trained by `featcache pretrain simclr`; its width decides the feature width."""
    tensors, meta, path = read_encoder(weights)
    model = ResNetCifar(meta["width"])
    load_strict(model, tensors, path)
    refined = dataclasses.replace(
        spec,
        features=(("pooled", meta["dim"]),),
        arch={**spec.arch, "width": meta["width"]},
        input_size=meta["image_size"],
    )
    return model, _pooled, refined
