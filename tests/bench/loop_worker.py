"""The server benchmark's baseline only, retired from serving/ when the API moved to granian
(docs/server.md): a gunicorn worker for a CPU-bound app, keep-alive connections served by one loop in
the worker's own thread.

It is gunicorn's gthread worker (the same poller, keep-alive bookkeeping, request parsing and
shutdown) with three changes:

* A request is handled in the thread that polled it. gthread hands each one to a request thread
  and back (a queue, a future, a wake-up pipe and two GIL hand-offs per request). With one request
  thread -- the right number for a GIL-bound app -- that hand-off buys nothing.
* The status line, headers and body leave in one TCP segment (``TCP_CORK`` around the response,
  on Linux). gunicorn sends the headers and the body separately, so a small answer cost two sends
  and woke the client twice.
* A new connection waits on the poller until its first bytes arrive, so an idle one holds
  nothing (gthread held its request thread for up to 5 s); a client that stalls mid-request or
  stops reading its answer is dropped after ``client_timeout`` seconds instead of holding the
  worker until gunicorn's worker timeout kills it.

A slow request still delays the others on the same worker, as in a sync worker: the worker has
one thread, and the kernel spreads connections over the workers (``reuse_port``).
"""
from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import ThreadWorker, TConn

_CORK = getattr(socket, "TCP_CORK", None)  # Linux only; elsewhere headers and body go separately
_log = logging.getLogger("gunicorn.error")


class _ClientSocket(socket.socket):
    """A client connection in timeout mode for good (``settimeout(client_timeout)`` at accept).

    Non-blocking for the kernel, so the poller can watch it; waiting at most ``client_timeout`` for
    the worker. gthread switches a socket to blocking for each request and back for the poller
    (an ioctl each way); here those switches are no-ops. A client that times out ends
    quietly: one warning line, then gunicorn's own handling of a client that went away, instead of a
    traceback per stalled client.
    """
    stalled = closing = False

    def setblocking(self, flag):
        pass

    def recv(self, bufsize, flags=0):
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            if self.closing:  # gunicorn's graceful close waits for the client's FIN with its own timeout
                raise
            return self._stall("sent part of a request, then nothing", b"")

    def sendall(self, data, flags=0):
        try:
            return super().sendall(data, flags)
        except TimeoutError:
            self._stall("stopped reading its answer", None)
            raise ConnectionResetError(errno.ECONNRESET, "client stopped reading") from None

    def _stall(self, what: str, result):
        if not self.stalled:
            self.stalled = True
            try:
                peer = "%s:%s" % self.getpeername()[:2]
            except OSError:
                peer = "a client"
            _log.warning("dropped %s: it %s for %.1f s (serving.client_timeout_s)", peer, what, self.gettimeout())
        return result


class _Conn(TConn):
    def close(self, graceful=False):
        # A graceful close waits up to 2 s for the client's FIN, in the worker's one thread: not for a
        # client that has just been dropped for stalling.
        self.sock.closing = True
        super().close(graceful and not self.sock.stalled)


class _Handled:
    """What gthread's finish_request expects from the request thread's future."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancelled(self):
        return False


class LoopWorker(ThreadWorker):
    client_timeout = 5.0  # seconds a stalled client may hold the worker

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ready: deque = deque()
        self._draining = False

    def accept(self, listener):
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        sock = _ClientSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        sock.settimeout(self.client_timeout)
        conn = _Conn(self.cfg, sock, client, listener.getsockname())
        # Parked until readable, and closed by murder_pending() if nothing comes.
        conn.timeout = time.monotonic() + max(self.cfg.keepalive, self.client_timeout)
        self.pending_conns.append(conn)
        self.poller.register(sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def enqueue_req(self, conn):
        # finish_request() calls back here for a pipelined request already read into the buffer: queue
        # it and let the outer call run it, so a long pipeline does not recurse.
        self._ready.append(conn)
        if self._draining:
            return
        self._draining = True
        try:
            while self._ready:
                conn = self._ready.popleft()
                self.finish_request(conn, _Handled(self.handle(conn)))
        finally:
            self._draining = False

    def handle_request(self, req, conn):
        if _CORK is None:
            return super().handle_request(req, conn)
        sock = conn.sock
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
        try:
            return super().handle_request(req, conn)
        finally:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)  # sends what the response left corked
            except OSError:
                pass  # the client is gone; handle() deals with the connection
