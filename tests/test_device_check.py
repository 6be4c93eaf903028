"""The device check (bench/device_check.sh): its CPU rehearsal runs in the default suite, so
that the script a GPU session runs never rots between GPU sessions."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import REPO, SHARED_CIFAR, make_image_folder

CHECKS = {"registry", "pixels", "throughput", "torchrun", "evaluation", "compile"}


@pytest.fixture
def ten_classes(request, tmp_path):
    """Real CIFAR-10 where ../shared has it, else ten classes of synthetic 32x32 images."""
    if (SHARED_CIFAR / "test.tar.gz").is_file():
        return request.getfixturevalue("cifar_dir")
    classes = tuple(f"class{i}" for i in range(10))
    return make_image_folder(tmp_path / "images", classes=classes, train=12, test=6)


def _rehearse(ten_classes, tmp_path, skip: str = "") -> dict:
    """The CPU rehearsal (DEVICE=cpu SMALL=1 bash bench/device_check.sh): its report."""

    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SMALL": "1",
        "PY": sys.executable,
        "DATA": str(ten_classes),
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "SKIP": skip,
    }
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "device_check.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads((tmp_path / "out" / "device-check.json").read_text())


def test_the_cpu_rehearsal_runs_every_check_but_torchrun_and_passes(ten_classes, tmp_path):
    """By default without its torchrun check (test_distributed runs torchrun on its own)."""
    from featcache.backbones import available_backbones, get_spec

    report = _rehearse(ten_classes, tmp_path, skip="torchrun")
    assert report["pass"] and set(report["checks"]) == CHECKS - {"torchrun"}
    # One entry of every family (the GPU run takes them all) and each of its feature sets,
    # compared image by image.
    seen = {(row["backbone"], row["feature"]) for row in report["checks"]["registry"]["rows"]}
    entries = {name: get_spec(name) for name in available_backbones() if name != "test-tiny"}
    assert {entries[name].family for name, _ in seen} == {s.family for s in entries.values()}
    assert seen == {(n, f) for n, _ in seen for f, _ in entries[n].features}
    assert all(row["images"] == 10 for row in report["checks"]["registry"]["rows"])
    throughput = report["checks"]["throughput"]
    assert throughput["images"] == 20 and throughput["run_over_bare"] > 0
    assert set(throughput["phases"]) == {"startup", "dataset", "model", "device", "run",
                                         "assembly", "total"}  # fmt: skip
    pixels = report["checks"]["pixels"]["rows"]  # CUDA's kernels, in Triton's interpreter
    assert {r["kernel"] for r in pixels} == {"triton"} and all(r["equal"] for r in pixels)
    assert set(report["checks"]["evaluation"]["top1"]) == {
        "cpu",
        "device",
        "device store, cpu probe",
    }
    table = (tmp_path / "out" / "device-check.md").read_text()
    assert all(f"| {name} |" in table for name in CHECKS - {"torchrun"})


@pytest.mark.slow
def test_the_whole_cpu_rehearsal_passes(ten_classes, tmp_path):
    report = _rehearse(ten_classes, tmp_path)
    assert report["pass"] and set(report["checks"]) == CHECKS


@pytest.fixture
def device_check(monkeypatch, tmp_path):
    """bench/device_check.py with every check replaced by one that passes at once."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import device_check

    for name in CHECKS:
        monkeypatch.setattr(device_check, f"check_{name}", lambda *args: {"pass": True})
    monkeypatch.setattr(device_check, "markdown", lambda report: "table\n")
    args = ["--device", "cpu", "--data", "-", "--out", str(tmp_path), "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["device_check.py", *args])
    return device_check


def test_a_broken_check_fails_the_run_and_the_others_still_run(device_check, monkeypatch, tmp_path):
    assert device_check.main() == 0

    def broken(*args):
        raise RuntimeError("nccl exploded")

    monkeypatch.setattr(device_check, "check_torchrun", broken)
    assert device_check.main() == 1
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert not report["pass"] and set(report["checks"]) == CHECKS
    assert report["checks"]["torchrun"]["error"] == "RuntimeError: nccl exploded"
    assert report["checks"]["evaluation"]["pass"]  # ran after the broken one
    monkeypatch.setattr(device_check, "check_evaluation", lambda *args: {"pass": False})
    monkeypatch.setattr(device_check, "check_torchrun", lambda *args: {"pass": True})
    assert device_check.main() == 1  # a failed check, not only a broken one


def _wheel(path, name: str) -> None:
    """A minimal pure-Python wheel holding one module ``name`` (VALUE = 42)."""
    dist = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(path / f"{name}-0.1-py3-none-any.whl", "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


def test_the_device_environment_sees_the_image_packages_and_the_pack(tmp_path):
    """What bench/device_env.sh does on the GPU machine, from a Python playing its image:
    a virtual environment over that Python's packages, the packed wheels, featcache, and
    CIFAR unpacked from the pack."""
    pack = tmp_path / "pack"
    (pack / "wheels").mkdir(parents=True)
    _wheel(pack / "wheels", "packed_probe")
    images = make_image_folder(tmp_path / "images", train=1, test=1)
    (pack / "cifar10-jpeg").mkdir()
    for split in ("train", "test"):
        with tarfile.open(pack / "cifar10-jpeg" / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(images / split, arcname=split)
    venv, data = tmp_path / "venv", tmp_path / "data"
    script = (
        f"set -euo pipefail; source {REPO}/bench/device_env.sh; "
        '"$PY" -c "import featcache, packed_probe, torch, h5py; '
        'print(featcache.__file__, packed_probe.VALUE)"; echo "$PY $DATA"'
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "PY"},
        "DEVICE_VENV": "1",
        "BASE_PYTHON": sys.executable,
        "DEVICE_VENV_DIR": str(venv),
        "PACK": str(pack),
        "DATA": str(data),
    }
    r = subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    module, value, py, where = r.stdout.split()
    assert module.startswith(str(venv)) and value == "42"  # installed into the environment
    assert py == str(venv / "bin" / "python") and where == str(data)
    assert sorted(p.name for p in (data / "train").iterdir()) == ["cat", "dog", "frog"]
