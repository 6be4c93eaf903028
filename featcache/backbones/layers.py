"""Features of inner layers in the same forward pass (``extract --layers SPEC``).

A family says which modules are its model's layers, in depth order (``Blocks``): timm's
``feature_info`` modules (a ViT's blocks, a CNN's stages), transformers' encoder layers or
stages, SimCLR's stages; and how one pass yields their outputs: timm's
``forward_intermediates``, transformers' ``output_hidden_states``, else forward hooks (which
also serve any other named module). Each chosen layer gives feature sets named by its index:
``layer.<i>.cls`` and ``layer.<i>.patch_mean`` for token outputs (the first token and the mean
of the patch tokens; a model without a CLS token, SigLIP's, only the mean of every token),
``layer.<i>.pooled`` (the spatial mean) for feature maps; a module named
outside the layers is ``layer.<name>.<kind>``. Outputs are the modules' own, before any final
norm (so ``layer.<last>.cls`` is not ``cls``, which is normed), as a forward hook sees them.

``SPEC``: ``last``, ``last4``, ``all``, block indices (``3,7,-1``) or module names
(``blocks.3,blocks.7``), comma-separated.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from featcache.errors import ArgumentError


@dataclass(frozen=True)
class Blocks:
    """A model's layers, deepest last, and how one forward pass returns their outputs."""

    names: tuple[str, ...]  # module names (model.get_submodule) in depth order
    prefix: int  # tokens before the patch tokens in token outputs (CLS, registers)
    # fn(model, x, indices) -> (the family's features, {index: output}); None: forward hooks.
    run: Callable | None = None


def parse(text: str, blocks: Blocks, model: nn.Module) -> list[int | str]:
    """Layer indices (into ``blocks.names``) and other module names, in depth order."""
    n = len(blocks.names)
    chosen: list[int | str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in ("last", "last4", "all"):
            chosen += list(range({"last": n - 1, "last4": max(n - 4, 0), "all": 0}[part], n))
        elif part.lstrip("-").isdigit():
            i = int(part)
            if not -n <= i < n:
                raise ArgumentError(f"--layers {part}: the model has {n} layers (0..{n - 1})")
            chosen.append(i % n)
        elif part in blocks.names:
            chosen.append(blocks.names.index(part))
        else:
            names = [name for name, _ in model.named_modules() if name]
            if part not in names:
                close = difflib.get_close_matches(part, list(blocks.names) + names, n=4)
                raise ArgumentError(
                    f"--layers {part}: no such module"
                    + (f"; the closest: {', '.join(close)}" if close else "")
                    + f". Its layers: {blocks.names[0]} .. {blocks.names[-1]} (or 0..{n - 1}); "
                    "last, last4 or all"
                )
            chosen.append(part)
    if not chosen:
        raise ArgumentError("--layers is empty: give last, last4, all, indices or module names")
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    depth = {c: order[blocks.names[c] if isinstance(c, int) else c] for c in chosen}
    return sorted(dict.fromkeys(chosen), key=lambda c: depth[c])


def layer_features(key: int | str, out, prefix: int) -> dict[str, torch.Tensor]:
    """The feature sets of one layer's output (a tensor, or a tuple whose first is one)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    name = f"layer.{key}"
    if out.ndim == 4:  # (B, C, H, W)
        return {f"{name}.pooled": out.mean(dim=(2, 3))}
    if out.ndim == 3:  # (B, tokens, D)
        patches = out[:, prefix:] if out.shape[1] > prefix else out
        first = {f"{name}.cls": out[:, 0]} if prefix else {}  # no CLS token (SigLIP): none
        return {**first, f"{name}.patch_mean": patches.mean(dim=1)}
    if out.ndim == 2:
        return {f"{name}.out": out}
    raise ArgumentError(f"--layers: {key} gives a {out.ndim}-d output; featcache reads 2-4-d ones")


class Layered:
    """A family's extract that also returns the chosen layers' features, from one pass."""

    def __init__(self, extract: Callable, blocks: Blocks, chosen: list[int | str]):
        self.extract, self.blocks, self.chosen = extract, blocks, chosen
        # Layers the family's run returns; forward hooks for the others (all without a run).
        ran = blocks.run is not None
        self.indices = [c for c in chosen if isinstance(c, int) and ran]
        self.hooks = {
            blocks.names[c] if isinstance(c, int) else c: c for c in chosen if c not in self.indices
        }

    def __call__(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seen: dict[int | str, torch.Tensor] = {}
        handles = [
            model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, key=key: seen.__setitem__(key, out)
            )
            for name, key in self.hooks.items()
        ]
        try:
            if self.indices:
                features, outputs = self.blocks.run(model, x, self.indices)
            else:
                features, outputs = self.extract(model, x), {}
        finally:
            for h in handles:
                h.remove()
        outputs = {**outputs, **seen}
        for key in self.chosen:
            features |= layer_features(key, outputs[key], self.blocks.prefix)
        return features


def widths(backbone) -> tuple[tuple[str, int], ...]:
    """The feature sets a backbone yields beyond its entry's, with their widths: one image
    through the model, on the CPU, measures them."""
    side = backbone.spec.input_size
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, side, side))
    known = dict(backbone.spec.features)
    return tuple((k, int(v.shape[-1])) for k, v in out.items() if k not in known)
