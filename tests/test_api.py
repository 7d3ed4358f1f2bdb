"""The lookup API through Flask's test client, on a real published snapshot, with an injected clock."""
from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from batch.job import run
from batch.popularity import read_request_counts, select
from serving.web.app import create_app
from serving.models.rating import RatingModel
from serving.store import Store


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


SERVING = {"max_age_s": 3600.0, "cache_ttl_s": 60.0, "cache_size": 1000, "k_limit": 500, "session_max_items": 5,
           "cors_origins": "https://shop.example", "log_flush_interval_s": 0.0, "log_flush_rows": 100000,
           # tests below send up to 8 identical misses at once: more than live_max_waiting lets wait by default
           "live_max_waiting": 16}


@pytest.fixture
def env(workspace):
    """(client, app, clock, store, first result, root)"""
    root, settings, cfg, first = workspace
    settings = settings.replace(**{f"serving__{k}": v for k, v in SERVING.items()})
    store = Store(settings["paths.store"])
    created = pd.Timestamp(first.manifest["created_at"]).timestamp()
    clock = Clock(created + 10.0)
    app = create_app(settings, clock=clock, background=False)
    yield app.test_client(), app, clock, store, first, root, settings
    app.extensions["hybridserve"].close()


def _table(store, sid, name):
    return store.read_table(sid, name).to_pandas()


def _precomputed_item(store, sid):
    return int(_table(store, sid, "similar_items")["item_id"].iloc[0])


def _missing_item(store, sid):
    stored = set(_table(store, sid, "similar_items")["item_id"])
    all_items = _table(store, sid, "items")["item_id"]
    return int(next(i for i in all_items if i not in stored))


def test_factory_builds_independent_apps(workspace):
    root, settings, _, _ = workspace
    a, b = create_app(settings, background=False), create_app(settings, background=False)
    assert a is not b and a.extensions["hybridserve"] is not b.extensions["hybridserve"]
    assert a.test_client().get("/healthz").json == {"status": "ok"}


def test_similar_items_precomputed_slice(env):
    client, app, clock, store, first, _, _ = env
    sid = first.snapshot_id
    row = _table(store, sid, "similar_items").iloc[3]
    r = client.get(f"/v1/items/{row.item_id}/similar?k=5")
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.json
    assert body["source"] == "precomputed" and body["snapshot"] == sid
    assert [x["item_id"] for x in body["items"]] == list(row.neighbor_ids[:5])
    np.testing.assert_allclose([x["score"] for x in body["items"]], row.scores[:5], atol=1e-6)
    assert body["age_s"] == pytest.approx(10.0, abs=1e-3)
    assert body["computed_at"].endswith("Z")
    # Cache-Control = remaining freshness; ETag; 304 on If-None-Match
    assert r.headers["Cache-Control"] == "public, max-age=3589"
    etag = r.headers["ETag"]
    r2 = client.get(f"/v1/items/{row.item_id}/similar?k=5", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.data == b"" and r2.headers["ETag"] == etag
    assert client.get(f"/v1/items/{row.item_id}/similar?k=4", headers={"If-None-Match": etag}).status_code == 200


def test_live_then_cache_for_keys_not_precomputed(env):
    client, app, clock, store, first, _, settings = env
    sid = first.snapshot_id
    item = _missing_item(store, sid)
    r1 = client.get(f"/v1/items/{item}/similar?k=7").json
    clock.advance(5)
    r2 = client.get(f"/v1/items/{item}/similar?k=7")
    assert r1["source"] == "live" and r2.json["source"] == "cache"
    assert r2.json["items"] == r1["items"] and r2.json["age_s"] == pytest.approx(5.0)
    assert r2.headers["Cache-Control"] == "public, max-age=54" and "ETag" not in r2.headers
    # k above k_max goes live even for a precomputed key
    k_max = settings["batch.k_max"]
    hot = _precomputed_item(store, sid)
    big = client.get(f"/v1/items/{hot}/similar?k={k_max + 5}").json
    assert big["source"] == "live" and len(big["items"]) == k_max + 5
    small = client.get(f"/v1/items/{hot}/similar?k={k_max}").json
    assert small["source"] == "precomputed"
    assert [x["item_id"] for x in big["items"][:k_max]] == [x["item_id"] for x in small["items"]]


def test_live_compute_in_a_request_thread_uses_one_thread_per_pool(env):
    """OpenMP thread counts are per thread: the threads live answers are computed on (each model's own,
    started by a request thread) must be limited too."""
    import faiss
    from threadpoolctl import threadpool_info

    client, app, clock, store, first, _, settings = env
    item = _missing_item(store, first.snapshot_id)
    seen = {}
    model = app.extensions["hybridserve"].engine.snapshot.models["recommender"]
    answer_one = model.answer_one

    def watched(*args, **kwargs):  # what the computing thread runs with, seen from inside it
        seen["thread"] = threading.current_thread().name
        seen["faiss"] = faiss.omp_get_max_threads()
        seen["pools"] = {i["filepath"]: i["num_threads"] for i in threadpool_info()
                         if i["user_api"] == "openmp" or i["internal_api"] == "openblas"}
        return answer_one(*args, **kwargs)

    model.answer_one = watched
    try:
        t = threading.Thread(target=lambda: seen.update(source=client.get(f"/v1/items/{item}/similar?k=5").json["source"]))
        t.start()
        t.join()
    finally:
        del model.answer_one
    assert seen["source"] == "live" and seen["thread"].startswith("live-recommender")
    # a new thread starts at one OpenMP thread per core (OMP_NUM_THREADS aside); the live computation set one
    assert seen["faiss"] == 1
    assert seen["pools"] and set(seen["pools"].values()) == {1}


def test_user_recs_and_predictions(env):
    client, app, clock, store, first, root, _ = env
    sid = first.snapshot_id
    recs = _table(store, sid, "user_recs")
    row = recs.iloc[0]
    body = client.get(f"/v1/users/{row.user_id}/recommendations?k=10").json
    assert body["source"] == "precomputed"
    assert [x["item_id"] for x in body["items"]] == list(row.item_ids[:10])
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    cold_user = int(inter["user_id"][~inter["user_id"].isin(recs["user_id"])].iloc[0])
    live = client.get(f"/v1/users/{cold_user}/recommendations?k=10").json
    assert live["source"] == "live" and len(live["items"]) == 10
    seen = set(inter.loc[inter["user_id"] == cold_user, "item_id"])
    assert not seen & {x["item_id"] for x in live["items"]}
    preds = _table(store, sid, "predictions")
    p = next(preds.iloc[2:3].itertuples())
    body = client.get(f"/v1/predictions?user_id={p.user_id}&item_id={p.item_id}").json
    assert body["source"] == "precomputed" and body["prediction"] == pytest.approx(p.prediction, abs=1e-5)
    other = client.get(f"/v1/predictions?user_id={cold_user}&item_id={p.item_id}").json
    assert other["source"] == "live"
    rating = RatingModel.load(store.model_dir(sid, "rating"), "rating", {})
    u = int(np.searchsorted(rating.user_ids, cold_user))
    i = int(np.searchsorted(rating.item_ids, p.item_id))
    r = rating.meta
    want = (r["blend"][0] + r["blend"][1] * (r["global_mean"] + rating.user_bias[u] + rating.item_bias[i])
            + r["blend"][2] * float(np.dot(rating.user_factors[u], rating.item_factors[i])))
    lo, hi = r["rating_range"]
    assert other["prediction"] == pytest.approx(float(np.clip(want, lo, hi)), abs=1e-4)


def test_session_recommendations_live_then_cached(env):
    client, app, clock, store, first, _, _ = env
    listed = set(_table(store, first.snapshot_id, "similar_items")["item_id"])
    # items the snapshot has no similar-item lists for: the session is computed live
    items = [i for i in _table(store, first.snapshot_id, "items")["item_id"] if i not in listed][:3]
    assert len(items) == 3
    q = ",".join(map(str, items))
    a = client.get(f"/v1/recommendations?items={q}&k=8").json
    assert a["source"] == "live" and a["viewed"] == items and len(a["items"]) == 8
    assert not set(items) & {x["item_id"] for x in a["items"]}
    # the order of the viewed items does not matter for the cache
    b = client.get(f"/v1/recommendations?items={','.join(map(str, items[::-1]))}&k=8").json
    assert b["source"] == "cache" and b["items"] == a["items"]
    # independent: the session folded in like a user's history (sum of the items' query vectors:
    # EASE's U, PureSVD's item vectors), inner product against every item vector, ties by id
    bundle = app.extensions["hybridserve"].engine.snapshot.models["recommender"].bundle
    vecs = np.asarray(bundle.item_vecs, dtype=np.float64)
    q = np.asarray(bundle.queries, dtype=np.float64)[bundle.item_index(items)].sum(axis=0)
    sims = vecs @ q
    sims[bundle.item_index(items)] = -np.inf
    sims[bundle.item_support < bundle.min_support] = -np.inf  # as similar items: enough support only
    want = bundle.item_ids[np.lexsort((np.arange(len(sims)), -sims))[:8]]
    assert [x["item_id"] for x in a["items"]] == want.tolist()


def test_session_of_precomputed_items_comes_from_the_snapshot(env, workspace):
    """Sessions of listed items: answered from the snapshot's lists, equal to the live search and to
    brute force; those the lists cannot prove go live."""
    client, app, clock, store, first, _, settings = env
    live = create_app(settings.replace(serving__mode="live-only"), clock=clock, background=False)
    bundle = app.extensions["hybridserve"].engine.snapshot.models["recommender"].bundle
    vecs = np.asarray(bundle.item_vecs, dtype=np.float64)
    listed = _table(store, first.snapshot_id, "similar_items")["item_id"].to_numpy()
    rng = np.random.default_rng(3)
    sources = []
    for _ in range(40):
        items = rng.choice(listed[:60], size=int(rng.integers(1, 5)), replace=False).tolist()
        k = int(rng.choice([1, 5, 10, 40]))
        url = f"/v1/recommendations?items={','.join(map(str, items))}&k={k}"
        a, b = client.get(url).json, live.test_client().get(url).json
        sources.append(a["source"])
        assert b["source"] == "live" and a["source"] in ("precomputed", "live"), url
        assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]], url
        np.testing.assert_allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=2e-6)
        sims = vecs @ np.asarray(bundle.queries, dtype=np.float64)[bundle.item_index(items)].sum(axis=0)
        sims[bundle.item_index(items)] = -np.inf
        sims[bundle.item_support < bundle.min_support] = -np.inf
        want = bundle.item_ids[np.lexsort((np.arange(len(sims)), -sims))[:k]]
        assert [x["item_id"] for x in a["items"]] == want.tolist(), url
        if a["source"] == "precomputed":  # the snapshot's answer, as old as the snapshot
            assert a["snapshot"] == first.snapshot_id
            assert pd.Timestamp(a["computed_at"]) == pd.Timestamp(first.manifest["created_at"]).floor("ms")
    live.extensions["hybridserve"].close()
    assert sources.count("precomputed") >= 10, sources  # the lists prove many sessions of listed items


def test_live_answers_equal_precomputed_ones(env, workspace):
    """Consistency: with the same snapshot, computing live gives the precomputed answer."""
    client, app, clock, store, first, _, settings = env
    live_app = create_app(settings.replace(serving__max_age_s=0.0), clock=clock, background=False)
    live = live_app.test_client()
    sid = first.snapshot_id
    k = settings["batch.k_max"]
    for name, path, key in (("similar_items", "/v1/items/{}/similar?k=%d" % k, "item_id"),
                            ("user_recs", "/v1/users/{}/recommendations?k=%d" % k, "user_id")):
        table = _table(store, sid, name).sample(15, random_state=0)
        for key_value in table[key]:
            a = client.get(path.format(key_value)).json
            b = live.get(path.format(key_value)).json
            assert (a["source"], b["source"]) == ("precomputed", "live")
            assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]]
            np.testing.assert_allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]],
                                       rtol=1e-5, atol=1e-5)
    for p in _table(store, sid, "predictions").sample(15, random_state=0).itertuples():
        a = client.get(f"/v1/predictions?user_id={p.user_id}&item_id={p.item_id}").json
        b = live.get(f"/v1/predictions?user_id={p.user_id}&item_id={p.item_id}").json
        assert (a["source"], b["source"]) == ("precomputed", "live")
        assert a["prediction"] == pytest.approx(b["prediction"], abs=1e-5)
    live_app.extensions["hybridserve"].close()


def test_freshness_and_ttl_follow_the_injected_clock(env):
    client, app, clock, store, first, _, _ = env
    engine = app.extensions["hybridserve"].engine
    hot = _precomputed_item(store, first.snapshot_id)
    cold = _missing_item(store, first.snapshot_id)
    assert client.get(f"/v1/items/{hot}/similar?k=3").json["source"] == "precomputed"
    assert client.get(f"/v1/items/{cold}/similar?k=3").json["source"] == "live"
    clock.advance(59)
    assert client.get(f"/v1/items/{cold}/similar?k=3").json["source"] == "cache"
    clock.advance(2)  # past the 60 s TTL
    assert client.get(f"/v1/items/{cold}/similar?k=3").json["source"] == "live"
    # past max_age_s the precomputed answer is not served; it is computed live and counted
    clock.advance(3600)
    stale_before = engine.counts["stale"]
    r = client.get(f"/v1/items/{hot}/similar?k=3").json
    assert r["source"] == "live" and engine.counts["stale"] == stale_before + 1
    assert client.get("/readyz").json["fresh"] is False
    assert 'hybridserve_stale_precomputed_total{endpoint="similar_items"} 1.0' in client.get("/metrics").text


def test_concurrent_identical_misses_compute_once(env):
    client, app, clock, store, first, _, _ = env
    engine = app.extensions["hybridserve"].engine
    bundle = engine.snapshot.models["recommender"].bundle
    calls, gate = [], threading.Event()
    original = bundle.similar_items

    def slow(iidx, k):
        calls.append(1)
        gate.wait(5)
        return original(iidx, k)

    bundle.similar_items = slow
    cold = _missing_item(store, first.snapshot_id)
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.lookup("recommender", "similar_items", (cold,), 4))) for _ in range(8)]
    for t in threads:
        t.start()
    while not calls:
        pass
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert sorted(a.source for a in results) == ["cache"] * 7 + ["live"]
    assert all(np.array_equal(a.ids, results[0].ids) for a in results)


def test_snapshot_health_ready_metrics_openapi(env):
    client, app, clock, store, first, _, _ = env
    snap = client.get("/v1/snapshot").json
    assert snap["id"] == first.snapshot_id and snap["age_s"] == pytest.approx(10.0)
    assert snap["created_at"] == first.manifest["created_at"]
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["snapshot"] == first.snapshot_id
    client.get(f"/v1/items/{_precomputed_item(store, first.snapshot_id)}/similar?k=2")
    client.get(f"/v1/items/{_missing_item(store, first.snapshot_id)}/similar?k=2")
    m = client.get("/metrics")
    assert m.status_code == 200 and m.mimetype == "text/plain"
    text = m.text
    assert 'hybridserve_requests_total{endpoint="similar_items",source="precomputed",status="200"} 1.0' in text
    assert 'hybridserve_requests_total{endpoint="similar_items",source="live",status="200"} 1.0' in text
    assert "hybridserve_hit_rate 0.5" in text
    assert "hybridserve_request_latency_seconds_bucket" in text
    assert "hybridserve_snapshot_age_seconds" in text and "hybridserve_live_compute_seconds_total" in text
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    routes = {r.rule.replace("<", "{").replace(">", "}") for r in app.url_map.iter_rules() if r.endpoint != "static"}
    per_model = {p for p in spec["paths"] if p.startswith("/v1/models/") and "{" not in p}  # one per model
    assert per_model == {"/v1/models/rating/predict"}
    assert routes == (set(spec["paths"]) - per_model) | {"/v1/models/{name}/predict"}
    for path, ops in spec["paths"].items():
        if path.startswith("/v1/") and path not in ("/v1/snapshot", "/v1/models", "/v1/items"):  # no id in these
            assert {"400", "404", "405"} <= set(ops["get"]["responses"])


def test_cors_allows_configured_origins_only(env):
    client, *_ = env
    ok = client.get("/healthz")  # not under /v1: no CORS headers
    assert "Access-Control-Allow-Origin" not in ok.headers
    r = client.get("/v1/snapshot", headers={"Origin": "https://shop.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "ETag" in r.headers["Access-Control-Expose-Headers"]
    r = client.get("/v1/snapshot", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    pre = client.options("/v1/snapshot", headers={"Origin": "https://shop.example",
                                                  "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "https://shop.example"


def test_request_log_round_trip_into_popularity(env):
    client, app, clock, store, first, root, settings = env
    cold = _missing_item(store, first.snapshot_id)
    for _ in range(3):
        client.get(f"/v1/items/{cold}/similar?k=5")
    client.get("/v1/items/999999999/similar?k=5")  # 404: logged with status, not counted
    client.get("/v1/items/x/similar?k=5")  # 400 before an id is known: not logged
    services = app.extensions["hybridserve"]
    assert services.requestlog.flush() == 4
    segs = [p for p in store.requests_dir.glob("seg-*.parquet")]
    assert len(segs) == 1
    log = pd.read_parquet(segs[0])
    assert list(log["source"]) == ["live", "cache", "cache", "error"]
    assert list(log["status"]) == [200, 200, 200, 404]
    assert (log["endpoint"] == "similar_items").all() and log["latency_us"].gt(0).all()
    assert str(log["ts"].dt.tz) == "UTC"
    counts = read_request_counts(store, datetime.fromtimestamp(clock(), tz=timezone.utc))
    assert counts.set_index("item_id")["weight"].to_dict() == {cold: 3.0}
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    bundle = services.engine.snapshot.models["recommender"].bundle
    sel = select(inter, counts, bundle.item_ids, bundle.user_ids, settings)
    assert cold in sel.items and sel.report["items"]["expected_hit_rate"] == 1.0


def test_request_log_failure_never_fails_a_request(env, monkeypatch):
    client, app, clock, store, first, _, _ = env
    services = app.extensions["hybridserve"]
    monkeypatch.setattr(services.requestlog, "_write", lambda rows: (_ for _ in ()).throw(OSError("disk full")))
    item = _precomputed_item(store, first.snapshot_id)
    assert client.get(f"/v1/items/{item}/similar?k=2").status_code == 200
    assert services.requestlog.flush() == 0
    assert services.requestlog.failed_flushes == 1 and len(services.requestlog) == 1  # kept for the next try
    assert "hybridserve_requestlog_flush_failures_total 1.0" in client.get("/metrics").text


def test_request_log_memory_is_bounded(env):
    _, app, *_ = env
    log = app.extensions["hybridserve"].requestlog
    log.max_buffer = 10
    for i in range(25):
        log.append("similar_items", i, None, 5, "live", 200, 10)
    assert len(log) == 10 and log.dropped_rows == 15
    assert [r[2] for r in log._rows] == list(range(15, 25))  # the newest kept, in order
    log.max_buffer = 1000  # raised: what is buffered stays
    for i in range(25, 1016):
        log.append("similar_items", i, None, 5, "live", 200, 10)
    assert len(log) == 1000 and log.dropped_rows == 16
    assert [r[2] for r in log._rows] == list(range(16, 1016))
    log.max_buffer = 3  # lowered: the newest three stay (dropping them uncounted: a setting change, not load)
    assert [r[2] for r in log._rows] == [1013, 1014, 1015]


def test_hot_reload_under_concurrent_requests(env):
    client, app, clock, store, first, _, settings = env
    engine = app.extensions["hybridserve"].engine
    # Publish two more snapshots (the batch job runs in another process in production), then
    # move CURRENT back and forth while requests are in flight.
    second, third = run(settings), run(settings)
    store.set_current(first.snapshot_id)
    item = _precomputed_item(store, first.snapshot_id)
    failures, seen, stop = [], set(), threading.Event()

    def hammer():
        c = app.test_client()
        while not stop.is_set():
            r = c.get(f"/v1/items/{item}/similar?k=5")
            if r.status_code != 200 or r.json["source"] != "precomputed":
                failures.append((r.status_code, r.data[:200]))
            else:
                seen.add(r.json["snapshot"])
            time.sleep(0.001)  # requests stay in flight throughout without starving the reload of the GIL

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for target in (second, third, second, third):
            store.set_current(target.snapshot_id)
            assert engine.reload() is True
            assert engine.snapshot.id == target.snapshot_id
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert seen <= {first.snapshot_id, second.snapshot_id, third.snapshot_id}
    assert client.get("/v1/snapshot").json["id"] == third.snapshot_id
    assert client.get(f"/v1/items/{item}/similar?k=5").json["snapshot"] == third.snapshot_id
    assert engine.counts["reloads"] == 5  # the first load + four swaps


def test_corrupt_snapshot_is_refused_and_old_one_keeps_serving(env):
    client, app, clock, store, first, _, settings = env
    engine = app.extensions["hybridserve"].engine
    second = run(settings)
    victim = store.table_path(second.snapshot_id, "similar_items")
    victim.write_bytes(victim.read_bytes()[:-4] + b"XXXX")
    assert engine.reload() is False
    assert engine.snapshot.id == first.snapshot_id
    ready = client.get("/readyz")
    assert ready.status_code == 200  # still serving the old, valid snapshot
    assert ready.json["error"].startswith(f"snapshot {second.snapshot_id} refused:")
    assert "checksum" in ready.json["error"]
    assert client.get(f"/v1/items/{_precomputed_item(store, first.snapshot_id)}/similar?k=2").json["snapshot"] \
        == first.snapshot_id
    assert "hybridserve_snapshot_reload_failures_total 1.0" in client.get("/metrics").text
    assert engine.reload() is False  # not retried until CURRENT changes


def test_worker_without_a_valid_snapshot_starts_and_serves_live(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    (store.model_dir(first.snapshot_id) / "items.faiss").unlink()
    app = create_app(settings, background=False)
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["ready"] is False
    assert "refused" in ready.json["error"] and ready.json["live_only_model"] == first.manifest["model_version"]
    item = int(_table(store, first.snapshot_id, "similar_items")["item_id"].iloc[0])
    r = client.get(f"/v1/items/{item}/similar?k=3")
    assert r.status_code == 200 and r.json["source"] == "live"
    # nothing at all: 503 problem, never a 500
    empty = settings.replace(paths__store=str(root / "empty-store"))
    c2 = create_app(empty, background=False).test_client()
    r = c2.get("/v1/items/1/similar?k=3")
    assert r.status_code == 503 and r.mimetype == "application/problem+json"
    assert "CURRENT missing" in r.json["detail"]
    # when a snapshot may be there: the next time the worker looks for one
    assert r.headers["Retry-After"] == str(max(1, math.ceil(settings["serving.reload_interval_s"])))
    assert c2.get("/readyz").status_code == 503


BAD_REQUESTS = [
    ("/v1/items/abc/similar?k=5", 400, "item_id must be a non-negative integer (int64), got 'abc'"),
    ("/v1/items/-3/similar?k=5", 400, "item_id must be a non-negative integer (int64), got '-3'"),
    ("/v1/items/1.5/similar?k=5", 400, "item_id must be a non-negative integer (int64), got '1.5'"),
    ("/v1/items/99999999999999999999/similar?k=5", 400,
     "item_id must be a non-negative integer (int64), got '99999999999999999999'"),
    ("/v1/items/%C3%A9%E2%82%AC/similar?k=5", 400, "item_id must be a non-negative integer (int64), got 'é€'"),
    ("/v1/items/1/similar?k=", 400, "k must be an integer from 1 to 500, got ''"),
    ("/v1/items/1/similar?k=0", 400, "k must be an integer from 1 to 500, got 0"),
    ("/v1/items/1/similar?k=-2", 400, "k must be an integer from 1 to 500, got -2"),
    ("/v1/items/1/similar?k=ten", 400, "k must be an integer from 1 to 500, got 'ten'"),
    ("/v1/items/1/similar?k=2.5", 400, "k must be an integer from 1 to 500, got '2.5'"),
    ("/v1/items/1/similar?k=501", 400, "k must be an integer from 1 to 500, got 501"),
    ("/v1/items/1/similar?k=5&k=6", 400, "query parameter 'k' given more than once"),
    ("/v1/items/1/similar?k=5&limit=3", 400, "unknown query parameter 'limit' (allowed: k, fields)"),
    ("/v1/items/1/similar?k=5&%FF%FE=1", 400, "unknown query parameter '\ufffd\ufffd' (allowed: k, fields)"),
    ("/v1/users/x/recommendations?k=5", 400, "user_id must be a non-negative integer (int64), got 'x'"),
    ("/v1/predictions?user_id=1", 400, "item_id is required: a non-negative integer"),
    ("/v1/predictions?item_id=1", 400, "user_id is required: a non-negative integer"),
    ("/v1/predictions?user_id=1&item_id=1&k=3", 400, "unknown query parameter 'k' (allowed: user_id, item_id)"),
    ("/v1/recommendations?k=5", 400, "query parameter 'items' is required: 1 to 5 comma-separated item ids"),
    ("/v1/recommendations?items=&k=5", 400, "query parameter 'items' is required: 1 to 5 comma-separated item ids"),
    ("/v1/recommendations?items=1,2,3,4,5,6&k=5", 400, "items lists 6 ids; at most 5 are allowed"),
    ("/v1/recommendations?items=1,2,1&k=5", 400, "items has duplicate ids: 1"),
    ("/v1/recommendations?items=1,,2&k=5", 400, "each id in items is required: a non-negative integer"),
    ("/v1/recommendations?items=1,abc&k=5", 400, "each id in items must be a non-negative integer (int64), got 'abc'"),
    ("/v1/recommendations?items=1,999999999&k=5", 404, "items not in the catalogue: 999999999"),
    ("/v1/snapshot?x=1", 400, "unknown query parameter 'x' (allowed: none)"),
    ("/v1/items/999999999/similar?k=5", 404, "item 999999999 is not in the catalogue"),
    ("/v1/users/999999999/recommendations?k=5", 404, "user 999999999 is unknown"),
    ("/v1/predictions?user_id=999999999&item_id=1", 404, "user 999999999 is unknown"),
]


@pytest.mark.parametrize("url,status,detail", BAD_REQUESTS)
def test_bad_input_gets_problem_json(env, url, status, detail):
    client = env[0]
    r = client.get(url)
    assert r.status_code == status
    assert r.mimetype == "application/problem+json"
    titles = {400: "Bad Request", 404: "Not Found"}
    assert r.json == {"type": "about:blank", "title": titles[status], "status": status, "detail": detail,
                      "instance": r.json["instance"]}


def test_wrong_method_long_url_and_unknown_route(env):
    client = env[0]
    r = client.post("/v1/items/1/similar?k=5")
    assert r.status_code == 405 and r.mimetype == "application/problem+json" and "GET" in r.headers["Allow"]
    r = client.delete("/v1/snapshot")
    assert r.status_code == 405
    r = client.get("/v1/items/1/similar?k=5&pad=" + "x" * 5000)
    assert r.status_code == 414 and r.json["detail"] == "URL is longer than 2048 bytes"
    r = client.get("/v2/whatever")
    assert r.status_code == 404 and r.mimetype == "application/problem+json"


@pytest.mark.parametrize("mode,first,second", [("hybrid", "precomputed", "precomputed"),
                                               ("ttl-cache", "live", "cache"), ("live-only", "live", "live")])
def test_serving_modes_are_configuration_of_the_same_app(workspace, mode, first, second):
    root, settings, _, published_ = workspace
    store = Store(settings["paths.store"])
    app = create_app(settings.replace(serving__mode=mode), background=False)
    client = app.test_client()
    hot = _precomputed_item(store, published_.snapshot_id)
    answers = [client.get(f"/v1/items/{hot}/similar?k=5").json for _ in range(2)]
    assert [a["source"] for a in answers] == [first, second]
    assert answers[0]["items"] == answers[1]["items"]
    assert client.get("/readyz").json["mode"] == mode
    engine = app.extensions["hybridserve"].engine
    assert engine.counts["live_computations"] == {"hybrid": 0, "ttl-cache": 1, "live-only": 2}[mode]
    app.extensions["hybridserve"].close()
