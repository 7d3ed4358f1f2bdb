"""Request traces over all endpoints with Zipf-distributed keys, and a threaded replayer.

Used by the demo and the benchmarks. The keys' popularity order is a seeded permutation, not
the order of the interaction history, so what the API is asked for can differ from what the
first batch run guessed; the closed loop (request log -> next run) has something to learn.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pandas as pd

ENDPOINTS = ("similar_items", "user_recs", "prediction", "session")
# similar items, user recommendations, predictions, sessions (a visitor's recent views: mostly new)
DEFAULT_MIX = (0.4, 0.3, 0.25, 0.05)


def zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


@dataclass
class Trace:
    endpoints: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def shown_items(bundle, user_ids: np.ndarray, n: int = 10, batch: int = 2048) -> dict[int, np.ndarray]:
    """Each user's top-n recommended items: what a page shows, and so what a frontend asks a
    predicted rating for."""
    user_ids = np.unique(np.asarray(user_ids))
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(user_ids), batch):
        part = user_ids[start:start + batch]
        ids, _ = bundle.recommend(bundle.user_index(part), n)
        for u, row in zip(part.tolist(), ids):
            out[u] = row[row >= 0]
    return out


def popularity_order(ids: np.ndarray, counts: np.ndarray, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """Keys ranked by interaction count times lognormal(0, ``noise``) noise: request popularity that
    follows the interaction history loosely (what people interact with is what they look at)."""
    rng = np.random.default_rng(seed)
    score = (np.asarray(counts, dtype=np.float64) + 1.0) * rng.lognormal(0.0, noise, size=len(ids))
    return np.asarray(ids)[np.argsort(-score, kind="stable")]


def make_trace(item_ids: np.ndarray, user_ids: np.ndarray, n: int, exponent: float = 1.1, seed: int = 0,
               mix: tuple[float, ...] = DEFAULT_MIX, k: int = 10, session_items: tuple[int, int] = (2, 4),
               order_seed: int = 1234, shown: dict[int, np.ndarray] | None = None,
               shown_share: float = 0.9, item_order: np.ndarray | None = None,
               user_order: np.ndarray | None = None) -> Trace:
    """``n`` GET paths. Items and users are drawn from Zipf(exponent) over a fixed permutation
    (``order_seed``), so traces with different ``seed`` share the same popular keys.

    ``item_order`` / ``user_order``: the keys from most to least requested (default: a seeded
    permutation, unrelated to the interaction history; see popularity_order for a correlated one).

    Predictions: with ``shown`` (user -> items on their page, see shown_items), a share
    ``shown_share`` of them ask about an item the user is shown; the rest pair the user with a
    Zipf-drawn item."""
    order = np.random.default_rng(order_seed)
    items = order.permutation(np.asarray(item_ids)) if item_order is None else np.asarray(item_order)
    users = order.permutation(np.asarray(user_ids)) if user_order is None else np.asarray(user_order)
    rng = np.random.default_rng(seed)
    p_items, p_users = zipf_probabilities(len(items), exponent), zipf_probabilities(len(users), exponent)
    kinds = rng.choice(len(ENDPOINTS), size=n, p=np.asarray(mix) / np.sum(mix))
    item_draw = items[rng.choice(len(items), size=n, p=p_items)]
    user_draw = users[rng.choice(len(users), size=n, p=p_users)]
    endpoints, paths = [], []
    for r, kind in enumerate(kinds):
        name = ENDPOINTS[kind]
        if name == "similar_items":
            path = f"/v1/items/{item_draw[r]}/similar?k={k}"
        elif name == "user_recs":
            path = f"/v1/users/{user_draw[r]}/recommendations?k={k}"
        elif name == "prediction":
            item = item_draw[r]
            options = shown.get(int(user_draw[r])) if shown is not None else None
            if options is not None and len(options) and rng.random() < shown_share:
                item = options[rng.integers(len(options))]
            path = f"/v1/predictions?user_id={user_draw[r]}&item_id={item}"
        else:  # a visitor's recent views: mostly never seen before
            m = int(rng.integers(session_items[0], session_items[1] + 1))
            viewed = rng.choice(items, size=m, replace=False)
            path = f"/v1/recommendations?items={','.join(map(str, viewed))}&k={k}"
        endpoints.append(name)
        paths.append(path)
    return Trace(endpoints, paths)


def replay(base_url: str, trace: Trace, concurrency: int = 8, timeout: float = 10.0) -> pd.DataFrame:
    """Send every request of ``trace`` (in order, ``concurrency`` at a time); one row per request:
    i, endpoint, status, source, latency_ms, started (seconds since the replay began)."""
    results: list[tuple | None] = [None] * len(trace)
    next_i = iter(range(len(trace)))
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(base_url + trace.paths[i], timeout=timeout) as resp:
                    status, body = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            except OSError:
                status, body = 0, b""
            latency = (time.perf_counter() - start) * 1000
            source = "error"
            if status == 200:
                try:
                    source = json.loads(body).get("source", "error")
                except ValueError:
                    pass
            results[i] = (i, trace.endpoints[i], status, source, latency, start - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pd.DataFrame(results, columns=["i", "endpoint", "status", "source", "latency_ms", "started"])


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Requests and p50/p99 latency (ms) by source."""
    g = df.groupby("source")["latency_ms"]
    out = pd.DataFrame({"requests": g.size(), "p50_ms": g.quantile(0.5), "p99_ms": g.quantile(0.99)})
    out.loc["all"] = [len(df), df["latency_ms"].quantile(0.5), df["latency_ms"].quantile(0.99)]
    return out


def hit_rate(df: pd.DataFrame) -> float:
    """Share of answered requests served from the snapshot (sessions included)."""
    ok = df[df["status"] == 200]
    return float((ok["source"] == "precomputed").mean()) if len(ok) else 0.0


def hit_rates_by_endpoint(df: pd.DataFrame) -> dict[str, float]:
    ok = df[df["status"] == 200]
    return {ep: float((g["source"] == "precomputed").mean()) for ep, g in ok.groupby("endpoint")}


def request_log_rows(trace: Trace, ts) -> "pd.DataFrame":
    """The request-log rows a trace would leave (for building a 'yesterday' of traffic quickly)."""
    rows = []
    for endpoint, path in zip(trace.endpoints, trace.paths):
        item = user = None
        if endpoint == "similar_items":
            item = int(path.split("/")[3])
        elif endpoint == "user_recs":
            user = int(path.split("/")[3])
        elif endpoint == "prediction":
            q = dict(x.split("=") for x in path.split("?")[1].split("&"))
            user, item = int(q["user_id"]), int(q["item_id"])
        rows.append({"ts": ts, "endpoint": endpoint, "item_id": item, "user_id": user, "k": 10,
                     "source": "live", "status": 200, "latency_us": 0})
    return pd.DataFrame(rows)
