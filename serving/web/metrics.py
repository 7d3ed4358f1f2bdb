"""Prometheus metrics; multiprocess mode under the server (serving/server.py sets PROMETHEUS_MULTIPROC_DIR).

Hit rate and snapshot age are derived at scrape time from the aggregated series, so they
are right across worker processes.
"""
from __future__ import annotations

import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
from serving.store.layout import LOOKUP_ENDPOINTS as LOOKUPS
# what per_model() counts for each model
PER_MODEL = ("computed", "deadline", "busy", "error", "stale_deadline", "stale_busy", "stale_error")
# How often each worker adds the hits it counted in memory to its Prometheus series (Metrics.hit)
HIT_FLUSH_S = 0.25
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self) -> None:
        # A registry per app: tests build many apps in one process.
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybridserve_requests", "Requests answered", ["endpoint", "source", "status"],
                                registry=r)
        self.latency = Histogram("hybridserve_request_latency_seconds", "Time in the app per request (but the "
                                 "hits answered below Flask: hybridserve_fast_path_*)",
                                 ["endpoint", "source"], buckets=_BUCKETS, registry=r)
        # The hit path's own series, counted in this worker's memory and added to the ones above in
        # batches (flush_hits): a multiprocess-mode increment writes a memory-mapped file under a lock,
        # three of them per hit cost as much as the rest of the hit (docs/server.md).
        self.fast_hits = Counter("hybridserve_fast_path_requests", "Precomputed hits answered below Flask "
                                 "(also in hybridserve_requests_total)", ["endpoint"], registry=r)
        self.fast_seconds = Counter("hybridserve_fast_path_seconds", "Time in the app of the hits answered "
                                    "below Flask (mean: rate of this over hybridserve_fast_path_requests_total)",
                                    ["endpoint"], registry=r)
        self._hits: dict[str, list] = {}  # endpoint -> [hits, seconds] not yet added
        self._hits_lock = threading.Lock()
        self.live_seconds = Counter("hybridserve_live_compute_seconds", "Thread CPU seconds in live model/FAISS work",
                                    ["endpoint"], registry=r)
        self.stale = Counter("hybridserve_stale_precomputed", "Precomputed answers too old to serve (computed live)",
                             ["endpoint"], registry=r)
        self.model_errors = Counter("hybridserve_model_errors", "Live computations a model failed (it raised)",
                                    ["model"], registry=r)
        self.live_computations = Counter("hybridserve_live_computations", "Live answers computed, per model",
                                         ["model"], registry=r)
        self.live_refused = Counter("hybridserve_live_refused", "Requests whose live answer was not had: past the "
                                    "model's deadline, its queue full, or the model failed (503, or stale if "
                                    "there was a precomputed answer)", ["model", "reason"], registry=r)
        self.shared_cache = Counter("hybridserve_shared_cache", "Lookups in the fleet's shared cache (Redis) by "
                                    "outcome: hit, waited (another replica computed it), miss (computed here), "
                                    "error (Redis failed or timed out), skipped (Redis skipped after failures)",
                                    ["outcome"], registry=r)
        self.stale_served = Counter("hybridserve_stale_served", "Precomputed answers past their freshness bound "
                                    "served marked stale, because the live answer was not had",
                                    ["model", "reason"], registry=r)
        self.reload_failures = Counter("hybridserve_snapshot_reload_failures", "Snapshots refused at reload",
                                       registry=r)
        self.reloads = Counter("hybridserve_snapshot_reloads", "Snapshots swapped in", registry=r)
        self.snapshot_created = Gauge("hybridserve_snapshot_created_timestamp_seconds",
                                      "Creation time of the snapshot being served", registry=r,
                                      multiprocess_mode="max")
        # Which snapshot each worker serves (1; 0 for the one it swapped out): replicas on an object
        # store say which copy they run. A pid label per worker in multiprocess mode ("liveall").
        self.snapshot_served = Gauge("hybridserve_snapshot_served", "The snapshot this worker serves (1)",
                                     ["snapshot"], registry=r, multiprocess_mode="liveall")
        self._served: str | None = None
        self.requestlog_failures = Counter("hybridserve_requestlog_flush_failures", "Failed request-log flushes",
                                           registry=r)
        # One sample per worker process (pid label in multiprocess mode): what gc.freeze() hid at start.
        self.gc_frozen = Gauge("hybridserve_gc_frozen_objects", "Start-up objects frozen out of the garbage "
                               "collector's sight in this worker", registry=r, multiprocess_mode="all")
        self._children: dict = {}  # (endpoint, source, status) or a live kind -> children
        self.requestlog_dropped = Counter("hybridserve_requestlog_dropped_rows",
                                          "Request-log rows dropped to bound memory", registry=r)

    def serving(self, snapshot_id: str) -> None:
        """This worker now serves ``snapshot_id``."""
        if self._served is not None and self._served != snapshot_id:
            self.snapshot_served.labels(self._served).set(0)
        self.snapshot_served.labels(snapshot_id).set(1)
        self._served = snapshot_id

    def observe(self, endpoint: str, source: str, status: int, seconds: float) -> None:
        """Count one request and its latency (labelled children cached: labels() is slow per call)."""
        key = (endpoint, source, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(endpoint, source, str(status)),
                                               self.latency.labels(endpoint, source))
        children[0].inc()
        children[1].observe(seconds)

    def hit(self, endpoint: str, seconds: float) -> None:
        """Count one hit answered below Flask (precomputed, 200) in memory; ``flush_hits`` adds the
        counts to Prometheus (every HIT_FLUSH_S, and before this worker renders its metrics)."""
        with self._hits_lock:
            pending = self._hits.get(endpoint)
            if pending is None:
                self._hits[endpoint] = [1, seconds]
            else:
                pending[0] += 1
                pending[1] += seconds

    def flush_hits(self) -> None:
        """Add the hits counted in memory to their Prometheus series (one increment per series)."""
        with self._hits_lock:
            pending, self._hits = self._hits, {}
        for endpoint, (n, seconds) in pending.items():
            self.requests.labels(endpoint, "precomputed", "200").inc(n)
            self.fast_hits.labels(endpoint).inc(n)
            self.fast_seconds.labels(endpoint).inc(seconds)

    def live(self, kind: str, cpu_s: float, model: str | None = None) -> None:
        """Count one live computation of ``model`` and add its thread CPU time to ``kind``'s (the
        labelled children cached, as in ``observe``)."""
        child = self._children.get(kind)
        if child is None:
            child = self._children[kind] = self.live_seconds.labels(kind)
        child.inc(cpu_s)
        if model is not None:
            counted = self._children.get(("model", model))
            if counted is None:
                counted = self._children[("model", model)] = self.live_computations.labels(model)
            counted.inc()

    def refused(self, model: str, why: str) -> None:
        """Count a live answer not had (``why``: deadline | busy | error) or a stale answer served for
        it (``stale_<why>``)."""
        if why.startswith("stale_"):
            self.stale_served.labels(model, why[6:]).inc()
        else:
            self.live_refused.labels(model, why).inc()

    def _registry(self) -> CollectorRegistry:
        """The series of every worker (multiprocess mode) or of this app; this worker's hits first
        flushed (the other workers' are at most HIT_FLUSH_S behind)."""
        self.flush_hits()
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return registry
        return self.registry

    def per_model(self) -> dict[str, dict[str, int]]:
        """Each model's live counts, summed over the workers: computations, deadline misses, full
        queues, failures (requests refused) and stale answers served (/readyz, /v1/models)."""
        out: dict[str, dict[str, int]] = {}
        names = {"hybridserve_live_computations": "computed", "hybridserve_live_refused": "",
                 "hybridserve_stale_served": "stale_"}
        for family in self._registry().collect():
            prefix = names.get(family.name)
            if prefix is None:
                continue
            for s in family.samples:
                if not s.name.endswith("_total"):
                    continue
                field = prefix if prefix == "computed" else prefix + s.labels["reason"]
                counts = out.setdefault(s.labels["model"], dict.fromkeys(PER_MODEL, 0))
                counts[field] = counts.get(field, 0) + int(s.value)
        return out

    def render(self) -> bytes:
        registry = self._registry()
        text = generate_latest(registry)
        total = hits = 0.0
        created = None
        for family in registry.collect():
            if family.name == "hybridserve_requests":
                for s in family.samples:
                    if (s.name.endswith("_total") and s.labels.get("endpoint") in LOOKUPS
                            and s.labels.get("status", "").startswith(("2", "3"))):
                        total += s.value
                        hits += s.value if s.labels.get("source") == "precomputed" else 0.0
            elif family.name == "hybridserve_snapshot_created_timestamp_seconds":
                values = [s.value for s in family.samples if s.value > 0]
                created = max(values) if values else None
        extra = ["# HELP hybridserve_hit_rate Share of answered requests served precomputed",
                 "# TYPE hybridserve_hit_rate gauge", f"hybridserve_hit_rate {hits / total if total else 0.0}"]
        if created is not None:
            extra += ["# HELP hybridserve_snapshot_age_seconds Age of the snapshot being served",
                      "# TYPE hybridserve_snapshot_age_seconds gauge",
                      f"hybridserve_snapshot_age_seconds {max(0.0, time.time() - created)}"]
        return text + ("\n".join(extra) + "\n").encode()
