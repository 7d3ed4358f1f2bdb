"""Hits through the caching front (config/nginx.conf's proxy_cache in front of the API) beside nginx
serving the same bytes as static files, side by side in one run, one nginx for both (same workers).

The front is the shipped config with its ports substituted (``front_conf``); the static server is
one more ``server`` block in the same nginx. Every path is requested once through the front first
(a MISS that fills the cache), then checked to be a HIT; wrk then measures both in alternating short
runs, 16 keep-alive connections and 1; medians of per-round ratios, CPU per request of nginx's
processes, and the load average.

    python tests/bench/bench_front.py [--items 100000 --seconds 4 --rounds 5]

tests/test_front.py starts the front with the same helper (``Front``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from batch.tools.demo import ApiServer, free_port, http_get  # noqa: E402
from serving.web.metrics import HIT_FLUSH_S  # noqa: E402

CONF = REPO / "config" / "nginx.conf"
NGINX = "/usr/sbin/nginx"
_STATIC = """
    server {{
        listen 127.0.0.1:{port};
        root {root}/static;
        location / {{ default_type application/json; try_files $uri.json =404; }}
    }}
"""


def _once(text: str, pattern: str, repl: str) -> str:
    """``text`` with the one match of ``pattern`` replaced; a config that lost the line is an error."""
    out, n = re.subn(pattern, repl, text)
    if n != 1:
        raise ValueError(f"{CONF.name}: expected one line matching {pattern!r}, found {n}")
    return out


def front_conf(api_port: int, port: int, static: tuple[int, Path] | None = None) -> str:
    """config/nginx.conf with what a user changes changed: the API's port and the listen port (on
    loopback); ``static``: (port, root) of one more server block serving root/static/<path>.json."""
    text = _once(CONF.read_text(), r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{api_port};")
    text = _once(text, r"listen 8080;", f"listen 127.0.0.1:{port};")
    if static is not None:
        text = text.rstrip()
        if not text.endswith("}"):
            raise ValueError(f"{CONF.name}: expected the http block to close the file")
        text = text[:-1] + _STATIC.format(port=static[0], root=static[1]) + "}\n"
    return text


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (NGINX if os.access(NGINX, os.X_OK) else None)


class Front:
    """nginx with config/nginx.conf in front of the API on ``api_port``, in its own prefix folder
    (``nginx -p <prefix> -c <generated conf> -e stderr -g 'daemon off;'``). Started by root (as in a
    container), its workers run as root too: nginx's default for root, nobody, cannot enter the
    private temporary folders a test runs in."""

    def __init__(self, api_port: int, static: bool = False):
        """``static``: also serve ``write_static``'s files from one more server block (``static_base``)."""
        self.api_port = api_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="hybridserve-front-"))
        (self.prefix / "tmp").mkdir()
        static_block = None
        if static:
            self.static_port = free_port()
            self.static_base = f"http://127.0.0.1:{self.static_port}"
            static_block = (self.static_port, self.prefix)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(front_conf(api_port, self.port, static_block))
        self.proc: subprocess.Popen | None = None

    def write_static(self, path: str, body: bytes) -> None:
        """``body`` as the static server's answer at ``path`` (its query ignored)."""
        f = self.prefix / "static" / (path.split("?")[0].lstrip("/") + ".json")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(body)

    def start(self, timeout: float = 20.0) -> "Front":
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light; make test-tools does it)")
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", "stderr",
                                      "-g", directives], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.log()}")
            try:
                if http_get(self.base + "/healthz", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not answer within {timeout:.0f}s: {self.log()}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: nginx's master stops its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> "Front":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(items: int = 100_000, users: int = 50_000, interactions: int = 1_000_000, seconds: float = 4.0,
        rounds: int = 5, loadgen: str = "wrk", workdir: Path | None = None, out_dir: Path | None = None,
        n_paths: int = 1000, config: Path | None = None) -> dict:
    """``config``: serve that config's store instead of preparing one of the given size."""
    from bench_api import _median_run, prepare
    from common import write_result
    from cpu import measured
    from loadgen import LOADGENS

    measure = LOADGENS[loadgen]
    load_start = list(os.getloadavg())
    if config is not None:
        from serving.settings import load_settings
        from serving.store import Store
        cfg = Path(config)
        store = Store(load_settings(cfg, env={})["paths.store"])
    else:
        cfg, _, store = prepare(items, users, interactions, workdir)
    sid = store.current_id()
    hot = store.read_table(sid, "similar_items").column("item_id").to_numpy()
    paths = [f"/v1/items/{i}/similar?k=10" for i in np.random.default_rng(0).permutation(hot)[:n_paths]]
    result: dict = {"items": len(store.read_table(sid, "items")), "snapshot": sid, "paths": len(paths), "loadgen": loadgen,
                    "seconds_per_run": seconds, "rounds": rounds,
                    "method": "one nginx (config/nginx.conf + a static server block); every path a HIT "
                              "before measuring; short runs alternate; medians of per-round ratios"}
    api = ApiServer(cfg).start()
    front = None
    try:
        front = Front(api.port, static=True).start()
        sources, sizes = {}, []
        for p in paths:  # fill the cache, then every path must be a hit; the static copy is its bytes
            http_get(front.base + p)
            # nginx may send the whole answer before it has put it in its cache (the file is committed
            # when the upstream request is finalised): on a busy machine the next request can still
            # be a MISS, so look again for a moment before calling it one
            for _ in range(40):
                status, headers, body = http_get(front.base + p)
                if status != 200 or headers.get("X-Cache-Status") == "HIT":
                    break
                time.sleep(0.05)
            if status != 200 or headers.get("X-Cache-Status") != "HIT":
                raise RuntimeError(f"{p} through the front: {status} {headers.get('X-Cache-Status')}")
            front.write_static(p, body)
            source = json.loads(body)["source"]
            sources[source] = sources.get(source, 0) + 1
            sizes.append(len(body))
        for p in paths[:5]:
            if http_get(front.static_base + p)[2] != http_get(front.base + p)[2]:
                raise RuntimeError(f"{p}: the static copy differs from the front's hit")
        result["sources"] = sources
        result["body_bytes_median"] = float(np.median(sizes))
        before = _origin_lookups(api.base)
        roots = [front.proc.pid]
        runs: dict[str, dict[str, list]] = {n: {"at_16": [], "at_1": []} for n in ("front", "static")}
        for _ in range(rounds):
            for conns, key in ((16, "at_16"), (1, "at_1")):
                for name, base in (("front", front.base), ("static", front.static_base)):
                    runs[name][key].append(measured(measure, roots)(base, paths, conns, seconds))
        for name in runs:
            result[name] = {k: _median_run(v) for k, v in runs[name].items()}
        origin_hits = _origin_lookups(api.base) - before
    finally:
        if front is not None:
            front.stop()
        api.stop()
    f, s = result["front"]["at_16"]["runs"], result["static"]["at_16"]["runs"]
    result["front_vs_static_rps_per_round"] = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(f, s)]
    result["front_vs_static_rps"] = float(np.median(result["front_vs_static_rps_per_round"]))
    result["front_vs_static_cpu"] = float(np.median([b["cpu_us_per_request"] / a["cpu_us_per_request"]
                                                     for a, b in zip(f, s)]))
    result["origin_lookups_during_run"] = origin_hits
    result["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    result["targets"] = {"front_vs_static_rps": ">= 0.8"}
    print(f"{'nginx (' + str(os.cpu_count()) + ' cores)':34}{'req/s @16':>12}{'CPU us/req':>12}{'p99 ms @16':>12}"
          f"{'p50 ms @1':>12}{'p99 ms @1':>12}")
    for name, label in (("front", "front: proxy_cache hits"), ("static", "static files, same bytes")):
        a, b = result[name]["at_16"], result[name]["at_1"]
        print(f"{label:34}{a['requests_per_s']:12.0f}{a['cpu_us_per_request']:12.1f}{a['p99_ms']:12.3f}"
              f"{b['p50_ms']:12.3f}{b['p99_ms']:12.3f}")
    print(f"front vs static: {result['front_vs_static_rps']:.2f}x req/s (target >= 0.8x), "
          f"{result['front_vs_static_cpu']:.2f}x by CPU per request; lookups the API answered meanwhile: "
          f"{origin_hits:.0f}; load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    write_result("front", result, out_dir)
    return result


def _origin_lookups(base: str) -> float:
    """Lookups the API counted (hybridserve_requests_total, similar items): the front's misses, once
    every worker has added the hits it counted in memory (within HIT_FLUSH_S)."""
    time.sleep(2 * HIT_FLUSH_S)
    _, _, body = http_get(base + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith('hybridserve_requests_total{endpoint="similar_items"'))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.seconds, a.rounds)
