import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featcache.backbones import load_backbone
from featcache.backbones.loading import load_tensors
from featcache.backbones.simclr_encoder import ResNetCifar
from featcache.errors import FeatcacheError
from featcache.extraction.extract import ExtractConfig, extract
from featcache.pretraining.simclr import SimCLRConfig, embed, nt_xent, pretrain
from featcache.store import Store


def _nt_xent_written_out(z1, z2, t):
    """Chen et al. 2020, eq. (1), averaged over all 2B anchors, with explicit loops."""
    z = torch.cat([z1, z2])
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        sim = lambda a, c: float(F.cosine_similarity(z[a], z[c], dim=0)) / t  # noqa: E731
        denom = sum(np.exp(sim(i, k)) for k in range(n) if k != i)
        total += -np.log(np.exp(sim(i, j)) / denom)
    return total / n


def test_nt_xent_equals_the_written_out_formula():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    for t in (0.1, 0.5):
        assert float(nt_xent(z1, z2, t)) == pytest.approx(_nt_xent_written_out(z1, z2, t), rel=1e-5)
    # identical views with a low temperature: the positive dominates, the loss nears zero
    z = torch.eye(4)
    assert float(nt_xent(z, z, 0.01)) < 1e-6


def _cfg(folder, out, **kw):
    base = dict(
        dataset=f"imagefolder:{folder}",
        out=str(out),
        width=8,
        epochs=2,
        batch_size=16,
        knn_every=1,
        warmup_epochs=0,
        device="cpu",
    )
    return SimCLRConfig(**{**base, **kw})


def test_a_time_limit_sizes_the_schedule_so_that_it_anneals(image_folder, tmp_path):
    """Cut by the clock alone, a 200-epoch schedule would stop near its peak step size."""
    one = pretrain(_cfg(image_folder, tmp_path / "one", epochs=1, knn_every=0))
    per_epoch = one["history"][0]["seconds"]
    cfg = _cfg(
        image_folder,
        tmp_path / "run",
        epochs=200,
        warmup_epochs=2,
        knn_every=0,
        time_limit=max(2.0, 30 * per_epoch),  # whole seconds: a loaded machine's noise
    )
    history = pretrain(cfg)["history"]
    assert 3 <= len(history) < 200
    peak = cfg.lr * cfg.batch_size / 256
    assert history[1]["lr"] > 0.7 * peak  # warm-up ends at the peak
    assert history[-1]["lr"] < 0.2 * peak  # and the cosine ran out by the last epoch
    _, meta = load_tensors(tmp_path / "run" / "checkpoint.safetensors")
    # The last epoch planned, or the first to end past the limit (a loaded machine's
    # epochs can be slower than warm-up's): checkpointed either way.
    assert meta["epoch"] == len(history) <= meta["planned_epochs"]


def test_checkpoints_every_n_epochs_and_at_the_last(image_folder, tmp_path, monkeypatch):
    from featcache.pretraining import simclr

    saved, write = [], simclr.save_tensors

    def recording(path, tensors, meta):
        if path.name == simclr.CHECKPOINT:  # not the exported encoder
            saved.append(meta["epoch"])
        write(path, tensors, meta)

    monkeypatch.setattr(simclr, "save_tensors", recording)
    pretrain(_cfg(image_folder, tmp_path / "run", epochs=5, checkpoint_every=2, knn_every=0))
    assert saved == [0, 2, 4, 5]


def test_resume_continues_from_the_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    first = pretrain(_cfg(image_folder, out, epochs=2))
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    tensors, meta = load_tensors(out / "checkpoint.safetensors")
    assert meta["epoch"] == 2 and any(k.startswith("opt.") for k in tensors)
    longer = pretrain(_cfg(image_folder, out, epochs=3))
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3]
    assert longer["history"][:2] == first["history"]  # not retrained
    with pytest.raises(FeatcacheError, match="another config"):
        pretrain(_cfg(image_folder, out, epochs=3, width=16))


@pytest.mark.slow  # 20 s; test_resume_continues_from_the_checkpoint is the default's resume
def test_a_killed_run_resumes_into_the_uninterrupted_run(image_folder, tmp_path):
    """kill -9 mid-run, the same command again: the encoder equals, tensor for tensor, that of
    a run never interrupted (the CPU run is deterministic given the seed)."""
    from safetensors.torch import load_file

    def command(out):
        return [
            sys.executable, "-m", "featcache", "pretrain", "simclr",
            "--dataset", f"imagefolder:{image_folder}", "--out", str(out), "--width", "8",
            "--epochs", "40", "--warmup-epochs", "2", "--batch-size", "16", "--knn-every", "0",
            "--device", "cpu",
        ]  # fmt: skip

    out = tmp_path / "run"
    p = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + 120
    epoch = 0
    while time.time() < deadline:
        if ckpt.exists():
            try:
                epoch = load_tensors(ckpt)[1]["epoch"]
            except Exception:  # noqa: BLE001 - caught mid-rename: try again
                epoch = 0
        if epoch >= 2:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _, meta = load_tensors(ckpt)  # the checkpoint is whole despite the kill
    done = meta["epoch"]
    assert 2 <= done < 40
    resumed = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at epoch {done}" in resumed.stderr
    whole = subprocess.run(command(tmp_path / "ref"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    a = load_file(out / "encoder.safetensors")
    b = load_file(tmp_path / "ref" / "encoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    def losses(run):
        return [
            (h["epoch"], h["loss"], h["lr"]) for h in json.loads((run / "history.json").read_text())
        ]

    assert losses(out) == losses(tmp_path / "ref") and len(losses(out)) == 40


def test_encoder_round_trips_through_the_registry_into_a_store(image_folder, tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(image_folder, out, epochs=1, knn_every=0))
    res = extract(
        ExtractConfig(
            backbone="simclr-resnet18",
            weights=str(out),
            dataset=f"imagefolder:{image_folder}",
            out=str(tmp_path / "s.h5"),
            workers=0,
            progress=False,
        )
    )
    store = Store(res.path)
    assert store.fields["backbone"]["features"] == {"pooled": 64}  # width 8 -> 8 * 8
    assert store.fields["preprocess"]["input_size"] == 32  # native resolution, no upscaling
    feats = store.load("test", "pooled")
    encoder = load_backbone("simclr-resnet18", out)[0].model
    from featcache.pretraining.simclr import load_images

    images, labels = load_images(f"imagefolder:{image_folder}", None, "test", None, 0, 32)
    direct = embed(encoder, images, torch.device("cpu"), "fp32")
    np.testing.assert_allclose(feats.features, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(feats.labels, labels.numpy())


def test_loss_falls_on_real_cifar_images(cifar_dir, tmp_path):
    cfg = SimCLRConfig(
        dataset=f"imagefolder:{cifar_dir}",
        out=str(tmp_path / "run"),
        width=16,
        epochs=8,
        batch_size=128,
        train_per_class=52,
        knn_every=0,
        warmup_epochs=1,
        lr=0.3,
        device="cpu",
    )
    history = pretrain(cfg)["history"]
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.1, losses


def test_encoder_architecture_is_resnet18_for_cifar():
    m = ResNetCifar(64)
    assert m.dim == 512
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    n_params = sum(p.numel() for p in m.parameters())
    assert 11.0e6 < n_params < 11.3e6  # ResNet-18 without its fc layer: 11.17M


@pytest.mark.slow
def test_gpu_recipe_starts_and_runs_on_the_cpu(cifar_dir, tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PY": sys.executable,
        "DATA": str(cifar_dir),
        "OUT": str(tmp_path / "r"),
        "RUN": str(tmp_path / "run"),  # not the repository's runs/
        "EPOCHS": "1",
        "WIDTH": "8",
        "BATCH": "64",
        "PER_CLASS": "20",
        "DEVICE": "cpu",
    }
    r = subprocess.run(
        ["bash", str(repo / "bench/simclr_gpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    knn = json.loads((tmp_path / "r" / "knn.json").read_text())
    assert [x["k"] for x in knn["results"]] == [20, 200]
