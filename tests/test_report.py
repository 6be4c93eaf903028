"""The comparison report: built from tiny stores, then opened in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess

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


def test_attention_maps_appear_for_vit_stores(image_folder, tmp_path):
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
    out = build_report(
        ReportConfig(
            stores=(str(store),),
            out=str(tmp_path / "r.html"),
            ks=(1,),
            shots=(1,),
            repeats=1,
            tsne_points=6,
            attention_images=2,
        )
    )
    assert 'alt="attention vit"' in out.read_text()


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
    assert check == {"images": check["images"], "broken": 0, "rows": 2}
    assert check["images"] >= 6
