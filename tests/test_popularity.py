"""Popularity: the smallest covering set, and the request log as its source."""
from datetime import datetime, timedelta, timezone
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.job import run
from batch.popularity import cover, coverage_of, held_out_choice, read_request_counts, select, split_halves
from serving.store import REQUEST_LOG_SCHEMA, Store


def _brute_smallest(keys, weights, share):
    total = weights.sum()
    for n in range(0, len(keys) + 1):
        best = max((sum(weights[list(c)]) for c in combinations(range(len(keys)), n)), default=0)
        if best / total >= share - 1e-12:
            return n, best / total
    return len(keys), 1.0


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("share", [0.5, 0.8, 0.95, 1.0])
def test_cover_is_the_smallest_set_reaching_the_share(seed, share):
    rng = np.random.default_rng(seed)
    keys = rng.permutation(50)[:9]
    weights = rng.zipf(1.5, size=9).astype(float)
    chosen, covered = cover(keys, weights, share, cap=100)
    n, best = _brute_smallest(keys, weights, share)
    assert len(chosen) == n
    assert covered == pytest.approx(best)
    assert covered == pytest.approx(weights[np.isin(keys, chosen)].sum() / weights.sum())


def test_cover_respects_cap_and_empty():
    chosen, covered = cover(np.arange(10), np.ones(10), 0.95, cap=3)
    assert list(chosen) == [0, 1, 2] and covered == pytest.approx(0.3)
    assert len(cover(np.arange(0), np.ones(0), 0.9, 5)[0]) == 0


def write_log(store: Store, rows: list[dict], name: str = "seg-test.parquet"):
    store.requests_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for f in REQUEST_LOG_SCHEMA:
        if f.name not in frame:
            frame[f.name] = None
    table = pa.Table.from_pandas(frame[REQUEST_LOG_SCHEMA.names], schema=REQUEST_LOG_SCHEMA, preserve_index=False)
    pq.write_table(table, store.requests_dir / name)


def test_request_log_drives_the_next_selection(workspace):
    """Keys asked for in the request log are precomputed in the next run, whatever their history."""
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    now = datetime.now(timezone.utc)
    # Rarely-interacted items and users, asked for many times.
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    rare_items = inter["item_id"].value_counts().index[-3:].tolist()
    rare_users = inter["user_id"].value_counts().index[-2:].tolist()
    rows = []
    for it in rare_items:
        rows += [dict(ts=now, endpoint="similar_items", item_id=it, k=10, source="live", status=200,
                      latency_us=900)] * 20
    for u in rare_users:
        rows += [dict(ts=now, endpoint="user_recs", user_id=u, k=10, source="live", status=200, latency_us=900)] * 20
    rows += [dict(ts=now, endpoint="prediction", user_id=rare_users[0], item_id=rare_items[0], k=1, source="live",
                  status=200, latency_us=500)] * 5
    # errors do not count
    rows += [dict(ts=now, endpoint="similar_items", item_id=10**9, k=10, source="error", status=404,
                  latency_us=50)] * 100
    write_log(store, rows)
    counts = read_request_counts(store, now)
    assert counts["weight"].sum() == 20 * 3 + 20 * 2 + 5
    result = run(settings)
    pop = result.manifest["popularity"]
    assert pop["items"]["source"] == pop["users"]["source"] == "request_log+interactions"
    assert pop["pairs"]["source"] == "request_log"
    sim = store.read_table(result.snapshot_id, "similar_items").column("item_id").to_pylist()
    recs = store.read_table(result.snapshot_id, "user_recs").column("user_id").to_pylist()
    preds = store.read_table(result.snapshot_id, "predictions").to_pandas()
    assert set(rare_items) <= set(sim)
    assert set(rare_users) <= set(recs)
    assert (rare_users[0], rare_items[0]) in set(zip(preds["user_id"], preds["item_id"]))
    # every key the log asked for is covered: the expected hit rate on that traffic is 1
    assert pop["expected_hit_rate"] == pytest.approx(1.0)
    assert pop["items"]["traffic"] == pytest.approx(60) and pop["users"]["traffic"] == pytest.approx(40)


def test_log_keys_come_first_when_the_cap_binds(workspace):
    root, settings, _, _ = workspace
    store = Store(settings["paths.store"])
    now = datetime.now(timezone.utc)
    write_log(store, [dict(ts=now, endpoint="similar_items", item_id=5, k=10, source="live", status=200,
                           latency_us=1)] * 3)
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    known = np.sort(inter["item_id"].unique())
    users = np.sort(inter["user_id"].unique())
    counts = read_request_counts(store, now)
    capped = select(inter, counts, known, users, settings.replace(batch__max_items=1))
    assert list(capped.items) == [5] and capped.report["items"]["expected_hit_rate"] == 1.0
    full = select(inter, counts, known, users, settings)
    no_log = select(inter, counts.iloc[:0], known, users, settings)
    assert set(full.items) == set(no_log.items) | {5}  # the log adds; it never shrinks the set


def test_decay_weights_old_traffic_less(workspace):
    root, settings, _, _ = workspace
    store = Store(settings["paths.store"])
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    write_log(store, [dict(ts=now - timedelta(hours=24), endpoint="similar_items", item_id=1, k=5, source="live",
                           status=200, latency_us=1),
                      dict(ts=now, endpoint="similar_items", item_id=2, k=5, source="live", status=200,
                           latency_us=1)])
    w = read_request_counts(store, now, half_life_hours=24).set_index("item_id")["weight"]
    assert w[1] == pytest.approx(0.5) and w[2] == pytest.approx(1.0)


def test_split_halves_deals_each_keys_requests():
    counts = np.array([0, 1, 5, 100, 7])
    weights = counts * 0.5  # decayed
    a, b = split_halves(counts, weights, seed=3)
    np.testing.assert_allclose(a + b, weights)
    assert (a >= 0).all() and (b >= 0).all() and a[0] == b[0] == 0
    assert 20 < a[3] < 30  # about half of 100 requests of weight 0.5
    np.testing.assert_array_equal(split_halves(counts, weights, seed=3)[0], a)


@pytest.mark.parametrize("seed", range(4))
def test_coverage_of_equals_a_loop(seed):
    rng = np.random.default_rng(seed)
    ranking = rng.permutation(30)[:20]
    keys = rng.permutation(40)[:25]
    w = rng.random(25)
    got = coverage_of(ranking, keys, w)
    want = [sum(wi for k, wi in zip(keys, w) if k in set(ranking[:n])) / w.sum() for n in range(len(ranking) + 1)]
    np.testing.assert_allclose(got, want)
    pairs_rank = np.stack([ranking % 5, ranking // 5], axis=1)
    pairs_keys = np.stack([keys % 5, keys // 5], axis=1)
    np.testing.assert_allclose(coverage_of(pairs_rank, pairs_keys, w), want)


@pytest.mark.parametrize("seed", range(5))
def test_held_out_estimate_tracks_coverage_of_traffic_not_yet_seen(seed):
    """Zipf traffic with known probabilities: the held-out choice covers the share of *future* traffic
    that in-sample coverage only promises, and its estimate is near the truth."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 20_001) ** 1.1
    p /= p.sum()
    keys = rng.permutation(20_000)  # popularity unrelated to the id
    seen = np.bincount(rng.choice(20_000, size=20_000, p=p), minlength=20_000)
    asked = seen > 0
    in_sample_set, _ = cover(keys[asked], seen[asked], 0.9, cap=10**9)
    assert p[np.isin(keys, in_sample_set)].sum() < 0.85  # what a cover of the log alone really serves

    # A prior (interaction counts: a bigger, independent sample of the same popularity) reaches the target.
    prior = np.bincount(rng.choice(20_000, size=200_000, p=p), minlength=20_000)
    chosen, est = held_out_choice(0.9, keys[asked], seen[asked], seen[asked].astype(float), keys, prior)
    truth = p[np.isin(keys, chosen)].sum()
    assert len(chosen) > len(in_sample_set)
    assert truth > 0.88 and abs(est["held_out"] - truth) < 0.02  # a sample estimate of 0.9

    # The log alone cannot reach it: every logged key is taken, and the estimate stays on the safe side
    # of the truth (ranked on half the requests), where in-sample coverage would claim 1.0.
    chosen, est = held_out_choice(0.9, keys[asked], seen[asked], seen[asked].astype(float), keys[:0], np.zeros(0))
    truth = p[np.isin(keys, chosen)].sum()
    assert len(chosen) == asked.sum() and truth < 0.9
    assert truth - 0.06 < est["held_out"] <= truth


def test_predictions_estimate_counts_the_top_recommendation_pairs():
    log = pd.DataFrame({"endpoint": "prediction", "user_id": [1, 1, 2, 3, 4], "item_id": [10, 11, 10, 12, 13],
                        "n": [6, 1, 4, 1, 2], "weight": [6.0, 1.0, 4.0, 1.0, 2.0]})
    inter = pd.DataFrame({"user_id": [1, 2, 3, 4], "item_id": [10, 10, 12, 13],
                          "ts": pd.Timestamp("2026-01-01", tz="UTC")})

    class S(dict):
        pass

    settings = S({"batch.coverage": 1.0, "batch.window_days": 30, "batch.max_items": 100, "batch.max_users": 100,
                  "batch.max_pairs": 100, "batch.pairs_per_user": 1})
    sel = select(inter, log, np.arange(20), np.arange(5), settings)
    before = sel.report["pairs"]["expected_hit_rate"]
    chosen_a, keys, w_b = sel.held_out_pairs
    sel.add_pairs(pd.DataFrame({"user_id": keys[:, 0], "item_id": keys[:, 1]}))  # every logged pair
    assert before < 1.0 and sel.report["pairs"]["expected_hit_rate"] == pytest.approx(1.0)
    parts = [sel.report[k] for k in ("items", "users", "pairs")]
    assert sel.report["expected_hit_rate"] == pytest.approx(
        sum(p["expected_hit_rate"] * p["traffic"] for p in parts) / sum(p["traffic"] for p in parts))
