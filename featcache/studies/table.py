"""One results table across stores: a row per store (and feature set), as the field reports.

A row gathers what was computed from one store: probe top-1 with its 95% bootstrap interval
and mean per-class accuracy, k-NN top-1 at k=20, retrieval mAP, k-means NMI, few-shot top-1
and the extraction's speed. ``featcache table`` reads the results saved beside each store
(``S.probe.json``, ``S.knn.json``, ...) or given as JSON files; the HTML report renders the
same rows. A result that is missing is an empty cell.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
from pathlib import Path

from featcache.errors import ArgumentError, StoreError
from featcache.evaluation.knn import HEADLINE_K
from featcache.evaluation.methods import METHODS
from featcache.store import Store, result_path

log = logging.getLogger(__name__)

# Result kinds, as saved beside a store (S.<kind>.json): every method of the table, and
# probe-noviews, the probe without the store's augmented views (the report makes it for
# stores that have views).
# Results of one store's feature set (similarity compares sets: its results are matrices).
RESULT_KINDS = (*(m for m in METHODS if not METHODS[m].compares), "probe-noviews")
KNN_K = HEADLINE_K


def row(store: Store | None, results: dict[str, dict]) -> dict:
    """The table's row for one store from its results (kind -> result JSON); any may lack."""
    first = next(iter(results.values()), {})
    probe, knn = results.get("probe"), results.get("knn")
    retrieval, cluster, shots = (results.get(k) for k in ("retrieval", "cluster", "shots"))
    out = {
        "store": str(store.path) if store else first.get("store"),
        "backbone": store.fields["backbone"]["name"] if store else first.get("backbone"),
        "features": first.get("features"),
        "dataset": store.config.get("dataset") if store else None,
        "subset": _subset(store) if store else None,
        "probe_top1": probe["test"]["top1"] if probe else None,
        "probe_protocol": probe.get("protocol", "sgd") if probe else None,
        "probe_ci95": (probe["test"].get("top1_ci95") if probe else None),
        "mean_per_class": probe["test"].get("mean_per_class") if probe else None,
        "retrieval_map": retrieval["train_gallery"]["map"] if retrieval else None,
        "kmeans_nmi": cluster["nmi"] if cluster else None,
        "zeroshot_top1": results["zeroshot"]["test"]["top1"] if results.get("zeroshot") else None,
        "images_per_second": store.extraction.get("images_per_second") if store else None,
    }  # fmt: skip
    if results.get("probe-noviews"):
        out["probe_noviews_top1"] = results["probe-noviews"]["test"]["top1"]
    for r in (knn or {}).get("results", []):
        out[f"knn_top1_k{r['k']}"] = r["top1"]
    for r in (shots or {}).get("results", []):
        if r["kind"] == "shots":
            out[f"shots_{r['labels_per_class']}_top1"] = r["probe_top1_mean"]
    return out


def _subset(store: Store) -> str:
    sub = store.fields.get("subset", {})
    train, test = sub.get("train_per_class"), sub.get("test_per_class")
    if train is None and test is None:
        return "all"
    return f"{train or 'all'} / {test or 'all'} per class"


def _key(fingerprint, result: dict) -> tuple:
    """The row a result belongs to: its store version and feature set, and for a probe of
    another protocol than the default (logreg) a row of its own."""
    protocol = result.get("protocol") if result.get("protocol") not in (None, "sgd") else None
    return (fingerprint, result.get("features"), protocol)


def collect(paths: list[str | Path]) -> list[dict]:
    """Rows from stores (their results beside them) and result JSON files, best probe first.

    Results group by the store version they were computed from (its fingerprint) and the
    feature set; a result's store is opened for the row's dataset and speed only when it is
    that version."""
    groups: dict[tuple, dict] = {}  # (fingerprint, features, protocol) -> kind -> result
    stores: dict[str, Store] = {}  # fingerprint -> the store, where known
    opened: dict[str, Store | None] = {}  # a result's store path -> the store, opened once
    for p in map(Path, paths):
        if p.suffix == ".json":
            # A result, or a list of them (--features all: one per feature set, one row each).
            found = read_result(p)
            noviews = p.name.endswith(".probe-noviews.json")
            for result in found if isinstance(found, list) else [found]:
                if not isinstance(result, dict) or result.get("kind") not in RESULT_KINDS:
                    raise StoreError(f"{p} is not a featcache result (probe, knn, retrieval, ...)")
                kind = "probe-noviews" if noviews else result["kind"]
                groups.setdefault(_key(result.get("fingerprint"), result), {})[kind] = result
                where = result.get("store")
                if where not in opened:
                    opened[where] = _open(where)
                store = opened[where]
                if store is not None and store.fingerprint == result.get("fingerprint"):
                    stores.setdefault(store.fingerprint, store)
            continue
        store = Store(p)
        stores[store.fingerprint] = store
        found = False
        for kind in RESULT_KINDS:
            kept = read_result(result_path(store.path, kind))
            for result in kept if isinstance(kept, list) else [kept] if kept else []:
                if result.get("fingerprint") != store.fingerprint:
                    log.warning("%s: computed from another version of the store; left out", kind)
                    continue
                groups.setdefault(_key(store.fingerprint, result), {})[kind] = result
                found = True
        if not found:  # a store without results is still a row
            groups.setdefault((store.fingerprint, None, None), {})
    rows = [row(stores.get(fp), results) for (fp, _, _), results in groups.items()]
    return sorted(rows, key=_probe_order)


def _probe_order(r: dict) -> float:
    """Best probe top-1 first; rows without one (or with NaN) last."""
    top1 = r.get("probe_top1")
    return -top1 if isinstance(top1, float) and math.isfinite(top1) else math.inf


def read_result(path: Path) -> dict | list | None:
    """A result file's JSON (a result or a list of them); None where it is missing or not
    valid JSON (logged)."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; left out", path)
        return None
    return result if isinstance(result, (dict, list)) else None


def _open(path: str | None) -> Store | None:
    try:
        return Store(path) if path else None
    except (StoreError, OSError):  # a result's store that moved: the row shows the result
        return None


# ---------------------------------------------------------------------------------------------
# Rendering


def columns(rows: list[dict], knn_ks: tuple[int, ...] = (KNN_K,)) -> list[str]:
    """The fixed columns (k-NN at ``knn_ks``), then a few-shot column per budget that any
    row has."""
    fixed = [
        "backbone", "features", "dataset", "subset", "probe_top1", "probe_ci95",
        "mean_per_class", *(f"knn_top1_k{k}" for k in knn_ks), "retrieval_map", "kmeans_nmi",
    ]  # fmt: skip
    shots = sorted(
        {k for r in rows for k in r if k.startswith("shots_")},
        key=lambda k: int(k.split("_")[1]),
    )
    noviews = ["probe_noviews_top1"] if any("probe_noviews_top1" in r for r in rows) else []
    # Which probe protocol, where any row's is not the default (sgd).
    protocol = ["probe_protocol"] if any(r.get("probe_protocol") == "logreg" for r in rows) else []
    zeroshot = ["zeroshot_top1"] if any(r.get("zeroshot_top1") is not None for r in rows) else []
    return fixed + protocol + noviews + zeroshot + shots + ["images_per_second", "store"]


HEADERS = {
    "probe_top1": "probe top-1",
    "probe_ci95": "95% CI",
    "probe_noviews_top1": "probe top-1 without views",
    "probe_protocol": "probe protocol",
    "zeroshot_top1": "zero-shot top-1",
    "mean_per_class": "mean per-class",
    "retrieval_map": "retrieval mAP",
    "kmeans_nmi": "k-means NMI",
    "images_per_second": "extraction img/s",
}


def _header(column: str) -> str:
    if column.startswith("shots_"):
        return f"{column.split('_')[1]}-shot top-1"
    if column.startswith("knn_top1_k"):
        return f"k-NN top-1 (k={column.removeprefix('knn_top1_k')})"
    return HEADERS.get(column, column)


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if column == "probe_ci95":
        return f"{value[0]:.2f}-{value[1]:.2f}"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "images_per_second" else f"{value:.2f}"
    return str(value)


def render(rows: list[dict], fmt: str, knn_ks: tuple[int, ...] = (KNN_K,)) -> str:
    """The table as Markdown, CSV (raw numbers), JSON or an HTML table."""
    cols = columns(rows, knn_ks)
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in cols} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        flat = [c for c in cols if c != "probe_ci95"]
        at = flat.index("probe_top1") + 1
        flat[at:at] = ["probe_ci95_low", "probe_ci95_high"]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(flat)
        for r in rows:
            ci = r.get("probe_ci95") or (None, None)
            values = {**r, "probe_ci95_low": ci[0], "probe_ci95_high": ci[1]}
            writer.writerow(["" if values.get(c) is None else values.get(c) for c in flat])
        return buf.getvalue()
    cells = [[_cell(r.get(c), c) for c in cols] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(_header(c) for c in cols) + " |"]
        lines.append("| " + " | ".join("---" for _ in cols) + " |")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cs) + " |" for cs in cells]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        head = "".join(f"<th>{html.escape(_header(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cs) + "</tr>" for cs in cells
        )
        return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    raise ArgumentError(f"unknown table format {fmt!r}: md, csv, json or html")
