"""The HTTP server under the API, side by side in one run, every server answering the same bytes:

- hybridserve on granian (`python -m serving.server`, what `make serve` runs);
- nginx serving those bytes as static files (the physical limit of this machine);
- the usual prediction-cache design: FastAPI + uvicorn (2 workers) + Redis (fastapi_redis_app.py),
  every answer already cached in Redis;
- the former production setup: gunicorn 27 with the project's own loop worker (loop_worker.py);
- granian's floor: an app that only looks the bytes up in a dict (floor_wsgi_app.py), same granian
  settings: what granian costs per request here, whatever the app does;
- hybridserve on granian with one app thread per worker (`serving.blocking_threads = 1`): what the
  default's pool of app threads (a request waiting for a live answer holds one) costs the hits.

Each gets the same precomputed paths (wrk, 16 keep-alive connections and 1), in alternating short
runs; medians are reported. Then slow clients: 50 connections trickling a header line every 0.5 s and
50 that sent half a request stay open while wrk measures the hits on other connections.

    python tests/bench/bench_server.py [--items 100000 --seconds 5 --rounds 3]

nginx, redis-server and wrk come from apt (make bench installs them); fastapi, uvicorn, redis and
gunicorn from the `bench` extra of pyproject.toml.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_api import WORK, _median_run, prepare  # noqa: E402
from batch.tools.demo import ApiServer, free_port, http_get  # noqa: E402
from common import write_result  # noqa: E402
from cpu import measured  # noqa: E402
from loadgen import LOADGENS  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.store import Store  # noqa: E402

SERVERS = ("granian", "nginx", "fastapi_redis", "gunicorn_loop", "granian_floor", "granian_1thread")
_NGINX_CONF = """
worker_processes {workers};
{user}
pid {root}/nginx.pid;
error_log {root}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {root}/static;
        location = /readyz {{ return 200 "ok"; }}
        location / {{ default_type application/json; try_files $uri.json =404; }}
    }}
}}
"""


class Proc:
    """A baseline server in a child process, ready when ``ready_url`` answers 200."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, base: str, env: dict | None = None):
        self.name, self.cmd, self.ready_url, self.base = name, cmd, ready_url, base
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Proc":
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self._log.read()[-2000:]}")
            try:
                if http_get(self.ready_url, timeout=2)[0] == 200:
                    time.sleep(3.0 if self.name != "redis" else 0)  # every worker up, not only the first
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()


def require(tool: str) -> str:
    path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)), None)
    if path is None:
        raise SystemExit(f"{tool} is not installed: `apt-get install nginx-light redis-server wrk` (make bench does this)")
    return path


def start_nginx(root: Path, bodies: dict[str, bytes], workers: int) -> Proc:
    static = root / "static"
    shutil.rmtree(static, ignore_errors=True)
    for path, body in bodies.items():
        f = static / (path.split("?")[0].lstrip("/") + ".json")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(body)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(workers=workers, root=root, port=port,
                                       user="user root;" if os.geteuid() == 0 else ""))
    base = f"http://127.0.0.1:{port}"
    return Proc("nginx", [require("nginx"), "-p", str(root), "-c", str(conf)], base + "/readyz", base).start()


def start_redis(bodies: dict[str, bytes]) -> tuple[Proc, str]:
    import redis

    port = free_port()
    proc = Proc("redis", [require("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], "", "")
    proc._log = tempfile.TemporaryFile(mode="w+")
    proc.proc = subprocess.Popen(proc.cmd, stdout=proc._log, stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis(port=port)
    deadline = time.time() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    with client.pipeline() as pipe:
        for path, body in bodies.items():
            item = path.split("/")[3]
            k = path.split("k=")[1]
            pipe.set(f"similar:{item}:{k}", body)
        pipe.execute()
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def start_fastapi(cfg: Path, redis_url: str, workers: int) -> Proc:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"REDIS_URL": redis_url, "HYBRIDSERVE_CONFIG": str(cfg), "PYTHONPATH": str(HERE)}
    return Proc("fastapi_redis", [sys.executable, "-m", "uvicorn", "fastapi_redis_app:app", "--host", "127.0.0.1",
                                  "--port", str(port), "--workers", str(workers), "--no-access-log",
                                  "--log-level", "warning"], base + "/readyz", base, env).start()


def start_loop_worker(cfg: Path, workers: int) -> Proc:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"HYBRIDSERVE_CONFIG": str(cfg), "PYTHONPATH": str(HERE), "LOOP_WORKER_BIND": f"127.0.0.1:{port}",
           "HYBRIDSERVE_SERVING_WORKERS": str(workers)}
    env_clean = {k: v for k, v in env.items()}
    return Proc("gunicorn_loop", [sys.executable, "-m", "gunicorn", "-c", "python:loop_gunicorn_conf",
                                  "serving.web.app:create_app()"], base + "/readyz", base, env_clean).start()


def start_granian_floor(root: Path, bodies: dict[str, bytes], workers: int) -> Proc:
    root.mkdir(parents=True, exist_ok=True)
    table = root / "floor-bodies.json"
    table.write_text(json.dumps({path: body.decode() for path, body in bodies.items()}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    granian = str(Path(sys.executable).parent / "granian")
    return Proc("granian_floor", [granian, "--interface", "wsgi", "--workers", str(workers), "--runtime-threads", "1",
                                  "--blocking-threads", "1", "--host", "127.0.0.1", "--port", str(port),
                                  "--working-dir", str(HERE), "floor_wsgi_app:app"],
                base + "/readyz", base, {"FLOOR_BODIES": str(table)}).start()


class SlowClients:
    """``trickling`` connections sending one header line every ``every_s`` and ``half`` connections that
    sent half a request line, all kept open until closed."""

    def __init__(self, port: int, trickling: int = 50, half: int = 50, every_s: float = 0.5):
        self.port, self.every_s = port, every_s
        self.trickling = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(trickling)]
        self.half = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(half)]
        self._stop = threading.Event()
        self.dropped = 0  # connections the server closed while they trickled (its header timeout)
        for s in self.half:
            s.sendall(b"GET /v1/items/1/simil")
        for s in self.trickling:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        n = 0
        while not self._stop.wait(self.every_s):
            n += 1
            for s in list(self.trickling):
                try:
                    s.sendall(b"X-Slow-%d: 1\r\n" % n)
                except OSError:
                    self.trickling.remove(s)
                    self.dropped += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.trickling + self.half:
            s.close()


def _measure_slow(base: str, port: int, paths: list[str], seconds: float, measure) -> dict:
    slow = SlowClients(port)
    try:
        time.sleep(1.0)
        at16 = measure(base, paths, 16, seconds)
        at1 = measure(base, paths, 1, seconds)
    finally:
        slow.close()
    return {"trickling": 50, "half_sent": 50, "at_16": at16, "at_1": at1,
            "trickling_dropped_by_server": slow.dropped}


def run(items: int = 100_000, users: int = 50_000, interactions: int = 1_000_000, seconds: float = 4.0,
        rounds: int = 5, loadgen: str = "wrk", workdir: Path | None = None, out_dir: Path | None = None,
        servers: tuple[str, ...] = SERVERS, n_paths: int = 1000, config: Path | None = None) -> dict:
    """``config``: serve that config's store instead of preparing one of the given size."""
    measure = LOADGENS[loadgen]
    load_start = list(os.getloadavg())
    if config is not None:
        cfg, settings = Path(config), load_settings(config, env={})
        store = Store(settings["paths.store"])
    else:
        cfg, settings, store = prepare(items, users, interactions, workdir)
    root = Path(workdir or WORK) / "server-bench"
    root.mkdir(parents=True, exist_ok=True)
    sid = store.current_id()
    hot = store.read_table(sid, "similar_items").column("item_id").to_numpy()
    rng = np.random.default_rng(0)
    paths = [f"/v1/items/{i}/similar?k=10" for i in rng.permutation(hot)[:n_paths]]
    workers = settings["serving.workers"]
    result: dict = {"items": len(hot) if config is not None else items, "snapshot": sid, "workers": workers, "paths": len(paths), "loadgen": loadgen,
                    "seconds_per_run": seconds, "rounds": rounds, "servers": list(servers),
                    "method": "all servers up at once, same paths and bytes; short runs alternate; medians"}
    started: dict[str, object] = {}
    redis_proc = None
    try:
        started["granian"] = ApiServer(cfg).start()
        bodies = {}
        for p in paths:
            status, _, body = http_get(started["granian"].base + p)
            if status != 200 or json.loads(body)["source"] != "precomputed":
                raise RuntimeError(f"expected a precomputed answer for {p}, got {status} {body[:200]!r}")
            bodies[p] = body
        result["body_bytes_median"] = float(np.median([len(b) for b in bodies.values()]))
        if "nginx" in servers:
            started["nginx"] = start_nginx(root / "nginx", bodies, workers)
        if "fastapi_redis" in servers:
            redis_proc, url = start_redis(bodies)
            started["fastapi_redis"] = start_fastapi(cfg, url, workers)
        if "gunicorn_loop" in servers:
            started["gunicorn_loop"] = start_loop_worker(cfg, workers)
        if "granian_floor" in servers:
            started["granian_floor"] = start_granian_floor(root / "floor", bodies, workers)
        if "granian_1thread" in servers:
            started["granian_1thread"] = ApiServer(cfg, env={"HYBRIDSERVE_SERVING_BLOCKING_THREADS": "1"}).start()
        for name, srv in started.items():  # the same bytes from every server (granian's age_s moves on)
            status, _, body = http_get(srv.base + paths[0])
            same = json.loads(body) | {"age_s": 0} == json.loads(bodies[paths[0]]) | {"age_s": 0}
            if status != 200 or not same:
                raise RuntimeError(f"{name} answered {status} {body[:200]!r}")
        # CPU seconds per answered request of each design's processes (the server's main process and
        # workers; for FastAPI also the Redis it reads): a view of the cost the machine's load moves less.
        roots = {name: [srv.proc.pid] for name, srv in started.items()}
        if redis_proc is not None and "fastapi_redis" in roots:
            roots["fastapi_redis"].append(redis_proc.proc.pid)
        runs: dict[str, dict[str, list]] = {n: {"at_16": [], "at_1": []} for n in started}
        for _ in range(rounds):
            for name, srv in started.items():
                runs[name]["at_16"].append(measured(measure, roots[name])(srv.base, paths, 16, seconds))
            for name, srv in started.items():
                runs[name]["at_1"].append(measured(measure, roots[name])(srv.base, paths, 1, seconds))
        for name in started:
            result[name] = {k: _median_run(v) for k, v in runs[name].items()}
        # Slow clients, against granian and (for comparison) the loop worker it replaces.
        result["slow_clients"] = {}
        for name in ("granian", "gunicorn_loop"):
            if name in started:
                srv = started[name]
                result["slow_clients"][name] = _measure_slow(srv.base, int(srv.base.rsplit(":", 1)[1]), paths,
                                                             seconds, measure)
    finally:
        for srv in started.values():
            srv.stop()
        if redis_proc is not None:
            redis_proc.stop()

    # The machine is shared: its load moves between rounds more than between the servers of one round.
    # So a ratio is the median of the per-round ratios (each round measures the servers back to back).
    # Beside each req/s ratio, the same comparison by CPU per request (the other design's CPU per
    # request over granian's): what the req/s ratio would be if both had the machine's cores to
    # themselves, and much less moved by the other work on a shared machine.
    g = result["granian"]["at_16"]["runs"]
    ratios = {}
    for name, key in (("nginx", "granian_vs_nginx"), ("fastapi_redis", "granian_vs_fastapi_redis"),
                      ("gunicorn_loop", "granian_vs_gunicorn_loop"), ("granian_floor", "granian_vs_granian_floor"),
                      ("granian_1thread", "granian_vs_granian_1thread")):
        if name in result:
            other = result[name]["at_16"]["runs"]
            for unit, per_round in (("rps", [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(g, other)]),
                                    ("cpu", [b["cpu_us_per_request"] / a["cpu_us_per_request"]
                                             for a, b in zip(g, other)])):
                ratios[f"{key}_{unit}"] = float(np.median(per_round))
                result[f"{key}_{unit}_per_round"] = per_round
    if "fastapi_redis" in result:  # the most any server here could show against FastAPI + Redis
        f = result["fastapi_redis"]["at_16"]["runs"]
        for name in ("nginx", "granian_floor"):
            if name in result:
                ratios[f"{name}_vs_fastapi_redis_rps"] = float(np.median(
                    [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(result[name]["at_16"]["runs"], f)]))
                ratios[f"{name}_vs_fastapi_redis_cpu"] = float(np.median(
                    [b["cpu_us_per_request"] / a["cpu_us_per_request"] for a, b in zip(result[name]["at_16"]["runs"], f)]))
    if "gunicorn_loop" in result:
        ratios["granian_p99_1_ms"] = result["granian"]["at_1"]["p99_ms"]
        ratios["gunicorn_loop_p99_1_ms"] = result["gunicorn_loop"]["at_1"]["p99_ms"]
    result.update(ratios)
    slow = result["slow_clients"]["granian"]["at_16"]
    result["slow_clients_granian_p99_ms"] = slow["p99_ms"]
    result["slow_clients_granian_failed"] = slow["non_2xx"] + slow["socket_errors"]
    result["load_average"] = {"end": list(os.getloadavg()), "start": load_start}
    result["targets"] = {"granian_vs_nginx_rps": ">= 0.4 (aim 0.5)", "granian_vs_fastapi_redis_rps": ">= 10",
                         "granian_p99_1_ms": "<= gunicorn_loop_p99_1_ms",
                         "slow_clients_granian_p99_ms": "< 50", "slow_clients_granian_failed": "== 0"}
    print(f"{'server (' + str(workers) + ' workers)':34}{'req/s @16':>12}{'CPU us/req':>12}{'p99 ms @16':>12}"
          f"{'p50 ms @1':>12}{'p99 ms @1':>12}")
    for name in started:
        a, b = result[name]["at_16"], result[name]["at_1"]
        print(f"{name:34}{a['requests_per_s']:12.0f}{a['cpu_us_per_request']:12.1f}{a['p99_ms']:12.3f}"
              f"{b['p50_ms']:12.3f}{b['p99_ms']:12.3f}")
    for name, s in result["slow_clients"].items():
        a = s["at_16"]
        print(f"{name + ', 50 trickling + 50 half-sent':34}{a['requests_per_s']:12.0f}{a['p99_ms']:12.3f}"
              f"{s['at_1']['p50_ms']:12.3f}{s['at_1']['p99_ms']:12.3f}  failed/reset: "
              f"{a['non_2xx'] + a['socket_errors'] + s['at_1']['non_2xx'] + s['at_1']['socket_errors']}")
    print("  ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + "  (ratios: medians of per-round ratios; "
          "_cpu: the other's CPU per request over granian's)")
    print("load average at start %.1f, at end %.1f" % (load_start[0], os.getloadavg()[0]))
    write_result("server", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of " + ",".join(SERVERS))
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.seconds, a.rounds, servers=tuple(a.servers.split(",")))
