"""The API in a real gunicorn process (loop, gthread and sync workers, multiprocess metrics), on a free port."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from batch.demo import GunicornServer, http_get as get
from batch.job import run
from serving.store import Store


@pytest.fixture
def server(workspace):
    root, settings, cfg, first = workspace
    cfg.write_text(cfg.read_text() + "[serving]\nlog_flush_interval_s = 0.0\nreload_interval_s = 0.2\n")
    srv = GunicornServer(cfg, workers=2).start()
    yield srv, Store(settings["paths.store"]), first, settings
    srv.stop()


def test_main_endpoints_through_gunicorn(server):
    srv, store, first, settings = server
    base, sid = srv.base, first.snapshot_id
    sim = store.read_table(sid, "similar_items").to_pandas()
    status, headers, body = get(f"{base}/v1/items/{sim.item_id.iloc[0]}/similar?k=5")
    data = json.loads(body)
    assert status == 200 and data["source"] == "precomputed"
    assert [x["item_id"] for x in data["items"]] == list(sim.neighbor_ids.iloc[0][:5])
    status, _, body = get(f"{base}/v1/items/{sim.item_id.iloc[0]}/similar?k=5", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    recs = store.read_table(sid, "user_recs").to_pandas()
    status, _, body = get(f"{base}/v1/users/{recs.user_id.iloc[0]}/recommendations?k=3")
    assert status == 200 and json.loads(body)["source"] == "precomputed"
    status, headers, body = get(f"{base}/v1/items/abc/similar?k=5")
    assert status == 400 and headers["Content-Type"] == "application/problem+json"
    status, _, body = get(f"{base}/v1/recommendations?items=1,2&k=4")
    assert status == 200 and json.loads(body)["source"] in ("live", "cache")
    assert json.loads(get(f"{base}/v1/snapshot")[2])["id"] == sid
    # metrics aggregate across worker processes
    for _ in range(20):
        get(f"{base}/v1/items/{sim.item_id.iloc[1]}/similar?k=2")
    text = get(f"{base}/metrics")[2].decode()
    line = next(x for x in text.splitlines()
                if x.startswith('hybridserve_requests_total{endpoint="similar_items",source="precomputed",status="200"}'))
    assert float(line.split()[-1]) == 21.0
    assert "hybridserve_snapshot_age_seconds" in text


def _similar_path(workspace, k: int = 3) -> str:
    """Similar items of the first item the snapshot precomputed."""
    root, settings, cfg, first = workspace
    sim = Store(settings["paths.store"]).read_table(first.snapshot_id, "similar_items").to_pandas()
    return f"/v1/items/{sim.item_id.iloc[0]}/similar?k={k}"


def _worker_pids(server_pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]


def _established_per_worker(server_pid: int, port: int) -> dict[int, int]:
    """Established TCP connections on ``port`` held by each gunicorn worker (from /proc)."""
    kids = _worker_pids(server_pid)
    owner = {}
    for pid in kids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[int(target[8:-1])] = pid
    counts = dict.fromkeys(kids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local_port, state, inode = int(f[1].rsplit(":", 1)[1], 16), f[3], int(f[9])
            if local_port == port and state == "01" and inode in owner:  # 01: ESTABLISHED
                counts[owner[inode]] += 1
    return counts


@pytest.mark.parametrize("worker_class", ["loop", "gthread", "sync"])
def test_keep_alive_connections_reach_every_worker(workspace, worker_class):
    """loop and gthread workers keep a client's connection open across requests, and each binds its own
    socket (reuse_port), so the kernel spreads connections over the workers; sync workers close after each."""
    root, settings, cfg, first = workspace
    path = _similar_path(workspace)
    with GunicornServer(cfg, env={"HYBRIDSERVE_SERVING_WORKER_CLASS": worker_class}, workers=2) as srv:
        conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(16)]
        try:
            socks = []
            for round_ in range(3):  # every connection has a request in flight before any answer is read
                for conn in conns:
                    conn.request("GET", path)
                for conn in conns:
                    resp = conn.getresponse()
                    assert resp.status == 200 and json.loads(resp.read())["source"] == "precomputed"
                    assert (resp.getheader("Connection") == "close") == (worker_class == "sync")
                    if round_ == 2:
                        socks.append(conn.sock)
            if worker_class == "sync":
                assert socks == [None] * 16  # http.client dropped each closed connection
                return
            assert all(s is not None for s in socks)
            held = _established_per_worker(srv.proc.pid, srv.port)
            assert sum(held.values()) == 16 and len(held) == 2
            # 16 connections hashed over two sockets: all on one worker has odds 2 in 65,536.
            assert min(held.values()) >= 1, held
        finally:
            for conn in conns:
                conn.close()


def _read_response(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, what the socket had beyond this response) for one Content-Length response."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return head, rest[:length], rest[length:]


def test_loop_worker_sends_each_answer_in_one_segment_and_serves_pipelined_requests(workspace):
    """gunicorn writes headers and body in two sends; the loop worker corks them into one, so a client's
    first read holds the whole answer (with gthread, 2 to 34 of 200 first reads held only the headers)."""
    root, settings, cfg, first = workspace
    path = _similar_path(workspace)
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    with GunicornServer(cfg, workers=1) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        whole = 0
        for _ in range(500):
            sock.sendall(request)
            first_read = sock.recv(65536)
            head, body, extra = _read_response(sock, first_read)
            assert head.startswith(b"HTTP/1.1 200") and extra == b""
            assert json.loads(body)["source"] == "precomputed"
            whole += len(first_read) == len(head) + 4 + len(body)
        assert whole == 500
        # Three pipelined requests in one send: three answers, in order, on the same connection.
        sock.sendall(request + f"GET /v1/snapshot HTTP/1.1\r\nHost: test\r\n\r\n".encode() + request)
        head1, body1, rest = _read_response(sock)
        head2, body2, rest = _read_response(sock, rest)
        head3, body3, rest = _read_response(sock, rest)
        assert rest == b"" and json.loads(body1)["source"] == json.loads(body3)["source"] == "precomputed"
        assert json.loads(body1)["items"] == json.loads(body3)["items"]
        assert json.loads(body2)["id"] == first.snapshot_id


def test_loop_worker_is_not_held_by_idle_or_stalled_clients(workspace):
    """One worker, one thread: a connection that sends nothing waits on the poller, and one that stops
    mid-request is dropped after serving.client_timeout_s; other clients are answered meanwhile, by the
    same worker (gunicorn would otherwise kill it at its 30 s worker timeout)."""
    root, settings, cfg, first = workspace
    path = _similar_path(workspace)
    env = {"HYBRIDSERVE_SERVING_CLIENT_TIMEOUT_S": "1", "HYBRIDSERVE_SERVING_KEEPALIVE_S": "30"}
    with GunicornServer(cfg, env=env, workers=1) as srv:
        pids = _worker_pids(srv.proc.pid)
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        try:
            stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")  # and nothing more
            for _ in range(3):  # each on a new connection, while both are open
                status, _, body = get(f"{srv.base}{path}", timeout=3)
                assert status == 200 and json.loads(body)["source"] == "precomputed"
            assert stalled.recv(100) == b""  # the worker closed it (a timeout here raises)
            idle.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            head, body, _ = _read_response(idle)  # the idle connection is still served when it speaks
            assert head.startswith(b"HTTP/1.1 200")
            assert _worker_pids(srv.proc.pid) == pids
        finally:
            idle.close()
            stalled.close()


def test_loop_worker_drops_a_client_that_stops_reading(workspace):
    """A client that pipelines requests and never reads the answers fills the socket buffers; the one
    worker's send then waits serving.client_timeout_s at most, drops that client, and serves others."""
    root, settings, cfg, first = workspace
    path = _similar_path(workspace)
    big = _similar_path(workspace, k=settings["serving.k_limit"])  # computed live once, then cached
    env = {"HYBRIDSERVE_SERVING_CLIENT_TIMEOUT_S": "1"}
    with GunicornServer(cfg, env=env, workers=1) as srv:
        pids = _worker_pids(srv.proc.pid)
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        hog.settimeout(20)
        hog.connect(("127.0.0.1", srv.port))
        try:
            # Tens of KB per answer: 300 of them are far more than the kernel buffers between the two.
            hog.sendall(f"GET {big} HTTP/1.1\r\nHost: test\r\n\r\n".encode() * 300)
            for _ in range(3):
                status, _, body = get(f"{srv.base}{path}", timeout=10)
                assert status == 200 and json.loads(body)["source"] == "precomputed"
            assert _worker_pids(srv.proc.pid) == pids
            received = b""
            while True:  # what reached the hog before it was dropped, then the end of the connection
                try:
                    chunk = hog.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
            assert 0 < received.count(b"HTTP/1.1 200 OK") < 300
        finally:
            hog.close()


def test_a_second_server_on_a_taken_port_refuses_to_start(server):
    """SO_REUSEPORT would let it share the port with the first, splitting its traffic, without a word."""
    srv = server[0]
    env = dict(srv.env, HYBRIDSERVE_BIND=f"127.0.0.1:{srv.port}")
    second = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:serving.gunicorn_conf",
                             "serving.app:create_app()"], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert f"cannot listen on 127.0.0.1:{srv.port}: Address already in use" in second.stderr
    assert get(f"{srv.base}/healthz")[0] == 200


def test_hot_reload_and_request_log_flush_on_shutdown(server):
    srv, store, first, settings = server
    second = run(settings)
    srv.wait_for_snapshot(second.snapshot_id)  # every worker swaps within a few reload intervals
    item = int(store.read_table(second.snapshot_id, "similar_items").column("item_id")[0].as_py())
    for _ in range(10):
        assert get(f"{srv.base}/v1/items/{item}/similar?k=3")[0] == 200
    assert srv.stop() == 0
    segs = list(store.requests_dir.glob("seg-*.parquet"))
    assert segs, "request log flushed on shutdown"
    log = pd.concat([pd.read_parquet(p) for p in segs])
    assert (log.loc[log["endpoint"] == "similar_items", "item_id"] == item).sum() == 10


def test_workers_freeze_what_they_built_and_a_swapped_out_snapshot_needs_no_collector(workspace):
    """gunicorn's post_worker_init hides the start-up objects from the garbage collector. That is safe
    for hot reload only if an old snapshot is freed by reference counting alone (no cycles)."""
    import gc
    import weakref

    from serving import gunicorn_conf
    from serving.engine import Engine

    root, settings, cfg, first = workspace
    gc.unfreeze()
    try:
        gunicorn_conf.post_worker_init(None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    engine = Engine(Store(settings["paths.store"]), 3600.0, 60.0, 100, verify_checksums=False)
    engine.reload()
    old = engine.snapshot
    refs = [weakref.ref(old), weakref.ref(old.bundle), weakref.ref(old.bundle.item_vecs)]
    del old
    second = run(settings)
    gc.disable()
    try:
        engine.reload()
        assert engine.snapshot.id == second.snapshot_id
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
