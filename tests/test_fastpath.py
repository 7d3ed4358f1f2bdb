"""The hit path below Flask answers exactly what the Flask views answer, byte for byte, header for header,
with the same metrics and request-log rows; everything else it hands to Flask."""
from __future__ import annotations

import pandas as pd
import pytest

from serving.app import create_app
from serving.fastpath import HitPath
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
    return urls + [f"/v1/items/{hot}/similar?k=05", f"/v1/items/0{hot}/similar?k=5"]  # leading zeros: same key


def _others(store, sid) -> list[str]:
    """Requests that are not plain hits: misses, k beyond the snapshot, unusual spellings, errors."""
    sim = _table(store, sid, "similar_items")
    hot = int(sim["item_id"].iloc[0])
    k_max = len(sim["neighbor_ids"].iloc[0])
    cold = int(next(i for i in _table(store, sid, "items")["item_id"] if i not in set(sim["item_id"])))
    return [f"/v1/items/{cold}/similar?k=5", f"/v1/items/{hot}/similar?k={k_max + 1}",
            f"/v1/items/{hot}/similar?k=%35", f"/v1/items/{hot}/similar/?k=5", f"/v1/items/{hot}/similar?k=5&", f"/v1/recommendations?items={hot}&k=5",
            "/v1/items/99999999999999999999/similar?k=5", "/v1/snapshot", "/healthz"] + [u for u, _, _ in BAD_REQUESTS]


def _response(client, url, headers=None):
    r = client.get(url, headers=headers or {})
    return r.status_code, sorted(r.headers.items()), r.data


@pytest.mark.parametrize("origin", [None, ORIGINS[1], "https://evil.example"])
def test_every_response_equals_the_flask_views(pair, origin):
    fast, slow, clock, store, sid = pair
    headers = {"Origin": origin} if origin else {}
    hits, others = _hits(store, sid), _others(store, sid)
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
