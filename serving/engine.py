"""The hybrid, for any model: precomputed -> cache of live results -> live compute. No Flask in here.

``Engine.lookup(model, query, key, k)`` is the one way an answer is had; it knows no model kind.
Every answer says where it came from (``precomputed`` | ``cache`` | ``live``), which snapshot, when
it was computed and how long it may still be served. The clock is injected so tests can move time.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from serving.errors import Busy, DeadlineExceeded, HybridServeError, ModelFailed, NotFound, Unavailable
from serving.live import CACHED, JOINED, STARTED, Live, LiveTier, Runner, Throttled
from serving.models.base import Model
from serving.reloader import Reloader
from serving.snapshot import LoadedSnapshot
from serving.store import Store

LOG = logging.getLogger(__name__)

PRECOMPUTED, CACHE, LIVE = "precomputed", "cache", "live"
MODES = ("hybrid", "ttl-cache", "live-only")
# why a live answer was not had, as counted per model (metrics, /readyz, /v1/models)
REFUSED = {DeadlineExceeded: "deadline", Busy: "busy", ModelFailed: "error"}

_thread = threading.local()


def one_thread_per_pool() -> None:
    """FAISS's OpenMP, the rating model's OpenMP and BLAS on one thread, in the calling thread.

    OpenMP's thread count is per thread: a limit set where the app was built does not reach the
    request threads of a threaded server (Flask's development server, granian's blocking threads), where a
    predict or a search would start one OpenMP thread per core that spin-wait against the worker
    (docs/api.md). So each thread that computes live sets it, once.
    """
    if not getattr(_thread, "limited", False):
        faiss.omp_set_num_threads(1)
        threadpool_limits(1)
        _thread.limited = True


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer: a ranked list (ids, scores) or a value, with where it came from and how fresh it is."""

    source: str
    snapshot: str
    computed_at: float                 # epoch seconds
    ids: np.ndarray | None = None      # for ranked queries
    scores: np.ndarray | None = None
    value: Any = None                  # for a prediction
    fresh_for_s: float = 0.0           # how long this answer may still be served (Cache-Control)
    model_version: str | None = None   # the version of the model that made it
    stale: bool = False                # a precomputed answer past its bound, served because live failed


def remaining_s(max_age_s: float, computed_at: float, now: float) -> float:
    """How long an answer computed at ``computed_at`` may still be served under ``max_age_s``: the one
    freshness rule (the engine and the hit path ask it)."""
    return max_age_s - (now - computed_at)


class Engine:
    """Answers any model's queries from the live snapshot; thread-safe; snapshots swap atomically."""

    def __init__(self, store: Store, max_age_s: float, cache_ttl_s: float, cache_size: int,
                 clock: Callable[[], float] = time.time, verify_checksums: bool = True, mode: str = "hybrid",
                 deadline_ms: float = 2000.0, deadlines_ms: dict[str, float] | None = None,
                 live_threads: int = 2, live_queue: int = 32, error_log_interval_s: float = 60.0,
                 cache_max_bytes: int | None = None, shared=None, max_waiting: int = 6):
        """``mode``: 'hybrid' (snapshot, cache, live), 'ttl-cache' (cache, live) or 'live-only' -- the
        designs hybridserve is compared with are configurations of the same engine.

        Live answers are computed on each model's own ``live_threads`` threads (at most ``live_queue``
        more waiting) and waited for up to the model's deadline: ``deadlines_ms[name]``, else
        ``deadline_ms``. A failing model is logged once per ``error_log_interval_s`` (with a count).
        ``shared``: the fleet's tier between the local cache and live (serving.shared.SharedTier), or None.
        At most ``max_waiting`` requests wait for live answers at once; another is refused (Busy) at once."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.use_precomputed, self.use_cache = mode == "hybrid", mode != "live-only"
        self.mode = mode
        self.store, self.max_age_s, self.cache_ttl_s = store, max_age_s, cache_ttl_s
        self.clock = clock
        self.counts: Counter = Counter()
        self.reloader = Reloader(store, verify_checksums, self.counts)
        self.live_tier = LiveTier(cache_size, clock, cache_max_bytes)
        self.deadline_ms, self.deadlines_ms = deadline_ms, dict(deadlines_ms or {})
        self.live_threads, self.live_queue = live_threads, live_queue
        self._runners: dict[str, Runner] = {}
        self._runners_lock = threading.Lock()
        self.failures = Throttled(LOG, error_log_interval_s, clock)
        self.shared = shared
        self.max_waiting = max_waiting
        self._waiting = threading.BoundedSemaphore(max_waiting)
        self.on_stale: Callable[[str], None] | None = None
        self.on_live: Callable[[str, float, str], None] | None = None  # (endpoint, cpu s, model)
        self.on_model_error: Callable[[str], None] | None = None
        # (model, what): what is deadline | busy | stale_deadline | stale_error | stale_busy
        self.on_live_refused: Callable[[str, str], None] | None = None

    # --- snapshots --------------------------------------------------------------
    @property
    def snapshot(self) -> LoadedSnapshot | None:
        return self.reloader.snapshot

    @property
    def last_reload_error(self) -> str | None:
        return self.reloader.last_error

    def reload(self) -> bool:
        """See Reloader.reload (its counts are the engine's)."""
        return self.reloader.reload()

    def model(self, name: str, query: str | None = None) -> tuple[LoadedSnapshot, Model]:
        """The live snapshot and its model ``name`` (one answering ``query``, when given); NotFound
        names the models there are."""
        snap = self.snapshot
        if snap is None:
            raise Unavailable(self.last_reload_error or "no snapshot loaded yet")
        model = snap.models.get(name)
        if model is None or (query is not None and query not in model.queries):
            there = sorted(n for n, m in snap.models.items() if query is None or query in m.queries)
            raise NotFound(f"no model {name!r} (models: {', '.join(there)})")
        return snap, model

    def max_age(self, model: Model) -> float:
        """A model's freshness bound: its own, else serving.max_age_s."""
        return self.max_age_s if model.max_age_s is None else model.max_age_s

    def deadline(self, name: str) -> float:
        """A model's live deadline in milliseconds: its config table's deadline_ms, else serving.live_deadline_ms."""
        return self.deadlines_ms.get(name, self.deadline_ms)

    def runner(self, name: str) -> Runner:
        """The threads model ``name`` computes on (made at its first live answer; kept across swaps)."""
        found = self._runners.get(name)
        if found is None:
            with self._runners_lock:
                found = self._runners.get(name)
                if found is None:
                    found = self._runners[name] = Runner(name, self.live_threads, self.live_queue)
        return found

    def close(self) -> None:
        """Let the live threads go (computations running finish; queued ones are dropped)."""
        for r in list(self._runners.values()):
            r.shutdown()
        if self.shared is not None:
            self.shared.close()

    # --- the one lookup -------------------------------------------------------------
    def lookup(self, model: str, query: str, key: tuple, k: int | None = None, live: bool = True) -> Answer | None:
        """The answer of ``model``'s ``query`` for the canonical ``key`` (and ``k`` for a ranked query):
        precomputed while fresh, else cached, else live through the model's own answer.

        ``live=False`` asks only the snapshot: a fresh precomputed answer or None, nothing computed or
        counted (the hit path's question; on None the request takes the full route, which does both).
        A model that raises while answering gives ModelFailed (503) and is counted; others keep serving."""
        snap = self.snapshot
        if snap is None:
            if not live:
                return None
            raise Unavailable(self.last_reload_error or "no snapshot loaded yet")
        m = snap.models.get(model)
        if m is None:
            if not live:
                return None
            raise NotFound(f"no model {model!r} (models: {', '.join(sorted(snap.models))})")
        ranked = m.queries[query].ranked
        try:
            m.check(query, key)
        except NotFound:
            if not live:
                return None
            raise
        max_age = self.max_age(m)
        stale = None
        if self.use_precomputed:
            found = m.stored(query, key, k)
            if found is not None:
                left = remaining_s(max_age, snap.created_at, self.clock())
                if left > 0:
                    return _answer(PRECOMPUTED, snap.id, snap.created_at, left, m.version, found, ranked)
                if live:
                    self.counts["stale"] += 1
                    if self.on_stale:
                        self.on_stale(m.queries[query].endpoint)
                    # served, marked stale, if the live answer fails or misses its deadline (stale-if-error)
                    stale = _answer(PRECOMPUTED, snap.id, snap.created_at, 0.0, m.version, found, ranked, stale=True)
        if not live:
            return None
        return self._live(snap, m, query, key, k, max_age, ranked, stale)

    def _live(self, snap: LoadedSnapshot, m: Model, query: str, key: tuple, k: int | None, max_age: float,
              ranked: bool, stale: Answer | None = None) -> Answer:
        """The live answer, computed on the model's own threads and waited for up to its deadline. Past
        the deadline, on the model's failure or a full queue: ``stale`` when there is one, else 503."""
        since = time.monotonic()
        ttl = min(self.cache_ttl_s, max_age)
        runner = self.runner(m.name)
        compute = lambda: self._compute(m, query, key, k, ttl)  # noqa: E731
        try:
            if not self.use_cache:
                state, result = STARTED, self._wait(m.name, runner.submit(compute), since)
            else:
                cache_key = (snap.id, m.name, m.version, query, m.cache_key(query, key), k)
                if self.shared is not None:  # the fleet's result, else computed once across the fleet
                    compute = self._through_shared(cache_key, compute, self.deadline(m.name) / 1000)
                while True:
                    state, got = self.live_tier.lookup(cache_key, runner.submit, compute)
                    self.counts["coalesced"] = self.live_tier.coalesced
                    try:
                        result = got if state == CACHED else self._wait(m.name, got, since)
                        break
                    except ModelFailed:
                        if state != JOINED:
                            raise
                        # the computation it waited for failed: it asks again itself (within its deadline)
        except (DeadlineExceeded, Busy, ModelFailed) as exc:
            return self._refused(m.name, exc, stale)
        source = LIVE if state == STARTED and not result.shared else CACHE
        left = ttl if not self.use_cache else max(0.0, result.expires - self.clock())
        return _answer(source, snap.id, result.computed_at, left, m.version, result.answer, ranked)

    def _through_shared(self, cache_key: tuple, compute: Callable[[], Live], wait_s: float) -> Callable[[], Live]:
        from serving.shared import shared_key
        key, shared = shared_key(cache_key), self.shared
        return lambda: shared.get_or_compute(key, compute, wait_s)

    def _wait(self, name: str, future: Future, since: float) -> Live:
        """The future's result, waited for until the model's deadline after ``since``, by at most
        ``max_waiting`` requests at once (each holds an app thread meanwhile)."""
        if future.done():
            return future.result()
        deadline_ms = self.deadline(name)
        if not self._waiting.acquire(blocking=False):
            raise Busy(f"model {name!r} is busy: {self.max_waiting} requests of this worker are waiting for live "
                       "answers already; try again shortly")
        try:
            return future.result(timeout=max(0.0, deadline_ms / 1000 - (time.monotonic() - since)))
        except FutureTimeout:
            raise DeadlineExceeded(f"model {name!r} did not answer within its deadline of {deadline_ms:g} ms; "
                                   "try again shortly") from None
        finally:
            self._waiting.release()

    def _refused(self, name: str, exc: Unavailable, stale: Answer | None) -> Answer:
        """Count a live answer that missed its deadline, found the queue full or failed; the stale
        answer if there is one (counted as served stale), else the error goes on to the client (503)."""
        why = REFUSED[type(exc)]
        self.counts[f"live_{why}"] += 1
        if self.on_live_refused:
            self.on_live_refused(name, why)
        if stale is None:
            raise exc
        self.counts["stale_served"] += 1
        if self.on_live_refused:
            self.on_live_refused(name, f"stale_{why}")
        return stale

    def _compute(self, m: Model, query: str, key: tuple, k: int | None, ttl: float) -> Live:
        """One live answer, on one of the model's threads; a model's own exception -> ModelFailed."""
        one_thread_per_pool()
        cpu0 = time.thread_time()
        try:
            out = m.answer_one(query, key, k)
        except HybridServeError:
            raise
        except Exception as exc:  # the model's own failure: this model is unavailable, not the server
            self.counts["model_errors"] += 1
            self.failures.failed(m.name, f"model {m.name} failed on {query} {key!r}", exc)
            if self.on_model_error:
                self.on_model_error(m.name)
            verb = "predict" if query == "predict" else f"answer {query}"
            raise ModelFailed(f"model {m.name!r} failed to {verb} ({type(exc).__name__}); "
                              "the error has been logged") from None
        cpu = time.thread_time() - cpu0
        self.counts["live_computations"] += 1
        self.counts["live_cpu_s"] += cpu
        if self.on_live:
            self.on_live(m.queries[query].endpoint, cpu, m.name)
        now = self.clock()
        return Live(now, now + ttl, out)

    def status(self) -> dict[str, Any]:
        snap = self.snapshot
        live_only = snap is not None and snap.live_only_mode
        info: dict[str, Any] = {"mode": self.mode, "ready": snap is not None and not live_only,
                                "snapshot": None if snap is None or live_only else snap.id,
                                "live_only_model": snap.manifest["model_version"] if live_only else None,
                                "current": self.reloader.pointer, "error": self.last_reload_error,
                                "refused": self.counts["reload_failures"],
                                "cache_entries": len(self.live_tier), "cache_bytes": self.live_tier.bytes}
        if snap is not None:
            info["age_s"] = round(self.clock() - snap.created_at, 3)
            info["fresh"] = info["age_s"] <= self.max_age_s
        return info


def _answer(source: str, snapshot: str, computed_at: float, fresh_for_s: float, version: str, found: Any,
            ranked: bool, stale: bool = False) -> Answer:
    if ranked:
        return Answer(source, snapshot, computed_at, found[0], found[1], fresh_for_s=fresh_for_s,
                      model_version=version, stale=stale)
    return Answer(source, snapshot, computed_at, value=found, fresh_for_s=fresh_for_s, model_version=version,
                  stale=stale)
