"""`create_app(settings)`: the only place the API is wired. Nothing heavy happens at import."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from flask import Flask
from flask_cors import CORS

from serving.engine import Engine, one_thread_per_pool
from serving.errors import ConfigError
from serving.requestlog import RequestLog
from serving.settings import Settings, load_settings
from serving.store import Store
from serving.web import api
from serving.web.fastpath import HitPath, cors_headers_for
from serving.web.metrics import HIT_FLUSH_S, Metrics
from serving.web.parse import Limits

LOG = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    requestlog: RequestLog
    metrics: Metrics
    limits: Limits
    _stop: threading.Event
    _reloader: threading.Thread | None = None
    hits: HitPath | None = None  # precomputed hits rendered and counted (serving.web.fastpath)

    def close(self) -> None:
        """Stop background work and flush the request log (worker exit, tests)."""
        self._stop.set()
        if self._reloader is not None:
            self._reloader.join(timeout=5)
        self.engine.close()
        self.requestlog.close()
        self.metrics.flush_hits()


def create_app(settings: Settings | None = None, clock: Callable[[], float] = time.time,
               background: bool = True) -> Flask:
    """Build the app for ``settings`` (default: $HYBRIDSERVE_CONFIG / defaults).

    ``clock`` drives freshness, cache TTLs and the request log (tests inject one);
    ``background=False`` starts no threads (tests call ``engine.reload()`` and ``requestlog.flush()``).
    """
    settings = settings or load_settings()
    # One thread per pool on the request path (FAISS's OpenMP, the rating model's OpenMP, BLAS):
    # two made single queries slower with a 4x worse p99, and workers already use every core.
    # Request threads other than this one set it again on their first live computation.
    one_thread_per_pool()
    store = Store(settings["paths.store"])
    metrics = Metrics()
    shared = _shared_tier(settings, clock)
    engine = Engine(store, settings["serving.max_age_s"], settings["serving.cache_ttl_s"],
                    settings["serving.cache_size"], clock=clock,
                    verify_checksums=settings["serving.verify_checksums"], mode=settings["serving.mode"],
                    deadline_ms=settings["serving.live_deadline_ms"],
                    deadlines_ms={m.name: m.deadline_ms for m in settings.models if m.deadline_ms is not None},
                    live_threads=settings["serving.live_threads"], live_queue=settings["serving.live_queue"],
                    error_log_interval_s=settings["serving.error_log_interval_s"],
                    cache_max_bytes=int(settings["serving.cache_max_mb"] * 1024 * 1024), shared=shared,
                    max_waiting=settings["serving.live_max_waiting"])
    engine.reloader.on_snapshot = lambda snap: (metrics.snapshot_created.set(snap.created_at), metrics.reloads.inc(),
                                                metrics.serving(snap.id))
    engine.reloader.on_failure = lambda _msg: metrics.reload_failures.inc()
    engine.on_stale = lambda kind: metrics.stale.labels(kind).inc()
    engine.on_live = metrics.live
    engine.on_model_error = lambda name: metrics.model_errors.labels(name).inc()
    engine.on_live_refused = metrics.refused
    if shared is not None:
        shared.on_outcome = lambda outcome: metrics.shared_cache.labels(outcome).inc()
    requestlog = RequestLog(store, settings["serving.log_flush_rows"], settings["serving.log_flush_interval_s"],
                            settings["serving.log_max_buffer"], clock=clock)
    requestlog.on_flush_failure = metrics.requestlog_failures.inc
    requestlog.on_drop = metrics.requestlog_dropped.inc
    engine.reload()  # a worker with no valid snapshot still starts; /readyz says why

    # the page at / (api.page: one document, its CSS and JS put in), unless serving.page is off
    app = Flask("serving.web", static_folder=None)
    app.json.sort_keys = False
    limits = Limits(settings["serving.k_limit"], settings["serving.session_max_items"])
    services = Services(settings, engine, requestlog, metrics, limits, threading.Event())
    app.extensions["hybridserve"] = services
    origins = [o.strip() for o in settings["serving.cors_origins"].split(",") if o.strip()]
    cors = {"methods": ["GET"], "expose_headers": ["ETag", "Cache-Control"], "max_age": 3600}
    if origins:  # empty: no CORS (a same-origin deployment saves its cost on every response)
        CORS(app, resources={r"/v1/*": {"origins": origins}}, **cors)
    api.register(app)
    # the hit path: below Flask unless serving.fast_path is off; the page asks it for its first answer
    services.hits = HitPath(app.wsgi_app, services,
                            cors_headers_for(app, {**cors, "origins": origins}) if origins else None)
    if settings["serving.fast_path"]:
        app.wsgi_app = services.hits  # type: ignore[method-assign]

    if background:
        requestlog.start()
        services._reloader = threading.Thread(target=_reload_loop, args=(engine, settings, services._stop),
                                              name="snapshot-reload", daemon=True)
        services._reloader.start()
        threading.Thread(target=_flush_hits_loop, args=(metrics, services._stop), name="metrics-hits",
                         daemon=True).start()
        # Flush the request log when the process ends. atexit is not enough: a server's worker started by
        # multiprocessing with fork (granian's) leaves through os._exit, which skips atexit; it does end
        # its main thread and then join the non-daemon threads, this one among them.
        threading.Thread(target=_close_after_main, args=(services,), name="requestlog-close-at-exit",
                         daemon=False).start()
    return app


def _shared_tier(settings: Settings, clock: Callable[[], float]):
    """The fleet's Redis tier when serving.shared_cache names one (no connection is made here)."""
    url = settings["serving.shared_cache"]
    if not url:
        return None
    try:
        from serving.shared import SharedTier
    except ImportError:
        raise ConfigError(f"{settings.source}: serving.shared_cache: needs the redis extra "
                          "(pip install 'hybridserve[redis]')") from None
    return SharedTier(url, settings["serving.shared_cache_timeout_ms"] / 1000, settings["serving.shared_cache_retry_s"],
                      clock, settings["serving.error_log_interval_s"])


def _close_after_main(services: Services) -> None:
    """Wait for the main thread to end (a worker that drained its connections), then flush."""
    threading.main_thread().join()
    services.close()


def _flush_hits_loop(metrics: Metrics, stop: threading.Event) -> None:
    """Add the hits counted in memory to Prometheus every HIT_FLUSH_S (serving.web.metrics)."""
    while not stop.wait(HIT_FLUSH_S):
        metrics.flush_hits()


def _reload_loop(engine: Engine, settings: Settings, stop: threading.Event) -> None:
    """Watch CURRENT; load, check and swap a new snapshot off the request path."""
    while not stop.wait(settings["serving.reload_interval_s"]):
        try:
            engine.reload()
        except Exception:  # the loop must survive anything a broken store throws at it
            LOG.exception("snapshot reload check failed")
