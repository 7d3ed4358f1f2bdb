"""The local tier of live results and the threads live results are computed on.

``LiveTier``: a per-process cache with a time to live per entry, and one computation per key however
many identical requests arrive while it runs (single flight: they share its Future).
``Runner``: a model's own threads (concurrent.futures) with a bounded queue, so a slow model holds its
own threads and never the app's; a request waits for its Future up to the model's deadline.
``Throttled``: a failure logged with its traceback once per interval, with how often it recurred.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np
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
    nbytes: int = 0  # what it holds in the cache, with its key (entry_bytes), once it is put there


# The cache's own structures per entry (cachetools' TLRU: its data, size and order dicts, heap items and
# their links), measured with tracemalloc under eviction churn at 306-407 bytes (the dicts keep the
# slots of deleted entries until they resize; TLRU only marks an evicted entry's heap item removed and
# cleans the heap once it holds twice as many items as entries). Such a removed item still holds its
# key, so entry_bytes counts each key twice.
ENTRY_OVERHEAD = 448


def size_of(obj: Any) -> int:
    """Bytes an object of a cached answer holds: ndarrays with their buffer (or the array they view),
    tuples, lists and dicts with their items, anything else as sys.getsizeof says."""
    if isinstance(obj, np.ndarray):
        base = obj.base
        return sys.getsizeof(obj) + (size_of(base) if isinstance(base, np.ndarray) else 0)
    if isinstance(obj, (tuple, list)):
        return sys.getsizeof(obj) + sum(size_of(x) for x in obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(size_of(k) + size_of(v) for k, v in obj.items())
    return sys.getsizeof(obj)


def entry_bytes(key: Hashable, live: Live) -> int:
    """An honest estimate of one cache entry's memory: its key, the Live and its answer, and the cache's
    own structures for it (tests/test_live.py checks it against tracemalloc)."""
    fields = sys.getsizeof(live.computed_at) + sys.getsizeof(live.expires) + sys.getsizeof(1 << 20)  # nbytes
    return ENTRY_OVERHEAD + 2 * size_of(key) + sys.getsizeof(live) + fields + size_of(live.answer)


class LiveTier:
    """``lookup(key, submit, compute)`` -> (CACHED, Live) | (JOINED, Future) | (STARTED, Future).

    Bounded twice: at most ``maxsize`` entries and ``max_bytes`` bytes (entry_bytes). One cachetools
    TLRUCache holds both: its size is in bytes, and an entry counts as at least max_bytes / maxsize, so
    no more than maxsize of them fit either."""

    def __init__(self, maxsize: int, clock: Callable[[], float], max_bytes: int | None = None):
        self.clock = clock
        self.maxsize = maxsize
        self.max_bytes = max_bytes if max_bytes is not None else maxsize * 4096
        floor = max(1, self.max_bytes // maxsize)
        # cachetools' TLRU: each entry lives until its own expiry (a model's freshness bound may be shorter).
        # Its size is floor * maxsize <= max_bytes: so at most maxsize entries of at least the floor fit.
        self._cache: TLRUCache = TLRUCache(maxsize=floor * maxsize, ttu=lambda _key, live, _now: live.expires,
                                           timer=clock, getsizeof=lambda live: max(live.nbytes, floor))
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}
        self.coalesced = 0
        self.too_large = 0

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def bytes(self) -> int:
        """The cache's size as it counts it (entries at their estimate, or the floor)."""
        return int(self._cache.currsize)

    def put(self, key: Hashable, live: Live) -> Live:
        """Cache ``live`` under ``key`` until it expires, evicting the least recently used entries as the
        bounds need; one larger than the whole byte bound is not kept (counted)."""
        live = dataclasses.replace(live, nbytes=entry_bytes(key, live))
        if live.expires > self.clock():
            with self._lock:
                try:
                    self._cache[key] = live
                except ValueError:  # cachetools: larger than maxsize
                    self.too_large += 1
        return live

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
                    return self.put(key, compute())
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
