"""``timm:NAME[.TAG]``: any timm model, preprocessing from timm's own pretrained config.

Weights are random, saved locally and passed with --weights (no network here); the reference
is the timm model called directly on the same images normalised with timm's data config.
"""

import h5py
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image_folder

from featcache.backbones import get_spec, load_backbone, save_random_weights
from featcache.cli import main
from featcache.errors import UnknownBackboneError, WeightsError


def _images(folder) -> torch.Tensor:
    """The test split of an image folder as uint8 (N, 3, H, W), in the store's order."""
    import numpy as np
    from PIL import Image

    files = sorted((folder / "test").glob("*/*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(
        0, 3, 1, 2
    )


def _extract(tmp_path, folder, backbone, weights) -> dict:
    out = tmp_path / "s.h5"
    args = ["extract", "--backbone", backbone, "--weights", weights, "--dataset",
            f"imagefolder:{folder}", "--out", out, "--precision", "fp32", "--workers", "0",
            "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        return {k: torch.from_numpy(v[:]) for k, v in f["test"]["features"].items()}


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """224x224 images: the model's own input size, so neither side resizes or crops."""
    return make_image_folder(tmp_path_factory.mktemp("photos"), train=1, test=2, size=224)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18.a1_in1k"])
def test_extract_equals_the_timm_model_called_directly(name, photos, tmp_path):
    import timm

    weights = save_random_weights(f"timm:{name}", tmp_path)
    stored = _extract(tmp_path, photos, f"timm:{name}", weights)

    from safetensors.torch import load_file

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    state = load_file(str(weights))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("head.", "fc."))})
    cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (_images(photos).float() / 255 - mean) / std
    with torch.inference_mode():
        tokens = model.forward_features(x)
        reference = {"pooled": model.forward_head(tokens, pre_logits=True)}
    if tokens.ndim == 3:  # a ViT: the CLS token and the mean of the patch tokens
        reference |= {"cls": tokens[:, 0], "patch_mean": tokens[:, 1:].mean(1)}
    assert sorted(stored) == sorted(reference)
    for key, ref in reference.items():
        assert _min_cosine(stored[key], ref) >= 0.9999, key
        torch.testing.assert_close(stored[key], ref, rtol=1e-4, atol=1e-4, msg=key)


def test_the_entry_comes_from_timm_pretrained_config():
    import timm

    spec = get_spec("timm:vit_small_patch16_224.dino")
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    cfg = timm.data.resolve_model_data_config(model)
    assert spec.input_size == cfg["input_size"][-1] == 224
    assert (spec.interpolation, spec.mean, spec.std, spec.crop_pct) == (
        cfg["interpolation"],
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["crop_pct"],
    )
    assert spec.features == (("pooled", 384), ("cls", 384), ("patch_mean", 384))
    assert spec.weights_id == "timm/vit_small_patch16_224.dino"
    # Without a tag: timm's default pretrained tag, named in the weights id (and identity).
    default = timm.models.get_pretrained_cfg("resnet50").hf_hub_id
    assert get_spec("timm:resnet50").weights_id == default == "timm/resnet50.a1_in1k"


def test_unknown_names_and_tags_suggest_what_timm_knows():
    with pytest.raises(UnknownBackboneError, match="timm:vit_small_patch16_224") as err:
        get_spec("timm:vit_smal_patch16_224")
    assert "is not a model timm knows" in str(err.value)
    with pytest.raises(UnknownBackboneError, match="timm:vit_small_patch16_224.dino"):
        get_spec("timm:vit_small_patch16_224.dinox")


def test_weights_missing_a_tensor_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    weights = save_random_weights("timm:resnet18", tmp_path)
    state = load_file(str(weights))
    del state["layer3.0.conv1.weight"]
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match="1 missing") as err:
        load_backbone("timm:resnet18", weights)
    assert "layer3.0.conv1.weight" in str(err.value)
