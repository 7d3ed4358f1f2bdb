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

import numpy as np
import pandas as pd

from batch.requestlog import RequestLogFiles, log_files
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
    held_out_pairs: tuple | None = None     # (chosen from one half, logged pairs, other half's weights)

    def add_pairs(self, extra: pd.DataFrame) -> None:
        """Count in the report the pairs precomputed besides the log's (each user's top recommendations):
        the held-out estimate for predictions is of everything that will be in the snapshot."""
        if self.held_out_pairs is None or "traffic" not in self.report["pairs"]:
            return
        chosen, keys, w_b = self.held_out_pairs
        extra_keys = extra[["user_id", "item_id"]].to_numpy(np.int64)
        have = np.concatenate([np.asarray(chosen).reshape(-1, 2), extra_keys])
        held_out = float(w_b[_positions(have, keys) >= 0].sum() / w_b.sum()) if w_b.sum() > 0 else 0.0
        pairs = self.report["pairs"]
        r = self.report
        traffic_all = r["traffic"]
        r["expected_hit_rate"] += (held_out - pairs["expected_hit_rate"]) * pairs["traffic"] / traffic_all
        pairs["expected_hit_rate"] = held_out


def order_by_weight(keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Positions of ``keys`` by descending weight; ties by lower key (rows of a 2-d key array compare
    column by column)."""
    keys, weights = np.asarray(keys), np.asarray(weights, dtype=np.float64)
    order = np.lexsort((keys,) if keys.ndim == 1 else tuple(keys.T[::-1]))  # by key, then stable by weight
    return order[np.argsort(-weights[order], kind="stable")]


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
    order = order_by_weight(keys, weights)
    cum = np.cumsum(weights[order]) / total
    n = int(np.searchsorted(cum, share - 1e-12) + 1)
    n = min(n, cap, len(keys))
    return keys[order[:n]], float(cum[n - 1])


def rank(log_keys: np.ndarray, log_w: np.ndarray, prior_keys: np.ndarray, prior_w: np.ndarray) -> np.ndarray:
    """Every key worth precomputing, most wanted first: those the request log asked for, by weight, then
    the rest by the prior (interaction counts), by weight. Keys with no weight in either are left out."""
    def by_weight(keys, w):
        keys, w = np.asarray(keys), np.asarray(w, dtype=np.float64)
        order = order_by_weight(keys, w)
        return keys[order][w[order] > 0]

    asked, prior = by_weight(log_keys, log_w), by_weight(prior_keys, prior_w)
    if len(prior) == 0:
        return asked
    return np.concatenate([asked, prior[~np.isin(prior, asked)]]) if len(asked) else prior


def split_halves(counts: np.ndarray, weights: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each key's requests dealt at random into two halves (binomial thinning of its count); its weight
    (decayed) shared in proportion. Two samples of the same traffic, for an estimate out of sample."""
    counts = np.asarray(counts, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    first = np.random.default_rng(seed).binomial(counts, 0.5)
    w_first = np.divide(weights * first, counts, out=np.zeros_like(weights), where=counts > 0)
    return w_first, weights - w_first


def coverage_of(ranking: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """covered[n] = share of ``weights`` on keys among the first n of ``ranking``, for n = 0..len(ranking)."""
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    out = np.zeros(len(ranking) + 1)
    if total <= 0 or len(ranking) == 0:
        return out
    pos = _positions(ranking, keys)
    found = pos >= 0
    per_pos = np.bincount(pos[found], weights=weights[found], minlength=len(ranking))
    out[1:] = np.cumsum(per_pos) / total
    return out


def _positions(ranking: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in ``ranking`` (-1 where absent); 2-d keys are matched row-wise."""
    ranking, keys = np.asarray(ranking), np.asarray(keys)
    if ranking.ndim == 2:
        ranking, keys = _row_ids(ranking, keys)
    order = np.argsort(ranking, kind="stable")
    at = np.searchsorted(ranking[order], keys)
    at = np.minimum(at, max(len(ranking) - 1, 0))
    hit = (ranking[order][at] == keys) if len(ranking) else np.zeros(len(keys), bool)
    return np.where(hit, order[at], -1)


def _row_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) rows -> one int per distinct row, consistently across both arrays."""
    both = np.concatenate([a.reshape(-1, 2), b.reshape(-1, 2)])
    _, ids = np.unique(both, axis=0, return_inverse=True)
    ids = ids.ravel()
    return ids[:len(a)], ids[len(a):]


def size_for(share: float, covered: np.ndarray) -> int | None:
    """The smallest n whose coverage reaches ``share``; None when none does (then: every ranked key)."""
    reached = np.flatnonzero(covered >= share - 1e-12)
    return int(reached[0]) if len(reached) else None


def held_out_choice(share: float, keys: np.ndarray, counts: np.ndarray, weights: np.ndarray,
                    prior_keys: np.ndarray, prior_w: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Keys to precompute so that traffic *not yet seen* is covered to ``share``.

    Coverage measured on the traffic a ranking was built from flatters it: under a Zipf law most of
    tomorrow's tail was never asked for today. So the requests are dealt into two halves; keys are
    ranked on one half (plus the prior), and the smallest prefix covering ``share`` of the *other*
    half sets how many keys to take from the ranking built on all of the traffic.
    Returns (keys in ranking order, {"held_out": coverage of the held-out half by a set that size}).
    """
    w_a, w_b = split_halves(counts, weights, seed)
    ranking_a = rank(keys, w_a, prior_keys, prior_w)
    covered = coverage_of(ranking_a, keys, w_b)
    n = size_for(share, covered)
    ranking = rank(keys, weights, prior_keys, prior_w)
    chosen = ranking if n is None else ranking[:n]
    return chosen, {"held_out": float(covered[-1] if n is None else covered[n]),
                    "half": (ranking_a if n is None else ranking_a[:n], np.asarray(keys), w_b)}


def coverage_curve(weights: np.ndarray) -> np.ndarray:
    """Share of traffic covered by the top-n keys, for n = 1..len (for plots and reports)."""
    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    return np.cumsum(w) / w.sum() if w.sum() > 0 else np.zeros(len(w))


def decay_weight_sql(now: datetime, half_life_hours: float) -> str:
    """The SQL weight of a request-log row: 1, or halved per ``half_life_hours`` of age at ``now``."""
    if half_life_hours <= 0:
        return "1.0"
    return (f"pow(0.5, greatest(0, epoch(TIMESTAMPTZ '{now.isoformat()}') - epoch(ts)) "
            f"/ 3600.0 / {float(half_life_hours)})")


def read_request_counts(store: Store, now: datetime, half_life_hours: float = 0.0,
                        log: RequestLogFiles | None = None) -> pd.DataFrame:
    """Request-log traffic per (endpoint, user_id, item_id): requests ``n``, and their ``weight``,
    less for older ones when a half-life is set.

    Only answered requests (status < 400) count. Empty frame when there is no log. ``log``: the files
    to read (batch.requestlog.log_files; default: every readable one, a damaged one skipped).
    """
    log = log_files(store) if log is None else log
    weight = decay_weight_sql(now, half_life_hours)
    frame = log.frame(f"SELECT endpoint, user_id, item_id, count(*) AS n, sum({weight}) AS weight "
                      f"FROM read_parquet(?, union_by_name = true) WHERE status < 400 GROUP BY ALL")
    if frame is None:
        return pd.DataFrame(columns=["endpoint", "user_id", "item_id", "n", "weight"])
    return frame


def _window(interactions: pd.DataFrame, days: int) -> pd.DataFrame:
    """The interactions of the last ``days`` days before the newest one in the inputs (0: all of them).

    Measured from the data, not the clock: a historical data set (MovieLens 1996-2018) has its own
    "recent", and a run on it must not find an empty window. The request log, which is live traffic,
    decays on the clock instead (read_request_counts)."""
    if days <= 0 or interactions.empty:
        return interactions
    end = interactions["ts"].max()
    return interactions[interactions["ts"] > end - pd.Timedelta(days=days)]


def window_report(interactions: pd.DataFrame, window: pd.DataFrame, days: int) -> dict[str, Any]:
    """What the popularity window held, for the manifest and for the warning below."""
    def span(frame):
        return (frame["ts"].min().isoformat(), frame["ts"].max().isoformat()) if len(frame) else (None, None)
    start, end = span(window)
    return {"days": int(days), "start": start, "end": end, "interactions": int(len(window)),
            "users": int(window["user_id"].nunique()), "items": int(window["item_id"].nunique()),
            "all_users": int(interactions["user_id"].nunique()), "all_items": int(interactions["item_id"].nunique())}


def historical_window_warning(report: dict[str, Any], now: datetime) -> str | None:
    """A hint when the inputs end more than a window before ``now`` (historical data) and the window
    holds under a fifth of the users: the run then precomputes for the few users active at the very
    end of the data, where someone replaying a data set expects its active users."""
    days, end = report["days"], report["end"]
    if days <= 0 or end is None:
        return None
    behind = (now - datetime.fromisoformat(end)).days
    if behind <= days or report["users"] >= 0.2 * report["all_users"]:
        return None
    return (f"inputs end {end[:10]}, {behind:,} days before this run: the popularity window "
            f"(batch.window_days = {days}, counted back from the newest interaction) holds "
            f"{report['users']:,} of {report['all_users']:,} users; for historical data set "
            f"batch.window_days = 0 (all history) or a window that spans its activity (docs/real-data.md)")


def _counts(frame: pd.DataFrame, column: str, weight: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    grouped = frame.groupby(column)[weight].sum() if weight else frame.groupby(column).size()
    return grouped.index.to_numpy(dtype=np.int64), grouped.to_numpy(dtype=np.float64)


def _prior(interactions: pd.DataFrame, column: str, w_keys: np.ndarray, w_n: np.ndarray,
           known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys ordered by interactions in the window, ties (and keys outside it) by all-time interactions:
    one weight, window count first, all-time count second."""
    a_keys, a_n = _counts(interactions, column)
    ok = np.isin(a_keys, known)
    a_keys, a_n = a_keys[ok], a_n[ok]
    in_window = np.zeros(len(a_keys))
    pos = np.searchsorted(a_keys, w_keys)  # _counts returns keys sorted; window keys are a subset
    in_window[pos] = w_n
    return a_keys, in_window * (a_n.max(initial=0) + 1) + a_n


def select(interactions: pd.DataFrame, log: pd.DataFrame, known_items: np.ndarray, known_users: np.ndarray,
           settings) -> Selection:
    """Choose items, users and (user, item) pairs to precompute; report the expected hit rate.

    Each kind of key is sized on held-out traffic (see held_out_choice): from the interactions in the
    window, and from the request log when it has rows. The log's keys come first and add to the
    interactions' choice; a young log never shrinks it.
    """
    share = settings["batch.coverage"]
    window = _window(interactions, settings["batch.window_days"])
    report: dict[str, Any] = {"coverage_target": share, "estimate": "held-out half of the traffic",
                              "window": window_report(interactions, window, settings["batch.window_days"])}
    log = log[log["endpoint"].isin([ENDPOINT_ITEMS, ENDPOINT_USERS, ENDPOINT_PAIRS])]
    if "n" not in log:  # a frame from an older reader: every row one request
        log = log.assign(n=1)
    totals = {"hit": 0.0, "held_out_hit": 0.0, "traffic": 0.0}

    def choose(kind, endpoint, column, known, cap):
        i_keys, i_n = _counts(window, column)
        ok = np.isin(i_keys, known)
        i_keys, i_n = i_keys[ok], i_n[ok]
        from_interactions, est = held_out_choice(share, i_keys, i_n, i_n, i_keys[:0], i_n[:0])
        rows = log[(log["endpoint"] == endpoint) & log[column].notna()]
        if len(rows):
            g = rows.astype({column: np.int64}).groupby(column)[["n", "weight"]].sum()
            g = g[np.isin(g.index.to_numpy(), known)]
            keys, n, w = g.index.to_numpy(np.int64), g["n"].to_numpy(), g["weight"].to_numpy(np.float64)
            # After the logged keys: the window's interactions, then those of all time (what the log
            # has not seen yet is more likely popular than not).
            p_keys, p_w = _prior(interactions, column, i_keys, i_n, known)
            from_log, est = held_out_choice(share, keys, n, w, p_keys, p_w)
            wanted = np.concatenate([from_log, from_interactions[~np.isin(from_interactions, from_log)]])
            source = "request_log+interactions"
        else:
            keys, w, wanted = i_keys, i_n, from_interactions
            source = "interactions"
        chosen = wanted[:cap]
        traffic = float(w.sum())
        hit = float(w[np.isin(keys, chosen)].sum())
        # The held-out estimate is for the ranking's own choice; the union covers at least as much,
        # unless the cap cut it short.
        held_out = est["held_out"] if len(wanted) <= cap else min(est["held_out"], hit / traffic if traffic else 0.0)
        report[kind] = {"source": source, "distinct_keys": int(len(keys)), "chosen": int(len(chosen)),
                        "traffic": traffic, "in_sample_hit_rate": hit / traffic if traffic else 0.0,
                        "expected_hit_rate": held_out}
        totals["hit"] += hit
        totals["held_out_hit"] += held_out * traffic
        totals["traffic"] += traffic
        return np.sort(chosen)

    items = choose("items", ENDPOINT_ITEMS, "item_id", known_items, settings["batch.max_items"])
    if settings["batch.similar_all_items"] and len(known_items) <= settings["batch.max_items"]:
        # The whole catalogue: every similar-items request and every session's lists are in the snapshot.
        items = np.unique(np.asarray(known_items, dtype=np.int64))
        rep = report["items"]
        totals["hit"] += rep["traffic"] - rep["in_sample_hit_rate"] * rep["traffic"]
        totals["held_out_hit"] += rep["traffic"] - rep["expected_hit_rate"] * rep["traffic"]
        rep.update(chosen=int(len(items)), whole_catalogue=True, in_sample_hit_rate=1.0 if rep["traffic"] else 0.0,
                   expected_hit_rate=1.0 if rep["traffic"] else 0.0)
    users = choose("users", ENDPOINT_USERS, "user_id", known_users, settings["batch.max_users"])

    pairs = held_out_pairs = None
    prows = log[(log["endpoint"] == ENDPOINT_PAIRS) & log["user_id"].notna() & log["item_id"].notna()]
    if len(prows):
        g = prows.groupby(["user_id", "item_id"])[["n", "weight"]].sum().reset_index()
        g = g[np.isin(g["user_id"], known_users) & np.isin(g["item_id"], known_items)]
        keys = g[["user_id", "item_id"]].to_numpy(dtype=np.int64)
        chosen, est = held_out_choice(share, keys, g["n"].to_numpy(), g["weight"].to_numpy(np.float64),
                                      keys[:0], np.zeros(0))
        held_out_pairs = est["half"]
        chosen = chosen[:settings["batch.max_pairs"]]
        pairs = pd.DataFrame(chosen, columns=["user_id", "item_id"]).sort_values(["user_id", "item_id"],
                                                                                 ignore_index=True)
        traffic = float(g["weight"].sum())
        hit = float(g["weight"].to_numpy()[_positions(chosen, keys) >= 0].sum()) if len(chosen) else 0.0
        held_out = min(est["held_out"], hit / traffic) if traffic else 0.0
        report["pairs"] = {"source": "request_log", "distinct_keys": int(len(g)), "chosen": int(len(pairs)),
                           "traffic": traffic, "in_sample_hit_rate": hit / traffic if traffic else 0.0,
                           "expected_hit_rate": held_out, "plus_top_recs_per_user": settings["batch.pairs_per_user"]}
        totals["hit"] += hit
        totals["held_out_hit"] += held_out * traffic
        totals["traffic"] += traffic
    else:
        report["pairs"] = {"source": "user_recs", "per_user": settings["batch.pairs_per_user"]}
    total = totals["traffic"]
    report["expected_hit_rate"] = totals["held_out_hit"] / total if total else 0.0
    report["in_sample_hit_rate"] = totals["hit"] / total if total else 0.0
    report["traffic"] = total
    LOG.info("selected %d items, %d users; expected hit rate %.3f (%.3f on the traffic it was chosen from)",
             len(items), len(users), report["expected_hit_rate"], report["in_sample_hit_rate"])
    return Selection(items=items, users=users, pairs=pairs, report=report, held_out_pairs=held_out_pairs)
