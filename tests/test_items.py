"""Item metadata: the snapshot's items table in memory (serving.catalogue), GET /v1/items/<id>, title
search (GET /v1/items?q=) and ?fields=title,genres on list answers (on the hit path for hits)."""
from __future__ import annotations

import shutil
import unicodedata

import numpy as np
import pandas as pd
import pytest

from batch.inputs import read_movielens_100k
from conftest import ML100K, make_settings
from serving.catalogue import Catalogue
from serving.snapshot import LoadedSnapshot, catalogue
from serving.store import Store
from serving.web.app import create_app
from test_api import SERVING, Clock, _table


def _fold(text: str) -> str:
    """Written apart from serving.catalogue.fold: every combining character dropped, casefolded."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def _brute_search(ids, titles, popularity, q: str, limit: int) -> list[int]:
    """Item ids in the promised order: title starts with q, then contains it; more popular, then lower id."""
    f = _fold(q)
    ranked = []
    for i, t, p in zip(ids, titles, popularity):
        if not t:
            continue
        ft = _fold(t)
        if ft.startswith(f):
            ranked.append((0, -p, i))
        elif f in ft:
            ranked.append((1, -p, i))
    return [i for _, _, i in sorted(ranked)[:limit]]


@pytest.fixture(scope="module")
def app_env(published, tmp_path_factory):
    """(fast app, Flask-only app, store, snapshot id) on a copy of the published store: the apps' request
    logs flush into their store on close, and the published one is shared by every test."""
    src, _, first = published
    root = tmp_path_factory.mktemp("items")
    shutil.copytree(src / "inputs", root / "inputs")
    shutil.copytree(src / "store", root / "store", symlinks=True)
    settings, _ = make_settings(root)
    settings = settings.replace(**{f"serving__{k}": v for k, v in SERVING.items()})
    clock = Clock(pd.Timestamp(first.manifest["created_at"]).timestamp() + 10.0)
    fast = create_app(settings, clock=clock, background=False)
    slow = create_app(settings.replace(serving__fast_path=False), clock=clock, background=False)
    yield fast, slow, Store(settings["paths.store"]), first.snapshot_id
    for app in (fast, slow):
        app.extensions["hybridserve"].close()


def _items(store, sid) -> pd.DataFrame:
    return _table(store, sid, "items").set_index("item_id")


def test_search_order_equals_a_brute_force_ranking():
    rng = np.random.default_rng(3)
    words = ["Star", "star", "Stär", "Wars", "Misérables", "MISERABLES", "Straße", "strasse", "Café", "Noël", "the"]
    titles = [" ".join(rng.choice(words, size=rng.integers(1, 4))) + f" ({1950 + i})" for i in range(400)]
    titles[5] = None  # an item without metadata: listed by id, never found by title
    ids = rng.permutation(np.arange(1000, 1400))
    pop = rng.integers(0, 20, size=400)  # many ties: the id breaks them
    cat = Catalogue(ids, titles, [["Drama"]] * 400, pop)
    for q in ["star", "STAR", "stár", "wars", "misérables", "miserables", "strasse", "STRASSE", "straße", "cafe",
              "noel", " (19", "the ", "(1951)", "zzz", "s", "e"]:
        for limit in (1, 7, 50, 400):
            got = [int(cat.ids[r]) for r in cat.search(q, limit)]
            assert got == _brute_search(ids, titles, pop, q, limit), (q, limit)
    assert cat.get(int(ids[5])) == {"title": None, "genres": ["Drama"]}
    assert cat.get(999_999) is None
    assert cat.fields([int(ids[0]), 999_999], ("title", "genres")) == [
        {"title": titles[0], "genres": ["Drama"]}, {"title": None, "genres": []}]


@pytest.mark.skipif(not (ML100K / "u.item").is_file(), reason=f"MovieLens 100K not found at {ML100K}")
def test_movielens_titles_are_found_without_their_accents():
    _, items = read_movielens_100k(ML100K)
    cat = Catalogue(items["item_id"].to_numpy(), items["title"].tolist(), items["genres"].tolist(),
                    np.zeros(len(items), np.int64))
    found = [cat.titles[r] for r in cat.search("miserables", 5)]
    assert "Misérables, Les (1995)" in found
    assert [cat.titles[r] for r in cat.search("CEREMONIE", 5)] == ["Cérémonie, La (1995)"]
    toy = cat.search("toy story", 3)
    assert cat.titles[toy[0]] == "Toy Story (1995)" and cat.genres_of(toy[0]) == ["Animation", "Children's", "Comedy"]


def test_an_item_and_items_without_metadata(app_env):
    fast, slow, store, sid = app_env
    items = _items(store, sid)
    client = fast.test_client()
    iid = int(items.index[3])
    r = client.get(f"/v1/items/{iid}")
    assert r.status_code == 200 and r.json["source"] == "precomputed" and r.json["snapshot"] == sid
    assert (r.json["title"], r.json["genres"]) == (items.loc[iid, "title"], list(items.loc[iid, "genres"]))
    assert "max-age=" in r.headers["Cache-Control"]
    r = client.get("/v1/items/999999999")
    assert r.status_code == 404 and r.mimetype == "application/problem+json"
    assert r.json["detail"] == "item 999999999 is not in the catalogue"
    for url, detail in (("/v1/items/abc", "item_id must be a non-negative integer (int64), got 'abc'"),
                        (f"/v1/items/{iid}?x=1", "unknown query parameter 'x' (allowed: none)")):
        r = client.get(url)
        assert (r.status_code, r.mimetype, r.json["detail"]) == (400, "application/problem+json", detail)
    # An items table without some of the model's items (or none at all): those items have no title
    snap = fast.extensions["hybridserve"].engine.snapshot
    table = store.read_table(sid, "items")
    part = catalogue(table.slice(0, 10), snap.models)
    bundle_ids = snap.models["recommender"].bundle.item_ids
    assert len(part) == len(bundle_ids)
    missing = int(table.column("item_id")[10].as_py())
    assert part.get(missing) == {"title": None, "genres": []}
    assert part.search(str(table.column("title")[10].as_py()), 5) == []
    live_only = LoadedSnapshot.live_only(snap.models["recommender"].bundle)
    assert len(live_only.items) == len(bundle_ids) and live_only.items.search("a", 5) == []


def test_title_search_through_the_api(app_env):
    fast, slow, store, sid = app_env
    items = _items(store, sid)
    bundle = fast.extensions["hybridserve"].engine.snapshot.models["recommender"].bundle
    support = dict(zip(bundle.item_ids.tolist(), bundle.item_support.tolist()))
    ids = items.index.to_numpy()
    pop = [support.get(int(i), 0) for i in ids]
    word = items["title"].iloc[0].split()[0]  # a word many sample titles share
    client = fast.test_client()
    for q, limit in ((word, None), (word.upper(), 3), (word[1:4].lower(), 50), ("(19", 20), ("no such title", None)):
        url = f"/v1/items?q={q}" + (f"&limit={limit}" if limit else "")
        r = client.get(url)
        assert r.status_code == 200, (url, r.json)
        want = _brute_search(ids, items["title"].tolist(), pop, q, limit or 10)
        assert [x["item_id"] for x in r.json["items"]] == want, url
        assert all(x["title"] == items.loc[x["item_id"], "title"] for x in r.json["items"])
        assert r.json["q"] == q and r.json["limit"] == (limit or 10) and r.json["source"] == "precomputed"
    assert len(client.get(f"/v1/items?q={word}&limit=50").json["items"]) == min(50, len(
        _brute_search(ids, items["title"].tolist(), pop, word, 1000)))
    for url, detail in (("/v1/items", "query parameter 'q' is required: some text of an item's title"),
                        ("/v1/items?q=", "query parameter 'q' is required: some text of an item's title"),
                        ("/v1/items?q=%20%20", "query parameter 'q' is required: some text of an item's title"),
                        ("/v1/items?q=" + "a" * 101, "q is 101 characters long; at most 100 are allowed"),
                        ("/v1/items?q=a&limit=0", "limit must be an integer from 1 to 50, got '0'"),
                        ("/v1/items?q=a&limit=51", "limit must be an integer from 1 to 50, got '51'"),
                        ("/v1/items?q=a&limit=x", "limit must be an integer from 1 to 50, got 'x'"),
                        ("/v1/items?q=a&q=b", "query parameter 'q' given more than once"),
                        ("/v1/items?q=a&k=3", "unknown query parameter 'k' (allowed: q, limit)")):
        r = client.get(url)
        assert (r.status_code, r.mimetype, r.json["detail"]) == (400, "application/problem+json", detail), url
    text = client.get("/metrics").text
    assert 'hybridserve_requests_total{endpoint="item_search",source="precomputed",status="200"}' in text


def test_fields_on_list_answers_are_hits_and_equal_flask(app_env):
    fast, slow, store, sid = app_env
    items = _items(store, sid)
    sim = _table(store, sid, "similar_items")
    recs = _table(store, sid, "user_recs")
    hot, user = int(sim["item_id"].iloc[0]), int(recs["user_id"].iloc[0])
    cold = int(next(i for i in items.index if i not in set(sim["item_id"])))
    hits = [f"/v1/items/{hot}/similar?k=5&fields=title,genres", f"/v1/items/{hot}/similar?fields=title",
            f"/v1/items/{hot}/similar?fields=genres&k=3", f"/v1/users/{user}/recommendations?fields=title,genres",
            f"/v1/recommendations?items={hot}&k=4&fields=title",
            f"/v1/items/{hot}/similar?k=5&fields=genres,title"]  # any order: the same answer
    others = [f"/v1/items/{cold}/similar?k=5&fields=title,genres",  # a live answer with titles
              f"/v1/items/{hot}/similar?k=5&fields=rating", f"/v1/items/{hot}/similar?fields=",
              f"/v1/items/{hot}/similar?fields=title,title"]
    before = (fast.wsgi_app.answered, fast.wsgi_app.passed)
    for url in hits + others:
        got, want = fast.test_client().get(url), slow.test_client().get(url)
        assert (got.status_code, sorted(got.headers.items()), got.data) == \
               (want.status_code, sorted(want.headers.items()), want.data), url
    assert (fast.wsgi_app.answered - before[0], fast.wsgi_app.passed - before[1]) == (len(hits), len(others))
    for url in hits + others[:1]:
        body = fast.test_client().get(url).json
        asked = url.split("fields=")[1].split("&")[0].split(",")
        assert body["items"], url
        for x in body["items"]:
            assert ("title" in x, "genres" in x) == ("title" in asked, "genres" in asked), url
            if "title" in x:
                assert x["title"] == items.loc[x["item_id"], "title"]
            if "genres" in x:
                assert x["genres"] == list(items.loc[x["item_id"], "genres"])
    plain = fast.test_client().get(f"/v1/items/{hot}/similar?k=5")
    titled = fast.test_client().get(hits[0])
    assert [x["item_id"] for x in plain.json["items"]] == [x["item_id"] for x in titled.json["items"]]
    assert plain.headers["ETag"] != titled.headers["ETag"]  # another body, another validator
    for url, detail in ((others[1], "fields must list one or more of title, genres, comma-separated; got 'rating'"),
                        (others[2], "fields must list one or more of title, genres, comma-separated; got an empty name"),
                        (others[3], "fields names a field more than once: 'title,title'")):
        r = fast.test_client().get(url)
        assert (r.status_code, r.json["detail"]) == (400, detail)
