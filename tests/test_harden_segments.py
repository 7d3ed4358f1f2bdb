"""A damaged or planted file in the store's requests/ folder stops no batch run and no SQL query: an
unreadable segment is skipped with one warning naming it (a run moves it to requests/quarantine/ and
counts it in the manifest), a symlink or FIFO is never read; segments reach the disk before their name.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import pyarrow.parquet as pq

from batch.__main__ import main
from batch.catalog import query
from batch.popularity import read_request_counts
from batch.requestlog import log_files
from serving.requestlog import RequestLog
from serving.store import Store, layout

from conftest import REPO


def _log_rows(store: Store, item_ids: list[int], clock: float | None = None) -> str:
    """One real segment (the servers' RequestLog) with a similar_items row per id; returns its name."""
    before = set(store.segments())
    log = RequestLog(store, flush_interval_s=0, clock=(lambda: clock) if clock else time.time)
    for item in item_ids:
        log.append("similar_items", item, None, 10, "live", 200, 100)
    log.flush()
    (new,) = set(store.segments()) - before
    return new.name


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


def test_a_truncated_segment_is_quarantined_counted_and_the_run_goes_on(workspace, capsys, caplog):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _log_rows(store, [1, 2, 3])
    bad = _log_rows(store, [4, 5])
    _truncate(store.requests_dir / bad)
    caplog.set_level(logging.WARNING)
    assert main(["--config", str(cfg), "run"]) == 0
    out = capsys.readouterr().out
    (warning,) = _warnings(caplog, bad)
    assert f"requests/{bad}" in warning and f"requests/quarantine/{bad}.damaged" in warning
    assert not (store.requests_dir / bad).exists()
    assert (store.requests_dir / layout.QUARANTINE / (bad + layout.QUARANTINE_SUFFIX)).is_file()
    manifest = store.read_manifest(store.current_id())
    assert store.current_id() != first.snapshot_id
    assert manifest["request_log"] == {"segments": 1, "damaged": [f"requests/{bad}"]}
    assert f"1 damaged segment skipped (moved to requests/quarantine/): requests/{bad}" in out
    # the quarantined file is no segment any more: SQL over the log reads the good one
    cols, rows, _ = query(store, "SELECT count(*), sum(item_id) FROM requests")
    assert rows == [(3, 6)]
    # the next run finds nothing damaged
    caplog.clear()
    assert main(["--config", str(cfg), "run"]) == 0
    assert not _warnings(caplog, "damaged")
    assert store.read_manifest(store.current_id())["request_log"] == {"segments": 1, "damaged": []}


def test_sql_over_requests_skips_a_damaged_segment_it_may_not_move(workspace, caplog):
    """`batch sql` is read-only: it skips (with the warning) what it cannot read and moves nothing."""
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _log_rows(store, [10, 20])
    bad = _log_rows(store, [30])
    _truncate(store.requests_dir / bad)
    caplog.set_level(logging.WARNING)
    _, rows, _ = query(store, "SELECT count(*), sum(item_id) FROM requests")
    assert rows == [(2, 30)]
    assert len(_warnings(caplog, bad)) == 1
    assert (store.requests_dir / bad).is_file()


def test_a_segment_damaged_inside_its_data_is_found_by_the_run(workspace, caplog):
    """A whole footer over damaged pages passes the footer check; the query's failure finds it."""
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _log_rows(store, [7])
    bad = store.requests_dir / _log_rows(store, list(range(5000)))
    data = bytearray(bad.read_bytes())
    meta = pq.read_metadata(bad)
    col = meta.row_group(0).column(2)  # item_id's pages
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + 8:start + col.total_compressed_size - 8] = os.urandom(col.total_compressed_size - 16)
    bad.write_bytes(bytes(data))
    pq.read_metadata(bad)  # the footer still reads
    caplog.set_level(logging.WARNING)
    counts = read_request_counts(store, datetime.now(timezone.utc), log=log_files(store, quarantine=True))
    assert counts["n"].sum() == 1 and list(counts["item_id"]) == [7]
    assert len(_warnings(caplog, bad.name)) == 1
    assert not bad.exists()


def test_planted_symlink_and_fifo_are_ignored_by_the_job_and_the_view(workspace, tmp_path):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    _log_rows(store, [1])
    outside = tmp_path / "outside"
    outside.mkdir()
    elsewhere = Store(outside)
    elsewhere.requests_dir.mkdir(parents=True)
    planted = elsewhere.requests_dir / _log_rows(elsewhere, [99] * 50)
    os.symlink(planted, store.requests_dir / "seg-planted-link.parquet")
    os.mkfifo(store.requests_dir / "seg-planted-fifo.parquet")
    assert [p.name for p in store.segments()] == [p.name for p in store.segments() if "planted" not in p.name]
    # In processes of their own: a reader that opens the FIFO blocks for ever.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sql = subprocess.run([sys.executable, "-m", "batch", "--config", str(cfg), "sql",
                          "SELECT count(*) AS n, sum(item_id) AS s FROM requests"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert sql.returncode == 0, sql.stderr
    assert "| 1 | 1 |" in sql.stdout.replace("  ", " "), sql.stdout
    job = subprocess.run([sys.executable, "-c", _job_script(cfg)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO)
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout.strip().splitlines()[-1]) == {"n": 1, "items": [1]}
    assert (store.requests_dir / "seg-planted-fifo.parquet").exists()  # ignored, not removed


def _job_script(cfg) -> str:
    """What the batch job reads of the log: the counts its selection starts from."""
    return (
        "import json, datetime\n"
        "from batch.popularity import read_request_counts\n"
        "from batch.requestlog import log_files\n"
        "from serving.settings import load_settings\n"
        "from serving.store import Store\n"
        f"s = load_settings({str(cfg)!r}, env={{}})\n"
        "store = Store(s['paths.store'])\n"
        "c = read_request_counts(store, datetime.datetime.now(datetime.timezone.utc), log=log_files(store, True))\n"
        "print(json.dumps({'n': int(c['n'].sum()), 'items': sorted(int(i) for i in c['item_id'])}))\n")


def test_a_segment_is_fsynced_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    store.ensure_layout()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.fspath(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    name = _log_rows(store, [1, 2])
    seg = str(store.requests_dir / name)
    kinds = [(kind, os.path.basename(path)) for kind, path in events]
    assert kinds == [("fsync", f".{name}.tmp"), ("rename", name), ("fsync", "requests")], events
    assert events[2][1] == str(store.requests_dir.resolve()) and events[1][1] == seg
