"""Encoders trained by ``featcache pretrain simclr``, as backbones (``--weights RUN_DIR``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from featcache.backbones.loading import load_strict
from featcache.backbones.registry import BackboneSpec, family


def _pooled(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pooled": model(x)}  # globally pooled last stage (B, 8 x width)


def _random_encoder(spec: BackboneSpec, root: Path) -> Path:
    from featcache.pretraining.simclr import ResNetCifar, SimCLRConfig, export_encoder

    path = root / spec.name
    path.mkdir(exist_ok=True)
    cfg = SimCLRConfig(dataset="-", out=str(path))  # the standard width, 64
    export_encoder(path, ResNetCifar(cfg.width), cfg)
    return path


@family("simclr-cifar", random_weights=_random_encoder)
def _build_simclr(spec: BackboneSpec, weights: Path):
    """An encoder trained by `featcache pretrain simclr`; its width decides the feature width."""
    from featcache.pretraining.simclr import ResNetCifar, read_encoder

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
