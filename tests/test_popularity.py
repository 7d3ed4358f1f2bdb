"""Popularity: the smallest covering set, and the request log as its source."""
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path

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
                  "batch.max_pairs": 100, "batch.pairs_per_user": 1,
                  "batch.similar_all_items": False})
    sel = select(inter, log, np.arange(20), np.arange(5), settings)
    before = sel.report["pairs"]["expected_hit_rate"]
    chosen_a, keys, w_b = sel.held_out_pairs
    sel.add_pairs(pd.DataFrame({"user_id": keys[:, 0], "item_id": keys[:, 1]}))  # every logged pair
    assert before < 1.0 and sel.report["pairs"]["expected_hit_rate"] == pytest.approx(1.0)
    parts = [sel.report[k] for k in ("items", "users", "pairs")]
    assert sel.report["expected_hit_rate"] == pytest.approx(
        sum(p["expected_hit_rate"] * p["traffic"] for p in parts) / sum(p["traffic"] for p in parts))


# --- the window is measured from the data, not the clock ------------------------------------------
_YEARS_AGO = pd.Timedelta(days=365 * 24 + 6)  # the small sample moved back to about 2002
NO_LOG = pd.DataFrame(columns=["endpoint", "user_id", "item_id", "n", "weight"])


def test_window_counts_back_from_the_newest_interaction_not_the_clock(sample_frames, workspace):
    """The same interactions, 24 years earlier, select the same keys: a window on the clock would be
    empty and choose none."""
    _, settings, _, _ = workspace
    inter, _ = sample_frames
    old = inter.assign(ts=inter["ts"] - _YEARS_AGO)
    assert old["ts"].max() < pd.Timestamp("2003-01-01", tz="UTC")
    items, users = np.sort(inter["item_id"].unique()), np.sort(inter["user_id"].unique())
    now_sel = select(inter, NO_LOG, items, users, settings)
    old_sel = select(old, NO_LOG, items, users, settings)
    np.testing.assert_array_equal(old_sel.items, now_sel.items)
    np.testing.assert_array_equal(old_sel.users, now_sel.users)
    # Independent: the users chosen are the heaviest users of the last window_days before the newest
    # interaction, enough of them to cover the target share of that window's interactions.
    days = settings["batch.window_days"]
    window = old[old["ts"] > old["ts"].max() - pd.Timedelta(days=days)]
    counts = window["user_id"].value_counts()
    assert 0 < len(old_sel.users) <= len(counts)
    assert set(old_sel.users) <= set(counts.index)
    assert counts[old_sel.users].sum() / counts.sum() >= settings["batch.coverage"] - 0.05
    w = old_sel.report["window"]
    assert (w["days"], w["interactions"], w["users"]) == (days, len(window), window["user_id"].nunique())
    assert w["end"] == old["ts"].max().isoformat()


def test_window_zero_counts_all_history(sample_frames, workspace):
    _, settings, _, _ = workspace
    inter, _ = sample_frames
    items, users = np.sort(inter["item_id"].unique()), np.sort(inter["user_id"].unique())
    all_time = select(inter, NO_LOG, items, users, settings.replace(batch__window_days=0))
    # The same interactions all at one instant: any window holds them all.
    flat = inter.assign(ts=inter["ts"].max())
    want = select(flat, NO_LOG, items, users, settings)
    np.testing.assert_array_equal(all_time.users, want.users)
    np.testing.assert_array_equal(all_time.items, want.items)
    w = all_time.report["window"]
    assert (w["interactions"], w["users"], w["days"]) == (len(inter), inter["user_id"].nunique(), 0)


def test_historical_run_precomputes_what_the_same_recent_data_would(tmp_path, sample_frames, published):
    """A whole run on interactions from years ago publishes the same users and items as the published
    run on the same interactions dated now."""
    from batch.inputs import write_inputs
    from conftest import make_settings
    _, _, recent = published
    inter, items = sample_frames
    write_inputs(tmp_path / "inputs", inter.assign(ts=inter["ts"] - _YEARS_AGO), items)
    settings, _ = make_settings(tmp_path)
    result = run(settings)
    store = Store(settings["paths.store"])
    recent_store = Store(Path(recent.manifest["settings"]["paths"]["store"]))
    for table, key in (("user_recs", "user_id"), ("similar_items", "item_id")):
        got = store.read_table(result.snapshot_id, table).column(key).to_pylist()
        want = recent_store.read_table(recent.snapshot_id, table).column(key).to_pylist()
        assert got == want and len(got) > 0


def test_bursty_historical_data_warns_and_window_zero_precomputes_its_active_users(tmp_path, sample_frames,
                                                                                   caplog):
    """MovieLens-like history: each user active for one month somewhere in 1998-2007. The last 30 days
    hold a handful of users; the run says so, and window_days = 0 precomputes for the users who carry
    the history's interactions."""
    from batch.inputs import write_inputs
    from conftest import make_settings
    inter, items = sample_frames
    rng = np.random.default_rng(5)
    users = np.sort(inter["user_id"].unique())
    month = pd.Series(rng.integers(0, 120, size=len(users)), index=users)
    start = pd.Timestamp("1998-01-01", tz="UTC") + pd.to_timedelta(month[inter["user_id"]].to_numpy() * 30, unit="D")
    ts = start + pd.to_timedelta(rng.uniform(0, 30 * 86400, size=len(inter)).astype(np.int64), unit="s")
    bursty = inter.assign(ts=ts.floor("s"))
    write_inputs(tmp_path / "inputs", bursty, items)
    settings, _ = make_settings(tmp_path)
    last_30 = bursty[bursty["ts"] > bursty["ts"].max() - pd.Timedelta(days=30)]["user_id"].nunique()
    assert last_30 < 0.1 * len(users)
    with caplog.at_level("WARNING", logger="batch.job"):
        narrow = run(settings)
    hints = [r.getMessage() for r in caplog.records if "popularity window" in r.getMessage()]
    assert len(hints) == 1, hints
    assert (f"holds {last_30} of {len(users)} users; for historical data set batch.window_days = 0 (all history)"
            in hints[0])
    assert narrow.manifest["row_counts"]["user_recs"] <= last_30
    caplog.clear()
    with caplog.at_level("WARNING", logger="batch.job"):
        full = run(settings.replace(batch__window_days=0))
    assert not [r for r in caplog.records if "popularity window" in r.getMessage()]
    chosen = Store(settings["paths.store"]).read_table(full.snapshot_id, "user_recs").column("user_id").to_numpy()
    counts = bursty["user_id"].value_counts()
    assert len(chosen) > 5 * last_30
    # The heaviest users of all history, covering the target share of its interactions (held-out estimate).
    assert counts[chosen].sum() / counts.sum() >= settings["batch.coverage"] - 0.05
    assert counts[chosen].min() >= counts.drop(chosen).to_numpy().max(initial=0)
