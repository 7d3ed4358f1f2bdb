"""The local tier of live results: a per-process cache with a time to live per entry, and one
computation per key however many identical requests arrive while it runs (single flight)."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from cachetools import TLRUCache


@dataclass(frozen=True, slots=True)
class Live:
    """One live result: when it was computed, until when it may be served, the answer."""

    computed_at: float
    expires: float
    answer: Any


class LiveTier:
    """``get_or_compute(key, ttl, compute)`` -> (came from the cache, Live)."""

    def __init__(self, maxsize: int, clock: Callable[[], float]):
        self.clock = clock
        # cachetools' TLRU: each entry lives until its own expiry (a model's freshness bound may be shorter)
        self._cache: TLRUCache = TLRUCache(maxsize=maxsize, ttu=lambda _key, live, _now: live.expires, timer=clock)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._cache)

    def get_or_compute(self, key: Hashable, ttl: float, compute: Callable[[], Any]) -> tuple[bool, Live]:
        """The cached result while it lives, else ``compute()`` once: requests for the same key that
        arrive meanwhile wait for that computation and take its result. When it fails, its caller gets
        the error and each waiter computes for itself."""
        while True:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    return True, cached
                waiting = self._inflight.get(key)
                if waiting is None:
                    mine = self._inflight[key] = Future()
                    break
            try:
                live = waiting.result()
            except Exception:  # noqa: BLE001 -- theirs failed: loop and compute it ourselves
                continue
            self.coalesced += 1
            return True, live
        try:
            answer = compute()
            now = self.clock()
            live = Live(now, now + ttl, answer)
            if ttl > 0:
                with self._lock:
                    self._cache[key] = live
            mine.set_result(live)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        return False, live
