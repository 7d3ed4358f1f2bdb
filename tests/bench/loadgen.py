"""Run wrk (an established C load generator) over a list of paths and parse its report."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
function setup(thread) thread:set("offset", math.random(#paths)) end
function init(args) i = tonumber(offset) or 0 end
function request()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}

# Replays a trace once, in order: thread t sends paths t, t + T, t + 2T, ... then only /healthz until
# the driver interrupts wrk (stopping a thread would abort its other connections' requests in flight).
# wrk calls request() once on the first thread's script before any connection opens, to check what it
# returns; that call sends nothing, so it must not use up a path (the trace's first request was lost).
_REPLAY_LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local nthreads = %d
local seq = 0
function setup(thread) thread:set("tid", seq); seq = seq + 1 end
local counter = 0
local checked = false
function request()
  if tid == 0 and not checked then
    checked = true
    return wrk.format("GET", paths[1])
  end
  local i = tid + counter * nthreads + 1
  counter = counter + 1
  if i > #paths then
    return wrk.format("GET", "/healthz")
  end
  return wrk.format("GET", paths[i])
end
"""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (make bench does this)")
    return path


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(base_url: str, paths: list[str], connections: int, seconds: float, threads: int | None = None,
            once: bool = False, done=None) -> dict:
    """Requests/s and latency percentiles (ms) for GETs cycling through ``paths`` for ``seconds``,
    or (``once``) sending each path once, in order. wrk's main thread sleeps for the whole -d even
    when every thread has stopped, so with ``once`` the caller passes ``done()`` (e.g. the server's
    request count reached len(paths)) and wrk is interrupted (SIGINT makes it report and exit)."""
    import signal
    import time

    wrk = require_wrk()
    with tempfile.TemporaryDirectory() as tmp:
        plist = Path(tmp) / "paths.txt"
        plist.write_text("\n".join(paths) + "\n")
        script = Path(tmp) / "paths.lua"
        threads = threads or min(connections, 2)
        script.write_text(_REPLAY_LUA % (plist, threads) if once else _LUA % plist)
        proc = subprocess.Popen([wrk, "-t", str(threads), "-c", str(connections), "-d",
                                 f"{max(1, int(round(seconds)))}s", "--latency", "-s", str(script), base_url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if once and done is not None:
            while proc.poll() is None and not done():
                time.sleep(0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        text, stderr = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {stderr or text}")
    pct = {f"p{int(p)}_ms": _ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", text, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    total = int(m.group(1))
    elapsed_s = float(m.group(2)) * _UNITS[m.group(3)] / 1000.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    rps = len(paths) / elapsed_s if once else rps  # the trace's requests, not the /healthz tail
    return {"requests_per_s": rps, "requests": total, "elapsed_s": elapsed_s,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
            "connections": connections, "seconds": seconds, **pct}


def run_python(base_url: str, paths: list[str], connections: int, seconds: float, threads: int | None = None,
               once: bool = False, done=None) -> dict:
    """The same measurement with Python threads: for the benchmarks' smoke tests, where wrk may be absent.
    Much slower than wrk (the client costs more than the server); never use its numbers as results.
    With ``once`` every path is sent once (batch.tools.trace.replay; ``done`` is not needed), else the paths
    cycle for ``seconds``."""
    import time

    import numpy as np

    from batch.tools.trace import Trace, replay

    if once:
        t_start = time.perf_counter()
        df = replay(base_url, Trace(["?"] * len(paths), list(paths)), connections)
        elapsed = time.perf_counter() - t_start
        lat, codes = df["latency_ms"].to_numpy(), df["status"].tolist()
    else:
        import threading
        import urllib.error
        import urllib.request

        stop, lock = time.perf_counter() + seconds, threading.Lock()
        lat_list: list[float] = []
        codes = []

        def worker(offset: int) -> None:
            mine, my_codes, i = [], [], offset
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(base_url + paths[i % len(paths)], timeout=10) as r:
                        r.read()
                        code = r.status
                except urllib.error.HTTPError as e:
                    code = e.code
                mine.append((time.perf_counter() - t0) * 1000)
                my_codes.append(code)
                i += 1
            with lock:
                lat_list.extend(mine)
                codes.extend(my_codes)

        t_start = time.perf_counter()
        workers = [threading.Thread(target=worker, args=(k * 7919,)) for k in range(connections)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.perf_counter() - t_start
        lat = np.asarray(lat_list)
    return {"requests_per_s": len(lat) / elapsed, "requests": len(lat), "elapsed_s": elapsed,
            "non_2xx": int(sum(1 for c in codes if not 200 <= c < 400)), "socket_errors": 0,
            "connections": connections, "seconds": seconds,
            **{f"p{p}_ms": float(np.percentile(lat, p)) for p in (50, 75, 90, 99)}}


LOADGENS = {"wrk": run_wrk, "python": run_python}
