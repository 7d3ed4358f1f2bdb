"""The API in a real gunicorn process (sync workers, multiprocess metrics), on a free port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest

from conftest import REPO, write_config
from serving.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def start_gunicorn(cfg, port, tmp_path, workers=2):
    env = dict(os.environ, HYBRIDSERVE_CONFIG=str(cfg), HYBRIDSERVE_BIND=f"127.0.0.1:{port}",
               HYBRIDSERVE_SERVING_WORKERS=str(workers), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:serving.gunicorn_conf",
                             "serving.app:create_app()"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {proc.stdout.read()}")
        try:
            if get(base + "/readyz")[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("gunicorn did not become ready")


@pytest.fixture
def server(workspace, tmp_path):
    root, settings, cfg, first = workspace
    text = cfg.read_text() + "[serving]\nlog_flush_interval_s = 0.0\nreload_interval_s = 0.2\n"
    cfg.write_text(text)
    proc, base = start_gunicorn(cfg, free_port(), tmp_path)
    yield base, proc, Store(settings["paths.store"]), first, settings
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()


def test_main_endpoints_through_gunicorn(server):
    base, proc, store, first, settings = server
    sid = first.snapshot_id
    sim = store.read_table(sid, "similar_items").to_pandas()
    status, headers, body = get(f"{base}/v1/items/{sim.item_id.iloc[0]}/similar?k=5")
    data = json.loads(body)
    assert status == 200 and data["source"] == "precomputed"
    assert [x["item_id"] for x in data["items"]] == list(sim.neighbor_ids.iloc[0][:5])
    status, headers2, _ = get(f"{base}/v1/items/{sim.item_id.iloc[0]}/similar?k=5",
                              {"If-None-Match": headers["ETag"]})
    assert status == 304
    recs = store.read_table(sid, "user_recs").to_pandas()
    status, _, body = get(f"{base}/v1/users/{recs.user_id.iloc[0]}/recommendations?k=3")
    assert status == 200 and json.loads(body)["source"] == "precomputed"
    status, headers, body = get(f"{base}/v1/items/abc/similar?k=5")
    assert status == 400 and headers["Content-Type"] == "application/problem+json"
    status, _, body = get(f"{base}/v1/recommendations?items=1,2&k=4")
    assert status == 200 and json.loads(body)["source"] in ("live", "cache")
    status, _, body = get(f"{base}/v1/snapshot")
    assert json.loads(body)["id"] == sid
    # metrics aggregate across worker processes
    for _ in range(20):
        get(f"{base}/v1/items/{sim.item_id.iloc[1]}/similar?k=2")
    status, _, body = get(f"{base}/metrics")
    text = body.decode()
    line = next(x for x in text.splitlines()
                if x.startswith('hybridserve_requests_total{endpoint="similar_items",source="precomputed",status="200"}'))
    assert float(line.split()[-1]) == 21.0
    assert "hybridserve_snapshot_age_seconds" in text


def test_hot_reload_and_request_log_flush_on_shutdown(server):
    base, proc, store, first, settings = server
    from batch.job import run
    second = run(settings)
    deadline = time.time() + 30
    while time.time() < deadline:  # every worker swaps within a few reload intervals
        ids = {json.loads(get(f"{base}/v1/snapshot")[2])["id"] for _ in range(6)}
        if ids == {second.snapshot_id}:
            break
        time.sleep(0.2)
    assert ids == {second.snapshot_id}
    item = int(store.read_table(second.snapshot_id, "similar_items").column("item_id")[0].as_py())
    for _ in range(10):
        assert get(f"{base}/v1/items/{item}/similar?k=3")[0] == 200
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == 0
    segs = list(store.requests_dir.glob("seg-*.parquet"))
    assert segs, "request log flushed on shutdown"
    log = pd.concat([pd.read_parquet(p) for p in segs])
    assert (log.loc[log["endpoint"] == "similar_items", "item_id"] == item).sum() == 10
