"""Popularity: choose the smallest set of keys that covers a target share of traffic.

Traffic comes from the API's request log when it has rows for a kind of key, else from
interactions in a recent window. Functions from frames to arrays; the log reader is the
only I/O here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from serving.store import Store

LOG = logging.getLogger(__name__)

# Request-log endpoint names (DESIGN: the request log) for each kind of precomputed key.
ENDPOINT_ITEMS, ENDPOINT_USERS, ENDPOINT_PAIRS = "similar_items", "user_recs", "prediction"


@dataclass
class Selection:
    items: np.ndarray                       # item ids to precompute similar items for
    users: np.ndarray                       # user ids to precompute recommendations for
    pairs: pd.DataFrame | None              # (user_id, item_id) asked for in the log; None if none
    report: dict[str, Any] = field(default_factory=dict)


def cover(keys: np.ndarray, weights: np.ndarray, share: float, cap: int) -> tuple[np.ndarray, float]:
    """The smallest prefix of keys by descending weight whose weight reaches ``share`` of the total,
    at most ``cap`` keys. Returns (chosen keys, share of the weight they cover). Ties: lower key first.
    """
    keys, weights = np.asarray(keys), np.asarray(weights, dtype=np.float64)
    if keys.shape[0] != weights.shape[0]:
        raise ValueError("keys and weights differ in length")
    total = weights.sum()
    if len(keys) == 0 or total <= 0 or cap <= 0 or share <= 0:
        return keys[:0], 0.0
    order = np.lexsort((keys,) if keys.ndim == 1 else tuple(keys.T[::-1]))  # by key, then stable by weight
    order = order[np.argsort(-weights[order], kind="stable")]
    cum = np.cumsum(weights[order]) / total
    n = int(np.searchsorted(cum, share - 1e-12) + 1)
    n = min(n, cap, len(keys))
    return keys[order[:n]], float(cum[n - 1])


def coverage_curve(weights: np.ndarray) -> np.ndarray:
    """Share of traffic covered by the top-n keys, for n = 1..len (for plots and reports)."""
    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    return np.cumsum(w) / w.sum() if w.sum() > 0 else np.zeros(len(w))


def read_request_counts(store: Store, now: datetime, half_life_hours: float = 0.0) -> pd.DataFrame:
    """Request-log traffic per (endpoint, user_id, item_id), weighted by age when a half-life is set.

    Only answered requests (status < 400) count. Empty frame when there is no log.
    """
    if not store.requests_dir.is_dir():
        return pd.DataFrame(columns=["endpoint", "user_id", "item_id", "weight"])
    weight = "1.0"
    if half_life_hours > 0:
        weight = (f"pow(0.5, greatest(0, epoch(TIMESTAMPTZ '{now.isoformat()}') - epoch(ts)) "
                  f"/ 3600.0 / {float(half_life_hours)})")
    con = duckdb.connect()
    try:
        return con.execute(
            f"SELECT endpoint, user_id, item_id, sum({weight}) AS weight "
            f"FROM read_parquet(?, union_by_name = true) WHERE status < 400 "
            f"GROUP BY ALL", [store.requests_glob()]).df()
    finally:
        con.close()


def _window(interactions: pd.DataFrame, days: int) -> pd.DataFrame:
    end = interactions["ts"].max()
    return interactions[interactions["ts"] > end - pd.Timedelta(days=days)]


def _counts(frame: pd.DataFrame, column: str, weight: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    grouped = frame.groupby(column)[weight].sum() if weight else frame.groupby(column).size()
    return grouped.index.to_numpy(dtype=np.int64), grouped.to_numpy(dtype=np.float64)


def select(interactions: pd.DataFrame, log: pd.DataFrame, known_items: np.ndarray, known_users: np.ndarray,
           settings) -> Selection:
    """Choose items, users and (user, item) pairs to precompute; report the expected hit rate."""
    share = settings["batch.coverage"]
    window = _window(interactions, settings["batch.window_days"])
    report: dict[str, Any] = {"coverage_target": share}
    log = log[log["endpoint"].isin([ENDPOINT_ITEMS, ENDPOINT_USERS, ENDPOINT_PAIRS])]

    def choose(kind, endpoint, column, known, cap):
        rows = log[(log["endpoint"] == endpoint) & log[column].notna()]
        i_keys, i_w = _counts(window, column)
        ok = np.isin(i_keys, known)
        i_keys, i_w = i_keys[ok], i_w[ok]
        chosen, _ = cover(i_keys, i_w, share, cap)
        if len(rows):
            # The keys covering the logged traffic, then those covering interaction history, up to the cap:
            # a young log (a few thousand requests under a Zipf law) sees most keys once or never, so it
            # alone would shrink the set to what it happened to see.
            keys, w = _counts(rows.astype({column: np.int64}), column, "weight")
            ok = np.isin(keys, known)
            keys, w = keys[ok], w[ok]
            from_log, _ = cover(keys, w, share, cap)
            chosen = np.concatenate([from_log, chosen[~np.isin(chosen, from_log)]])[:cap]
            source = "request_log+interactions"
        else:
            keys, w = i_keys, i_w
            source = "interactions"
        traffic = float(w.sum())
        hit = float(w[np.isin(keys, chosen)].sum())
        report[kind] = {"source": source, "distinct_keys": int(len(keys)), "chosen": int(len(chosen)),
                        "traffic": traffic, "expected_hit_rate": hit / traffic if traffic else 0.0}
        return np.sort(chosen), hit, traffic

    items, i_hit, i_all = choose("items", ENDPOINT_ITEMS, "item_id", known_items, settings["batch.max_items"])
    users, u_hit, u_all = choose("users", ENDPOINT_USERS, "user_id", known_users, settings["batch.max_users"])

    pairs = None
    p_hit = p_all = 0.0
    prows = log[(log["endpoint"] == ENDPOINT_PAIRS) & log["user_id"].notna() & log["item_id"].notna()]
    if len(prows):
        g = prows.groupby(["user_id", "item_id"])["weight"].sum().reset_index()
        g = g[np.isin(g["user_id"], known_users) & np.isin(g["item_id"], known_items)]
        keys = g[["user_id", "item_id"]].to_numpy(dtype=np.int64)
        chosen, covered = cover(keys, g["weight"].to_numpy(), share, settings["batch.max_pairs"])
        pairs = pd.DataFrame(chosen, columns=["user_id", "item_id"]).sort_values(["user_id", "item_id"],
                                                                                 ignore_index=True)
        p_all = float(g["weight"].sum())
        p_hit = covered * p_all
        report["pairs"] = {"source": "request_log", "distinct_keys": int(len(g)), "chosen": int(len(pairs)),
                           "traffic": p_all, "expected_hit_rate": covered,
                           "plus_top_recs_per_user": settings["batch.pairs_per_user"]}
    else:
        report["pairs"] = {"source": "user_recs", "per_user": settings["batch.pairs_per_user"]}
    total = i_all + u_all + p_all
    report["expected_hit_rate"] = (i_hit + u_hit + p_hit) / total if total else 0.0
    LOG.info("selected %d items, %d users; expected hit rate %.3f", len(items), len(users),
             report["expected_hit_rate"])
    return Selection(items=items, users=users, pairs=pairs, report=report)
