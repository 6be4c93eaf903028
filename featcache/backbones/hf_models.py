"""Backbones through transformers: the DINO/ViT entries, DINOv2 and CLIP entries, and ``hf:REPO``.

Every load goes through ``from_pretrained`` (which maps a checkpoint's tensor names onto this
transformers version's and strips a classifier checkpoint's prefix) and its loading report is
checked: a missing, unexpected or reshaped tensor is refused by name, where transformers would
fill it at random and only log it. Only heads that no feature uses may be left unread.

``hf:REPO`` reaches ViT, DINOv2 (with or without registers), CLIP's image tower, ConvNeXt and
ResNet repos. Its entry comes from the repo's config.json and preprocessor_config.json (on the
hub, or in a ``--weights`` directory written by ``save_pretrained`` of the model and of its
image processor). Features: ``cls`` and ``patch_mean`` for transformers (and DINOv2's linear
protocol ``cls_patch``, the two concatenated), ``pooled`` for CNNs, and for CLIP the projected
image embedding ``embed``. Never a randomly initialised pooler or head.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from featcache.backbones.layers import Blocks
from featcache.backbones.loading import check_loading_info, load_safetensors, no_hub_error
from featcache.backbones.registry import (
    BackboneSpec,
    check_preprocessing,
    family,
    kind,
    token_features,
    unknown_model,
)
from featcache.errors import UnsupportedModelError, WeightsError

# PIL resampling codes of image processor configs.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class _Type:
    """What featcache needs to know of a transformers model type."""

    model_class: str  # the transformers class that loads it (no task head)
    features: str  # "tokens", "clip", "siglip" or "pooled": which extractor
    heads: tuple[str, ...]  # checkpoint tensors that no feature uses (task heads, text tower)
    processor: str  # the image processor class, for random weights saved as a repo
    kwargs: tuple[tuple[str, object], ...] = ()


_CLIP_TEXT = ("text_model.", "text_projection.", "logit_scale")
_SIGLIP_TEXT = ("text_model.", "logit_scale", "logit_bias")
_TYPES = {
    "vit": _Type("ViTModel", "tokens", ("classifier.", "pooler."), "ViTImageProcessor",
                 (("add_pooling_layer", False),)),
    "dinov2": _Type("Dinov2Model", "tokens", ("classifier.",), "BitImageProcessor"),
    "dinov2_with_registers": _Type(
        "Dinov2WithRegistersModel", "tokens", ("classifier.",), "BitImageProcessor"
    ),
    "clip": _Type("CLIPVisionModelWithProjection", "clip", _CLIP_TEXT, "CLIPImageProcessor"),
    # A vision-only save, or a whole CLIP repo loaded by the named entry: the text tower unread.
    "clip_vision_model": _Type(
        "CLIPVisionModelWithProjection", "clip", _CLIP_TEXT, "CLIPImageProcessor"
    ),
    "siglip": _Type("SiglipVisionModel", "siglip", _SIGLIP_TEXT, "SiglipImageProcessor"),
    "siglip_vision_model": _Type(
        "SiglipVisionModel", "siglip", _SIGLIP_TEXT, "SiglipImageProcessor"
    ),
    "convnext": _Type("ConvNextModel", "pooled", ("classifier.",), "ConvNextImageProcessor"),
    "resnet": _Type("ResNetModel", "pooled", ("classifier.",), "ConvNextImageProcessor"),
}  # fmt: skip


def _type(model_type: str, source: str) -> _Type:
    if model_type not in _TYPES:
        raise UnsupportedModelError(
            f"{source} is a {model_type!r} model; hf: reaches {', '.join(sorted(_TYPES))} "
            "(or try its timm: name)"
        )
    return _TYPES[model_type]


# ---------------------------------------------------------------------------------------------
# Features


def _prefix_tokens(config) -> int:
    if config.model_type.startswith("siglip"):
        return 0  # no CLS: SigLIP pools its tokens with an attention head
    return 1 + getattr(config, "num_register_tokens", 0)  # CLS, then DINOv2's registers


def _token_features(model: nn.Module, out) -> dict[str, torch.Tensor]:
    tokens = out.last_hidden_state  # (B, prefix + N, D), after the final norm
    feats = token_features(tokens, _prefix_tokens(model.config))
    if model.config.model_type.startswith("dinov2"):  # DINOv2's linear protocol
        feats["cls_patch"] = torch.cat([feats["cls"], feats["patch_mean"]], dim=-1)
    return feats


def _clip_features(model: nn.Module, out) -> dict[str, torch.Tensor]:
    # Tokens after the final norm, as for every other model (CLIP keeps it out of its
    # last_hidden_state and applies it to the CLS token, which the projection reads).
    tokens = model.vision_model.post_layernorm(out.last_hidden_state)
    return {"embed": out.image_embeds, **token_features(tokens, 1)}  # embed: projected


def _siglip_features(model: nn.Module, out) -> dict[str, torch.Tensor]:
    # embed: the attention-pooled output, SigLIP's image embedding (it has no projection;
    # none where the model has no head); patch_mean: the mean of its tokens after the final
    # norm (it has no CLS token).
    pooled = {} if out.pooler_output is None else {"embed": out.pooler_output}
    return {**pooled, "patch_mean": out.last_hidden_state.mean(dim=1)}


def _pooled_features(model: nn.Module, out) -> dict[str, torch.Tensor]:
    return {"pooled": out.pooler_output.flatten(1)}


# The feature sets of a model's output, by _Type.features.
_FEATURES = {
    "tokens": _token_features, "clip": _clip_features, "siglip": _siglip_features,
    "pooled": _pooled_features,
}  # fmt: skip


def _extract(kind: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return _FEATURES[kind](model, model(pixel_values=x))


def _run(features: Callable, count: int, model: nn.Module, x: torch.Tensor, indices: list[int]):
    """The features and the chosen layers' outputs of one pass: hidden_states[0] is the
    embeddings' output, hidden_states[i + 1] layer i's (of ``count`` layers)."""
    out = model(pixel_values=x, output_hidden_states=True)
    if len(out.hidden_states) != count + 1:
        raise UnsupportedModelError(
            f"--layers: {type(model).__name__} returns {len(out.hidden_states)} hidden states "
            f"for its {count} layers; name its modules instead (hooks)"
        )
    return features(model, out), {i: out.hidden_states[i + 1] for i in indices}


# Where a transformers model keeps its layers (those whose outputs are its hidden_states).
_LAYERS = (
    "layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers",
    "vision_model.layers", "encoder.stages",
)  # fmt: skip


def _blocks(model: nn.Module, features: Callable) -> Blocks:
    for path in _LAYERS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        maps = _type(model.config.model_type, type(model).__name__).features == "pooled"
        prefix = _prefix_tokens(getattr(model.config, "vision_config", model.config))
        names = tuple(f"{path}.{i}" for i in range(len(layers)))
        return Blocks(names, 0 if maps else prefix, partial(_run, features, len(names)))
    raise UnsupportedModelError(f"--layers: no encoder layers found in {type(model).__name__}")


def _hf_blocks(model: nn.Module) -> Blocks:
    kind = _type(model.config.model_type, type(model).__name__).features
    return _blocks(model, _FEATURES[kind])


def _feature_widths(config) -> tuple[tuple[str, int], ...]:
    t = _type(config.model_type, "the config")
    if t.features == "pooled":
        return (("pooled", config.hidden_sizes[-1]),)
    if t.features == "siglip":
        vision = getattr(config, "vision_config", config)
        pooled = (
            (("embed", vision.hidden_size),) if getattr(vision, "vision_use_head", True) else ()
        )
        return (*pooled, ("patch_mean", vision.hidden_size))
    if t.features == "clip":
        vision = getattr(config, "vision_config", config)
        return (
            ("embed", config.projection_dim),
            ("cls", vision.hidden_size),
            ("patch_mean", vision.hidden_size),
        )
    width = config.hidden_size
    out = (("cls", width), ("patch_mean", width))
    return out + ((("cls_patch", 2 * width),) if config.model_type.startswith("dinov2") else ())


# ---------------------------------------------------------------------------------------------
# Loading


def _pretrained(spec: BackboneSpec, weights: Path | None, model_type: str) -> nn.Module:
    """The model of ``model_type`` from the hub, a save_pretrained directory or (with the
    entry's architecture) a single safetensors file; strictly."""
    import transformers

    t = _type(model_type, spec.name)
    cls = getattr(transformers, t.model_class)
    source = f"--weights {weights}" if weights is not None else spec.weights_id
    if weights is not None and weights.is_file():
        config = _config(spec)
        where, kwargs = None, dict(config=config, state_dict=load_safetensors(weights))
    else:
        where, kwargs = str(weights or spec.weights_id), {}
        if t.features == "clip":  # a whole CLIP repo: its vision tower, with the projection
            kwargs["config"] = _clip_vision_config(where, source, local=weights is not None)
    try:
        with _quiet(transformers):  # its loading report is checked (and refused) below
            model, info = cls.from_pretrained(
                where,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
                # Reshaped tensors land in the report (named below), not an anonymous error.
                ignore_mismatched_sizes=True,
                **dict(t.kwargs),
                **kwargs,
            )
    except OSError as exc:
        if weights is not None:
            raise WeightsError(f"{source}: cannot load a {t.model_class} from it ({exc})") from exc
        raise no_hub_error(spec.name, spec.weights_id, exc) from exc
    except RuntimeError as exc:  # transformers' conversion of the tensor names failed
        raise WeightsError(f"{source}: cannot load a {t.model_class} from it ({exc})") from exc
    for key in _ARCH_KEYS:  # the structure; other config fields may differ between versions
        want, got = spec.arch.get(key), getattr(model.config, key, None)
        if want is not None and got != want:
            raise WeightsError(
                f"{source}: {key}={got} but {spec.name} expects {want}; these weights belong "
                "to another architecture"
            )
    check_loading_info(source, info, t.heads)
    return model


def _config(spec: BackboneSpec):
    """The transformers config of an entry's architecture (``arch``)."""
    import transformers

    arch = dict(spec.arch)
    features = _type(arch.pop("model_type"), spec.name).features
    if features == "clip":  # the image tower's own
        return transformers.CLIPVisionConfig(**arch)
    if features == "siglip":
        return transformers.SiglipVisionConfig(**arch)
    return transformers.AutoConfig.for_model(spec.arch["model_type"], **arch)


def _clip_vision_config(where: str, source: str, local: bool):
    """The vision config of a CLIP repo with the model's projection width: transformers'
    CLIPVisionConfig.from_pretrained drops ``projection_dim`` (top level) for its default."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(where)
    except OSError as exc:
        if local:
            raise WeightsError(f"{source}: no config.json in it ({exc})") from exc
        raise no_hub_error(source, where, exc) from exc
    if config.model_type != "clip":
        return config
    vision = config.vision_config.to_dict() | {"projection_dim": config.projection_dim}
    return transformers.CLIPVisionConfig(**vision)


@contextmanager
def _quiet(transformers):
    """transformers' own loading report and progress bar, silenced while featcache loads."""
    verbosity = transformers.logging.get_verbosity()
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()


def _build_hf(spec: BackboneSpec, weights: Path | None):
    model_type = spec.arch["model_type"]
    kind = _type(model_type, spec.name).features
    return _pretrained(spec, weights, model_type), partial(_extract, kind)


def _random_hf(spec: BackboneSpec, root: Path) -> Path:
    """A save_pretrained directory of the model (random weights) and of its image processor."""
    import transformers

    t = _type(spec.arch["model_type"], spec.name)
    config = _config(spec)
    path = root / spec.name.replace(":", "_").replace("/", "_")
    getattr(transformers, t.model_class)(config, **dict(t.kwargs)).save_pretrained(path)
    side = round(spec.input_size / spec.crop_pct)
    resample = {v: k for k, v in _RESAMPLE.items()}[spec.interpolation]
    common = dict(image_mean=list(spec.mean), image_std=list(spec.std), resample=resample)
    crop = {"height": spec.input_size, "width": spec.input_size}
    processor = getattr(transformers, t.processor)
    if t.processor in ("ViTImageProcessor", "SiglipImageProcessor"):  # resized, no crop
        made = processor(size=crop, **common)
    elif t.processor == "ConvNextImageProcessor":
        made = processor(size={"shortest_edge": spec.input_size}, crop_pct=spec.crop_pct, **common)
    else:
        made = processor(
            size={"shortest_edge": side}, crop_size=crop, do_center_crop=True, **common
        )
    made.save_pretrained(path)
    return path


family("hf", random_weights=_random_hf, blocks=_hf_blocks)(_build_hf)


# ---------------------------------------------------------------------------------------------
# DINO's protocol on transformers' ViTModel (the named dino-vits16, vit-b16, random-vits16)


def _vit_extract(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return _vit_features(model, model(pixel_values=x, output_hidden_states=True))


def _vit_features(model: nn.Module, out) -> dict[str, torch.Tensor]:
    # DINO's linear protocol: the normalised CLS token of each of the last four blocks.
    last4 = [model.layernorm(h[:, 0]) for h in out.hidden_states[-4:]]
    return {**token_features(out.last_hidden_state, 1), "cls_last4": torch.cat(last4, dim=-1)}


def _vit_blocks(model: nn.Module) -> Blocks:
    return _blocks(model, _vit_features)


def _vit_model(spec: BackboneSpec) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**spec.arch), add_pooling_layer=False)


def _vit_arch(spec: BackboneSpec) -> BackboneSpec:
    from dataclasses import replace

    return replace(spec, arch={"model_type": "vit", **spec.arch})


def _build_vit_hub(spec: BackboneSpec, weights: Path | None):
    return _pretrained(_vit_arch(spec), weights, "vit"), _vit_extract


def _random_vit(spec: BackboneSpec, root: Path) -> Path:
    path = root / spec.name
    _vit_model(spec).save_pretrained(path)  # config.json + model.safetensors
    return path


family("vit-hub", random_weights=_random_vit, blocks=_vit_blocks)(_build_vit_hub)


def _vit_random_identity(spec: BackboneSpec) -> str:
    import transformers

    return f"{spec.weights_id}:transformers={transformers.__version__}"


@family("vit-random", identity=_vit_random_identity, random_weights=_random_vit, blocks=_vit_blocks)
def _build_vit_random(spec: BackboneSpec, weights: Path | None):
    if weights is not None:
        return _pretrained(_vit_arch(spec), weights, "vit"), _vit_extract
    seed = int(spec.weights_id.rsplit("seed=", 1)[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _vit_model(spec)
    return model, _vit_extract


# ---------------------------------------------------------------------------------------------
# hf:REPO


def _read_json(where: str, filename: str, repo: bool) -> dict:
    if not repo:
        path = Path(where) / filename
        if not path.is_file():
            raise WeightsError(
                f"--weights {where} has no {filename}: save the model and its image processor "
                "there with save_pretrained"
            )
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(where, filename)).read_text())
    except Exception as exc:  # huggingface_hub raises several connection and entry errors
        raise no_hub_error(f"hf:{where}", where, exc) from exc


def _side(value, what: str) -> tuple[int, int]:
    """(height, width) of an image processor size; a shortest edge as a square."""
    if isinstance(value, int):
        return value, value
    if "shortest_edge" in value:
        return value["shortest_edge"], value["shortest_edge"]
    return value["height"], value["width"]


def processor_preprocess(cfg: dict, what: str) -> dict:
    """input_size, interpolation, mean, std and crop_pct of an image processor config.

    featcache resizes the shorter side to ``input_size / crop_pct`` and crops the centre:
    exactly what the processors do for square images (the images featcache batches).
    """
    size = _side(cfg["size"], what)
    interpolation = _RESAMPLE.get(cfg.get("resample", 2), str(cfg.get("resample")))
    if cfg.get("crop_pct") is not None:
        # ConvNeXt's: below 384, resize to size / crop_pct and crop size; else resize to size.
        crop_pct = float(cfg["crop_pct"]) if size[0] < 384 else 1.0
        input_size = size
    elif cfg.get("do_center_crop") and cfg.get("crop_size") is not None:
        input_size = _side(cfg["crop_size"], what)
        crop_pct = input_size[0] / size[0]
    else:  # resized to the input size, no crop
        input_size, crop_pct = size, 1.0
    check_preprocessing(what, input_size, interpolation, "center")
    return dict(
        input_size=input_size[0],
        interpolation=interpolation,
        mean=tuple(cfg["image_mean"]),
        std=tuple(cfg["image_std"]),
        crop_pct=crop_pct,
    )


# Architecture fields recorded in an hf: entry (fingerprinted and checked at load).
_ARCH_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    "hidden_sizes", "depths", "projection_dim", "num_register_tokens",
)  # fmt: skip


def _resolve(repo: str, weights: Path | None) -> BackboneSpec:
    import transformers

    where = str(weights) if weights is not None else repo
    try:
        config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if weights is not None:
            raise WeightsError(f"--weights {weights}: no model config in it ({exc})") from exc
        if "is not a local folder and is not a valid model identifier" in str(exc):
            raise unknown_model("hf", repo, []) from exc
        raise no_hub_error(f"hf:{repo}", repo, exc) from exc
    model_type = config.model_type
    t = _type(model_type, f"hf:{repo}")
    arch = {"model_type": model_type}
    vision = getattr(config, "vision_config", config)
    arch |= {k: getattr(vision, k) for k in _ARCH_KEYS if getattr(vision, k, None) is not None}
    if t.features == "clip":
        arch["projection_dim"] = config.projection_dim
    processor = _read_json(where, "preprocessor_config.json", repo=weights is None)
    return BackboneSpec(
        name=f"hf:{repo}",
        family="hf",
        weights_id=repo,
        features=_feature_widths(config),
        arch=arch,
        description=f"transformers {t.model_class} from {repo}",
        needs_download=True,
        cpu_freeze=t.features == "pooled",
        recipe="transformers",
        **processor_preprocess(processor, f"hf:{repo}"),
    )


kind(
    "hf",
    resolve=_resolve,
    help="a transformers vision model repo (ViT, DINOv2, CLIP's or SigLIP's image tower, "
    "ConvNeXt, ResNet): hf:facebook/dinov2-small; preprocessing from its image processor config; "
    "--weights DIR (save_pretrained of the model and its image processor) offline",
)


# ---------------------------------------------------------------------------------------------
# The text tower of CLIP and SigLIP (zero-shot classification: featcache zeroshot)


@dataclass
class TextTower:
    """A CLIP or SigLIP text tower, its tokenizer, and the model's logit scale (and bias)."""

    model: nn.Module
    tokenizer: object
    logit_scale: float  # exp of the checkpoint's logit_scale (the inverse temperature)
    logit_bias: float | None = None  # SigLIP's: its scores are sigmoid(scale * cos + bias)

    @property
    def scoring(self) -> str:
        return "softmax" if self.logit_bias is None else "sigmoid"

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings (len(texts), width), float32: CLIP's projected
        end-of-text token; SigLIP's last token through its head, the texts padded to the
        length SigLIP was trained with (64) and no attention mask, as its processor does."""
        longest = self.model.config.max_position_embeddings  # CLIP's 77 tokens, SigLIP's 64
        if self.scoring == "softmax":
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=longest,
                                    return_tensors="pt")  # fmt: skip
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            embeds = out.text_embeds
        else:
            if type(self.tokenizer).__name__.startswith("Gemma"):
                # SigLIP 2 (a Gemma vocabulary) was trained on lowercased text: transformers'
                # Siglip2Tokenizer lowercases, the GemmaTokenizer its FixRes repos name does
                # not (SigLIP's own SentencePiece tokenizer lowercases by itself).
                texts = [t.lower() for t in texts]
            tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                    max_length=longest, return_tensors="pt")  # fmt: skip
            embeds = self.model(input_ids=tokens["input_ids"]).pooler_output
        return torch.nn.functional.normalize(embeds.float(), dim=-1)


def load_text_tower(
    spec: BackboneSpec, weights: Path | None, revision: str | None = None
) -> TextTower:
    """The text tower of a CLIP or SigLIP entry's own weights (the whole repo at
    ``revision``, or a save_pretrained directory of the whole model with its tokenizer),
    loaded strictly: every text tensor read."""
    import transformers

    model_type = spec.arch.get("model_type") if spec.family == "hf" else None
    family = _TYPES[model_type].features if model_type in _TYPES else None
    if family not in ("clip", "siglip"):
        raise UnsupportedModelError(
            f"{spec.name} is not a CLIP or SigLIP model: zero-shot classification needs their "
            "text tower (clip-vitb16, or an hf: CLIP or SigLIP repo)"
        )
    where = str(weights or spec.weights_id)
    source = f"--weights {weights}" if weights is not None else spec.weights_id
    try:
        hub = {} if weights is not None else {"revision": revision}
        config = transformers.AutoConfig.from_pretrained(where, **hub)
        if config.model_type != family:
            raise WeightsError(
                f"{source} holds the image tower only ({config.model_type}); zero-shot needs the "
                "whole model (save_pretrained of the model and its tokenizer)"
            )
        with _quiet(transformers):
            model, info = _text_model(transformers, family, config, where, hub)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **hub)
        except ImportError as exc:  # SigLIP's SentencePiece tokenizer, its library missing
            raise UnsupportedModelError(
                f"{source}: its tokenizer needs a library that is not installed ({exc}); for "
                "SigLIP: pip install 'featcache[siglip]' (sentencepiece and protobuf)"
            ) from None
        except ValueError as exc:  # no tokenizer config transformers recognises
            raise WeightsError(
                f"{source}: no tokenizer featcache can load ({exc}); save the model's tokenizer "
                "there with save_pretrained"
            ) from None
        local = weights is not None
        scale = _checkpoint_tensor(where, "logit_scale", local, revision)
        bias = (
            _checkpoint_tensor(where, "logit_bias", local, revision) if family == "siglip" else None
        )
    except OSError as exc:
        if weights is not None:
            raise WeightsError(f"{source}: no text tower or tokenizer in it ({exc})") from exc
        raise no_hub_error(spec.name, spec.weights_id, exc) from exc
    image = ("vision_model.", "visual_projection.", "logit_scale", "logit_bias")
    check_loading_info(source, info, image)
    return TextTower(
        model.eval().requires_grad_(False), tokenizer, float(scale.exp()),
        None if bias is None else float(bias),
    )  # fmt: skip


def _text_model(transformers, family: str, config, where: str, hub: dict):
    """(model, loading report) of the text tower, with what from_pretrained would lose."""
    common = dict(
        use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **hub
    )  # reshaped tensors land in the report
    if family == "siglip":
        return transformers.SiglipTextModel.from_pretrained(
            where, config=config.text_config, **common
        )
    # CLIP's text config with the model's projection width (from_pretrained of the text
    # config alone would drop projection_dim, a top-level field, for its default).
    text = transformers.CLIPTextConfig(
        **config.text_config.to_dict() | {"projection_dim": config.projection_dim}
    )
    return transformers.CLIPTextModelWithProjection.from_pretrained(where, config=text, **common)


def _checkpoint_tensor(where: str, name: str, local: bool, revision=None) -> torch.Tensor:
    """One tensor of a safetensors checkpoint (a single file or shards with an index)."""
    from safetensors import safe_open

    def path(filename: str) -> str | None:
        if local:
            p = Path(where) / filename
            return str(p) if p.is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(where, filename, revision=revision)
        except Exception:  # noqa: BLE001 (the file is optional: the index or the single file)
            return None

    index = path("model.safetensors.index.json")
    filename = (
        json.loads(Path(index).read_text())["weight_map"][name] if index else "model.safetensors"
    )
    found = path(filename)
    if found is None:
        raise WeightsError(f"{where}: no {filename} with the tensor {name}")
    with safe_open(found, "pt") as f:
        return f.get_tensor(name)
