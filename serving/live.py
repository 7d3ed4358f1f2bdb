"""The local tier of live results and the threads live results are computed on.

``LiveTier``: a per-process cache with a time to live per entry, and one computation per key however
many identical requests arrive while it runs (single flight: they share its Future).
``Runner``: a model's own threads (concurrent.futures) with a bounded queue, so a slow model holds its
own threads and never the app's; a request waits for its Future up to the model's deadline.
``Throttled``: a failure logged with its traceback once per interval, with how often it recurred.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from cachetools import TLRUCache

from serving.errors import Busy

LOG = logging.getLogger(__name__)

CACHED, JOINED, STARTED = "cached", "joined", "started"


@dataclass(frozen=True, slots=True)
class Live:
    """One live result: when it was computed, until when it may be served, the answer; ``shared``
    when it came from the fleet's shared tier rather than from this process's own computation."""

    computed_at: float
    expires: float
    answer: Any
    shared: bool = False


class LiveTier:
    """``lookup(key, submit, compute)`` -> (CACHED, Live) | (JOINED, Future) | (STARTED, Future)."""

    def __init__(self, maxsize: int, clock: Callable[[], float]):
        self.clock = clock
        # cachetools' TLRU: each entry lives until its own expiry (a model's freshness bound may be shorter)
        self._cache: TLRUCache = TLRUCache(maxsize=maxsize, ttu=lambda _key, live, _now: live.expires, timer=clock)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._cache)

    def lookup(self, key: Hashable, submit: Callable[[Callable[[], Live]], Future],
               compute: Callable[[], Live]) -> tuple[str, Any]:
        """The cached result while it lives; else the Future of the computation of ``key`` under way;
        else a new one, ``submit(task)`` where the task runs ``compute()`` and caches its result (also
        when nobody waits for it any more: a late result still fills the cache)."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return CACHED, cached
            running = self._inflight.get(key)
            if running is not None:
                self.coalesced += 1
                return JOINED, running

            def task() -> Live:
                try:
                    live = compute()
                    if live.expires > self.clock():
                        with self._lock:
                            self._cache[key] = live
                    return live
                finally:
                    with self._lock:
                        self._inflight.pop(key, None)

            # submit under the lock: the Future is in the table before anyone else can look
            future = self._inflight[key] = submit(task)
            return STARTED, future


class Runner:
    """One model's live computations: ``threads`` threads and at most ``queue`` waiting beyond them;
    past that ``submit`` refuses at once (Busy, 503 naming the model) instead of queueing without end."""

    def __init__(self, name: str, threads: int, queue: int):
        self.name, self.threads, self.queue = name, threads, queue
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"live-{name}")
        self._slots = threading.BoundedSemaphore(threads + queue)

    def submit(self, fn: Callable[[], Any]) -> Future:
        if not self._slots.acquire(blocking=False):
            raise Busy(f"model {self.name!r} is busy: {self.threads} live computation"
                       f"{'s' if self.threads != 1 else ''} running and {self.queue} queued; try again shortly")
        try:
            return self._pool.submit(self._run, fn)
        except BaseException:
            self._slots.release()
            raise

    def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Throttled:
    """``failed(key, message, exc)``: the first failure of ``key`` in an interval is logged at ERROR
    with its traceback; the rest of that interval only counted, and the next one logged says how many
    there were since (so a client sending a failing request in a loop cannot flood the log)."""

    def __init__(self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def failed(self, key: Hashable, message: str, exc: BaseException | None = None) -> bool:
        """Log (True) or count (False) one failure."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            more = self._suppressed.pop(key, 0)
        if more:
            message += f" ({more} more time{'s' if more != 1 else ''} in the last {now - last:.0f} s, not logged)"
        self.logger.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
        return True
