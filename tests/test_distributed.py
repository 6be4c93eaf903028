"""torchrun: two CPU processes (gloo) make the same store as one process."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from featcache.store import Store

TINYCLI = Path(__file__).parent / "tinycli.py"


def _extract_args(folder, out):
    return [
        "extract",
        "--backbone",
        "test-tiny",
        "--dataset",
        f"imagefolder:{folder}",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--shard-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
    ]


def test_torchrun_two_cpu_ranks_equal_one_process(image_folder, tmp_path):
    one = tmp_path / "one.h5"
    r = subprocess.run(
        [sys.executable, str(TINYCLI), *_extract_args(image_folder, one)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two.h5"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TINYCLI),
            *_extract_args(image_folder, two),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # each rank extracted its own shards: every other one of 9 train and 3 test shards of 4
    counts = sorted(int(n) for n in re.findall(r"extracted (\d+) images", r.stdout))
    assert counts == [20, 28], r.stdout
    a, b = Store(one), Store(two)
    assert a.fingerprint == b.fingerprint
    for split in ("train", "test"):
        x, y = a.load(split, "pooled"), b.load(split, "pooled")
        assert x.ids == y.ids
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.features, y.features)
