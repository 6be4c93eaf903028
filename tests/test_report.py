"""The comparison report: built from tiny stores, then opened in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from featcache.extract import ExtractConfig, extract
from featcache.report import ReportConfig, build_report, result_path


@pytest.fixture
def stores(image_folder, tmp_path):
    out = []
    for name, views in (("plain", 1), ("views", 3)):
        cfg = ExtractConfig(
            backbone="test-tiny",
            dataset=f"imagefolder:{image_folder}",
            out=str(tmp_path / f"{name}.h5"),
            workers=0,
            views=views,
            progress=False,
        )
        out.append(extract(cfg).path)
    return out


@pytest.fixture
def report(stores, tmp_path):
    cfg = ReportConfig(
        stores=tuple(map(str, stores)),
        out=str(tmp_path / "report.html"),
        ks=(1, 5),
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
    # results are saved beside each store, the views store with its ablation
    assert result_path(stores[1], "probe-noviews").is_file()
    assert not result_path(stores[0], "probe-noviews").exists()
    for kind in ("probe", "knn", "cluster", "shots"):
        assert json.loads(result_path(stores[0], kind).read_text())["kind"] == kind


def _report(stores, out, **kw):
    base = dict(ks=(1,), shots=(1,), repeats=1, tsne_points=6)
    return build_report(
        ReportConfig(stores=tuple(map(str, stores)), out=str(out), **{**base, **kw})
    )


def test_attention_maps_are_made_in_stage_1_and_only_read_by_the_report(image_folder, tmp_path):
    from click.testing import CliRunner

    from featcache.attention import attention_path
    from featcache.cli import main

    cfg = ExtractConfig(
        backbone="random-vits16",
        dataset=f"imagefolder:{image_folder}",
        out=str(tmp_path / "vit.h5"),
        train_per_class=4,
        test_per_class=2,
        workers=0,
        progress=False,
    )
    store = extract(cfg).path
    page = _report([store], tmp_path / "r.html").read_text()
    assert 'alt="attention vit"' not in page
    assert f"no attention maps yet: run `featcache attention --store {store}`" in page
    r = CliRunner().invoke(main, ["attention", "--store", str(store), "--max-images", "2"])
    assert r.exit_code == 0, r.output
    assert "attention maps of 2 test images x 6 heads" in r.output
    assert attention_path(store).is_file()
    assert 'alt="attention vit"' in _report([store], tmp_path / "r.html").read_text()
    # The store is made again with another spec: its old maps are not shown as its own.
    extract(replace(cfg, test_per_class=3, overwrite=True))
    page = _report([store], tmp_path / "r.html").read_text()
    assert "vit.attention.npz belongs to another version of the store" in page


def test_cached_results_are_reused_only_when_their_config_covers_the_report(stores, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    store = stores[0]
    runner = CliRunner()
    for kind, option in (("knn", ["--k", "5"]), ("probe", ["--epochs", "2"])):
        args = [kind, "--store", str(store), *option, "--json", str(result_path(store, kind))]
        assert runner.invoke(main, args).exit_code == 0
    page = _report([store], tmp_path / "r.html", ks=(1, 5)).read_text()
    knn = json.loads(result_path(store, "knn").read_text())
    assert [r["k"] for r in knn["results"]] == [1, 5]  # recomputed with every k shown
    probe = json.loads(result_path(store, "probe").read_text())
    assert probe["config"]["max_epochs"] == 100  # the report's protocol, not the 2-epoch run
    head = re.findall(r"<th>([^<]*)</th>", page)
    cells = dict(zip(head, re.findall(r"<td>([^<]*)</td>", page)))
    assert float(cells["k-NN k=1"]) >= 0 and float(cells["k-NN k=5"]) >= 0  # no gaps
    mtime = result_path(store, "knn").stat().st_mtime_ns
    _report([store], tmp_path / "r.html", ks=(5,))  # covered by the saved k=1,5: reused
    assert result_path(store, "knn").stat().st_mtime_ns == mtime
    assert not list(store.parent.glob(".*.tmp"))  # written whole, then renamed


def test_stage_2_never_imports_a_model_a_dataset_or_the_extraction(stores, tmp_path):
    """Every stage-2 command run in a fresh interpreter, then its imported modules listed."""
    code = f"""
import json, sys
import featcache.baselines, featcache.cluster, featcache.knn, featcache.metrics
import featcache.probe, featcache.report, featcache.shots, featcache.store
from featcache.report import ReportConfig, build_report
build_report(ReportConfig(stores={tuple(map(str, stores))!r}, out={str(tmp_path / "r.html")!r},
                          ks=(1,), shots=(1,), repeats=1, tsne_points=6))
names = ("featcache", "transformers", "timm", "torchvision")
print(json.dumps(sorted(m for m in sys.modules if m.startswith(names))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    assert "featcache.report" in loaded and "featcache.probe" in loaded
    forbidden = {
        "featcache.backbones",
        "featcache.datasets",
        "featcache.extract",
        "featcache.preprocess",
        "featcache.simclr",
        "transformers",
        "timm",
        "torchvision",
    }
    assert not loaded & forbidden, loaded & forbidden


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
