"""Snapshot swaps under load on S3 (issue 22, target 3: 0 failed requests across 3 swaps). moto's S3 server
(in this process) holds the store; the real batch job (``python -m batch run``) publishes a snapshot into
it, then 2 replicas (``python -m serving.server``, each its own cache folder: two "machines") serve it
with a short ``serving.reload_interval_s`` while keep-alive clients in a child process replay a trace over
them the whole time (hits and misses of every endpoint; at most ``--rate`` requests/s in all, so that the
batch job on the same cores still runs), and the batch job publishes 3 new snapshots one after another,
each once every replica serves the one before. Every request's outcome is counted: anything but a 200,
or a connection error, is a failure. Each replica's move is read from its /metrics
(``hybridserve_snapshot_served``: every worker on the new snapshot) and timed from the moment CURRENT
moved in the bucket. Printed and written, never asserted.

    python tests/bench/bench_swaps.py [--items 20000 --users 10000 --interactions 200000 --swaps 3]
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from batch.inputs import INTERACTIONS, generate_sample, load_inputs, write_inputs  # noqa: E402
from batch.tools.demo import REPO, ApiServer, http_get  # noqa: E402
from batch.tools.trace import make_trace  # noqa: E402
from common import write_result  # noqa: E402

WORK = HERE / ".work"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
_SERVED = re.compile(r'^hybridserve_snapshot_served\{(?=[^}]*pid="(\w+)")(?=[^}]*snapshot="([^"]+)")[^}]*\} 1\.0$',
                     re.M)


def _drive(port: int, paths: list[str], offset: int, interval: float, halt, tally: dict,
           lock: threading.Lock) -> None:
    """GETs ``paths`` in a loop over one keep-alive connection, one every ``interval`` seconds at most,
    until ``halt``; every outcome counted."""
    conn, i = None, offset
    statuses, sources, errors, seen, latencies = Counter(), Counter(), Counter(), {}, []
    due = time.perf_counter()
    while not halt.is_set():
        path = paths[i % len(paths)]
        i += 1
        due += interval
        t0 = time.perf_counter()
        if due > t0:
            time.sleep(due - t0)
            t0 = time.perf_counter()
        else:
            due = t0  # behind: no burst to catch up
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:  # a failure: counted, then a new connection
            errors[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            conn = None
            continue
        latencies.append(time.perf_counter() - t0)
        statuses[resp.status] += 1
        if resp.status == 200:
            doc = json.loads(body)
            sources[doc.get("source")] += 1
            seen.setdefault(doc.get("snapshot"), time.time())  # first answer from each snapshot
    if conn is not None:
        conn.close()
    with lock:
        tally["statuses"].update(statuses)
        tally["sources"].update(sources)
        tally["errors"].update(errors)
        tally["latencies"].extend(latencies)
        first = tally["first_seen"].setdefault(port, {})
        for sid, t in seen.items():
            first[sid] = min(t, first.get(sid, t))


def client_pool(ports: list[int], paths: list[str], per_replica: int, rate: float, halt, results) -> None:
    """The load, in its own process (its GIL is not the emulator's): ``per_replica`` connections to each
    port, ``rate`` requests/s in all at most (the batch job shares the machine's cores)."""
    tally = {"statuses": Counter(), "sources": Counter(), "errors": Counter(), "latencies": [], "first_seen": {}}
    lock = threading.Lock()
    interval = len(ports) * per_replica / rate
    threads = [threading.Thread(target=_drive, args=(port, paths, (j * 7919 + n * 104729) % len(paths), interval,
                                                     halt, tally, lock), daemon=True)
               for j, port in enumerate(ports) for n in range(per_replica)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.asarray(tally["latencies"]) * 1000.0
    results.put({"statuses": {str(k): v for k, v in tally["statuses"].items()}, "sources": dict(tally["sources"]),
                 "connection_errors": dict(tally["errors"]), "answered": int(lat.size),
                 "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else 0.0,
                                "p99": float(np.percentile(lat, 99)) if lat.size else 0.0,
                                "max": float(lat.max()) if lat.size else 0.0},
                 "first_answer_from": {str(p): v for p, v in tally["first_seen"].items()}})


def _served(base: str) -> dict[str, str]:
    """pid -> the snapshot that worker serves, from the replica's /metrics."""
    return {pid: sid for pid, sid in _SERVED.findall(http_get(base + "/metrics", timeout=10)[2].decode())}


class Watch(threading.Thread):
    """Polls CURRENT in the bucket and each replica's /metrics: when CURRENT first named a snapshot, and
    when every worker of a replica first served it."""

    def __init__(self, current, replicas: list[ApiServer], workers: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.current, self.replicas, self.workers, self.period = current, replicas, workers, period
        self.halt = threading.Event()
        self.current_at: dict[str, float] = {}
        self.moved_at: dict[int, dict[str, float]] = {r.port: {} for r in replicas}
        self.problems: Counter = Counter()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                sid = self.current()
                if sid:
                    self.current_at.setdefault(sid, time.time())
            except Exception as exc:  # noqa: BLE001 -- counted, polled again
                self.problems[f"CURRENT: {type(exc).__name__}"] += 1
            for r in self.replicas:
                try:
                    served = _served(r.base)
                except OSError as exc:
                    self.problems[f"/metrics: {type(exc).__name__}"] += 1
                    continue
                ids = set(served.values())
                if len(served) >= self.workers and len(ids) == 1:
                    self.moved_at[r.port].setdefault(ids.pop(), time.time())
            self.halt.wait(self.period)


def _publish(cfg: Path, env: dict) -> float:
    """One run of the real batch job (its own process); its seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batch", "--config", str(cfg), "run"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"batch run exited {proc.returncode}: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def run(items: int = 20_000, users: int = 10_000, interactions: int = 200_000, swaps: int = 3, replicas: int = 2,
        workers: int = 2, per_replica: int = 4, rate: float = 300.0, reload_interval_s: float = 0.5,
        trace_requests: int = 20_000, dwell_s: float = 2.0, move_timeout_s: float = 180.0,
        workdir: Path | None = None, out_dir: Path | None = None) -> dict:
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    load_start = list(os.getloadavg())
    workdir = Path(workdir or WORK / f"swaps-{items}-{users}-{interactions}")
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "inputs" / INTERACTIONS).is_file():
        print(f"generating {users:,} users x {items:,} items x {interactions:,} interactions ...", file=sys.stderr)
        write_inputs(workdir / "inputs", *generate_sample(users, items, interactions, seed=11))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the emulator logs a line per request otherwise
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env_keys = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in [*env_keys, "XDG_CACHE_HOME"]}
    os.environ.update(env_keys)
    servers: list[ApiServer] = []
    ctx = multiprocessing.get_context("spawn")
    halt, pool = ctx.Event(), None
    try:
        bucket = f"swaps-{uuid.uuid4().hex[:8]}"
        raw = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        raw.mkdir(bucket)
        url = f"s3://{bucket}/store"
        cfg = workdir / "config.toml"
        cfg.write_text(f'[paths]\nstore = "{url}"\ninputs = "{workdir / "inputs"}"\n'
                       f"[sample]\nusers = {users}\nitems = {items}\ninteractions = {interactions}\n"
                       f"[serving]\nreload_interval_s = {reload_interval_s}\n")
        batch_env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "publisher")}
        first_s = _publish(cfg, batch_env)
        print(f"first publish (trains the model): {first_s:.1f} s", file=sys.stderr)

        def current() -> str | None:
            return raw.cat_file(f"{bucket}/store/CURRENT").decode().strip() or None
        first = current()
        inputs = load_inputs(workdir / "inputs")
        item_ids = np.sort(inputs.items["item_id"].to_numpy())
        user_ids = np.sort(inputs.interactions["user_id"].unique())
        paths = make_trace(item_ids, user_ids, trace_requests, seed=7).paths
        servers = [ApiServer(cfg, workers=workers, env={"XDG_CACHE_HOME": str(workdir / f"machine-{i}")})
                   for i in range(replicas)]
        for s in servers:
            s.start(timeout=300)
        watch = Watch(current, servers, workers)
        watch.start()
        results = ctx.Queue()
        pool = ctx.Process(target=client_pool,
                           args=([s.port for s in servers], paths, per_replica, rate, halt, results))
        pool.start()
        t_load = time.time()
        time.sleep(dwell_s)
        published, loads = [], []
        for n in range(swaps):
            loads.append(os.getloadavg()[0])
            took = _publish(cfg, batch_env)
            sid = current()
            deadline = time.time() + move_timeout_s
            while time.time() < deadline and not all(sid in watch.moved_at[s.port] for s in servers):
                time.sleep(0.05)
            published.append({"snapshot": sid, "batch_run_s": took})
            print(f"swap {n + 1}: {sid} published in {took:.1f} s", file=sys.stderr)
            time.sleep(dwell_s)  # answers from the new snapshot before the next publish
        halt.set()
        client = results.get(timeout=120)
        pool.join(30)
        t_end = time.time()
        watch.halt.set()
        watch.join(10)
    finally:
        halt.set()  # a publish that failed must not leave the clients running
        if pool is not None and pool.is_alive():
            pool.join(60)
            if pool.is_alive():
                pool.terminate()
        codes = [s.stop() for s in servers]
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for p in published:
        sid, at = p["snapshot"], watch.current_at.get(p["snapshot"])
        p["replicas_moved_s"] = [round(watch.moved_at[s.port][sid] - at, 3) if at and sid in watch.moved_at[s.port]
                                 else None for s in servers]
        p["every_replica_moved"] = all(m is not None for m in p["replicas_moved_s"])
        # the loaded-in seconds each worker logged (copy verified, tables mapped), for the copy's share
        p["load_s"] = [[float(x) for x in re.findall(rf"loaded snapshot {sid} in ([\d.]+)s", s.output)]
                       for s in servers]
        p["copied_once_per_replica"] = [s.output.count(f"copied snapshot {sid}") == 1 for s in servers]
    # the ports are this run's: name each replica's first answers by its index instead
    client["first_answer_from"] = [client["first_answer_from"].get(str(s.port), {}) for s in servers]
    failed = sum(v for k, v in client["statuses"].items() if k != "200") + sum(client["connection_errors"].values())
    requests = client["answered"] + sum(client["connection_errors"].values())
    moved = [m for p in published for m in p["replicas_moved_s"] if m is not None]
    result = {"items": items, "users": users, "interactions": interactions, "store": "s3 (moto server, in-process)",
              "replicas": replicas, "workers_per_replica": workers, "connections": replicas * per_replica,
              "rate_cap_per_s": rate,
              "reload_interval_s": reload_interval_s, "trace_paths": len(paths), "first_snapshot": first,
              "first_publish_s": first_s, "swaps": published, "requests": requests, "failed": failed,
              "requests_per_s": requests / (t_end - t_load), "client": client, "watch_problems": dict(watch.problems),
              "every_replica_moved_every_time": all(p["every_replica_moved"] for p in published),
              "time_to_move_s": {"min": min(moved, default=None), "max": max(moved, default=None),
                                 "median": float(np.median(moved)) if moved else None},
              "server_exit_codes": codes, "target": "failed == 0 across 3 swaps, every replica moved",
              "load_average_at_publishes": loads,
              "load_average_start": load_start, "load_average_end": list(os.getloadavg())}
    ok = failed == 0 and result["every_replica_moved_every_time"] and len(published) >= 3
    print(f"\n{'MET' if ok else 'NOT MET'}: {failed} failed of {requests:,} requests "
          f"({result['requests_per_s']:,.0f}/s over {replicas} replicas x {workers} workers) across "
          f"{len(published)} swaps on S3; every replica moved each time: {result['every_replica_moved_every_time']}; "
          f"CURRENT moved -> replica serving: {result['time_to_move_s']['min']}-{result['time_to_move_s']['max']} s "
          f"(reload interval {reload_interval_s} s); load {load_start} -> {result['load_average_end']}")
    write_result("fleet_swaps", result, out_dir)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--interactions", type=int, default=200_000)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=300.0, help="requests/s at most, all connections together")
    ap.add_argument("--reload-interval", type=float, default=0.5)
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.swaps, a.replicas, a.workers, rate=a.rate,
        reload_interval_s=a.reload_interval)


if __name__ == "__main__":
    main()
