"""The former production setup, kept only as the benchmark's baseline ("today's loop worker"):
gunicorn 27 with hybridserve's loop worker (loop_worker.py, which overrides gthread internals; it is
why the project left gunicorn). `gunicorn -c python:loop_gunicorn_conf 'serving.web.app:create_app()'`
with tests/bench on PYTHONPATH; LOOP_WORKER_BIND names the address.
"""
import gc
import os
import tempfile

from serving.settings import load_settings

_settings = load_settings()

bind = os.environ["LOOP_WORKER_BIND"]
workers = _settings["serving.workers"]
worker_class = "loop_worker.LoopWorker"
threads = 1
keepalive = 5
reuse_port = True  # one listening socket per worker, as it ran in production
timeout = 30
graceful_timeout = 10
accesslog = None


def on_starting(server):
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-loop-metrics-"))


def post_worker_init(worker):
    gc.freeze()


def worker_exit(server, worker):
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("hybridserve")
    if services is not None:
        services.close()
