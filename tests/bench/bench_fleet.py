"""A fleet's live computations with and without the shared tier (issue 22, target 2): 4 replicas behind
one port (granian's 4 workers, each its own process and local cache, SO_REUSEPORT spreading the
connections) replay the serving-modes trace (tests/bench/bench_modes.py: the same store, snapshot and
"today's" trace) in hybrid mode, once with `serving.shared_cache` on a real redis-server and once without,
each on a fresh server (and a flushed Redis), the order rotating per round. The live computations all
replicas made (their /metrics, summed) are divided by the distinct keys of the trace the snapshot does
not answer, counted in this process by the engine itself (``lookup(..., live=False)``). The cache TTL
is longer than the trace. Printed and written, never asserted.

    python tests/bench/bench_fleet.py [--items 100000 --users 50000 --interactions 1000000 --requests 20000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_modes import _answered_from, _metric, prepare_modes_store  # noqa: E402
from batch.tools.demo import ApiServer, free_port, http_get  # noqa: E402
from common import write_result  # noqa: E402
from cpu import measured  # noqa: E402
from loadgen import LOADGENS  # noqa: E402
from serving.web.app import create_app  # noqa: E402

REPLICAS = 4
VARIANTS = ("shared", "local")


def distinct_missed_keys(cfg: Path, paths: list[str]) -> tuple[int, int]:
    """(distinct keys the snapshot does not answer, requests for them) among ``paths``, by the engine."""
    from serving.settings import load_settings
    from serving.web.fastpath import HitPath

    app = create_app(load_settings(cfg, env={}), background=False)
    try:
        svc = app.extensions["hybridserve"]
        parser = HitPath(lambda *a: None, svc, None)
        engine = svc.engine
        keys, requests = set(), 0
        for path in paths:
            route, _, query = path.partition("?")
            lookup = parser._parse(route, query)
            if lookup is None:  # not a plain spelling: the path itself is its key
                keys.add(path)
                requests += 1
                continue
            if engine.lookup(lookup.model, lookup.query, lookup.key, lookup.k, live=False) is None:
                _, m = engine.model(lookup.model)
                keys.add((lookup.model, lookup.query, m.cache_key(lookup.query, lookup.key), lookup.k))
                requests += 1
        return len(keys), requests
    finally:
        svc.close()


class Redis:
    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        self.client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def _replay(cfg: Path, paths: list[str], concurrency: int, shared: str, measure) -> dict:
    prom = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    env = {"HYBRIDSERVE_SERVING_MODE": "hybrid", "PROMETHEUS_MULTIPROC_DIR": str(prom),
           "HYBRIDSERVE_SERVING_CACHE_TTL_S": "36000", "HYBRIDSERVE_SERVING_SHARED_CACHE": shared}
    server = ApiServer(cfg, workers=REPLICAS, env=env).start()
    try:
        progress = {"count": -1.0, "since": time.monotonic()}

        def done() -> bool:
            count = _answered_from(prom)
            if count != progress["count"]:
                progress.update(count=count, since=time.monotonic())
            return count >= len(paths) or (count > 0 and time.monotonic() - progress["since"] > 3.0)

        client = measured(measure, [server.proc.pid])(server.base, paths, concurrency, 900, once=True, done=done)
        text = http_get(server.base + "/metrics")[2].decode()
    finally:
        server.stop()
        shutil.rmtree(prom, ignore_errors=True)
    outcomes = {o: _metric(text, f'hybridserve_shared_cache_total{{outcome="{o}"}}')
                for o in ("hit", "waited", "miss", "error", "skipped")}
    return {"live_computations": _metric(text, "hybridserve_live_computations_total"),
            "errors_5xx": sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith("hybridserve_requests_total{") and 'status="5' in line),
            "shared_cache": outcomes, "requests_per_s": client["requests_per_s"],
            "cpu_us_per_request": client.get("cpu_us_per_request")}


def run(items: int = 100_000, users: int = 50_000, interactions: int = 1_000_000, requests: int = 20_000,
        exponent: float = 1.1, concurrency: int = 16, rounds: int = 2, workdir: Path | None = None,
        out_dir: Path | None = None) -> dict:
    load_start = list(os.getloadavg())
    cfg, settings, store, published, today = prepare_modes_store(items, users, interactions, requests, exponent,
                                                                 workdir)
    missed, missed_requests = distinct_missed_keys(cfg, today.paths)
    redis = Redis()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for r in range(rounds):
            for variant in VARIANTS[r % 2:] + VARIANTS[:r % 2]:
                redis.client.flushall()
                got = _replay(cfg, today.paths, concurrency, redis.url if variant == "shared" else "",
                              LOADGENS["wrk"])
                got["computations_per_missed_key"] = got["live_computations"] / missed
                runs[variant].append(got)
                print(f"round {r} {variant}: {got['live_computations']:.0f} live computations for {missed} distinct "
                      f"missed keys = {got['computations_per_missed_key']:.3f}x", file=sys.stderr)
    finally:
        redis.stop()
    result = {"items": items, "users": users, "requests": len(today.paths), "exponent": exponent,
              "replicas": REPLICAS, "how": "granian workers behind one port (SO_REUSEPORT), each its own cache",
              "concurrency": concurrency, "cache_ttl_s": 36000, "snapshot": published.snapshot_id,
              "distinct_missed_keys": missed, "missed_requests": missed_requests, "rounds": runs,
              "shared_computations_per_missed_key": max(x["computations_per_missed_key"] for x in runs["shared"]),
              "local_computations_per_missed_key": max(x["computations_per_missed_key"] for x in runs["local"]),
              "target": "shared_computations_per_missed_key <= 1.05",
              "load_average_start": load_start, "load_average_end": list(os.getloadavg())}
    print(f"\n{REPLICAS} replicas, {len(today.paths):,} requests, {missed:,} distinct missed keys "
          f"({missed_requests:,} requests): live computations per missed key with the shared tier "
          f"{result['shared_computations_per_missed_key']:.3f}x (target <= 1.05), without "
          f"{result['local_computations_per_missed_key']:.3f}x; load {load_start} -> {result['load_average_end']}")
    write_result("fleet_shared_cache", result, out_dir)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.requests, concurrency=a.concurrency, rounds=a.rounds)


if __name__ == "__main__":
    main()
