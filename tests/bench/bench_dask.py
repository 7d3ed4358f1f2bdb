"""Dask benchmark: the precompute of similar items for N synthetic items, on the local backend and on
the Dask backend with two local workers (a LocalCluster, one thread and one OpenMP thread each), side
by side in one run: the cost of distribution, measured.

Both backends map the same parts of the same staged model, each into a snapshot being written of its
own, interleaved a round of parts at a time so that whatever else the machine does weighs on both
alike; then the two snapshots' parts are compared row for row (they must be equal bit for bit).
Loading the staged model (in this process; on each worker, by the plugin) is staging, not precompute,
and is left out of both rates, as the local benchmark does.

    python tests/bench/bench_dask.py [--items 1000000] [--dim 64] [--workers 2] [--scheduler ADDRESS]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import clustered, item_only_bundle  # noqa: E402
from batch.backends import DaskBackend, LocalBackend  # noqa: E402
from batch.precompute import Staged, forget, partitions, precompute_part, staged_models  # noqa: E402
from batch.train import build_index, index_spec  # noqa: E402
from common import peak_rss_mb, write_result  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.store import Store  # noqa: E402


def run(items: int = 1_000_000, dim: int = 64, workers: int = 2, k: int = 10, index: str = "auto",
        scheduler: str = "", per_round: int = 16, out_dir=None) -> dict:
    load_start = list(os.getloadavg())
    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(cores)  # the local backend: every core inside each part (batch.threads = 0)
    vecs = clustered(items, dim, clusters=max(10, items // 500))
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        settings = load_settings(env={}).replace(
            train__index=index, paths__store=str(Path(work) / "store"), batch__backend="dask",
            batch__dask_scheduler=scheduler, batch__dask_workers=workers, batch__dask_threads_per_worker=1,
            batch__dask_omp_threads=1, batch__dask_dashboard=":0")
        t0 = time.perf_counter()
        spec = index_spec(items, settings)
        idx, params = build_index(vecs, spec, settings)
        bundle = item_only_bundle(vecs, idx, {"index": spec, "search_params": params})
        t_build = time.perf_counter() - t0

        store = Store(settings["paths.store"])
        entries = {"recommender": {"kind": "recommender", "version": "bench", "k_max": k}}
        writers, staged = {}, {}
        for name in ("local", "dask"):
            writers[name] = store.begin()
            bundle.save(writers[name].model_folder("recommender"))
            staged[name] = Staged(store.url, writers[name].id, entries)
        parts = list(partitions("recommender", "similar_items", [bundle.item_ids], settings["batch.batch_size"], k))

        t1 = time.perf_counter()
        dask = DaskBackend(settings)
        t_cluster = time.perf_counter() - t1
        local = LocalBackend()
        try:
            t2 = time.perf_counter()
            staged_models(staged["local"])
            t_stage_local = time.perf_counter() - t2
            t2 = time.perf_counter()
            dask.map(precompute_part, staged["dask"], [])  # registers the plugin: every worker loads the model
            t_stage_dask = time.perf_counter() - t2
            seconds = {"local": 0.0, "dask": 0.0}
            rounds = []
            for first in range(0, len(parts), per_round):
                chunk = parts[first:first + per_round]
                this = {}
                for name, backend in (("local", local), ("dask", dask)):
                    t3 = time.perf_counter()
                    backend.map(precompute_part, staged[name], chunk)
                    this[name] = time.perf_counter() - t3
                    seconds[name] += this[name]
                rounds.append(this["local"] / this["dask"])
        finally:
            dask.close()
        tables = {name: writers[name].read_parts("recommender", "similar_items") for name in writers}
        same = tables["local"].equals(tables["dask"])
        rows = tables["local"].num_rows
        for name in writers:
            forget(staged[name])
            writers[name].abort()
    rate = {name: items / s for name, s in seconds.items()}
    result = {
        "items": items, "dim": dim, "k": k, "index": spec, "search_params": params, "parts": len(parts),
        "part_rows": settings["batch.batch_size"], "rows": rows, "cores": cores,
        "dask": {"workers": workers if not scheduler else None, "threads_per_worker": 1, "omp_threads": 1,
                 "scheduler": scheduler or "LocalCluster"},
        "local_queries_per_s": rate["local"], "dask_queries_per_s": rate["dask"],
        "dask_vs_local": rate["dask"] / rate["local"],
        "dask_vs_local_per_round": rounds, "same_rows_bit_for_bit": same,
        "seconds": {"build_index": t_build, "cluster_start": t_cluster, "stage_local": t_stage_local,
                    "stage_dask_workers": t_stage_dask, "precompute_local": seconds["local"],
                    "precompute_dask": seconds["dask"]},
        "peak_rss_mb_this_process": peak_rss_mb(),
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "targets": {"dask_vs_local": ">= 0.8"},
    }
    print(f"{'':28}{'local':>12}{'dask':>12}")
    print(f"{'precompute queries/s':28}{rate['local']:12.0f}{rate['dask']:12.0f}   dask/local "
          f"{result['dask_vs_local']:.2f} (target >= 0.8; rounds {min(rounds):.2f}-{max(rounds):.2f})")
    print(f"{'precompute seconds':28}{seconds['local']:12.1f}{seconds['dask']:12.1f}")
    print(f"{'staging (model loads)':28}{t_stage_local:12.1f}{t_stage_dask:12.1f}   cluster start {t_cluster:.1f} s")
    print(f"{items:,} items, index {spec} {params}, {len(parts)} parts of {settings['batch.batch_size']}: "
          f"local = 1 process x {cores} OpenMP threads; dask = {workers} workers x 1 thread x 1 OpenMP thread")
    print(f"same rows bit for bit: {'yes' if same else 'NO'}; load average {load_start[0]:.1f} -> "
          f"{result['load_average_end'][0]:.1f}")
    write_result("batch_dask", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheduler", default="", help="an existing scheduler's address (default: a LocalCluster)")
    a = ap.parse_args()
    run(a.items, a.dim, a.workers, scheduler=a.scheduler)
