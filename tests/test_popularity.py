"""Popularity: the smallest covering set, and the request log as its source."""
from datetime import datetime, timedelta, timezone
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.job import run
from batch.popularity import cover, read_request_counts, select
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
