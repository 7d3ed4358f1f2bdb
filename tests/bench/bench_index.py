"""Index choice for inner-product (PureSVD) vectors, measured side by side in one run.

For each candidate index over the trained item vectors of a generated catalogue: build seconds,
time per single query on one OpenMP thread (as on the request path) through the served functions
(`ModelBundle.similar_items` with the minimum-support filter, `ModelBundle.recommend`), recall@10 of
those answers against the exact (Flat) bundle's, and batch queries/s of `similar_items` against raw
FAISS `search` on every core.

    python tests/bench/bench_index.py [--items 100000 --users 50000 --interactions 1000000]
                                      [--indexes Flat,HNSW32,HNSW32-pad,IVF1024-pad,SQ8] [--queries 300]

Inputs are generated as bench_api.py does (same seed: the 100K case is its catalogue); vectors are
cached under tests/bench/.work/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from batch.job import ann_recall  # noqa: E402
from batch.inputs import INTERACTIONS, ITEMS, generate_sample, write_inputs  # noqa: E402
from batch.train import build_index, popularity_svd  # noqa: E402
from common import peak_rss_mb, write_result  # noqa: E402
from serving.models.recommender import ModelBundle  # noqa: E402
from serving.models.vectors import fold_in, mips_pad  # noqa: E402
from serving.settings import load_settings  # noqa: E402

WORK = HERE / ".work"
K = 10


def vectors(items: int, users: int, interactions: int, workdir: Path) -> dict[str, np.ndarray]:
    """The trainer's own PureSVD item vectors, folded-in user vectors, seen items and support."""
    cache = workdir / "vectors.npz"
    if cache.is_file():
        return dict(np.load(cache))
    inputs = workdir / "inputs"
    if not (inputs / INTERACTIONS).is_file():
        print(f"generating {users:,} users x {items:,} items x {interactions:,} interactions ...", file=sys.stderr)
        write_inputs(inputs, *generate_sample(users, items, interactions, seed=11))
    inter = pd.read_parquet(inputs / INTERACTIONS, columns=["user_id", "item_id"])
    item_ids = np.sort(pd.read_parquet(inputs / ITEMS, columns=["item_id"])["item_id"].to_numpy(np.int64))
    user_ids = np.unique(inter["user_id"].to_numpy(np.int64))
    uidx = np.searchsorted(user_ids, inter["user_id"].to_numpy(np.int64))
    iidx = np.searchsorted(item_ids, inter["item_id"].to_numpy(np.int64))
    settings = load_settings(env={})
    print("PureSVD ...", file=sys.stderr)
    item_vecs = popularity_svd(uidx, iidx, len(user_ids), len(item_ids), settings["train.dim"],
                               settings["train.popularity_damping"], settings["train.seed"])
    order = np.lexsort((iidx, uidx))
    seen_items = iidx[order].astype(np.int32)
    seen_indptr = np.concatenate([[0], np.cumsum(np.bincount(uidx, minlength=len(user_ids)))]).astype(np.int64)
    out = {"item_ids": item_ids, "item_vecs": item_vecs, "seen_indptr": seen_indptr, "seen_items": seen_items,
           "user_vecs": fold_in(item_vecs, seen_indptr, seen_items, "ip"),
           "support": np.bincount(iidx, minlength=len(item_ids)).astype(np.int64)}
    np.savez(cache, **out)
    return out


def builder(name: str, settings):
    """name: a FAISS spec, optionally '-pad' (index the MIPS-padded vectors) or '@<efSearch|nprobe>'."""
    spec, _, knob = name.partition("@")
    pad = spec.endswith("-pad")
    spec = spec.removesuffix("-pad")
    if spec.startswith("IVF") and "," not in spec:
        spec += ",Flat"
    if knob:
        settings = settings.replace(**({"train__hnsw_ef_search": int(knob)} if spec.startswith("HNSW")
                                       else {"train__ivf_nprobe": int(knob)}))

    def build(group_vecs):
        if spec.startswith("SQ"):  # a scalar-quantised flat scan; the bundle re-scores candidates exactly
            index = faiss.index_factory(group_vecs.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
            index.train(group_vecs)
            index.add(group_vecs)
            return index, {"index": spec, "search_params": {}, "mips_pad": False}
        index, params = build_index(mips_pad(group_vecs) if pad else group_vecs, spec, settings)
        return index, {"index": spec, "search_params": params, "mips_pad": pad}
    return build


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    """Share of the exact answer's ids found (ties at the cut make this lower than score recall)."""
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum()) for g, w in zip(got, want)]))


def _score_recall(got: np.ndarray, want: np.ndarray) -> float:
    """Share of answers scoring at least the exact k-th score (scores are exact re-scores either way):
    recall that counts an item tied with the exact list's last one as found. Items without
    interactions have zero vectors, so every candidate ties for them, and which ids of a tie the
    exact scan keeps says nothing about the index."""
    kth = np.nanmin(want, axis=1, keepdims=True)
    tol = 1e-5 * np.maximum(1.0, np.abs(kth))
    found = np.nan_to_num(got, nan=-np.inf) >= kth - tol
    return float(np.mean(found.sum(axis=1) / np.maximum(1, (~np.isnan(want)).sum(axis=1))))


def _single(fn, rows: np.ndarray) -> tuple[float, float]:
    """p50 / p99 milliseconds of fn on one row at a time."""
    times = []
    for r in rows:
        t = time.perf_counter()
        fn(np.array([r]), K)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3)


def run(items: int, users: int, interactions: int, indexes: list[str], queries: int = 300,
        batch_items: int = 20_000, out_dir: Path | None = None) -> dict:
    workdir = WORK / f"index-{items}-{users}-{interactions}"
    workdir.mkdir(parents=True, exist_ok=True)
    data = vectors(items, users, interactions, workdir)
    settings = load_settings(env={})
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    n_users = len(data["user_vecs"])
    qi = rng.choice(items, min(queries, items), replace=False)
    qu = rng.choice(n_users, min(queries, n_users), replace=False)
    common = dict(user_ids=np.arange(n_users, dtype=np.int64), user_vecs=data["user_vecs"],
                  item_support=data["support"], seen_indptr=data["seen_indptr"], seen_items=data["seen_items"],
                  meta={"metric": "ip", "min_support": settings["train.similar_min_support"]})
    rows, exact = [], {}
    for name in indexes:
        faiss.omp_set_num_threads(cores)  # the batch job builds on every core
        t = time.perf_counter()
        bundle = ModelBundle.from_vectors(data["item_ids"], data["item_vecs"], builder(name, settings), **common)
        build_s = time.perf_counter() - t
        faiss.omp_set_num_threads(1)  # the request path: one thread
        sim_ids, sim_s = bundle.similar_items(qi, K)
        rec_ids, rec_s = bundle.recommend(qu, K)
        if not exact:
            if name != "Flat":
                raise SystemExit("the first index must be Flat: it is the exact reference")
            exact = {"similar": sim_ids, "recs": rec_ids, "similar_s": sim_s, "recs_s": rec_s}
        # the batch job's validation gate (batch.min_recall): raw index top-10 vs exact, item queries
        gate = ann_recall(bundle, qi, K)
        sim_t = _single(bundle.similar_items, qi)
        rec_t = _single(bundle.recommend, qu)
        faiss.omp_set_num_threads(cores)
        n_batch = min(batch_items, items)
        t = time.perf_counter()
        for start in range(0, n_batch, settings["batch.batch_size"]):
            bundle.similar_items(np.arange(start, min(n_batch, start + settings["batch.batch_size"])), K)
        job_qps = n_batch / (time.perf_counter() - t)
        q = np.ascontiguousarray(bundle.item_vecs[:n_batch])
        if bundle.meta.get("mips_pad"):
            q = np.ascontiguousarray(np.column_stack([q, np.zeros(len(q), np.float32)]))
        t = time.perf_counter()
        for start in range(0, n_batch, settings["batch.batch_size"]):
            bundle.index.search(q[start:start + settings["batch.batch_size"]], K + 1)
        raw_qps = n_batch / (time.perf_counter() - t)
        row = {"index": name, "groups": bundle.n_groups, "build_s": build_s, "validation_ann_recall_at_10": gate,
               "similar_recall_at_10": _recall(sim_ids, exact["similar"]),
               "recs_recall_at_10": _recall(rec_ids, exact["recs"]),
               "similar_score_recall_at_10": _score_recall(sim_s, exact["similar_s"]),
               "recs_score_recall_at_10": _score_recall(rec_s, exact["recs_s"]),
               "similar_p50_ms": sim_t[0], "similar_p99_ms": sim_t[1],
               "recs_p50_ms": rec_t[0], "recs_p99_ms": rec_t[1],
               "job_queries_per_s": job_qps, "raw_faiss_queries_per_s": raw_qps, "job_vs_raw": job_qps / raw_qps}
        rows.append(row)
        print(f"{name:16} build {build_s:6.1f}s | similar R@10 {row['similar_score_recall_at_10']:.4f} "
              f"(ids {row['similar_recall_at_10']:.4f}) p50 {sim_t[0]:6.3f} p99 {sim_t[1]:6.2f} ms | "
              f"recs R@10 {row['recs_score_recall_at_10']:.4f} (ids {row['recs_recall_at_10']:.4f}) "
              f"p50 {rec_t[0]:6.3f} p99 {rec_t[1]:6.2f} ms | batch {job_qps:7.0f} q/s vs raw {raw_qps:7.0f} "
              f"({row['job_vs_raw']:.2f}) | validation ANN recall {gate:.4f}", flush=True)
        del bundle
    load = os.getloadavg()
    result = {"items": items, "users": users, "interactions": interactions, "queries": len(qi), "k": K,
              "max_seen": int(np.diff(data["seen_indptr"]).max()), "rows": rows, "peak_rss_mb": peak_rss_mb(),
              "load_average": load,
              "reference": "recall@10 of the served answers against the exact Flat bundle's: by score (an answer "
                           "tied with the exact k-th counts) and by ids; times per single "
                           "query on 1 OpenMP thread; batch q/s on every core"}
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; peak RSS {result['peak_rss_mb']:.0f} MB")
    write_result(f"index_choice_{items}", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--indexes", default="Flat,HNSW32@64,HNSW32,HNSW32@256,HNSW16,HNSW32-pad,IVF1024-pad@32,"
                                         "IVF1024-pad@256,SQ8,SQfp16")
    ap.add_argument("--queries", type=int, default=300)
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.indexes.split(","), a.queries)
