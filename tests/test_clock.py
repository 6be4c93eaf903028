"""The extraction's clock: every phase from the process's start, adding up to the total."""

import json
import subprocess
import time

from conftest import tiny_extract

from featcache.extraction.clock import PHASES, PhaseClock, process_age
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import ShardedWriter, Store


def test_the_clock_starts_with_the_process():
    age = process_age()
    assert age is not None and 0 < age < 24 * 3600
    clock = PhaseClock.since_process_start()
    assert clock.phases["startup"] > 0.1  # this interpreter imported pytest and torch


def test_phases_are_consecutive_and_add_up():
    clock = PhaseClock(startup=1.0)
    time.sleep(0.02)
    clock.mark("dataset")
    time.sleep(0.03)
    clock.mark("run")
    d = clock.to_dict()
    assert list(d) == ["startup", "dataset", "run", "total"]
    assert d["dataset"] >= 0.02 and d["run"] >= 0.03
    assert abs(sum(v for k, v in d.items() if k != "total") - d["total"]) < 1e-3


def test_extract_records_and_writes_the_phase_table(image_folder, tmp_path):
    """The CLI's table covers the process: its phases add up to the total, which is the
    process's wall time as seen from outside up to the moment its JSON was written.

    The outside view ends at the file's write, not at the process's exit: printing, closing
    and the interpreter's exit come after the last mark and take seconds on a loaded machine
    (CI saw 1 s more than the total with two test workers)."""
    out, result = tmp_path / "s.h5", tmp_path / "s.json"
    start = time.time()
    r = subprocess.run([*tiny_extract(image_folder, out), "--json", result], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    written = result.stat().st_mtime - start  # the JSON is written just after the last mark
    phases = json.loads(result.read_text())["phases"]
    assert list(phases) == [*PHASES, "total"]
    parts = sum(v for k, v in phases.items() if k != "total")
    assert abs(parts - phases["total"]) <= 0.05 * phases["total"]
    assert phases["startup"] > 0.3  # the interpreter and torch: measured from the process start
    # No more than the outside view (the file time's 10 ms granularity aside), and less by
    # far less than the startup: a clock that began after half the startup fails.
    assert phases["total"] <= written + 0.02
    assert written - phases["total"] < 0.5 * phases["startup"]
    recorded = Store(out).extraction["phases"]  # as of the store's own last write
    assert set(recorded) == {*PHASES, "total"}
    assert recorded["run"] == phases["run"]


def test_the_run_clock_includes_the_last_commit(image_folder, tmp_path, monkeypatch):
    write = ShardedWriter.write_shard

    def slow_last(self, split, index, *args):
        write(self, split, index, *args)
        if (split, index) == ("test", 2):  # the last shard: 12 test images in shards of 5
            time.sleep(1.0)

    monkeypatch.setattr(ShardedWriter, "write_shard", slow_last)
    cfg = ExtractConfig(
        backbone="test-tiny", dataset=f"imagefolder:{image_folder}", out=str(tmp_path / "s.h5"),
        workers=0, shard_size=5, progress=False,
    )  # fmt: skip
    result = extract(cfg)
    assert result.seconds >= 1.0 and abs(result.seconds - result.phases["run"]) < 1e-3
    assert "startup" not in result.phases  # an API call's clock starts with the call
