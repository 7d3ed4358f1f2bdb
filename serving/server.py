"""How `make serve` runs the API: granian (a Rust HTTP server) with WSGI worker processes.

    python -m serving.server [--config FILE] [--host H] [--port P] [--workers N]

Chosen on a side-by-side measurement (docs/server.md): granian parses HTTP, keeps connections alive
and writes responses on its own Rust threads, so the worker's one Python thread only runs the app,
and a slow or stalled client holds a Rust task, never the Python thread. Nothing of granian is
subclassed or patched; this module only maps ``serving.*`` settings onto granian's public
``Granian`` class and adds what the project promises around it:

* a taken port is refused with one line and exit status 2 (granian binds every worker's socket with
  SO_REUSEPORT, so a second server of the same user would otherwise share the port silently);
* the listen address and worker layout are logged;
* Prometheus multiprocess mode: one fresh metrics directory per server, removed at exit;
* each worker builds the app itself (granian has no pre-fork app loading), then freezes what it
  built (``gc.freeze()``) before serving; the request log is flushed when the worker stops
  (serving.web.app watches for the worker's main thread to end).
"""
from __future__ import annotations

import gc
import logging
import logging.config
import os
import shutil
import signal
import socket
import sys
import tempfile

import click

from serving.cli import CONTEXT_SETTINGS, config_line, config_option, run_cli
from serving.errors import PortTaken
from serving.settings import ENV_FILE, Settings, load_settings

LOG = logging.getLogger(__name__)

APP_TARGET = "serving.server:worker_app"
PROMETHEUS_DIR = "PROMETHEUS_MULTIPROC_DIR"

_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "generic": {"()": "logging.Formatter", "fmt": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"},
        "access": {"()": "logging.Formatter", "fmt": "%(message)s"},
    },
    "handlers": {
        "console": {"formatter": "generic", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
    },
    "loggers": {
        "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        "faiss.loader": {"level": "WARNING"},
    },
    # the project's own loggers (snapshot swaps, request-log failures) in the workers and the main process
    "root": {"handlers": ["console"], "level": "INFO"},
}


def worker_app():
    """granian's factory target, called once in each worker process: the app, then a frozen heap.

    Everything built here (modules, Flask, the snapshot's model objects) lives as long as the worker;
    out of the collector's sight a full collection stays short (measured: docs/performance.md). A
    swapped-out snapshot is freed by reference counting (tests/test_server.py).
    """
    from serving.web.app import create_app

    app = create_app(load_settings())
    gc.freeze()
    app.extensions["hybridserve"].metrics.gc_frozen.set(gc.get_freeze_count())
    return app


def check_port(host: str, port: int) -> None:
    """Refuse a taken port before granian binds it with SO_REUSEPORT (which would share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortTaken(f"cannot listen on {host}:{port}: {exc.strerror} "
                            "(serving.host / serving.port, or --host / --port)") from None


def build(settings: Settings, target: str = APP_TARGET):
    """The granian server for ``settings`` (not started)."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    return Granian(
        target, address=settings["serving.host"], port=settings["serving.port"], interface=Interfaces.WSGI,
        # HTTP/1.1 only: granian's default (auto) also speaks cleartext HTTP/2, and while it waits for
        # the first bytes to tell the two apart no head timeout runs, nor on an HTTP/2 connection that
        # sends nothing (docs/server.md, tests/test_http2.py)
        http=HTTPModes.http1,
        factory=True, workers=settings["serving.workers"], blocking_threads=settings["serving.blocking_threads"],
        runtime_threads=settings["serving.runtime_threads"], backpressure=settings["serving.backpressure"],
        http1_settings=HTTP1Settings(header_read_timeout=int(settings["serving.header_read_timeout_s"] * 1000),
                                     keep_alive=settings["serving.keepalive"],
                                     max_buffer_size=settings["serving.max_head_bytes"]),
        workers_kill_timeout=settings["serving.shutdown_timeout_s"], respawn_failed_workers=True,
        log_dictconfig=_LOG_CONFIG, log_access=False,
    )


def _metrics_dir() -> tuple[str, bool]:
    """A fresh Prometheus multiprocess directory, set in the environment the workers inherit."""
    path = os.environ.get(PROMETHEUS_DIR)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        return path, False
    path = tempfile.mkdtemp(prefix="hybridserve-metrics-")
    os.environ[PROMETHEUS_DIR] = path
    return path, True


def first_stop_signal_only() -> None:
    """Let only the first SIGINT/SIGTERM reach the handlers granian installed in this (its main)
    process; shutdown is under way after it.

    granian's handler sets a ``threading.Event``. A second signal that arrives while the first
    handler holds that Event's lock runs the handler again on the same thread, which then waits
    forever for a lock it holds itself: the server never exits. Two signals in a row are common:
    GNU make passes the SIGTERM of a terminal or supervisor that stops ``make serve`` on to its
    child, which got its own from the process group. Called from granian's startup hook, right
    after it installed its handlers (the workers install their own)."""
    fired: list[int] = []

    def first_only(original):
        def on_signal(signum, frame):
            if fired:
                return
            fired.append(signum)
            original(signum, frame)
        return on_signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            signal.signal(sig, first_only(handler))


def serve(settings: Settings, target: str = APP_TARGET, config: str | None = None) -> int:
    """Run the server in this process until SIGTERM/SIGINT (every worker drains and flushes its log).
    ``config``: the line saying which config it uses (serving.cli.config_line), logged once the port
    is known to be free."""
    host, port = settings["serving.host"], settings["serving.port"]
    check_port(host, port)
    if config:
        LOG.info("%s", config)
    metrics_dir, own_dir = _metrics_dir()
    server = build(settings, target)
    server.on_startup(first_stop_signal_only)
    if own_dir:
        server.on_shutdown(lambda: shutil.rmtree(metrics_dir, ignore_errors=True))
    workers, threads = settings["serving.workers"], settings["serving.blocking_threads"]
    LOG.info("listening on http://%s:%d (granian, %d worker%s x %d Python thread%s, mode %s, store %s)",
             host, port, workers, "" if workers == 1 else "s", threads, "" if threads == 1 else "s",
             settings["serving.mode"],
             settings["paths.store"])
    server.serve()
    return 0


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--host", default=None, help="Overrides serving.host.")
@click.option("--port", type=int, default=None, help="Overrides serving.port.")
@click.option("--workers", type=int, default=None, help="Overrides serving.workers.")
@click.option("--app", default=APP_TARGET, hidden=True)  # benchmarks serve a baseline app
def cli(config: str | None, host: str | None, port: int | None, workers: int | None, app: str) -> int:
    """hybridserve API server (granian)"""
    logging.config.dictConfig(_LOG_CONFIG)
    given = dict(os.environ)
    # The workers read the settings again from the environment they inherit: pass the overrides on.
    if config:
        os.environ[ENV_FILE] = config
    for name, value in (("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            os.environ[f"HYBRIDSERVE_SERVING_{name.upper()}"] = str(value)
    settings = load_settings()
    return serve(settings, app, config_line(config, settings, given))


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, prog_name="python -m serving.server")


if __name__ == "__main__":
    sys.exit(main())
