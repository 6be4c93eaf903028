"""The device check (bench/device_check.sh): its CPU rehearsal runs in the default suite, so
that the script a GPU session runs never rots between GPU sessions."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

CHECKS = {"registry", "throughput", "torchrun", "evaluation"}


def test_the_cpu_rehearsal_runs_every_check_and_passes(cifar_dir, tmp_path):
    from featcache.backbones import available_backbones, get_spec

    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SMALL": "1",
        "PY": sys.executable,
        "DATA": str(cifar_dir),
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
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
    report = json.loads((tmp_path / "out" / "device-check.json").read_text())
    assert report["pass"] and set(report["checks"]) == CHECKS
    # Every registry entry and each of its feature sets, compared image by image.
    seen = {(row["backbone"], row["feature"]) for row in report["checks"]["registry"]["rows"]}
    expected = {
        (name, feature)
        for name in available_backbones()
        if name != "test-tiny"  # registered by the tests only
        for feature, _ in get_spec(name).features
    }
    assert seen == expected
    assert all(row["images"] == 10 for row in report["checks"]["registry"]["rows"])
    assert report["checks"]["throughput"]["stored"] == 20
    table = (tmp_path / "out" / "device-check.md").read_text()
    assert all(f"| {name} |" in table for name in CHECKS)


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
