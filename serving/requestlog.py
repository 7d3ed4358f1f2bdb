"""Buffered append of served keys to Parquet segments under the store's requests/ folder.

One file per flush per process, written under a temporary name and renamed, never rewritten.
Flushes on size, on interval and on close. Memory is bounded: past ``max_buffer`` rows the
oldest are dropped and counted. A failed flush is logged and counted, never raised to a request.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from serving.store import REQUEST_LOG_SCHEMA, Store

LOG = logging.getLogger(__name__)


class RequestLog:
    def __init__(self, store: Store, flush_rows: int = 10_000, flush_interval_s: float = 10.0,
                 max_buffer: int = 200_000, clock: Callable[[], float] = time.time):
        self.store, self.flush_rows, self.flush_interval_s = store, flush_rows, flush_interval_s
        self.max_buffer, self.clock = max_buffer, clock
        self._rows: list[tuple] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushed_rows = self.failed_flushes = self.dropped_rows = 0
        self.on_flush_failure: Callable[[], None] | None = None
        self.on_drop: Callable[[int], None] | None = None

    def append(self, endpoint: str, item_id: int | None, user_id: int | None, k: int | None, source: str,
               status: int, latency_us: int, model: str | None = None, input: str | None = None) -> None:
        """Record one served request (cheap: a tuple into a list). ``model`` and ``input`` (its
        canonical key) for a model's prediction."""
        row = (self.clock(), endpoint, item_id, user_id, k, source, status, latency_us, model, input)
        with self._lock:
            self._rows.append(row)
            over = len(self._rows) - self.max_buffer
            if over > 0:
                del self._rows[:over]
                self.dropped_rows += over
            full = len(self._rows) >= self.flush_rows
        if over > 0 and self.on_drop:
            self.on_drop(over)
        if full:
            self.flush()

    def flush(self) -> int:
        """Write the buffer as one new segment. Returns rows written (0 on failure or nothing to do)."""
        with self._flush_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            try:
                self._write(rows)
            except Exception as exc:  # never fail a request because the log could not be written
                self.failed_flushes += 1
                LOG.error("request log flush of %d rows failed: %s", len(rows), exc)
                with self._lock:  # keep them for the next try, within the bound
                    self._rows[:0] = rows
                    over = len(self._rows) - self.max_buffer
                    if over > 0:
                        del self._rows[:over]
                        self.dropped_rows += over
                if self.on_flush_failure:
                    self.on_flush_failure()
                return 0
            self.flushed_rows += len(rows)
            return len(rows)

    def _write(self, rows: list[tuple]) -> None:
        cols = list(zip(*rows))
        ts = [datetime.fromtimestamp(t, tz=timezone.utc) for t in cols[0]]
        table = pa.Table.from_arrays([pa.array(ts, REQUEST_LOG_SCHEMA.field("ts").type)]
                                     + [pa.array(c, f.type) for c, f in zip(cols[1:], list(REQUEST_LOG_SCHEMA)[1:])],
                                     schema=REQUEST_LOG_SCHEMA)
        self.store.requests_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"seg-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:6]}"
        tmp = self.store.requests_dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.store.requests_dir / f"{name}.parquet")

    def start(self) -> None:
        """Flush every ``flush_interval_s`` from a daemon thread."""
        if self._thread is not None or self.flush_interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="requestlog-flush", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)
