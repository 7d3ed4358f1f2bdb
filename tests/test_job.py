"""A batch run on a small seeded sample, checked against independent computations."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from batch.job import run
from serving.models.rating import RatingModel
from serving.models.recommender import ModelBundle
from serving.store import TABLES, Store, sha256_file


@pytest.fixture(scope="module")
def snap(published):
    root, settings, result = published
    store = Store(root / "store")
    sid = store.current_id()
    bundle = ModelBundle.load(store.model_dir(sid))
    return store, sid, bundle, settings, root


def test_layout_and_manifest(snap):
    store, sid, _, settings, _ = snap
    d = store.snapshot_dir(sid)
    for t in TABLES:
        assert store.table_path(sid, t).is_file()
    assert (store.model_dir(sid) / "items.faiss").is_file()
    m = json.loads((d / "manifest.json").read_text())
    for key in ("id", "created_at", "model_version", "inputs_fingerprint", "row_counts", "settings", "files",
                "evaluation", "validation", "popularity", "parent", "k_max"):
        assert key in m, key
    assert m["id"] == sid
    assert m["settings"]["batch"]["k_max"] == settings["batch.k_max"]
    assert m["validation"]["passed"] is True
    ev = m["evaluation"]
    assert 0 < ev["rmse_model"] < 2 and 0 < ev["rmse_item_mean"] < 2
    assert 0 <= ev["recall_at_10"] <= 1 and 0 <= ev["recall_at_10_popular"] <= 1
    for t in TABLES:
        assert m["row_counts"][t] == pq.read_metadata(store.table_path(sid, t)).num_rows > 0
    # every file but the manifest is listed, with a checksum that verifies
    listed = set(m["files"])
    on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert listed == on_disk
    for rel, meta in m["files"].items():
        assert sha256_file(d / rel) == meta["sha256"]
    store.verify(sid)


def _brute_force(vecs: np.ndarray, q: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products in float64, dropped rows excluded, ordered by (score desc, index asc)."""
    sims = vecs @ q
    order = np.lexsort((np.arange(len(sims)), -sims))
    order = order[~drop[order]][:k]
    return order, sims[order]


def test_similar_items_equal_brute_force(snap):
    store, sid, bundle, settings, root = snap
    assert bundle.meta["index"] == "Flat" and bundle.meta["metric"] == "ip"
    table = store.read_table(sid, "similar_items").to_pandas()
    k = settings["batch.k_max"]
    vecs = np.asarray(bundle.item_vecs, dtype=np.float64)
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    support = inter["item_id"].value_counts().reindex(bundle.item_ids, fill_value=0).to_numpy()
    rare = support < settings["train.similar_min_support"]
    assert rare.any(), "the sample must hold rare items for this test to mean something"
    for row in table.sample(40, random_state=1).itertuples():
        i = int(np.searchsorted(bundle.item_ids, row.item_id))
        drop = rare.copy()
        drop[i] = True  # itself excluded
        order, sims = _brute_force(vecs, np.asarray(bundle.queries, np.float64)[i], drop, k)  # EASE: U_i . V_j
        np.testing.assert_array_equal(np.asarray(row.neighbor_ids), bundle.item_ids[order])
        np.testing.assert_allclose(np.asarray(row.scores), sims, rtol=1e-4, atol=1e-5)


def test_predictions_equal_model_predict(snap):
    store, sid, bundle, _, root = snap
    preds = store.read_table(sid, "predictions").to_pandas()
    u = np.searchsorted(bundle.user_ids, preds["user_id"].to_numpy())
    i = np.searchsorted(bundle.item_ids, preds["item_id"].to_numpy())
    # the blend written out by hand, independently of RatingModel.predict
    rating = RatingModel.load(store.model_dir(sid, "rating"), "rating", {})
    r = rating.meta
    w0, w1, w2 = r["blend"]
    base = r["global_mean"] + np.asarray(rating.user_bias, np.float64)[u] + np.asarray(rating.item_bias, np.float64)[i]
    inter = (np.asarray(rating.user_factors, np.float64)[u] * np.asarray(rating.item_factors, np.float64)[i]).sum(1)
    lo, hi = r["rating_range"]
    want = np.clip(w0 + w1 * base + w2 * inter, lo, hi)
    np.testing.assert_allclose(preds["prediction"].to_numpy(), want, rtol=1e-5, atol=1e-5)


def test_user_recs_exclude_seen_and_equal_brute_force(snap):
    """User vectors are the user's history folded in (the sum of its items' query vectors, each
    weighted by its recency, batch.train.history_weights); recommendations are the unseen items with
    at least the minimum support by inner product, ties by id."""
    store, sid, bundle, settings, root = snap
    recs = store.read_table(sid, "user_recs").to_pandas()
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    seen = inter.groupby("user_id")["item_id"].apply(set)
    vecs = np.asarray(bundle.item_vecs, dtype=np.float64)
    query = np.asarray(bundle.queries, dtype=np.float64)
    half_life = bundle.meta["method"]["history_half_life"]
    rare = np.asarray(bundle.item_support) < bundle.min_support
    assert len(recs) > 0
    for row in recs.itertuples():
        ids = list(row.item_ids)
        assert len(ids) == settings["batch.k_max"]
        assert not set(ids) & seen[row.user_id]
        mine = inter[inter.user_id == row.user_id].sort_values(["ts", "item_id"])
        history = np.searchsorted(bundle.item_ids, mine["item_id"].to_numpy())
        newer = np.arange(len(history))[::-1]  # the newest interaction has none newer
        weight = 0.5 ** (newer / half_life) if half_life > 0 else np.ones(len(history))
        drop = rare.copy()
        drop[history] = True
        order, sims = _brute_force(vecs, weight @ query[history], drop, len(ids))
        np.testing.assert_array_equal(ids, bundle.item_ids[order])
        np.testing.assert_allclose(np.asarray(row.scores), sims, rtol=1e-4, atol=1e-4)


def test_one_query_agrees_with_the_batch(snap):
    """The API will call the same functions with one query; answers must agree."""
    store, sid, bundle, settings, _ = snap
    k = settings["batch.k_max"]
    recs = store.read_table(sid, "user_recs").to_pandas().head(25)
    for row in recs.itertuples():
        ids, scores = bundle.recommend(bundle.user_index([row.user_id]), k)
        np.testing.assert_array_equal(ids[0], np.asarray(row.item_ids))
        np.testing.assert_allclose(scores[0], np.asarray(row.scores), rtol=1e-5)
    sim = store.read_table(sid, "similar_items").to_pandas().head(25)
    for row in sim.itertuples():
        ids, _ = bundle.similar_items(bundle.item_index([row.item_id]), k)
        np.testing.assert_array_equal(ids[0], np.asarray(row.neighbor_ids))


def test_popularity_report_and_selection(snap):
    store, sid, _, settings, root = snap
    m = store.read_manifest(sid)
    pop = m["popularity"]
    assert pop["items"]["source"] == "interactions"
    assert pop["items"]["expected_hit_rate"] >= settings["batch.coverage"] - 1e-9
    assert pop["items"]["chosen"] == m["row_counts"]["similar_items"]
    assert pop["users"]["chosen"] == m["row_counts"]["user_recs"]
    # predictions before any request log: each chosen user's own top recommended items
    recs = store.read_table(sid, "user_recs").to_pandas()
    preds = store.read_table(sid, "predictions").to_pandas()
    want = {(r.user_id, i) for r in recs.itertuples() for i in list(r.item_ids)[:settings["batch.pairs_per_user"]]}
    assert set(zip(preds["user_id"], preds["item_id"])) == want


def test_second_run_reuses_model_and_keeps_parent(workspace):
    root, settings, _, first = workspace
    second = run(settings)
    assert second.manifest["parent"] == first.snapshot_id
    assert second.manifest["model_version"] == first.manifest["model_version"]
    assert second.manifest["retrained"] is False
    third = run(settings, retrain=True)
    assert third.manifest["retrained"] is True
    assert third.manifest["model_version"] != first.manifest["model_version"]


def test_whole_catalogue_of_similar_items_and_sessions_from_it(workspace):
    """The default: similar items for every catalogue item (up to batch.max_items); a session of any
    items is then answered from the snapshot, equal to the live search. Above max_items: the popular
    items only, as before."""
    from serving.web.app import create_app

    root, settings, _, first = workspace
    settings = settings.replace(batch__similar_all_items=True, batch__k_max=50)
    whole = run(settings)
    store = Store(settings["paths.store"])
    items = store.read_table(whole.snapshot_id, "items").to_pandas()["item_id"]
    listed = store.read_table(whole.snapshot_id, "similar_items").to_pandas()["item_id"]
    assert first.manifest["row_counts"]["similar_items"] < len(items)  # the popular ones only
    assert sorted(listed) == sorted(items)
    rep = whole.manifest["popularity"]["items"]
    assert rep["whole_catalogue"] is True and rep["chosen"] == len(items) and rep["expected_hit_rate"] == 1.0
    app = create_app(settings, background=False)
    live = create_app(settings.replace(serving__mode="live-only"), background=False)
    try:
        rng = np.random.default_rng(11)
        sources = []
        for _ in range(30):  # sessions of any items, popular or not
            viewed = rng.choice(items.to_numpy(), size=int(rng.integers(2, 5)), replace=False)
            url = f"/v1/recommendations?items={','.join(map(str, viewed))}&k=5"
            a, b = app.test_client().get(url).json, live.test_client().get(url).json
            sources.append(a["source"])
            assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]], url
        assert sources.count("precomputed") >= 15, sources
    finally:
        app.extensions["hybridserve"].close()
        live.extensions["hybridserve"].close()
    capped = run(settings.replace(batch__max_items=len(items) - 1), force=True)
    assert capped.manifest["row_counts"]["similar_items"] < len(items)
    assert "whole_catalogue" not in capped.manifest["popularity"]["items"]
