"""torchrun: two CPU processes (gloo) make the same store as one process."""

import re
import subprocess
import sys

from conftest import TINYCLI, assert_equal_stores, tiny_extract_args


def _extract_args(folder, out):
    return tiny_extract_args(folder, out, "--batch-size", 4, "--shard-size", 4)


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
    assert_equal_stores(one, two)
