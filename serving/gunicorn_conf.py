"""gunicorn settings from the project's config: `gunicorn -c python:serving.gunicorn_conf 'serving.app:create_app()'`.

Worker type (`serving.worker_class`), measured side by side on the serving-modes trace (2 workers,
16 wrk connections, alternating replays, throughput from the request log): the loop worker
(`serving/worker.py`) did the hybrid trace at 6,442 and 5,496 req/s against 4,945 and 4,137 for
gthread with one request thread, and live-only at 1,209 and 1,120 against 925 and 1,022; on steady
hits it spent 212-250 us of worker CPU per request against 251-413 us. Earlier, with client-timed
replays: gthread 4,520 req/s against 3,603 for sync workers; two request threads per gthread worker
lost the gain (3,545, GIL contention), and gunicorn's tornado worker was no faster than gthread on
hits. A sync worker connects, closes and lingers per request (~40% of its time waiting for the
client's FIN). loop and gthread need one listening socket per worker (``reuse_port``): with a shared
socket, one worker accepted every keep-alive connection of a load test. Each worker loads the
snapshot itself (memory-mapped arrays are shared through the page cache).
"""
import gc
import os
import shutil
import socket
import tempfile

from serving.settings import load_settings

_settings = load_settings()

bind = os.environ.get("HYBRIDSERVE_BIND", f"{_settings['serving.host']}:{_settings['serving.port']}")
workers = _settings["serving.workers"]
_kind = _settings["serving.worker_class"]
worker_class = "serving.worker.LoopWorker" if _kind == "loop" else _kind
threads = 1 if _kind == "loop" else _settings["serving.threads"]
keepalive = _settings["serving.keepalive_s"]
# gunicorn then binds a socket in each worker (SO_REUSEPORT) and the kernel spreads new connections.
reuse_port = _kind in ("loop", "gthread")
timeout = 30
graceful_timeout = 10
accesslog = None
limit_request_line = 8190


def on_starting(server):
    if reuse_port:
        _refuse_taken_ports(server.cfg.address)
    # Prometheus multiprocess mode: one fresh directory per server, set before workers import the client.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="hybridserve-metrics-")


def _refuse_taken_ports(addresses) -> None:
    """With SO_REUSEPORT a second server of the same user would share a taken port silently (the kernel
    splitting connections between the two): refuse to start instead, as a plain bind would."""
    for addr in addresses:
        if not isinstance(addr, tuple):  # a unix socket path or a file descriptor
            continue
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            try:
                probe.bind(addr[:2])
            except OSError as exc:
                raise SystemExit(f"cannot listen on {addr[0]}:{addr[1]}: {exc.strerror} "
                                 "(serving.host / serving.port, or HYBRIDSERVE_BIND)") from None


def post_fork(server, worker):
    worker.client_timeout = _settings["serving.client_timeout_s"]  # read by serving.worker.LoopWorker


def post_worker_init(worker):
    # Everything the app built at start (modules, Flask, the model objects) lives as long as the worker:
    # out of the garbage collector's sight, a full collection under load took 0.6-7 ms instead of 80-100 ms.
    gc.freeze()


def worker_exit(server, worker):
    # Flush this worker's request log before it goes.
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("hybridserve") if app is not None else None
    if services is not None:
        services.close()


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
