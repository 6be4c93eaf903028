"""``hf:REPO``: transformers vision models, preprocessing from the repo's image processor.

Each repo is played by a ``save_pretrained`` directory (small random model of the real type,
and the repo's real preprocessor_config.json) passed with --weights; the reference is the
transformers model called directly on the same images, normalised by the repo's own image
processor.
"""

import json

import h5py
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image_folder

from featcache.backbones import get_spec, load_backbone
from featcache.cli import main
from featcache.errors import UnsupportedModelError, WeightsError

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
CLIP = dict(
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]
)
# The preprocessor_config.json of each repo, as published.
PROCESSORS = {
    "facebook/dinov2-small": dict(
        image_processor_type="BitImageProcessor", size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3, **IMAGENET,
    ),
    "openai/clip-vit-base-patch16": dict(
        feature_extractor_type="CLIPFeatureExtractor", size=224, crop_size=224,
        do_center_crop=True, resample=3, **CLIP,
    ),
    "google/vit-base-patch16-224": dict(
        feature_extractor_type="ViTFeatureExtractor", size=224, resample=2,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ),
    "google/siglip-base-patch16-224": dict(
        image_processor_type="SiglipImageProcessor", processor_class="SiglipProcessor",
        do_resize=True, size={"height": 224, "width": 224}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ),
    "facebook/convnext-tiny-224": dict(
        feature_extractor_type="ConvNextFeatureExtractor", size=224, crop_pct=0.875, resample=3,
        **IMAGENET,
    ),
}  # fmt: skip
PROCESSORS["microsoft/resnet-50"] = PROCESSORS["facebook/convnext-tiny-224"]
PROCESSORS["facebook/dinov2-with-registers-small"] = PROCESSORS["facebook/dinov2-small"]


def _small_model(repo: str):
    """A small random model of the repo's type (with the head its checkpoint has)."""
    import transformers as t

    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if repo == "facebook/dinov2-small":
        return t.Dinov2Model(t.Dinov2Config(**vit, patch_size=14, image_size=518))
    if repo == "facebook/dinov2-with-registers-small":
        config = t.Dinov2WithRegistersConfig(**vit, patch_size=14, num_register_tokens=4)
        return t.Dinov2WithRegistersModel(config)
    if repo == "openai/clip-vit-base-patch16":  # the whole CLIP model, text tower included
        text = dict(vit, vocab_size=99)
        return t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vit, projection_dim=16))
    if repo == "google/siglip-base-patch16-224":  # the whole SigLIP model, text tower included
        text = dict(vit, vocab_size=99)
        return t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=vit))
    if repo == "google/vit-base-patch16-224":  # a classifier with its head and pooler
        return t.ViTForImageClassification(t.ViTConfig(**vit, num_labels=5))
    cnn = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5)
    if repo == "facebook/convnext-tiny-224":
        return t.ConvNextForImageClassification(t.ConvNextConfig(**cnn))
    return t.ResNetForImageClassification(t.ResNetConfig(**cnn, embedding_size=8))


def _reference(repo: str, model, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each feature set is, computed from the library model directly."""
    if "clip" in repo:
        out = model.vision_model(pixel_values=pixels)
        tokens = model.vision_model.post_layernorm(out.last_hidden_state)
        return {
            "embed": model.visual_projection(out.pooler_output),
            "cls": out.pooler_output,  # CLIP's pooled output: the CLS token after the norm
            "patch_mean": tokens[:, 1:].mean(1),
        }
    if "siglip" in repo:
        out = model.vision_model(pixel_values=pixels)
        return {
            "embed": out.pooler_output,  # get_image_features: the head's attention pooling
            "patch_mean": out.last_hidden_state.mean(1),  # no CLS: every token
        }
    if "resnet" in repo or "convnext" in repo:
        body = model.resnet if "resnet" in repo else model.convnext
        return {"pooled": body(pixel_values=pixels).pooler_output.flatten(1)}
    body = model.vit if "vit-base" in repo else model
    tokens = body(pixel_values=pixels).last_hidden_state
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    out = {"cls": tokens[:, 0], "patch_mean": tokens[:, prefix:].mean(1)}
    if "dinov2" in repo:
        out["cls_patch"] = torch.cat([out["cls"], out["patch_mean"]], dim=-1)
    return out


def save_repo(repo: str, root) -> tuple:
    """A directory laid out as the hub repo: model files and preprocessor_config.json."""
    path = root / repo.replace("/", "--")
    model = _small_model(repo).eval()
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSORS[repo]))
    return path, model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """224x224 images: the models' input size, so neither side resizes or crops."""
    return make_image_folder(tmp_path_factory.mktemp("photos"), train=1, test=2, size=224)


@pytest.mark.parametrize("repo", sorted(PROCESSORS))
def test_extract_equals_the_transformers_model_called_directly(repo, photos, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    weights, model = save_repo(repo, tmp_path)
    out = tmp_path / "s.h5"
    args = ["extract", "--backbone", f"hf:{repo}", "--weights", weights, "--dataset",
            f"imagefolder:{photos}", "--out", out, "--precision", "fp32", "--workers", "0",
            "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        stored = {k: torch.from_numpy(v[:]) for k, v in f["test"]["features"].items()}

    processor = AutoImageProcessor.from_pretrained(weights)
    files = sorted((photos / "test").glob("*/*.png"))
    pixels = processor(
        images=[Image.open(f).convert("RGB") for f in files],
        do_resize=False,
        do_center_crop=False,
        return_tensors="pt",
    )["pixel_values"]
    with torch.inference_mode():
        reference = _reference(repo, model, pixels)
    assert list(stored) == sorted(reference)
    for key, ref in reference.items():
        cosine = torch.nn.functional.cosine_similarity(stored[key], ref, dim=1)
        assert float(cosine.min()) >= 0.9999, key
        torch.testing.assert_close(stored[key], ref, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    "repo, expected",
    [
        ("facebook/dinov2-small", (224, "bicubic", IMAGENET["image_mean"], 224 / 256)),
        ("openai/clip-vit-base-patch16", (224, "bicubic", CLIP["image_mean"], 1.0)),
        ("google/vit-base-patch16-224", (224, "bilinear", [0.5] * 3, 1.0)),
        ("google/siglip-base-patch16-224", (224, "bicubic", [0.5] * 3, 1.0)),
        ("facebook/convnext-tiny-224", (224, "bicubic", IMAGENET["image_mean"], 0.875)),
    ],
)
def test_the_entry_comes_from_the_repo_configs(repo, expected, tmp_path):
    weights, model = save_repo(repo, tmp_path)
    spec = get_spec(f"hf:{repo}", weights)
    assert (spec.input_size, spec.interpolation, list(spec.mean), spec.crop_pct) == expected
    assert spec.name == f"hf:{repo}" and spec.weights_id == repo
    built, _ = load_backbone(f"hf:{repo}", weights)
    x = torch.zeros(1, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        widths = {k: v.shape[-1] for k, v in built(x).items()}
    assert widths == spec.feature_widths  # known before the first batch, and right


@pytest.mark.parametrize(
    "config, expected",
    [  # ConvNeXt crops below 384 only; above, it resizes to the size
        (dict(PROCESSORS["facebook/convnext-tiny-224"], size=384), (384, "bicubic", 1.0)),
        (dict(PROCESSORS["facebook/dinov2-small"], resample=2), (224, "bilinear", 224 / 256)),
        # PIL's every filter is reproduced exactly (featcache.preprocessing.pil)
        (dict(PROCESSORS["facebook/dinov2-small"], resample=1), (224, "lanczos", 224 / 256)),
    ],
)
def test_preprocessing_follows_the_processor(config, expected):
    from featcache.backbones.hf_models import processor_preprocess

    got = processor_preprocess(config, "hf:x")
    assert (got["input_size"], got["interpolation"], got["crop_pct"]) == expected


@pytest.mark.parametrize(
    "change, named",
    [(dict(resample=6), "6"), (dict(crop_size={"height": 224, "width": 160}), "224x160")],
)
def test_preprocessing_featcache_cannot_reproduce_is_refused(change, named):
    from featcache.backbones.hf_models import processor_preprocess

    with pytest.raises(UnsupportedModelError, match=named):
        processor_preprocess(dict(PROCESSORS["facebook/dinov2-small"], **change), "hf:x")


# The named entries that load hub repos through transformers, with the small model's arch.
_SMALL_ARCH = {
    "clip-vitb16": ("openai/clip-vit-base-patch16", dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, patch_size=32, image_size=224,
        projection_dim=16)),
    "dinov2-vits14": ("facebook/dinov2-small", dict(
        model_type="dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, patch_size=14, image_size=518)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_SMALL_ARCH))
def test_named_entries_load_their_repo_as_published(name, tmp_path, monkeypatch):
    """openai/clip-vit-base-patch16 is a whole CLIPModel (its text tower stays unread);
    facebook/dinov2-small a Dinov2Model. Played by small models of the same layout."""
    from dataclasses import replace

    from featcache.backbones import registry

    repo, arch = _SMALL_ARCH[name]
    spec = get_spec(name)
    small = replace(spec, arch=arch, features=tuple((k, 16 if k == "embed" else 32 * (
        2 if k == "cls_patch" else 1)) for k, _ in spec.features))  # fmt: skip
    monkeypatch.setitem(registry._REGISTRY, name, small)
    weights, model = save_repo(repo, tmp_path)
    backbone, preprocess = load_backbone(name, weights)
    pixels = preprocess(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    with torch.inference_mode():
        got, reference = backbone(pixels), _reference(repo, model, pixels)
    assert list(got) == [k for k, _ in spec.features]
    for key, ref in reference.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-5, atol=1e-5, msg=key)


def test_no_head_or_pooler_is_ever_random(tmp_path):
    """A ViT classifier repo: its head and pooler are dropped, never initialised at random."""
    weights, clf = save_repo("google/vit-base-patch16-224", tmp_path)
    model, _ = load_backbone("hf:google/vit-base-patch16-224", weights)
    assert model.model.pooler is None
    own = model.model.state_dict()
    assert own.keys() == {k.removeprefix("vit.") for k in clf.state_dict() if k.startswith("vit.")}
    for k, v in own.items():
        torch.testing.assert_close(v, clf.vit.state_dict()[k], rtol=0, atol=0, msg=k)


def test_a_repo_missing_a_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    weights, _ = save_repo("facebook/dinov2-small", tmp_path)
    state = load_file(str(weights / "model.safetensors"))
    gone = next(k for k in sorted(state) if ".1." in k and k.endswith("fc1.weight"))
    del state[gone]
    save_file(state, str(weights / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="1 missing") as err:
        load_backbone("hf:facebook/dinov2-small", weights)
    assert "fc1.weight" in str(err.value)


def test_a_model_type_beyond_reach_is_named(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="'bert' model; hf: reaches .*dinov2"):
        get_spec("hf:bert-base-uncased", tmp_path / "bert")


def test_a_directory_without_its_image_processor_says_what_to_save(tmp_path):
    weights, _ = save_repo("facebook/dinov2-small", tmp_path)
    (weights / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match="no preprocessor_config.json.*save_pretrained"):
        get_spec("hf:facebook/dinov2-small", weights)
