"""The Python API: the README's notebook example, results equal to the CLI's JSON, a light
import."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder, tiny_extract_args

import featcache
from featcache.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_featcache_does_not_import_torch():
    code = (
        "import featcache, sys; assert 'torch' not in sys.modules; "
        "featcache.Store, featcache.probe, featcache.ProbeResult; "  # the API itself is light too
        "assert 'torch' not in sys.modules, 'torch'; print(featcache.__all__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "probe" in out.stdout and "Store" in out.stdout


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch):
    """The example as written, on a small image folder in place of the CIFAR-10 folder (the
    real efficientnet-lite0 weights, fewer images)."""
    block = re.search(r"<!-- notebook -->\n```python\n(.*?)```", README.read_text(), re.S)
    code = block.group(1)
    folder = make_image_folder(tmp_path / "images", train=24, test=8)
    for old, new in (
        ("imagefolder:data/cifar10-jpeg", f"imagefolder:{folder}"),
        ("train_per_class=100", "train_per_class=24"),
        ("test_per_class=50", "test_per_class=8"),
    ):
        assert old in code, old  # the test follows the README, or fails
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["probe"].top1 == 100.0  # the folder's classes differ in colour
    assert scope["probe"].top1_ci95 == (100.0, 100.0)  # every resample of all-right is right
    assert scope["x"].shape == (72, 1280) and scope["x"].dtype == np.float32
    assert scope["ret"].map > 90 and set(scope["ret"].recall) == {1, 5, 10}
    assert (tmp_path / "lite0.h5").is_file()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    folder = make_image_folder(tmp / "images", train=12, test=6)
    out = tmp / "tiny.h5"
    r = CliRunner().invoke(main, tiny_extract_args(folder, out), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize(
    "command, call",
    [
        (["probe", "--max-epochs", "5"], lambda s: featcache.probe(s, max_epochs=5)),
        (["probe", "--epochs", "5"], lambda s: featcache.probe(s, max_epochs=5)),  # an alias
        (["knn", "--k", "1,5"], lambda s: featcache.knn(s, k=(1, 5))),
        (["cluster", "--seed", "3"], lambda s: featcache.cluster(s, seed=3)),
        (["retrieval", "--recall-at", "1,5"], lambda s: featcache.retrieval(s, recall_at=(1, 5))),
        (
            ["probe", "--shots", "1,2", "--repeats", "2", "--max-epochs", "5"],
            lambda s: featcache.shots(s, shots=(1, 2), repeats=2, probe={"max_epochs": 5}),
        ),
        (
            ["probe", "--features", "maxpool", "--max-epochs", "5"],
            lambda s: featcache.probe(s, features="maxpool", max_epochs=5),
        ),
    ],
)
def test_api_results_equal_the_cli_json(store, tmp_path, command, call):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, [command[0], "--store", str(store), *command[1:], "--json",
                                  str(out)], catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    cli = json.loads(out.read_text())
    api = call(str(store)).to_dict()
    cli.pop("seconds"), api.pop("seconds")
    assert api == cli


def test_in_memory_features_give_the_store_numbers(store):
    s = featcache.Store(store)
    x, y, ids = s.features("train")
    xt, yt, _ = s.features("test")
    assert len(ids) == len(y) == len(x) == 36 and ids[0] == "cat/0000.png"
    from_store = featcache.probe(s, max_epochs=5)
    from_arrays = featcache.probe(train=(x, y), test=(xt, yt), max_epochs=5)
    assert from_arrays.to_dict()["test"] == from_store.to_dict()["test"]
    assert featcache.knn(train=(x, y), test=(xt, yt), k=(5,)).top1_at == {5: 100.0}
    assert featcache.retrieval(train=(x, y), test=(xt, yt)).map == featcache.retrieval(s).map
    assert featcache.cluster(test=(xt, yt)).nmi == featcache.cluster(s).nmi
    shots = dict(shots=(2,), repeats=1, probe={"max_epochs": 5})
    assert (
        featcache.shots(train=(x, y), test=(xt, yt), **shots).probe_top1
        == featcache.shots(s, **shots).probe_top1
    )


def test_the_store_record(store):
    s = featcache.Store(store)
    assert s.feature_sets == ["pooled", "maxpool"] and s.class_names == ["cat", "dog", "frog"]
    record = s.features("test", "maxpool", torch=True)
    assert record._x is None  # nothing read until x is used
    x, y, ids = record
    assert tuple(x.shape) == (18, s.fields["backbone"]["features"]["maxpool"])
    assert type(x).__module__ == "torch"
    assert s.info()["sizes"] == {"train": 36, "test": 18}
    assert s.info()["fingerprint"] == s.fingerprint


def test_bad_calls_say_what_is_wrong(store):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epochs'\]; ProbeConfig takes"):
        featcache.probe(store, epochs=5)
    with pytest.raises(TypeError, match="give a store, or train=.* and test="):
        featcache.knn()
    x, y, _ = featcache.Store(store).features("train")
    with pytest.raises(TypeError, match="not both"):
        featcache.probe(store, train=(x, y))
    with pytest.raises(TypeError, match="features= names a store's feature set"):
        featcache.knn(train=(x, y), test=(x, y), features="pooled")
