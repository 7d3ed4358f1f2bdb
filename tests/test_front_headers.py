"""What an answer's headers promise a cache in front, on the hit path and through Flask alike: max-age
is the whole seconds of freshness left less one (so a cache counting whole seconds never serves an
answer past its bound), the ETag is weak and names the snapshot, errors and status endpoints are
never stored. An injected clock; tests/test_front.py holds the same through a real nginx."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from serving.store import Store
from serving.web.app import create_app

MAX_AGE_S, TTL_S = 3600.0, 60.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=[True, False], ids=["hit-path", "flask"])
def env(request, workspace):
    """(client, hit path or None, clock, store, snapshot id, created_at) with the hit path on or off."""
    root, settings, cfg, first = workspace
    settings = settings.replace(serving__max_age_s=MAX_AGE_S, serving__cache_ttl_s=TTL_S,
                                serving__fast_path=request.param, serving__log_flush_interval_s=0.0)
    created = pd.Timestamp(first.manifest["created_at"]).timestamp()
    clock = Clock(created + 10.3)
    app = create_app(settings, clock=clock, background=False)
    hit_path = app.wsgi_app if request.param else None
    yield app.test_client(), hit_path, clock, Store(settings["paths.store"]), first.snapshot_id, created
    app.extensions["hybridserve"].close()


def _max_age(resp) -> int:
    cc = resp.headers["Cache-Control"]
    assert cc.startswith("public, max-age="), cc
    return int(cc.rsplit("=", 1)[1])


def _items(store, sid):
    sim = store.read_table(sid, "similar_items").to_pandas()
    stored = set(sim["item_id"])
    missing = next(int(i) for i in store.read_table(sid, "items").to_pandas()["item_id"] if i not in stored)
    return int(sim["item_id"].iloc[0]), missing


def test_a_precomputed_answer_says_its_freshness_left_less_one_second(env):
    client, hit_path, clock, store, sid, created = env
    hot, _ = _items(store, sid)
    url = f"/v1/items/{hot}/similar?k=5"
    for age in (10.3, 1000.0, MAX_AGE_S - 2.5, MAX_AGE_S - 1.5, MAX_AGE_S - 0.2):
        clock.t = created + age
        r = client.get(url)
        assert r.status_code == 200 and r.json["source"] == "precomputed", (age, r.json)
        left = MAX_AGE_S - age
        assert _max_age(r) == max(0, math.floor(left) - 1), (age, r.headers["Cache-Control"])
        # what a whole-second cache does with it (nginx: kept while floor(got) + max-age >= floor(now)):
        # the last moment it serves the answer is under a second past got + max-age -- within the bound
        # (max-age=0: not kept at all)
        assert _max_age(r) == 0 or age + _max_age(r) + 1 <= MAX_AGE_S + 1e-9
    if hit_path is not None:
        assert hit_path.answered == 5  # the hit path answered them all, with the same rule
    clock.t = created + MAX_AGE_S + 0.5  # past the bound: computed live, fresh for the live TTL
    r = client.get(url)
    assert r.json["source"] == "live" and _max_age(r) == TTL_S - 1 and "ETag" not in r.headers


def test_the_etag_is_weak_names_the_snapshot_and_answers_304(env):
    client, hit_path, clock, store, sid, created = env
    hot, _ = _items(store, sid)
    url = f"/v1/items/{hot}/similar?k=5"
    r = client.get(url)
    tag = r.headers["ETag"]
    assert tag.startswith('W/"') and sid in tag
    for sent in (tag, tag[2:], f'"other", {tag}'):  # weak, the same as strong, in a list
        r2 = client.get(url, headers={"If-None-Match": sent})
        assert r2.status_code == 304 and r2.data == b"", sent
        assert r2.headers["ETag"] == tag and r2.headers["Cache-Control"] == r.headers["Cache-Control"]
    assert client.get(f"/v1/items/{hot}/similar?k=4", headers={"If-None-Match": tag}).status_code == 200


def test_a_live_answer_is_cacheable_only_while_fresh(env):
    client, hit_path, clock, store, sid, created = env
    _, missing = _items(store, sid)
    url = f"/v1/items/{missing}/similar?k=5"
    first = client.get(url)
    assert first.json["source"] == "live" and _max_age(first) == TTL_S - 1 and "ETag" not in first.headers
    clock.t += TTL_S - 1.5  # cached, 1.5 s left: no cache may keep it
    r = client.get(url)
    assert r.json["source"] == "cache" and r.json["computed_at"] == first.json["computed_at"] and _max_age(r) == 0
    clock.t += 2.0  # expired: computed again, fresh again
    r = client.get(url)
    assert r.json["source"] == "live" and r.json["computed_at"] != first.json["computed_at"]
    assert _max_age(r) == TTL_S - 1


def test_errors_and_status_endpoints_are_never_stored(env):
    client, hit_path, clock, store, sid, created = env
    for url, status in (("/v1/items/999999999/similar?k=5", 404), ("/v1/items/1/similar?k=0", 400),
                        ("/v1/items/x/similar", 400), ("/v1/nothing", 404), ("/healthz", 200), ("/readyz", 200),
                        ("/v1/snapshot", 200), ("/v1/models", 200), ("/metrics", 200)):
        r = client.get(url)
        assert r.status_code == status and r.headers.get("Cache-Control") == "no-store", (url, r.status_code,
                                                                                         r.headers)


@pytest.mark.parametrize("fast_path", [True, False], ids=["hit-path", "flask"])
def test_max_age_cap_bounds_every_answer(workspace, fast_path):
    """serving.max_age_cap_s: no answer says more (a front revalidates within it), none says more than
    its freshness left either; errors stay no-store."""
    root, settings, cfg, first = workspace
    settings = settings.replace(serving__max_age_s=MAX_AGE_S, serving__cache_ttl_s=TTL_S, serving__max_age_cap_s=30,
                                serving__fast_path=fast_path, serving__log_flush_interval_s=0.0)
    created = pd.Timestamp(first.manifest["created_at"]).timestamp()
    clock = Clock(created + 10.3)
    app = create_app(settings, clock=clock, background=False)
    try:
        client = app.test_client()
        hot, missing = _items(Store(settings["paths.store"]), first.snapshot_id)
        r = client.get(f"/v1/items/{hot}/similar?k=5")
        assert r.json["source"] == "precomputed" and _max_age(r) == 30
        r304 = client.get(f"/v1/items/{hot}/similar?k=5", headers={"If-None-Match": r.headers["ETag"]})
        assert r304.status_code == 304 and _max_age(r304) == 30
        clock.t = created + MAX_AGE_S - 10.5  # 10.5 s left: under the cap, so the answer's own
        assert _max_age(client.get(f"/v1/items/{hot}/similar?k=5")) == 9
        assert _max_age(client.get(f"/v1/items/{missing}/similar?k=5")) == 30  # live, fresh for 60 s
        assert client.get("/v1/items/999999999/similar?k=5").headers["Cache-Control"] == "no-store"
    finally:
        app.extensions["hybridserve"].close()
