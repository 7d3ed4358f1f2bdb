"""The API in a real gunicorn process (sync workers, multiprocess metrics), on a free port."""
from __future__ import annotations

import json

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
    refs = [weakref.ref(old), weakref.ref(old.bundle), weakref.ref(old.bundle.regressor)]
    del old
    second = run(settings)
    gc.disable()
    try:
        engine.reload()
        assert engine.snapshot.id == second.snapshot_id
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
