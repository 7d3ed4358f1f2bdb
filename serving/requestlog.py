"""Buffered append of served keys to Parquet segments under the store's requests/ folder.

One file per flush per process, written under a temporary name and renamed, never rewritten.
Flushes on size, on interval and on close. Memory is bounded: past ``max_buffer`` rows the
oldest are dropped and counted. A failed flush is counted, never raised to a request, and backs
off: an unwritable or full folder costs one attempt per backoff step (doubling up to the flush
interval) and one log line per interval, not a write and an ERROR per request. The rows wait in
the buffer and are written once the folder takes them again.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from serving.store import REQUEST_LOG_SCHEMA, Store, describe_os_error

LOG = logging.getLogger(__name__)


FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0  # the cap when flushing on an interval is switched off (flush_interval_s = 0)


class RequestLog:
    def __init__(self, store: Store, flush_rows: int = 10_000, flush_interval_s: float = 10.0,
                 max_buffer: int = 200_000, clock: Callable[[], float] = time.time,
                 write_table: Callable[..., None] = pq.write_table,
                 monotonic: Callable[[], float] = time.monotonic):
        """``clock`` stamps the rows; ``monotonic`` times the backoff; ``write_table`` writes a
        segment (pyarrow's; tests inject a failing one)."""
        self.store, self.flush_rows, self.flush_interval_s = store, flush_rows, flush_interval_s
        self.clock, self.write_table, self.monotonic = clock, write_table, monotonic
        self.max_backoff_s = flush_interval_s if flush_interval_s > 0 else MAX_BACKOFF_S
        self._backoff_s = 0.0         # 0: healthy
        self._retry_at = 0.0          # monotonic time before which automatic flushes are not tried
        self._failing_since = 0.0
        self._logged_at = 0.0
        self._unlogged_failures = 0
        # A deque bounded at max_buffer drops its oldest row in O(1): deleting a list's first row moved
        # the whole buffer on every request while the log stayed full.
        self._rows: deque[tuple] = deque(maxlen=max_buffer)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushed_rows = self.failed_flushes = self.dropped_rows = 0
        self.last_error: Exception | None = None  # why the last flush failed (named in the final ERROR)
        self._reported_lost = 0
        self.on_flush_failure: Callable[[], None] | None = None
        self.on_drop: Callable[[int], None] | None = None

    def append(self, endpoint: str, item_id: int | None, user_id: int | None, k: int | None, source: str,
               status: int, latency_us: int, model: str | None = None, input: str | None = None) -> None:
        """Record one served request (cheap: a tuple into a bounded deque). ``model`` and ``input``
        (its canonical key) for a model's prediction."""
        row = (self.clock(), endpoint, item_id, user_id, k, source, status, latency_us, model, input)
        with self._lock:
            over = int(len(self._rows) == self._rows.maxlen)  # the deque drops its oldest row itself
            self._rows.append(row)
            self.dropped_rows += over
            full = len(self._rows) >= self.flush_rows
        if over > 0 and self.on_drop:
            self.on_drop(over)
        if full and (not self._backoff_s or self.monotonic() >= self._retry_at):
            self.flush()

    @property
    def max_buffer(self) -> int:
        """Rows kept in memory at most."""
        return self._rows.maxlen

    @max_buffer.setter
    def max_buffer(self, rows: int) -> None:
        with self._lock:
            self._rows = deque(self._rows, maxlen=rows)

    def flush(self) -> int:
        """Write the buffer as one new segment now. Returns rows written (0 on failure or nothing to do)."""
        with self._flush_lock:
            with self._lock:
                rows, self._rows = self._rows, deque(maxlen=self._rows.maxlen)
            if not rows:
                return 0
            try:
                self._write(rows)
            except Exception as exc:  # never fail a request because the log could not be written
                self._failed(rows, exc)
                return 0
            self.flushed_rows += len(rows)
            if self._backoff_s:
                LOG.warning("request log writable again after %.1fs: wrote %d buffered rows to %s",
                            self.monotonic() - self._failing_since, len(rows), self.store.requests_dir)
                self._backoff_s, self._unlogged_failures = 0.0, 0
            return len(rows)

    def _failed(self, rows: deque[tuple], exc: Exception) -> None:
        """Keep the rows (within the bound), count the failure, back off, log at most once per interval."""
        self.failed_flushes += 1
        self.last_error = exc
        with self._lock:
            kept = list(rows) + list(self._rows)
            over = len(kept) - self.max_buffer
            if over > 0:
                del kept[:over]
                self.dropped_rows += over
            self._rows = deque(kept, maxlen=self.max_buffer)
            buffered = len(self._rows)
        now = self.monotonic()
        if not self._backoff_s:
            self._failing_since, self._logged_at, self._unlogged_failures = now, now, 0
            self._backoff_s = min(FIRST_BACKOFF_S, self.max_backoff_s)
            LOG.error("request log flush to %s failed: %s; keeping %d rows in memory (at most %d) and retrying "
                      "with backoff", self.store.requests_dir, exc, buffered, self.max_buffer)
        else:
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
            self._unlogged_failures += 1
            if now - self._logged_at >= self.max_backoff_s:
                LOG.error("request log still failing for %.0fs (%d more failed flushes): %s; %d rows in memory, "
                          "%d dropped so far", now - self._failing_since, self._unlogged_failures, exc, buffered,
                          self.dropped_rows)
                self._logged_at, self._unlogged_failures = now, 0
        self._retry_at = now + self._backoff_s
        if over > 0 and self.on_drop:
            self.on_drop(over)
        if self.on_flush_failure:
            self.on_flush_failure()

    def _write(self, rows: deque[tuple]) -> None:
        cols = list(zip(*rows))
        ts = [datetime.fromtimestamp(t, tz=timezone.utc) for t in cols[0]]
        table = pa.Table.from_arrays([pa.array(ts, REQUEST_LOG_SCHEMA.field("ts").type)]
                                     + [pa.array(c, f.type) for c, f in zip(cols[1:], list(REQUEST_LOG_SCHEMA)[1:])],
                                     schema=REQUEST_LOG_SCHEMA)
        self._seq += 1
        name = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:6]}"
        self.store.append_segment(table, name, self.write_table)

    def start(self) -> None:
        """Flush every ``flush_interval_s`` from a daemon thread."""
        if self._thread is not None or self.flush_interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="requestlog-flush", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            if not self._backoff_s or self.monotonic() >= self._retry_at:
                self.flush()

    def close(self) -> int:
        """Stop the flush thread and write what is buffered. Returns the rows lost over the log's life
        (still unwritten now, or dropped from a full buffer); when any were, one final ERROR says how
        many and why, so a full disk at shutdown never loses answered requests without a word."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()
        unwritten = len(self)
        lost = unwritten + self.dropped_rows
        if lost and lost != self._reported_lost:  # closed twice (at exit too): said once
            self._reported_lost = lost
            why = self.last_error
            reason = (describe_os_error(why) if isinstance(why, OSError) else f"{type(why).__name__}: {why}"
                      if why is not None else "the buffer was full")
            LOG.error("request log: %d rows lost at shutdown (%d not written to %s, %d dropped earlier from "
                      "the full buffer): %s", lost, unwritten, self.store.requests_dir, self.dropped_rows, reason)
        return lost

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)
