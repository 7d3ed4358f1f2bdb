"""The hit path below Flask answers exactly what the Flask views answer, byte for byte, header for header,
with the same metrics and request-log rows; everything else it hands to Flask."""
from __future__ import annotations

import pandas as pd
import pytest

from serving.snapshot import LoadedSnapshot
from serving.web.app import create_app
from serving.web.fastpath import HitPath
from serving.store import Store
from test_api import SERVING, BAD_REQUESTS, Clock, _table

ORIGINS = ("https://shop.example", "https://blog.example")


@pytest.fixture
def pair(workspace):
    """(fast app, Flask-only app, clock, store, snapshot id): the same store, settings and clock."""
    root, settings, _, first = workspace
    settings = settings.replace(**{f"serving__{k}": v for k, v in {**SERVING, "cors_origins": ",".join(ORIGINS)}.items()})
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    fast = create_app(settings, clock=clock, background=False)
    slow = create_app(settings.replace(serving__fast_path=False), clock=clock, background=False)
    assert isinstance(fast.wsgi_app, HitPath) and not isinstance(slow.wsgi_app, HitPath)
    yield fast, slow, clock, Store(settings["paths.store"]), first.snapshot_id
    for app in (fast, slow):
        app.extensions["hybridserve"].close()


def _hits(store, sid) -> list[str]:
    """Requests the snapshot answers: lists at several k, predictions with their parameters either way."""
    sim, recs, preds = (_table(store, sid, n) for n in ("similar_items", "user_recs", "predictions"))
    k_max = len(sim["neighbor_ids"].iloc[0])
    urls = [f"/v1/items/{i}/similar?k={k}" for i, k in zip(sim["item_id"].iloc[:6], (1, 5, 10, k_max, 3, 7))]
    urls += [f"/v1/users/{u}/recommendations?k={k}" for u, k in zip(recs["user_id"].iloc[:4], (1, 10, k_max, 4))]
    for u, i in zip(preds["user_id"].iloc[:3], preds["item_id"].iloc[:3]):
        urls += [f"/v1/predictions?user_id={u}&item_id={i}", f"/v1/predictions?item_id={i}&user_id={u}"]
    hot = int(sim["item_id"].iloc[0])
    # sessions of precomputed items whose lists prove the answer (checked in the test that uses them)
    a, b = _provable_pair(store, sid, [int(i) for i in sim["item_id"].iloc[:30]])
    urls += [f"/v1/recommendations?items={a}&k=5", f"/v1/recommendations?items={a},{b}&k=5",
             f"/v1/recommendations?items={b},{a}&k=3"]
    urls += [f"/v1/items/{hot}/similar?k=05", f"/v1/items/0{hot}/similar?k=5"]  # leading zeros: same key
    # k left out: parse.DEFAULT_K, still a hit
    return urls + [f"/v1/items/{hot}/similar", f"/v1/users/{recs['user_id'].iloc[0]}/recommendations",
                   f"/v1/recommendations?items={a}"]


def _provable_pair(store, sid, items: list[int]) -> tuple[int, int]:
    """Two precomputed items whose similar lists prove the sessions (a), (a, b) at k=5 and (b, a) at k=3:
    which pairs do depends on the trained vectors, so the snapshot is asked, not assumed."""
    rec = LoadedSnapshot.load(store, sid).models["recommender"]
    for a in items:
        if rec.stored("session", ((a,),), 5) is None:
            continue
        for b in items:
            if b != a and rec.stored("session", ((a, b),), 5) is not None and rec.stored("session", ((b, a),), 3) is not None:
                return a, b
    raise AssertionError(f"no two of {items} have similar lists that prove a session answer")


def _others(store, sid) -> list[str]:
    """Requests that are not plain hits: misses, k beyond the snapshot, unusual spellings, errors."""
    sim = _table(store, sid, "similar_items")
    hot = int(sim["item_id"].iloc[0])
    k_max = len(sim["neighbor_ids"].iloc[0])
    cold = int(next(i for i in _table(store, sid, "items")["item_id"] if i not in set(sim["item_id"])))
    return [f"/v1/items/{cold}/similar?k=5", f"/v1/items/{hot}/similar?k={k_max + 1}",
            f"/v1/items/{hot}/similar?k=%35", f"/v1/items/{hot}/similar/?k=5", f"/v1/items/{hot}/similar?k=5&",
            f"/v1/recommendations?items={hot},{cold}&k=5", f"/v1/recommendations?k=5&items={hot}",
            f"/v1/recommendations?items={hot},{hot}&k=5", f"/v1/recommendations?items={hot}%2C{cold}&k=5",
            "/v1/items/99999999999999999999/similar?k=5", "/v1/snapshot", "/healthz"] + [u for u, _, _ in BAD_REQUESTS]


def _response(client, url, headers=None):
    r = client.get(url, headers=headers or {})
    return r.status_code, sorted(r.headers.items()), r.data


@pytest.mark.parametrize("origin", [None, ORIGINS[1], "https://evil.example"])
def test_every_response_equals_the_flask_views(pair, origin):
    fast, slow, clock, store, sid = pair
    headers = {"Origin": origin} if origin else {}
    hits, others = _hits(store, sid), _others(store, sid)
    engine = fast.extensions["hybridserve"].engine
    sessions = [u for u in hits if u.startswith("/v1/recommendations")]
    for url in sessions:  # the lists prove these answers (Engine.lookup with live=False), so they are hits
        items, _, k = url.split("items=")[1].partition("&k=")
        assert engine.lookup("recommender", "session", (tuple(map(int, items.split(","))),), int(k or 10),
                             live=False) is not None, url
    for url in hits + others:
        got, want = _response(fast.test_client(), url, headers), _response(slow.test_client(), url, headers)
        assert got == want, url
    # The hits were answered below Flask; everything else went through it.
    assert fast.wsgi_app.answered == len(hits)
    assert fast.wsgi_app.passed == len(others)
    if origin == ORIGINS[1]:
        assert dict(_response(fast.test_client(), hits[0], headers)[1])["Access-Control-Allow-Origin"] == origin


def test_metrics_and_request_log_rows_are_the_same(pair):
    fast, slow, clock, store, sid = pair
    urls = _hits(store, sid) + _others(store, sid)[:3]
    for app in (fast, slow):
        client = app.test_client()
        for url in urls:
            client.get(url)
    rows = [[r[1:7] for r in app.extensions["hybridserve"].requestlog._rows] for app in (fast, slow)]
    assert rows[0] == rows[1] and len(rows[0]) == len(urls)

    def counts(app):
        text = app.test_client().get("/metrics").text
        return sorted(line for line in text.splitlines() if line.startswith("hybridserve_requests_total{"))

    assert counts(fast) == counts(slow) and any('source="precomputed"' in line for line in counts(fast))


def test_hits_are_counted_in_memory_and_flushed_to_prometheus(pair):
    fast, slow, clock, store, sid = pair
    metrics = fast.extensions["hybridserve"].metrics
    hits = [u for u in _hits(store, sid) if u.startswith("/v1/items/")]
    client = fast.test_client()
    for url in hits:
        assert client.get(url).json["source"] == "precomputed"

    def counted(name: str, **labels) -> float:  # the Prometheus series as they stand, nothing flushed
        return metrics.registry.get_sample_value(name, {"endpoint": "similar_items", **labels}) or 0.0

    series = {"source": "precomputed", "status": "200"}
    assert counted("hybridserve_requests_total", **series) == 0.0  # counted in memory only, so far
    metrics.flush_hits()
    assert counted("hybridserve_requests_total", **series) == len(hits)
    assert counted("hybridserve_fast_path_requests_total") == len(hits)
    assert 0 < counted("hybridserve_fast_path_seconds_total") < 1.0
    assert counted("hybridserve_request_latency_seconds_count", source="precomputed") == 0.0  # Flask's only
    client.get(hits[0])
    fast.extensions["hybridserve"].close()  # a worker that stops adds what it counted since
    assert counted("hybridserve_requests_total", **series) == len(hits) + 1
    client.get(hits[0])
    line = next(x for x in client.get("/metrics").text.splitlines()  # a scrape adds them first
                if x.startswith('hybridserve_fast_path_requests_total{endpoint="similar_items"}'))
    assert float(line.split()[-1]) == len(hits) + 2


def test_revalidation_and_stale_answers_go_through_flask_once(pair):
    fast, slow, clock, store, sid = pair
    url = _hits(store, sid)[1]
    client = fast.test_client()
    etag = client.get(url).headers["ETag"]
    r = client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.headers["ETag"] == etag
    assert (fast.wsgi_app.answered, fast.wsgi_app.passed) == (1, 1)
    engine = fast.extensions["hybridserve"].engine
    clock.advance(engine.max_age_s)  # the snapshot is now too old to serve
    body = client.get(url).json
    assert body["source"] == "live" and engine.counts["stale"] == 1
    assert (fast.wsgi_app.answered, fast.wsgi_app.passed) == (1, 2)


def test_head_and_other_methods_are_flasks(pair):
    fast, slow, clock, store, sid = pair
    url = _hits(store, sid)[0]
    for method in ("head", "post", "options"):
        got = getattr(fast.test_client(), method)(url, headers={"Origin": ORIGINS[0],
                                                               "Access-Control-Request-Method": "GET"})
        want = getattr(slow.test_client(), method)(url, headers={"Origin": ORIGINS[0],
                                                                "Access-Control-Request-Method": "GET"})
        assert (got.status_code, sorted(got.headers.items()), got.data) == \
               (want.status_code, sorted(want.headers.items()), want.data)
    assert fast.wsgi_app.answered == 0


def test_a_kept_hit_still_ages_and_equals_the_flask_views(pair):
    """The second request on a URL takes the rendered hit; its age_s and Cache-Control still move."""
    fast, slow, clock, store, sid = pair
    url = _hits(store, sid)[2]
    created = fast.extensions["hybridserve"].engine.snapshot.created_at
    for step in (0.0, 0.2504, 1234.5678, 1.0):
        clock.advance(step)
        got, want = _response(fast.test_client(), url), _response(slow.test_client(), url)
        assert got == want
        body = fast.test_client().get(url).json
        assert body["age_s"] == round(clock() - created, 3)
    info = fast.wsgi_app._rendered.cache_info()
    assert (info.misses, info.currsize) == (1, 1) and info.hits == 7
    assert fast.wsgi_app.answered == 8


def test_only_hits_are_kept_and_the_limit_holds(pair, workspace):
    fast, slow, clock, store, sid = pair
    hits = _hits(store, sid)
    for url in _others(store, sid):
        fast.test_client().get(url)
    assert fast.wsgi_app._rendered.cache_info().currsize == 0  # misses, stale, errors: never kept
    for url in hits:
        fast.test_client().get(url)
    # sessions are rendered each time, never kept (seldom asked twice, they would push out the hits)
    kept = {u for u in hits if not u.startswith("/v1/recommendations")}
    assert len(kept) < len(set(hits))
    assert fast.wsgi_app._rendered.cache_info().currsize == len(kept)
    settings = fast.extensions["hybridserve"].settings
    for entries in (0, 3):
        app = create_app(settings.replace(serving__hit_cache_entries=entries), clock=clock, background=False)
        try:
            for url in hits + hits:
                assert _response(app.test_client(), url) == _response(slow.test_client(), url), (entries, url)
            assert app.wsgi_app.answered == 2 * len(hits)
            if entries:
                assert app.wsgi_app._rendered.cache_info().currsize == entries
            else:
                assert not hasattr(app.wsgi_app._rendered, "cache_info")
        finally:
            app.extensions["hybridserve"].close()


def test_a_new_snapshot_replaces_the_kept_hits(pair):
    from batch.job import run

    fast, slow, clock, store, sid = pair
    url = _hits(store, sid)[0]
    assert fast.test_client().get(url).json["snapshot"] == sid
    second = run(fast.extensions["hybridserve"].settings)
    assert second.snapshot_id != sid
    for app in (fast, slow):
        assert app.extensions["hybridserve"].engine.reload() is True
    clock.advance(1.0)
    new_urls = _hits(store, second.snapshot_id)
    for u in [url] + new_urls:
        got, want = _response(fast.test_client(), u), _response(slow.test_client(), u)
        assert got == want, u
    assert fast.test_client().get(new_urls[0]).json["snapshot"] == second.snapshot_id
    # the first snapshot's renderings went at the swap; what is kept now is the second's only
    kept = fast.wsgi_app._rendered.cache_info().currsize
    assert kept == len({u for u in [url] + new_urls if fast.test_client().get(u).json["source"] == "precomputed"
                        and not u.startswith("/v1/recommendations")})  # sessions are never kept


def test_an_omitted_k_is_ten_and_answered_by_the_hit_path(pair):
    """k defaults to parse.DEFAULT_K: the same answer as k=10, on the hit path (its own counter), and
    k_limit where that is lower."""
    fast, slow, clock, store, sid = pair
    sim = _table(store, sid, "similar_items")
    hot = int(sim["item_id"].iloc[0])
    recs = _table(store, sid, "user_recs")
    user = int(recs["user_id"].iloc[0])
    client = fast.test_client()
    for bare, with_k in ((f"/v1/items/{hot}/similar", f"/v1/items/{hot}/similar?k=10"),
                         (f"/v1/users/{user}/recommendations", f"/v1/users/{user}/recommendations?k=10"),
                         (f"/v1/recommendations?items={hot}", f"/v1/recommendations?items={hot}&k=10")):
        before = fast.wsgi_app.answered
        got = client.get(bare)
        assert fast.wsgi_app.answered == before + 1, bare
        want = client.get(with_k)
        assert got.status_code == 200 and got.json["source"] == "precomputed", bare
        assert got.json["k"] == 10 and got.json["items"] == want.json["items"] and len(got.json["items"]) == 10
        assert got.headers["ETag"] == want.headers["ETag"]  # the same answer, so the same validator
    assert list(sim["neighbor_ids"].iloc[0][:10]) == [x["item_id"] for x in client.get(f"/v1/items/{hot}/similar").json["items"]]
    settings = fast.extensions["hybridserve"].settings
    low = create_app(settings.replace(serving__k_limit=4), clock=clock, background=False)
    try:
        body = low.test_client().get(f"/v1/items/{hot}/similar").json
        assert body["k"] == 4 and len(body["items"]) == 4
    finally:
        low.extensions["hybridserve"].close()
