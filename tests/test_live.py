"""The live path's parts (serving/live.py) and what they promise through the app: a failing model is
logged once per interval with a count (issue 20.10), a full queue is refused at once, the cache of live
results is bounded by bytes as well as entries (issue 20.12)."""
from __future__ import annotations

import gc
import logging
import threading
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from serving.errors import Busy
from serving.live import Live, LiveTier, Runner
from serving.store import Store
from serving.web.app import create_app


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def app_clock(workspace):
    root, settings, cfg, first = workspace
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    app = create_app(settings.replace(serving__error_log_interval_s=60.0), clock=clock, background=False)
    yield app, clock, Store(settings["paths.store"]), first
    app.extensions["hybridserve"].close()


def _unstored_pairs(store, sid, n):
    stored = set(map(tuple, store.read_table(sid, "predictions").to_pandas()[["user_id", "item_id"]].to_numpy()))
    users = store.read_table(sid, "user_recs").to_pandas()["user_id"].tolist()
    items = store.read_table(sid, "items").to_pandas()["item_id"].tolist()
    return [(u, i) for u in users for i in items if (u, i) not in stored][:n]


def test_a_failing_model_is_logged_once_per_interval_with_a_count(app_clock, caplog):
    app, clock, store, first = app_clock
    rating = app.extensions["hybridserve"].engine.snapshot.models["rating"]

    def broken(*args, **kwargs):
        raise ZeroDivisionError("the model's own bug")

    rating.answer_one = broken
    client = app.test_client()
    pairs = _unstored_pairs(store, first.snapshot_id, 41)
    with caplog.at_level(logging.ERROR, logger="serving.engine"):
        burst = [client.get(f"/v1/predictions?user_id={u}&item_id={i}") for u, i in pairs[:40]]
        assert [r.status_code for r in burst] == [503] * 40
        assert all("model 'rating' failed to predict (ZeroDivisionError)" in r.json["detail"] for r in burst)
        records = [r for r in caplog.records if r.name == "serving.engine"]
        assert len(records) == 1 and records[0].exc_info[0] is ZeroDivisionError  # one traceback for 40
        clock.t += 61  # the next interval: the next failure is logged, saying how many were not
        u, i = pairs[40]
        assert client.get(f"/v1/predictions?user_id={u}&item_id={i}").status_code == 503
    records = [r for r in caplog.records if r.name == "serving.engine"]
    assert len(records) == 2 and records[1].exc_info[0] is ZeroDivisionError
    assert "(39 more times in the last 61 s, not logged)" in records[1].getMessage()
    text = client.get("/metrics").text
    assert 'hybridserve_model_errors_total{model="rating"} 41.0' in text
    assert 'hybridserve_live_refused_total{model="rating",reason="error"} 41.0' in text


def test_a_full_queue_is_refused_at_once_and_frees_as_computations_end():
    runner = Runner("slow", threads=1, queue=1)
    gate = threading.Event()
    try:
        running = runner.submit(gate.wait)
        queued = runner.submit(lambda: "second")
        with pytest.raises(Busy, match=r"model 'slow' is busy: 1 live computation running and 1 queued"):
            runner.submit(lambda: "third")
        gate.set()
        assert running.result(5) is True and queued.result(5) == "second"
        assert runner.submit(lambda: "again").result(5) == "again"
    finally:
        gate.set()
        runner.shutdown()


def test_the_live_cache_holds_to_its_byte_bound_measured_by_tracemalloc(workspace):
    """Real live answers (FAISS similar items) put past the bound: the memory the cache holds, measured
    by tracemalloc (not by the cache's own estimate), stays under serving.cache_max_mb's bytes."""
    root, settings, cfg, first = workspace
    app = create_app(settings, background=False)
    try:
        engine = app.extensions["hybridserve"].engine
        model = engine.snapshot.models["recommender"]
        items = Store(settings["paths.store"]).read_table(first.snapshot_id, "items").to_pandas()["item_id"][:50]
        answers = [model.answer_one("similar_items", (int(i),), 10) for i in items]
    finally:
        app.extensions["hybridserve"].close()
    bound = 256 * 1024
    clock = Clock(1000.0)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tier = LiveTier(maxsize=100_000, clock=clock, max_bytes=bound)
        first_size = None
        misses = 3000
        for n in range(misses):  # distinct misses, each a fresh copy of a real answer under a fresh key
            ids, scores = answers[n % len(answers)]
            key = (first.snapshot_id, "recommender", model.version, "similar_items", f"({n},)", 10)
            put = tier.put(key, Live(clock(), clock() + 300.0, (ids.copy(), scores.copy())))
            first_size = first_size or put.nbytes
        del put
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"\nper entry (similar items, k=10): {first_size} bytes estimated; after {misses} distinct misses "
          f"{len(tier)} entries kept, {tier.bytes} bytes by the estimate, {held} bytes measured by tracemalloc "
          f"({held / len(tier):.0f} per entry), bound {bound}")
    assert len(tier) < misses                      # the byte bound evicted (the entry bound is far)
    assert tier.bytes <= bound and held <= bound   # and held, measured independently
    assert held >= 0.5 * tier.bytes                # the estimate is not wildly above what it holds


def test_the_live_cache_holds_to_its_entry_bound_when_entries_are_small():
    clock = Clock(1000.0)
    tier = LiveTier(maxsize=50, clock=clock, max_bytes=10 * 1024 * 1024)
    for n in range(500):
        tier.put(("m", n), Live(clock(), clock() + 300.0, float(n)))
    assert len(tier) == 50 and tier.bytes <= 10 * 1024 * 1024
    tier.put(("m", "huge"), Live(clock(), clock() + 300.0, np.zeros(2 * 1024 * 1024)))  # 16 MB: not kept
    assert tier.too_large == 1 and len(tier) == 50


def test_the_shared_cache_url_is_checked_and_rediss_means_tls(tmp_path):
    """rediss:// and a password go to redis-py's from_url (TLS and AUTH); anything else is one line."""
    from redis.connection import SSLConnection

    from serving.errors import ConfigError
    from serving.settings import load_settings
    from serving.shared import SharedTier

    tier = SharedTier("rediss://:pw@cache.example:6380/2", 0.05, 1.0, time.time)
    try:
        kwargs = tier.client.connection_pool.connection_kwargs
        assert tier.client.connection_pool.connection_class is SSLConnection
        assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("cache.example", 6380, 2, "pw")
        assert kwargs["socket_timeout"] == 0.05 and tier.url == "rediss://:***@cache.example:6380/2"
    finally:
        tier.close()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serving]\nshared_cache = "http://cache:6379"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: serving\.shared_cache: 'http://cache:6379' does not match"):
        load_settings(cfg, env={})


def test_past_live_max_waiting_a_request_is_refused_at_once(workspace):
    """However many slow misses arrive, at most live_max_waiting requests hold app threads waiting."""
    root, settings, cfg, first = workspace
    app = create_app(settings.replace(serving__live_max_waiting=1, serving__live_deadline_ms=60000.0),
                     background=False)
    try:
        rating = app.extensions["hybridserve"].engine.snapshot.models["rating"]
        entered, release = threading.Event(), threading.Event()
        answer_one = rating.answer_one

        def held(query, key, k=None):
            if key == held.first:
                entered.set()
                release.wait(30)
            return answer_one(query, key, k)

        (u1, i1), (u2, i2) = _unstored_pairs(Store(settings["paths.store"]), first.snapshot_id, 2)
        held.first = (u1, i1)
        rating.answer_one = held
        out = {}
        t = threading.Thread(target=lambda: out.update(
            first=app.test_client().get(f"/v1/predictions?user_id={u1}&item_id={i1}")))
        t.start()
        assert entered.wait(30)
        refused = app.test_client().get(f"/v1/predictions?user_id={u2}&item_id={i2}")
        assert refused.status_code == 503 and refused.json["detail"] == (
            "model 'rating' is busy: 1 requests of this worker are waiting for live answers already; try again shortly")
        assert refused.headers["Retry-After"] == "1"
        release.set()
        t.join(30)
        assert out["first"].status_code == 200 and out["first"].json["source"] == "live"
        again = app.test_client().get(f"/v1/predictions?user_id={u2}&item_id={i2}")
        assert again.status_code == 200  # the refused request's computation went on (cached, or joined now)
    finally:
        release.set()
        app.extensions["hybridserve"].close()
