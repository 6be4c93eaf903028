"""The comparison report: built from tiny stores, then opened in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import make_image_folder, tiny_config

from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import Store
from featcache.studies.report import ReportConfig, build_report, result_path


@pytest.fixture
def stores(image_folder, tmp_path):
    out = []
    for name, views in (("plain", 1), ("views", 3)):
        out.append(extract(tiny_config(image_folder, tmp_path / f"{name}.h5", views=views)).path)
    return out


@pytest.fixture
def report(stores, tmp_path):
    cfg = ReportConfig(
        stores=tuple(map(str, stores)),
        out=str(tmp_path / "report.html"),
        k=(1, 5),
        shots=(1, 4),
        repeats=2,
        tsne_points=30,
    )
    return build_report(cfg), stores


def test_report_is_self_contained_and_caches_results(report):
    path, stores = report
    page = path.read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    images = re.findall(r'<img alt="([^"]+)"[^>]* src="data:image/png;base64,', page)
    expected = {"probe curves", "knn against k", "label efficiency", "per-class accuracy"}
    assert expected <= set(images)
    assert sum(a.startswith("t-SNE") for a in images) == 2
    assert page.count("<tr><td>") == 2
    assert "<th>probe top-1 without views</th>" in page  # the views store's ablation, shown
    # results are saved beside each store, the views store with its ablation
    assert result_path(stores[1], "probe-noviews").is_file()
    assert not result_path(stores[0], "probe-noviews").exists()
    for kind in ("probe", "knn", "cluster", "shots"):
        assert json.loads(result_path(stores[0], kind).read_text())["kind"] == kind


def _report(stores, out, **kw):
    base = dict(k=(1,), shots=(1,), repeats=1, tsne_points=6)
    return build_report(
        ReportConfig(stores=tuple(map(str, stores)), out=str(out), **{**base, **kw})
    )


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A ViT store (random-vits16 on a few images) with its attention maps beside it."""
    from click.testing import CliRunner

    from featcache.cli import main

    root = tmp_path_factory.mktemp("vit")
    cfg = ExtractConfig(
        backbone="random-vits16",
        dataset=f"imagefolder:{make_image_folder(root / 'images')}",
        out=str(root / "vit.h5"),
        train_per_class=4,
        test_per_class=2,
        workers=0,
        progress=False,
        layers="0,11",  # the report's accuracy by depth
    )
    store = extract(cfg).path
    assert "no attention maps yet: run `featcache attention --store" in _page([store], root)
    r = CliRunner().invoke(main, ["attention", "--store", str(store), "--max-images", "2"])
    assert r.exit_code == 0, r.output
    assert "attention maps of 2 test images x 6 heads" in r.output
    return cfg, store


def _page(stores, tmp_path, **kw) -> str:
    return _report(stores, tmp_path / "r.html", **kw).read_text()


def test_attention_maps_are_made_in_stage_1_and_only_read_by_the_report(vit, tmp_path):
    from featcache.studies.report import attention_path

    cfg, made = vit
    store = shutil.copy(made, tmp_path / "vit.h5")
    shutil.copy(attention_path(made), attention_path(store))
    page = _page([store], tmp_path)
    assert 'alt="attention vit"' in page
    # Accuracy by depth: k-NN of each inner layer, kept beside the store as one list.
    assert 'alt="accuracy by depth"' in page
    layers = json.loads(result_path(store, "knn-layers").read_text())
    assert [r["features"] for r in layers] == [
        "layer.0.cls", "layer.0.patch_mean", "layer.11.cls", "layer.11.patch_mean"
    ]  # fmt: skip
    assert all(r["fingerprint"] == Store(store).fingerprint for r in layers)
    good = attention_path(store).read_bytes()
    attention_path(store).write_bytes(b"not a zip")  # a damaged file does not sink the report
    assert "vit.attention.npz is unreadable" in _page([store], tmp_path)
    attention_path(store).write_bytes(good)
    # The store is made again with another spec: its old maps are not shown as its own.
    extract(replace(cfg, out=str(store), test_per_class=3, overwrite=True))
    assert "vit.attention.npz belongs to another version of the store" in _page([store], tmp_path)


def test_attention_of_a_store_recorded_before_its_registry_entry_was(vit, tmp_path):
    """Stores from before featcache recorded backbone_spec: stage 1 asks the registry."""
    import h5py
    from click.testing import CliRunner

    from featcache.cli import main

    _, made = vit
    store = shutil.copy(made, tmp_path / "old.h5")
    with h5py.File(store, "r+") as f:
        del f.attrs["backbone_spec"]
    r = CliRunner().invoke(main, ["attention", "--store", str(store), "--max-images", "1"])
    assert r.exit_code == 0, r.output
    assert 'alt="attention old"' in _page([store], tmp_path)


def test_attention_refuses_maps_from_weights_the_store_was_not_made_with(
    vit, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from featcache.cli import main
    from featcache.extraction import attention

    monkeypatch.setattr(attention, "weights_identity", lambda spec, weights: "local:other")
    r = CliRunner().invoke(main, ["attention", "--store", str(vit[1])])
    assert r.exit_code == 1 and "changed since it was made" in r.output


def test_attention_command_line(vit, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    run = CliRunner().invoke
    images = vit[0].dataset.removeprefix("imagefolder:") + "/test"
    assert run(main, ["attention"]).exit_code == 2  # neither --store nor --images
    r = run(main, ["attention", "--store", str(vit[1]), "--backbone", "dino-vits16"])
    assert r.exit_code == 2 and "own backbone" in r.output
    assert run(main, ["attention", "--images", images]).exit_code == 2  # no --backbone/--out
    assert run(main, ["attention", "--store", str(vit[1]), "--max-images", "0"]).exit_code == 1
    out = tmp_path / "a.png"
    args = ["attention", "--backbone", "random-vits16", "--images", images, "--out", str(out)]
    r = run(main, [*args, "--max-images", "2"])
    assert r.exit_code == 0, r.output
    assert "attention maps of 2 images x 6 heads" in r.output and out.stat().st_size > 1000


def test_cached_results_are_reused_only_when_their_config_covers_the_report(stores, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    store = stores[0]
    runner = CliRunner()
    for kind, command, option in (
        ("knn", "knn", ["--k", "5"]),
        ("probe", "probe", ["--epochs", "2"]),
        ("shots", "probe", ["--shots", "1", "--repeats", "1", "--seed", "5"]),
    ):
        args = [command, "--store", str(store), *option, "--json", str(result_path(store, kind))]
        assert runner.invoke(main, args).exit_code == 0
    page = _report([store], tmp_path / "r.html", k=(1, 5)).read_text()
    knn = json.loads(result_path(store, "knn").read_text())
    assert [r["k"] for r in knn["results"]] == [1, 5]  # recomputed with every k shown
    probe = json.loads(result_path(store, "probe").read_text())
    assert probe["config"]["max_epochs"] == 100  # the report's protocol, not the 2-epoch run
    shots = json.loads(result_path(store, "shots").read_text())
    assert shots["config"]["seed"] == 0  # its subsets, not those of seed 5
    head = re.findall(r"<th>([^<]*)</th>", page)
    cells = dict(zip(head, re.findall(r"<td>([^<]*)</td>", page)))
    assert float(cells["k-NN top-1 (k=1)"]) >= 0 and float(cells["k-NN top-1 (k=5)"]) >= 0
    kinds = ("probe", "knn", "cluster", "shots", "retrieval")
    mtimes = [result_path(store, k).stat().st_mtime_ns for k in kinds]
    _report([store], tmp_path / "r.html", k=(5,))  # all covered (k=5 by k=1,5): all reused
    assert [result_path(store, k).stat().st_mtime_ns for k in kinds] == mtimes
    assert not list(store.parent.glob(".*.tmp"))  # written whole, then renamed


def test_stage_2_never_imports_a_model_a_dataset_or_the_extraction(stores, vit, tmp_path):
    """A whole report (a ViT store with its attention maps among the stores) and the other
    stage-2 modules in a fresh interpreter, then its imported modules listed."""
    every = (*map(str, stores), str(vit[1]))
    code = f"""
import importlib, json, pkgutil, sys
import featcache.evaluation, featcache.studies, featcache.store
for package in (featcache.evaluation, featcache.studies):  # every stage-2 module, new ones too
    for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(m.name)
from featcache.studies.report import ReportConfig, build_report
page = build_report(ReportConfig(stores={every!r}, out={str(tmp_path / "r.html")!r},
                                 k=(1,), shots=(1,), repeats=1, tsne_points=6)).read_text()
assert 'alt="attention vit"' in page
names = ("featcache", "transformers", "timm", "torchvision")
print(json.dumps(sorted(m for m in sys.modules if m.startswith(names))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    assert "featcache.studies.report" in loaded and "featcache.evaluation.probe" in loaded
    assert "featcache.studies.table" in loaded and "featcache.evaluation.retrieval" in loaded
    stage_1 = ("featcache.extraction", "featcache.backbones", "featcache.datasets",
               "featcache.pretraining", "transformers", "timm", "torchvision")  # fmt: skip
    assert not {m for m in loaded if m.startswith(stage_1)}


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("FEATCACHE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (FEATCACHE_REQUIRE_CHROMIUM) but missing")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    path, _ = report
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    check = json.loads(re.search(r'<div id="selfcheck">(.*?)</div>', dom).group(1))
    page = path.read_text()
    assert check == {"images": page.count("<img "), "broken": 0, "rows": 2}
    assert check["images"] == 6  # curves, k-NN, label efficiency, two t-SNE, per class
