"""Prometheus metrics; multiprocess mode under the server (serving/server.py sets PROMETHEUS_MULTIPROC_DIR).

Hit rate and snapshot age are derived at scrape time from the aggregated series, so they
are right across worker processes.
"""
from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
from serving.store.layout import LOOKUP_ENDPOINTS as LOOKUPS
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
        self.latency = Histogram("hybridserve_request_latency_seconds", "Time in the app per request",
                                 ["endpoint", "source"], buckets=_BUCKETS, registry=r)
        self.live_seconds = Counter("hybridserve_live_compute_seconds", "Thread CPU seconds in live model/FAISS work",
                                    ["endpoint"], registry=r)
        self.stale = Counter("hybridserve_stale_precomputed", "Precomputed answers too old to serve (computed live)",
                             ["endpoint"], registry=r)
        self.model_errors = Counter("hybridserve_model_errors", "Live predictions a registered model failed (503)",
                                    ["model"], registry=r)
        self.reload_failures = Counter("hybridserve_snapshot_reload_failures", "Snapshots refused at reload",
                                       registry=r)
        self.reloads = Counter("hybridserve_snapshot_reloads", "Snapshots swapped in", registry=r)
        self.snapshot_created = Gauge("hybridserve_snapshot_created_timestamp_seconds",
                                      "Creation time of the snapshot being served", registry=r,
                                      multiprocess_mode="max")
        self.requestlog_failures = Counter("hybridserve_requestlog_flush_failures", "Failed request-log flushes",
                                           registry=r)
        # One sample per worker process (pid label in multiprocess mode): what gc.freeze() hid at start.
        self.gc_frozen = Gauge("hybridserve_gc_frozen_objects", "Start-up objects frozen out of the garbage "
                               "collector's sight in this worker", registry=r, multiprocess_mode="all")
        self._children: dict = {}  # (endpoint, source, status) or a live kind -> children
        self.requestlog_dropped = Counter("hybridserve_requestlog_dropped_rows",
                                          "Request-log rows dropped to bound memory", registry=r)

    def observe(self, endpoint: str, source: str, status: int, seconds: float) -> None:
        """Count one request and its latency (labelled children cached: labels() is slow per call)."""
        key = (endpoint, source, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(endpoint, source, str(status)),
                                               self.latency.labels(endpoint, source))
        children[0].inc()
        children[1].observe(seconds)

    def live(self, kind: str, cpu_s: float) -> None:
        """Add one live computation's thread CPU time (the labelled child cached, as in ``observe``)."""
        child = self._children.get(kind)
        if child is None:
            child = self._children[kind] = self.live_seconds.labels(kind)
        child.inc(cpu_s)

    def render(self) -> bytes:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = self.registry
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
