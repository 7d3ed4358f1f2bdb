"""A 1,000,000-item snapshot: load time, and resident memory per server worker.

The snapshot is written with the store's writer: synthetic clustered item vectors (dimension 64),
the configured ANN index, similar items precomputed for every item at k_max. Then:
- load time: LoadedSnapshot.load (verify checksums and schemas, map the arrays), in a fresh process;
- memory: the server with 1 and with N workers on that store, after requests touched the data;
  PSS (proportional set size) summed over workers, so shared pages are counted once.

    python tests/bench/bench_snapshot.py [--items 1000000 --k-max 50 --workers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_batch import clustered, item_only_bundle  # noqa: E402
from batch.job import items_table  # noqa: E402
from batch.tools.demo import ApiServer, http_get  # noqa: E402
from batch.train import build_index, index_spec  # noqa: E402
from bench_api import WORK  # noqa: E402
from common import write_result  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.models.base import Lists  # noqa: E402
from serving.models.rating import RatingModel  # noqa: E402
from serving.models.recommender import RecommenderModel  # noqa: E402
from serving.store import TABLE_SCHEMAS, Store  # noqa: E402


def build_snapshot(root: Path, items: int, dim: int, k_max: int) -> tuple[Path, Store, str]:
    cfg = root / "config.toml"
    cfg.write_text(f'[paths]\nstore = "{root / "store"}"\ninputs = "{root / "inputs"}"\n'
                   f"[batch]\nk_max = {k_max}\n[serving]\nlog_flush_interval_s = 0.0\n")
    settings = load_settings(cfg, env={})
    store = Store(settings["paths.store"])
    if store.current_id() is not None:
        return cfg, store, store.current_id()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    vecs = clustered(items, dim, clusters=max(10, items // 500))
    index, params = build_index(vecs, index_spec(items, settings), settings)
    bundle = item_only_bundle(vecs, index, {"index": index_spec(items, settings), "search_params": params})
    # This snapshot has items only (no users to score), and no predictions
    bundle.meta.update({"trained_at": "2026-01-01T00:00:00+00:00", "model_version": f"synthetic-{items}"})
    writer = store.begin()
    folder = writer.model_folder("recommender")
    bundle.save(folder)
    model = RecommenderModel.live_only(bundle, "recommender")
    lists = [bundle.similar_items(np.arange(start, min(start + 4096, items)), k_max) for start in range(0, items, 4096)]
    sim = model.part("similar_items", [bundle.item_ids], Lists(np.concatenate([a for a, _ in lists]),
                                                                np.concatenate([b for _, b in lists])))
    model.assemble("similar_items", sim, folder, k_max)
    empty = TABLE_SCHEMAS["user_recs"].empty_table()
    model.assemble("user_recs", empty, folder, k_max)
    writer.write_table("similar_items", sim)
    writer.write_table("user_recs", empty)
    rating = RatingModel("rating", {"user_ids": np.zeros(0, np.int64), "item_ids": bundle.item_ids,
                                    "user_bias": np.zeros(0, np.float32), "item_bias": np.zeros(items, np.float32),
                                    "user_factors": np.zeros((0, 1), np.float32),
                                    "item_factors": np.zeros((items, 1), np.float32)},
                         {"global_mean": 0.0, "blend": [0.0, 1.0, 1.0], "rating_range": [1.0, 5.0],
                          "model_version": bundle.meta["model_version"]})
    rating.save(writer.model_folder("rating"))
    preds = TABLE_SCHEMAS["predictions"].empty_table()
    rating.assemble("predict", preds, writer.model_folder("rating"), k_max)
    writer.write_table("predictions", preds)
    titles = pa.array([f"item {i}" for i in bundle.item_ids.tolist()])
    writer.write_table("items", items_table_from(bundle.item_ids, titles))
    from datetime import datetime, timezone
    writer.publish({"created_at": datetime.now(timezone.utc).isoformat(), "model_version": bundle.meta["model_version"],
                    "k_max": k_max, "settings": settings.as_dict(), "synthetic": True,
                    "recommender": {"kind": "recommender", "version": bundle.meta["model_version"], "k_max": k_max,
                                    "rows": {"similar_items": items, "user_recs": 0}},
                    "models": {"rating": {"kind": "rating", "version": bundle.meta["model_version"], "rows": 0}}})
    return cfg, store, store.current_id()


def items_table_from(ids: np.ndarray, titles: pa.Array) -> pa.Table:
    import pandas as pd
    return items_table(pd.DataFrame({"item_id": ids, "title": titles.to_pylist(), "genres": [[]] * len(ids)}))


def _pss_mb(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of a process in MB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Pss"] / 1024.0, fields["Rss"] / 1024.0


def _workers(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def measure_workers(cfg: Path, n: int, paths: list[str]) -> dict:
    with ApiServer(cfg, workers=n, env={"HYBRIDSERVE_SERVING_VERIFY_CHECKSUMS": "false"}) as srv:
        for p in paths:  # touch the data every worker serves: precomputed rows and live FAISS search
            http_get(srv.base + p)
        pids = _workers(srv.proc.pid)
        per = [_pss_mb(p) for p in pids]
    return {"workers": n, "pss_total_mb": sum(p for p, _ in per), "rss_per_worker_mb": [r for _, r in per],
            "pss_per_worker_mb": [p for p, _ in per]}


def run(items: int = 1_000_000, dim: int = 64, k_max: int = 50, workers: int = 4, workdir: Path | None = None,
        out_dir: Path | None = None, requests: int = 400) -> dict:
    root = Path(workdir or WORK / f"snapshot-{items}-{dim}-{k_max}")
    root.mkdir(parents=True, exist_ok=True)
    cfg, store, sid = build_snapshot(root, items, dim, k_max)
    manifest = store.read_manifest(sid)
    snapshot_mb = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    # Load in a fresh process, as a worker does (the files are in the page cache after writing).
    code = ("import json, time, sys; sys.path.insert(0, %r); from serving.store import Store; "
            "from serving.snapshot import LoadedSnapshot; s = Store(%r); r = {}\n"
            "for name, ck in (('first_load_s', True), ('reload_s', True), ('reload_without_checksums_s', False)):\n"
            "    t = time.perf_counter(); LoadedSnapshot.load(s, %r, checksums=ck); r[name] = time.perf_counter() - t\n"
            "print(json.dumps(r))" % (str(HERE.parents[1]), str(store.root), sid))
    loads = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1]) for _ in range(3)]
    load = {k: float(np.median([x[k] for x in loads])) for k in loads[0]}
    rng = np.random.default_rng(0)
    ids = rng.integers(1, items + 1, size=requests)
    paths = [f"/v1/items/{i}/similar?k=10" for i in ids[: requests // 2]]
    paths += [f"/v1/items/{i}/similar?k={k_max + 10}" for i in ids[requests // 2:]]  # live FAISS search
    one = measure_workers(cfg, 1, paths)
    many = measure_workers(cfg, workers, paths)
    extra = (many["pss_total_mb"] - one["pss_total_mb"]) / (workers - 1)
    result = {"items": items, "dim": dim, "k_max": k_max, "snapshot": sid, "snapshot_mb": snapshot_mb,
              "load_s": load, "load_runs": loads, "one_worker": one, "n_workers": many,
              "extra_worker_mb": extra, "extra_worker_share_of_snapshot": extra / snapshot_mb,
              "targets": {"load_s.first_load_s": "<= 2", "extra_worker_share_of_snapshot": "<= 0.25"}}
    print(f"snapshot of {items:,} items (k_max {k_max}): {snapshot_mb:,.0f} MB on disk")
    print(f"load in a fresh worker process: {load['first_load_s']:.2f} s verifying every checksum "
          f"(target <= 2 s); a reload {load['reload_s']:.2f} s, {load['reload_without_checksums_s']:.2f} s "
          f"without checksums")
    print(f"memory (PSS): 1 worker {one['pss_total_mb']:,.0f} MB, {workers} workers {many['pss_total_mb']:,.0f} MB; "
          f"each extra worker {extra:,.0f} MB = {extra / snapshot_mb:.0%} of the snapshot (target <= 25%)")
    write_result("snapshot_load_memory", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k-max", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    run(a.items, a.dim, a.k_max, a.workers)
