"""``--layers``: inner layers' features from the same forward pass, each equal to what a
forward hook on the same module sees (timm's forward_intermediates, transformers'
output_hidden_states, hooks for SimCLR); stored as layer.<i>.* sets listed in depth order."""

import numpy as np
import pytest
import torch

from featcache.backbones import load_backbone, save_random_weights
from featcache.backbones.layers import Blocks, layer_features, parse
from featcache.errors import ArgumentError
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import Store

# name, the modules of its layers, tokens before the patches (0: feature maps).
MODELS = {
    "timm:vit_tiny_patch16_224": ([f"blocks.{i}" for i in range(12)], 1),
    "random-vits16": ([f"layers.{i}" for i in range(12)], 1),  # transformers 5's ViTModel
    "efficientnet-lite0": (["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"], 0),
    "hf:convnext": ([f"encoder.stages.{i}" for i in range(4)], 0),
}


def _hooked(model, modules, x):
    """What forward hooks on ``modules`` see during a plain forward of the model."""
    seen = {}
    handles = [
        model.model.get_submodule(m).register_forward_hook(
            lambda _m, _i, out, m=m: seen.__setitem__(m, out[0] if isinstance(out, tuple) else out)
        )
        for m in modules
    ]
    with torch.no_grad():
        plain = model(x)
    for h in handles:
        h.remove()
    return plain, seen


def _load(name, tmp_path, layers=None):
    if (
        name == "hf:convnext"
    ):  # a tiny transformers ConvNeXt saved locally (a CNN via hidden_states)
        import transformers

        path = tmp_path / "convnext"
        if not path.exists():
            config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
            torch.manual_seed(0)
            transformers.ConvNextModel(config).save_pretrained(path)
            transformers.ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(path)
        return load_backbone("hf:convnext", path, layers)
    weights = None
    if name.startswith("timm:"):  # saved once: each save draws new random weights
        weights = next(tmp_path.glob("timm_*.safetensors"), None) or save_random_weights(
            name, tmp_path
        )
    return load_backbone(name, weights, layers)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_layer_equals_a_forward_hook_on_its_module(name, tmp_path):
    modules, prefix = MODELS[name]
    model, _ = _load(name, tmp_path, "all")
    side = model.spec.input_size
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layered = model(x)
    plain_model, _ = _load(name, tmp_path)
    plain, seen = _hooked(plain_model, modules, x)
    for k, v in plain.items():  # the model's own features are unchanged
        torch.testing.assert_close(layered[k], v, rtol=0, atol=1e-5)
    for i, m in enumerate(modules):
        out = seen[m]
        if prefix:
            torch.testing.assert_close(layered[f"layer.{i}.cls"], out[:, 0], rtol=0, atol=1e-5)
            mean = out[:, prefix:].mean(dim=1)
            torch.testing.assert_close(layered[f"layer.{i}.patch_mean"], mean, rtol=0, atol=1e-5)
        else:
            mean = out.mean(dim=(2, 3))
            torch.testing.assert_close(layered[f"layer.{i}.pooled"], mean, rtol=0, atol=1e-5)
    widths = dict(model.spec.features)
    assert all(widths[k] == v.shape[-1] for k, v in layered.items())
    assert list(widths)[: len(plain)] == list(plain)  # the model's sets first, then by depth


def test_a_simclr_encoder_reads_its_stages_by_hooks(tmp_path):
    weights = save_random_weights("simclr-resnet18", tmp_path)
    model, _ = load_backbone("simclr-resnet18", weights, "last,0")
    x = torch.randn(2, 3, 32, 32)
    plain, seen = _hooked(load_backbone("simclr-resnet18", weights)[0], ["layers.0", "layers.7"], x)
    with torch.no_grad():
        out = model(x)
    for i in (0, 7):  # its eight residual blocks
        torch.testing.assert_close(out[f"layer.{i}.pooled"], seen[f"layers.{i}"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["layer.7.pooled"], plain["pooled"])  # its pooled feature
    assert [k for k, _ in model.spec.features] == ["pooled", "layer.0.pooled", "layer.7.pooled"]


def test_the_spec_chooses_layers_by_keyword_index_or_name_in_depth_order():
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(6)])
    blocks = Blocks(tuple(str(i) for i in range(6)), 0)
    assert parse("last", blocks, model) == [5]
    assert parse("last4", blocks, model) == [2, 3, 4, 5]
    assert parse("all", blocks, model) == list(range(6))
    assert parse("-1,1,3", blocks, model) == [1, 3, 5]
    assert parse("4.0,2", blocks, model) == [2, "4.0"]  # a module inside layer 4: a hook
    with pytest.raises(ArgumentError, match="has 6 layers"):
        parse("6", blocks, model)
    with pytest.raises(ArgumentError, match="no such module; the closest: 4.0"):
        parse("4.1", blocks, model)


def test_layers_extract_into_feature_sets_listed_in_depth_order(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", train=2, test=1, size=32)
    cfg = ExtractConfig(backbone="efficientnet-lite0", dataset=f"imagefolder:{folder}",
                        out=str(tmp_path / "s.h5"), workers=0, progress=False,
                        layers="last4", dtype="float16")  # fmt: skip
    store = Store(extract(cfg).path)
    names = ["pooled", *(f"layer.{i}.pooled" for i in range(1, 5))]
    assert store.feature_sets == names and store.splits["test"] == names
    assert "layer.1.pooled" in store.describe()
    x = store.load("test", "layer.4.pooled").features
    assert x.shape == (3, 320)
    # Lite0 is TorchScript-frozen on the CPU: its layers as the eager model gives them.
    eager = Store(extract(ExtractConfig(**{**cfg.__dict__, "freeze": False,
                                           "out": str(tmp_path / "eager.h5")})).path)  # fmt: skip
    for name in names:
        a, b = store.load("test", name).features, eager.load("test", name).features
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-2)
    ref = Store(extract(ExtractConfig(**{**cfg.__dict__, "layers": None,
                                         "out": str(tmp_path / "plain.h5")})).path)  # fmt: skip
    assert ref.fingerprint != store.fingerprint  # the layers are part of what was extracted
    np.testing.assert_array_equal(store.load("test", "pooled").features,
                                  ref.load("test", "pooled").features)  # fmt: skip


def test_a_layer_of_tokens_without_a_cls_token_gives_only_their_mean():
    """Token outputs with a CLS (prefix 1): its token and the patches' mean; without one
    (SigLIP, prefix 0) only the mean of every token, no first patch posing as CLS."""
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    with_cls = layer_features(5, tokens, prefix=1)
    assert torch.equal(with_cls["layer.5.cls"], tokens[:, 0])
    assert torch.equal(with_cls["layer.5.patch_mean"], tokens[:, 1:].mean(1))
    without = layer_features(5, tokens, prefix=0)
    assert list(without) == ["layer.5.patch_mean"]
    assert torch.equal(without["layer.5.patch_mean"], tokens.mean(1))
