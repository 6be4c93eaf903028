"""torchrun: two CPU processes (gloo) make the same store as one process, and the k-NN and
probe that follow in the same processes give the same results as one process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINYCLI, assert_equal_stores, tiny_extract_args

# The probe's sweep of 6 weight decays, 3 on each rank: rank 0's heads (the chosen one, 0,
# among them) stop at epoch 13, rank 1's run on: a retrain that continued a rank's sweep
# generator would start from another state than one process's.
# On one validation split (--cv-below 0): its heads are what the ranks share.
PROBE = ["--epochs", "20", "--patience", "5", "--weight-decays", "0,1e-2,1e-1,1,3,10",
         "--cv-below", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """3,000 x 16 training features of 5 classes: a probe with something to learn."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from synthetic import write_synthetic

    path = tmp_path_factory.mktemp("synthetic") / "s.h5"
    return write_synthetic(path, 3000, 1000, 16, 5, shard_rows=500, separation=0.5)


def _stages(folder, synthetic, out):
    """extract, then k-NN and probe (each in memory and bounded), as one command line."""
    kinds = ("knn", "knnb", "probe", "probeb")  # the b: with --max-memory
    json_of = {kind: out.with_suffix(f".{kind}.json") for kind in kinds}
    stages = [
        tiny_extract_args(folder, out, "--batch-size", 4, "--shard-size", 4),
        ["knn", "--store", synthetic, "--k", "1,5,20", "--json", json_of["knn"]],
        [
            "knn",
            "--store",
            synthetic,
            "--k",
            "1,5,20",
            "--max-memory",
            "16KiB",
            "--json",
            json_of["knnb"],
        ],  # fmt: skip
        ["probe", "--store", synthetic, *PROBE, "--json", json_of["probe"]],
        [
            "probe",
            "--store",
            synthetic,
            *PROBE,
            "--max-memory",
            "40KiB",
            "--json",
            json_of["probeb"],
        ],  # fmt: skip
    ]
    args = [str(a) for stage in stages for a in ("---", *stage)][1:]
    return args, json_of


def _numbers(result: dict, path: str = "") -> dict:
    """A result flattened to {path: value}, without its timing."""
    if isinstance(result, dict):
        items = result.items()
    elif isinstance(result, list):
        items = enumerate(result)
    else:
        return {path: result}
    return {k: v for key, value in items if key != "seconds"
            for k, v in _numbers(value, f"{path}/{key}").items()}  # fmt: skip


def test_torchrun_two_cpu_ranks_equal_one_process(image_folder, synthetic, tmp_path):
    args, one = _stages(image_folder, synthetic, tmp_path / "one.h5")
    r = subprocess.run(
        [sys.executable, str(TINYCLI), *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    args, two = _stages(image_folder, synthetic, tmp_path / "two.h5")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TINYCLI),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # each rank extracted its own shards: every other one of 9 train and 3 test shards of 4
    counts = sorted(int(n) for n in re.findall(r"extracted (\d+) images", r.stdout))
    assert counts == [20, 28], r.stdout
    assert_equal_stores(tmp_path / "one.h5", tmp_path / "two.h5")
    # Rank 0 alone writes and prints each result.
    assert r.stdout.count("k-NN synthetic") == 2 and r.stdout.count("probe synthetic") == 2
    for kind in ("knn", "knnb"):  # the same neighbours: the same numbers
        assert _numbers(json.loads(two[kind].read_text())) == _numbers(
            json.loads(one[kind].read_text())
        )
    for kind in ("probe", "probeb"):
        a, b = (_numbers(json.loads(f[kind].read_text())) for f in (one, two))
        # The chosen weight decay and epochs, and so the retrained head and its test numbers,
        # are one process's exactly; a sweep head's float32 arithmetic may differ in its last
        # bit when it trains beside other heads.
        close = [k for k in a if k.startswith(("/sweep/", "/epochs/", "/selected/val/"))]
        assert {k: v for k, v in b.items() if k not in close} == {
            k: v for k, v in a.items() if k not in close
        }, kind
        assert {k: b[k] for k in close} == pytest.approx({k: a[k] for k in close}, rel=1e-5), kind
    # The case the test is for: the chosen head's rank stops its sweep before the other.
    result = json.loads(one["probe"].read_text())
    stops = [min(20, row["best_epoch"] + 5) for row in result["sweep"]]
    assert result["selected"]["weight_decay"] == 0 and max(stops[:3]) < max(stops[3:])
