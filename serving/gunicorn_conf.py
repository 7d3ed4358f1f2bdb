"""gunicorn settings from the project's config: `gunicorn -c python:serving.gunicorn_conf 'serving.app:create_app()'`.

Sync workers: in a local load test gthread workers pinned all keep-alive connections to one
worker, sync workers spread them. (Earlier gthread measurements were also slowed by OpenMP
threads spinning in request threads; serving/engine.py's one_thread_per_pool fixed that. gthread
with reuse_port, one socket per worker, is worth re-measuring.) Each worker loads the snapshot
itself (memory-mapped arrays are shared through the page cache).
"""
import gc
import os
import shutil
import tempfile

from serving.settings import load_settings

_settings = load_settings()

bind = os.environ.get("HYBRIDSERVE_BIND", f"{_settings['serving.host']}:{_settings['serving.port']}")
workers = _settings["serving.workers"]
worker_class = "sync"
timeout = 30
graceful_timeout = 10
accesslog = None
limit_request_line = 8190


def on_starting(server):
    # Prometheus multiprocess mode: one fresh directory per server, set before workers import the client.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="hybridserve-metrics-")


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
