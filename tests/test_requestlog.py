"""The request log under a full or unwritable requests/ folder: back off, log once per interval, lose nothing."""
from __future__ import annotations

import errno
import logging
import shutil

import pandas as pd
import pyarrow.parquet as pq

from serving.web.app import create_app
from serving.requestlog import FIRST_BACKOFF_S, RequestLog
from serving.store import Store

from test_api import SERVING, _precomputed_item


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FullDisk:
    """pq.write_table that fails with ENOSPC (after writing half a file) until ``healed``."""

    def __init__(self):
        self.healed, self.attempts = False, []
        self.clock: Clock | None = None

    def __call__(self, table, where, **kwargs):
        self.attempts.append(self.clock() if self.clock else None)
        if not self.healed:
            with open(where, "wb") as fh:
                fh.write(b"PAR1 half a segment")
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        pq.write_table(table, where, **kwargs)


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "serving.requestlog" and r.levelno >= logging.ERROR]


def _segments(store: Store) -> pd.DataFrame:
    files = sorted(store.requests_dir.glob("seg-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame()


def test_full_disk_backs_off_logs_once_per_interval_and_loses_no_row(tmp_path, caplog):
    store = Store(tmp_path / "store")
    mono, writer, interval = Clock(), FullDisk(), 4.0
    writer.clock = mono
    log = RequestLog(store, flush_rows=1, flush_interval_s=interval, max_buffer=10_000, clock=lambda: 1.7e9,
                     write_table=writer, monotonic=mono)
    n = 0
    with caplog.at_level(logging.WARNING, logger="serving.requestlog"):
        for step in range(97):  # 12 s in steps of 1/8 s, ten requests per step, each of them wanting a flush
            mono.t = 1000.0 + step * 0.125
            for _ in range(10):
                log.append("similar_items", n, None, n, "precomputed", 200, 10)
                n += 1
        # one attempt per backoff step, the step doubling from FIRST_BACKOFF_S up to the interval,
        # instead of one attempt per request
        want, t, gap = [], 1000.0, FIRST_BACKOFF_S
        while t <= mono.t + 1e-9:
            want.append(t)
            t, gap = t + gap, min(gap * 2, interval)
        assert writer.attempts == want
        assert log.failed_flushes == len(want) and len(log) == n == 970
        # the first failure, then at most one line per interval
        errors = _errors(caplog)
        assert 2 <= len(errors) <= 1 + 12 / interval
        assert "No space left on device" in errors[0].getMessage()
        assert not list(store.requests_dir.glob(".*.tmp"))  # half-written segments removed
        # the disk has room again: the next automatic flush writes every row kept, in order
        writer.healed = True
        mono.t += interval
        log.append("similar_items", n, None, n, "precomputed", 200, 10)
        n += 1
    assert len(log) == 0 and log.flushed_rows == n
    assert list(_segments(store)["k"]) == list(range(n))
    assert any("writable again" in r.getMessage() for r in caplog.records)
    assert len(_errors(caplog)) == len(errors)


def test_rows_kept_while_failing_are_bounded_and_the_newest_survive(tmp_path):
    store = Store(tmp_path / "store")
    mono, writer = Clock(), FullDisk()
    drops = []
    log = RequestLog(store, flush_rows=1, flush_interval_s=1.0, max_buffer=50, write_table=writer, monotonic=mono)
    log.on_drop = drops.append
    for i in range(120):
        mono.t += 0.1
        log.append("user_recs", None, i, i, "live", 200, 10)
    assert len(log) == 50 and log.dropped_rows == 70 and sum(drops) == 70
    writer.healed = True
    assert log.flush() == 50
    assert list(_segments(store)["k"]) == list(range(70, 120))


def test_api_keeps_answering_while_requests_folder_is_unwritable(workspace, caplog):
    """A file where the folder should be (root ignores chmod): every request answers, one attempt is made."""
    root, settings, _, first = workspace
    settings = settings.replace(**{f"serving__{k}": v for k, v in {**SERVING, "log_flush_rows": 1}.items()})
    store = Store(settings["paths.store"])
    app = create_app(settings, background=False)
    services = app.extensions["hybridserve"]
    mono = Clock()
    services.requestlog.monotonic = mono
    client = app.test_client()
    shutil.rmtree(store.requests_dir)
    store.requests_dir.write_text("not a folder")
    item = _precomputed_item(store, first.snapshot_id)
    try:
        with caplog.at_level(logging.WARNING, logger="serving.requestlog"):
            codes = [client.get(f"/v1/items/{item}/similar?k=3").status_code for _ in range(200)]
            codes += [client.get("/v1/items/999999999/similar?k=3").status_code]
        assert codes == [200] * 200 + [404]
        assert services.requestlog.failed_flushes == 1 and len(services.requestlog) == 201
        assert len(_errors(caplog)) == 1
        assert "hybridserve_requestlog_flush_failures_total 1.0" in client.get("/metrics").text
        # writable again: after the backoff the next request's flush writes all of them
        store.requests_dir.unlink()
        store.requests_dir.mkdir()
        mono.t += FIRST_BACKOFF_S
        assert client.get(f"/v1/items/{item}/similar?k=3").status_code == 200
        log = _segments(store)
        assert len(log) == 202 and len(services.requestlog) == 0
        assert list(log["status"]) == [200] * 200 + [404, 200]
    finally:
        services.close()
