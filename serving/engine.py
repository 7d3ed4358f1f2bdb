"""The hybrid: precomputed -> cache of live results -> live compute. No Flask in here.

Every answer says where it came from (``precomputed`` | ``cache`` | ``live``), which snapshot,
when it was computed and how old it is. The clock is injected so tests can move time.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import faiss
import numpy as np
from cachetools import TTLCache
from threadpoolctl import threadpool_limits

from serving.errors import HybridServeError, ModelFailed, NotFound, SnapshotError, Unavailable
from serving.model import ModelBundle
from serving.models import Served
from serving.models.base import canonical_key
from serving.models.predictor import RATING
from serving.snapshot import LoadedSnapshot
from serving.store import Store

LOG = logging.getLogger(__name__)

PRECOMPUTED, CACHE, LIVE = "precomputed", "cache", "live"

_thread = threading.local()


def one_thread_per_pool() -> None:
    """FAISS's OpenMP, the rating model's OpenMP and BLAS on one thread, in the calling thread.

    OpenMP's thread count is per thread: a limit set where the app was built does not reach the
    request threads of a threaded server (Flask's development server, granian's blocking threads), where a
    predict or a search would start one OpenMP thread per core that spin-wait against the worker
    (measured: 53 req/s instead of ~900). So each thread that computes live sets it, once.
    """
    if not getattr(_thread, "limited", False):
        faiss.omp_set_num_threads(1)
        threadpool_limits(1)
        _thread.limited = True


@dataclass(frozen=True)
class Answer:
    source: str
    snapshot: str
    computed_at: float                 # epoch seconds
    ids: np.ndarray | None = None      # for lists
    scores: np.ndarray | None = None
    value: float | None = None         # for a prediction
    fresh_for_s: float = 0.0           # how long this answer may still be served (Cache-Control)
    model_version: str | None = None   # for a prediction: the version of the model that made it

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.computed_at)


@dataclass(frozen=True)
class _Live:
    computed_at: float
    ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    value: float | None = None


class Engine:
    """Answers queries from the live snapshot; thread-safe; swaps snapshots atomically."""

    def __init__(self, store: Store, max_age_s: float, cache_ttl_s: float, cache_size: int,
                 clock: Callable[[], float] = time.time, verify_checksums: bool = True, mode: str = "hybrid"):
        """``mode``: 'hybrid' (snapshot, cache, live), 'ttl-cache' (cache, live) or 'live-only' -- the
        designs hybridserve is compared with are configurations of the same engine."""
        if mode not in ("hybrid", "ttl-cache", "live-only"):
            raise ValueError(f"unknown mode {mode!r}")
        self.use_precomputed, self.use_cache = mode == "hybrid", mode != "live-only"
        self.mode = mode
        self.store, self.max_age_s, self.cache_ttl_s = store, max_age_s, cache_ttl_s
        self.clock = clock
        self.verify_checksums = verify_checksums
        self._snap: LoadedSnapshot | None = None
        self._cache: TTLCache = TTLCache(maxsize=cache_size, ttl=cache_ttl_s, timer=clock)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Event | None] = {}
        self._reload_lock = threading.Lock()
        self.counts: Counter = Counter()
        self.last_reload_error: str | None = None
        self._refused: str | None = None
        self._pointer: str | None = None  # what CURRENT named at the last check
        self.on_snapshot: Callable[[LoadedSnapshot], None] | None = None
        self.on_reload_failure: Callable[[str], None] | None = None
        self.on_stale: Callable[[str], None] | None = None
        self.on_live: Callable[[str, float], None] | None = None
        self.on_model_error: Callable[[str], None] | None = None

    # --- snapshots --------------------------------------------------------------
    @property
    def snapshot(self) -> LoadedSnapshot | None:
        return self._snap

    def reload(self) -> bool:
        """Load CURRENT if it changed; swap it in when it passes its checks. True if swapped.

        A snapshot that fails, in any way, is refused (logged, counted, reported by /readyz) and the
        old one keeps serving; it is not retried until CURRENT changes again. CURRENT moving back to
        the snapshot being served clears the refusal; a missing or empty CURRENT is reported.
        """
        with self._reload_lock:
            target, pointer_problem = self._read_current()
            self._pointer = target
            current = self._snap.id if self._snap else None
            if target is None:
                if current is None:
                    self.last_reload_error = f"no snapshot published in {self.store.root} ({pointer_problem})"
                    self._fall_back_to_model()
                elif self.last_reload_error is None or not self.last_reload_error.startswith(pointer_problem):
                    self.last_reload_error = f"{pointer_problem} in {self.store.root}; still serving {current}"
                    LOG.error("%s", self.last_reload_error)
                return False
            if target == current:
                if self.last_reload_error is not None:  # CURRENT is back at what is served: nothing is wrong now
                    LOG.info("CURRENT points at %s again, which is being served", current)
                self._refused, self.last_reload_error = None, None
                return False
            if target == self._refused:
                return False
            try:
                snap = LoadedSnapshot.load(self.store, target, checksums=self.verify_checksums)
            except Exception as exc:  # whatever is wrong with it, one path: refuse, count, keep serving
                self._refused = target
                reason = exc if isinstance(exc, (SnapshotError, OSError)) else f"{type(exc).__name__}: {exc}"
                self.last_reload_error = f"snapshot {target} refused: {reason}"
                self.counts["reload_failures"] += 1
                LOG.error("%s; still serving %s", self.last_reload_error, current)
                if self.on_reload_failure:
                    self.on_reload_failure(self.last_reload_error)
                if self._snap is None:
                    self._fall_back_to_model()
                return False
            self._snap = snap  # atomic reference swap; requests in flight keep the old object
            self._refused, self.last_reload_error = None, None
            self.counts["reloads"] += 1
            LOG.info("serving snapshot %s (was %s)", snap.id, current)
            if self.on_snapshot:
                self.on_snapshot(snap)
            return True

    def _read_current(self) -> tuple[str | None, str]:
        """(CURRENT's snapshot id, or None and what is wrong with the pointer)."""
        try:
            text = self.store.current_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return None, "CURRENT missing"
        except OSError as exc:
            return None, f"CURRENT unreadable ({exc.strerror or exc})"
        return (text, "") if text else (None, "CURRENT empty")

    def _fall_back_to_model(self) -> None:
        """No valid snapshot: serve live from the newest trained model in the store, if any."""
        folders = sorted((p for p in self.store.models_dir.glob("*") if not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True) if self.store.models_dir.is_dir() else []
        for folder in folders:
            try:
                self._snap = LoadedSnapshot.live_only(ModelBundle.load(folder))
            except Exception as exc:  # try the next one
                LOG.warning("model %s does not load: %s", folder.name, exc)
                continue
            LOG.warning("no valid snapshot: serving live only from model %s", folder.name)
            return

    def _require(self) -> LoadedSnapshot:
        snap = self._snap
        if snap is None:
            raise Unavailable(self.last_reload_error or "no snapshot loaded yet")
        return snap

    # --- queries ----------------------------------------------------------------
    def similar_items(self, item_id: int, k: int) -> Answer:
        snap = self._require()
        iidx = snap.bundle.item_index_one(item_id)
        if iidx < 0:
            raise NotFound(f"item {item_id} is not in the catalogue")
        hit = self._precomputed(snap, "similar_items", k, lambda: snap.similar.get(iidx, k))
        if hit is not None:
            return hit
        return self._live(snap, ("similar", item_id, k),
                          lambda: _first(snap.bundle.similar_items(np.array([iidx]), k)))

    def user_recs(self, user_id: int, k: int) -> Answer:
        snap = self._require()
        uidx = snap.bundle.user_index_one(user_id)
        if uidx < 0:
            raise NotFound(f"user {user_id} is unknown")
        hit = self._precomputed(snap, "user_recs", k, lambda: snap.recs.get(uidx, k))
        if hit is not None:
            return hit
        return self._live(snap, ("recs", user_id, k), lambda: _first(snap.bundle.recommend(np.array([uidx]), k)))

    def prediction(self, user_id: int, item_id: int) -> Answer:
        """The built-in rating model's prediction (``/v1/predictions``): one registered model among others."""
        return self.predict(RATING, (user_id, item_id))

    def served(self, name: str) -> tuple[LoadedSnapshot, Served]:
        """The live snapshot and its model ``name``; NotFound names the models there are."""
        snap = self._require()
        served = snap.models.get(name)
        if served is None:
            raise NotFound(f"no model {name!r} (models: {', '.join(sorted(snap.models))})")
        return snap, served

    def predict(self, name: str, values: tuple) -> Answer:
        """Model ``name``'s prediction for one canonical input tuple (``ModelSpec.parse_query``):
        precomputed while fresh, else cached, else live through the model's vectorised answer.
        A model that raises gives ModelFailed (503) and is counted; other models keep serving."""
        snap, served = self.served(name)
        served.model.check(values)
        key = canonical_key(values)
        max_age = self.max_age(served)
        kind = "prediction" if name == RATING else "model"
        if self.use_precomputed:
            value = served.lookup(key, values)
            if value is not None:
                hit = self._fresh(snap, kind, value=value, model_version=served.version, max_age=max_age)
                if hit is not None:
                    return hit
        try:
            return self._live(snap, ("pred" if name == RATING else "model", name, served.version, key),
                              lambda: (None, None, served.answer_one(values)), ttl=max_age,
                              model_version=served.version)
        except HybridServeError:
            raise
        except Exception as exc:  # the model's own failure: this model is unavailable, not the server
            self.counts["model_errors"] += 1
            LOG.exception("model %s failed on %s", name, key)
            if self.on_model_error:
                self.on_model_error(name)
            raise ModelFailed(f"model {name!r} failed to predict ({type(exc).__name__}); "
                              "the error has been logged") from None

    def peek_model(self, name: str, values: tuple, key: str | None = None) -> Answer | None:
        """The snapshot's fresh prediction of model ``name`` for a canonical tuple, or None (never
        computes, never counts: the fast path's question)."""
        snap = self._snap
        if snap is None or not self.use_precomputed:
            return None
        served = snap.models.get(name)
        if served is None:
            return None
        value = served.lookup(canonical_key(values) if key is None else key, values)
        if value is None:
            return None
        return self._fresh(snap, "model", count=False, value=value, model_version=served.version,
                           max_age=self.max_age(served))

    def max_age(self, served: Served) -> float:
        own = served.spec.max_age_s
        return self.max_age_s if own is None else own

    def session(self, item_ids: tuple[int, ...], k: int) -> Answer:
        """Session recommendations: from the snapshot when its similar-item lists of the viewed items
        prove the answer (see ModelBundle.session_from_lists), else live (then cached)."""
        snap = self._require()
        iidx = snap.bundle.item_index(np.array(item_ids))
        unknown = [i for i, x in zip(item_ids, iidx) if x < 0]
        if unknown:
            raise NotFound(f"items not in the catalogue: {', '.join(map(str, unknown))}")
        found = self._session_lists(snap, iidx, k)
        if found is not None:
            hit = self._fresh(snap, "session", ids=found[0], scores=found[1])
            if hit is not None:
                return hit
        return self._live(snap, ("session", tuple(sorted(item_ids)), k),
                          lambda: _first(snap.bundle.recommend_for_items([iidx], k)))

    def peek_session(self, item_ids: tuple[int, ...], k: int) -> Answer | None:
        """The snapshot's fresh session answer, or None (never computes live, never counts)."""
        snap = self._snap
        if snap is None:
            return None
        iidx = snap.bundle.item_index(np.array(item_ids))
        if (iidx < 0).any():
            return None
        found = self._session_lists(snap, iidx, k)
        return None if found is None else self._fresh(snap, "session", count=False, ids=found[0], scores=found[1])

    def _session_lists(self, snap: LoadedSnapshot, iidx: np.ndarray, k: int) -> tuple | None:
        """A session answer from the snapshot's lists of its items, when each has one and they prove it."""
        if not self.use_precomputed:
            return None
        rows = snap.similar.row[iidx]
        if (rows < 0).any():
            return None
        bundle = snap.bundle
        return bundle.session_from_lists(iidx, bundle.item_index(snap.similar.ids[rows]), snap.similar.scores[rows], k)

    def peek(self, endpoint: str, key: int, arg: int) -> Answer | None:
        """The snapshot's fresh answer, or None; never computes, never counts (the hit path's question:
        on None the request takes the full route, which does both).

        ``("similar_items", item_id, k)``, ``("user_recs", user_id, k)`` or ``("prediction", user_id, item_id)``.
        """
        snap = self._snap
        if snap is None or not self.use_precomputed:
            return None
        bundle = snap.bundle
        if endpoint == "prediction":
            return self.peek_model(RATING, (key, arg))
        if arg > snap.k_max:
            return None
        if endpoint == "similar_items":
            idx, table = bundle.item_index_one(key), snap.similar
        else:
            idx, table = bundle.user_index_one(key), snap.recs
        found = table.get(idx, arg) if idx >= 0 else None
        return None if found is None else self._fresh(snap, endpoint, count=False, ids=found[0], scores=found[1])

    # --- the three sources ------------------------------------------------------
    def _precomputed(self, snap, kind, k, get) -> Answer | None:
        if k > snap.k_max or not self.use_precomputed:
            return None
        found = get()
        if found is None:
            return None
        return self._fresh(snap, kind, ids=found[0], scores=found[1])

    def _fresh(self, snap, kind, count: bool = True, max_age: float | None = None, **payload) -> Answer | None:
        """The precomputed answer while the snapshot is younger than max_age_s (or a model's own
        ``max_age``); else None (counted as stale unless ``count`` is False: peek leaves that to the
        full route)."""
        remaining = (self.max_age_s if max_age is None else max_age) - (self.clock() - snap.created_at)
        if remaining <= 0:
            if count:
                self.counts["stale"] += 1
                if self.on_stale:
                    self.on_stale(kind)
            return None
        return Answer(PRECOMPUTED, snap.id, snap.created_at, fresh_for_s=remaining, **payload)

    def _live(self, snap: LoadedSnapshot, key: tuple, compute: Callable[[], tuple],
              ttl: float | None = None, model_version: str | None = None) -> Answer:
        """Cached live result, else compute once however many identical requests are waiting.
        ``ttl``: a shorter life for this answer in the cache than cache_ttl_s (a model's freshness bound)."""
        full_key = (snap.id,) + key
        ttl = self.cache_ttl_s if ttl is None else min(ttl, self.cache_ttl_s)
        one_thread_per_pool()
        if not self.use_cache:
            cpu0 = time.thread_time()
            ids, scores, value = compute()
            self._count_live(key[0], time.thread_time() - cpu0)
            return self._answer(snap, LIVE, _Live(self.clock(), ids, scores, value), ttl, model_version)
        while True:
            with self._lock:
                cached = self._cached(full_key, ttl)
                if cached is not None:
                    return self._answer(snap, CACHE, cached, ttl, model_version)
                if full_key not in self._inflight:
                    # computing, nobody waiting yet: the first waiter makes the Event (most misses have none)
                    self._inflight[full_key] = None
                    break
                event = self._inflight[full_key]
                if event is None:
                    event = self._inflight[full_key] = threading.Event()
            event.wait()  # someone else is computing it: take theirs from the cache
            with self._lock:
                cached = self._cached(full_key, ttl)
            if cached is not None:
                self.counts["coalesced"] += 1
                return self._answer(snap, CACHE, cached, ttl, model_version)
            # their computation failed or the entry expired at once: loop and compute ourselves
        try:
            cpu0 = time.thread_time()
            ids, scores, value = compute()
            self._count_live(key[0], time.thread_time() - cpu0)
            result = _Live(self.clock(), ids, scores, value)
            with self._lock:
                self._cache[full_key] = result
        finally:
            with self._lock:
                event = self._inflight.pop(full_key, None)
            if event is not None:
                event.set()
        return self._answer(snap, LIVE, result, ttl, model_version)

    def _cached(self, full_key: tuple, ttl: float) -> _Live | None:
        """The cache entry while younger than ``ttl`` (call with the lock held)."""
        cached = self._cache.get(full_key)
        if cached is not None and ttl < self.cache_ttl_s and self.clock() - cached.computed_at >= ttl:
            del self._cache[full_key]
            return None
        return cached

    def _count_live(self, kind: str, cpu_s: float) -> None:
        self.counts["live_computations"] += 1
        self.counts["live_cpu_s"] += cpu_s
        if self.on_live:
            self.on_live(kind, cpu_s)

    def _answer(self, snap, source, live: _Live, ttl: float | None = None,
                model_version: str | None = None) -> Answer:
        remaining = (self.cache_ttl_s if ttl is None else ttl) - (self.clock() - live.computed_at)
        return Answer(source, snap.id, live.computed_at, live.ids, live.scores, live.value,
                      fresh_for_s=max(0.0, remaining), model_version=model_version)

    def status(self) -> dict[str, Any]:
        snap = self._snap
        live_only = snap is not None and snap.live_only_mode
        info: dict[str, Any] = {"mode": self.mode, "ready": snap is not None and not live_only,
                                "snapshot": None if snap is None or live_only else snap.id,
                                "live_only_model": snap.manifest["model_version"] if live_only else None,
                                "current": self._pointer, "error": self.last_reload_error,
                                "refused": self.counts["reload_failures"], "cache_entries": len(self._cache)}
        if snap is not None:
            info["age_s"] = round(self.clock() - snap.created_at, 3)
            info["fresh"] = info["age_s"] <= self.max_age_s
        return info


def _first(pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, None]:
    ids, scores = pair[0][0], pair[1][0]
    valid = ids >= 0
    return ids[valid], scores[valid], None
