"""Search as you type through the server (granian) on a 100,000-item catalogue, side by side in one run:

- GET /v1/items?q=<each prefix a visitor types>&limit=8, one connection, one request after another
  (as a search box sends them): p50/p99, for prefixes of real titles, substrings from their middle
  and queries that match nothing (a scan of every title);
- GET /v1/items/<id> on the same server and connection: what a request costs without the search;
- in the process: building the in-memory catalogue at snapshot load, its search index (built on a
  background thread after the load), and a search that matches nothing (a scan of every title).

    python tests/bench/bench_search.py [--items 100000 --users 10000 --interactions 300000]
"""
from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from batch.tools.demo import ApiServer  # noqa: E402
from bench_api import WORK, prepare  # noqa: E402
from common import write_result  # noqa: E402
from serving.catalogue import Catalogue  # noqa: E402
from serving.snapshot import LoadedSnapshot, catalogue  # noqa: E402

TARGET_P99_MS = 50.0


def typed(titles: list[str], rng: np.random.Generator, n: int) -> dict[str, list[str]]:
    """What a search box sends: every prefix of a title's first 8 characters, a substring from its middle
    typed the same way, and a query that matches nothing."""
    picks = rng.choice(len(titles), size=n, replace=False)
    out: dict[str, list[str]] = {"prefix": [], "substring": [], "no match": []}
    for p in picks:
        t = titles[int(p)]
        out["prefix"] += [t[:i] for i in range(1, min(8, len(t)) + 1)]
        mid = t[len(t) // 3:len(t) // 3 + 6]
        out["substring"] += [mid[:i] for i in range(2, len(mid) + 1)]
        out["no match"].append(f"{t[:3]}qxz")
    return out


def timed(conn: http.client.HTTPConnection, paths: list[str]) -> np.ndarray:
    """Milliseconds per request, one after another on one keep-alive connection."""
    out = np.empty(len(paths))
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        out[i] = (time.perf_counter() - t0) * 1e3
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status}")
    return out


def stats(ms: np.ndarray) -> dict:
    return {"requests": int(len(ms)), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def run(items: int = 100_000, users: int = 10_000, interactions: int = 300_000, titles_typed: int = 150,
        workdir: Path | None = None, out_dir: Path | None = None) -> dict:
    cfg, settings, store = prepare(items, users, interactions, workdir or WORK / f"search-{items}-{users}-{interactions}")
    sid = store.current_id()
    snap = LoadedSnapshot.load(store, sid, checksums=False)
    table = store.read_table(sid, "items")
    t0 = time.perf_counter()
    cat: Catalogue = catalogue(table, snap.models)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cat._search_index()  # what a served snapshot builds on a background thread after its load
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng(5)
    queries = typed([t for t in cat.titles if t], rng, titles_typed)
    t0 = time.perf_counter()
    for q in queries["no match"]:
        cat.search(q, 8)
    scan_ms = (time.perf_counter() - t0) * 1e3 / len(queries["no match"])
    ids = rng.choice(cat.ids, size=sum(map(len, queries.values())))
    result: dict = {"items": len(cat), "catalogue_build_s": round(build_s, 3), "search_index_build_s": round(index_s, 3),
                    "in_process_no_match_search_ms": round(scan_ms, 3), "load_average_before": os.getloadavg()[0]}
    with ApiServer(cfg, workers=1) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        timed(conn, ["/v1/items?q=a&limit=8", f"/v1/items/{int(ids[0])}"] * 50)  # warm up
        by_kind, all_ms = {}, []
        for kind, qs in queries.items():
            ms = timed(conn, [f"/v1/items?q={urllib.parse.quote(q)}&limit=8" for q in qs])
            by_kind[kind] = stats(ms)
            all_ms.append(ms)
        # the same number of plain requests, on the same connection, in between
        item_ms = timed(conn, [f"/v1/items/{int(i)}" for i in ids])
        conn.close()
    every = np.concatenate(all_ms)
    result.update(search=stats(every), search_by_kind=by_kind, item_by_id=stats(item_ms),
                  search_p99_vs_item_p99=float(np.percentile(every, 99) / np.percentile(item_ms, 99)),
                  target_p99_ms=TARGET_P99_MS, load_average_after=os.getloadavg()[0])
    write_result("item_search", result, out_dir)
    s = result["search"]
    print(f"search as you type, {result['items']:,} items: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms "
          f"(target <= {TARGET_P99_MS:.0f} ms) over {s['requests']:,} requests; GET /v1/items/<id> p99 "
          f"{result['item_by_id']['p99_ms']:.2f} ms; catalogue built in {build_s:.2f} s at load, its search index "
          f"in {index_s:.2f} s after; "
          f"load average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--interactions", type=int, default=300_000)
    a = ap.parse_args()
    run(a.items, a.users, a.interactions)
