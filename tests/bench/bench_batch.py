"""Batch benchmark: precompute similar items for N synthetic clustered items with the configured index.

Prints, side by side in one run: the job's queries/s (its precompute function mapped over partitions
from a staged snapshot, the parts assembled) against raw FAISS `search` on the same queries, the two
interleaved round by round; recall@10 against exact search on a sample, total minutes and peak RSS.

    python tests/bench/bench_batch.py [--items 1000000] [--dim 64] [--index auto]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch.backends import LocalBackend  # noqa: E402
from batch.precompute import Staged, forget, partitions, precompute_part, staged_models  # noqa: E402
from batch.train import build_index, index_spec  # noqa: E402
from common import peak_rss_mb, write_result  # noqa: E402
from serving.models.recommender import ModelBundle, ann_recall  # noqa: E402
from serving.models.vectors import normalise  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.store import Store  # noqa: E402


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)]
    x += 0.8 * rng.normal(size=(n, d)).astype(np.float32)
    return normalise(x)


def item_only_bundle(vecs: np.ndarray, index, meta: dict | None = None) -> ModelBundle:
    """A bundle with items only (no users) around an index built already over ``vecs``: what
    similar-items precompute needs."""
    n = vecs.shape[0]

    def prebuilt(group_vecs):
        if len(group_vecs) != n:  # the index holds one row per distinct vector
            raise ValueError("item_only_bundle needs distinct vectors")
        return index, dict(meta or {})
    # unit vectors (clustered() normalises): cosine, so the prebuilt index needs no padding coordinate
    return ModelBundle.from_vectors(np.arange(1, n + 1, dtype=np.int64), vecs, prebuilt, meta={"metric": "cosine"})


def run(items: int, dim: int, index: str, k: int = 10, recall_queries: int = 1000, out_dir=None) -> dict:
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the batch side gets every core
    settings = load_settings(env={}).replace(train__index=index)
    t0 = time.perf_counter()
    vecs = clustered(items, dim, clusters=max(10, items // 500))
    t_data = time.perf_counter() - t0

    t1 = time.perf_counter()
    spec = index_spec(items, settings)
    idx, params = build_index(vecs, spec, settings)
    bundle = item_only_bundle(vecs, idx, {"index": spec, "search_params": params})
    t_build = time.perf_counter() - t1

    # The job's own precompute (batch.precompute over the local backend, from a staged snapshot, then
    # assembled) and raw FAISS searches of the same queries, interleaved a round at a time, so that
    # whatever else the machine does weighs on both alike.
    size = settings["batch.batch_size"]
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        store = Store(Path(work) / "store")
        writer = store.begin()
        bundle.save(writer.model_folder("recommender"))
        staged = Staged(store.url, writer.id, {"recommender": {"kind": "recommender", "version": "bench", "k_max": k}})
        parts = list(partitions("recommender", "similar_items", [bundle.item_ids], size, k))
        local, t_job, t_raw, per_round = LocalBackend(), 0.0, 0.0, 16
        staged_models(staged)  # loading the staged model is part of a run's staging, not its precompute
        for first in range(0, len(parts), per_round):
            chunk = parts[first:first + per_round]
            t2 = time.perf_counter()
            local.map(precompute_part, staged, chunk)
            t_job += time.perf_counter() - t2
            t3 = time.perf_counter()
            for part in chunk:
                start = part.number * size
                idx.search(vecs[start:start + size], k + 1)
            t_raw += time.perf_counter() - t3
        t2 = time.perf_counter()
        table = writer.read_parts("recommender", "similar_items")
        staged_models(staged)["recommender"].assemble("similar_items", table, writer.model_folder("recommender"), k)
        t_job += time.perf_counter() - t2
        assert table.num_rows == items
        forget(staged)
        writer.abort()

    rng = np.random.default_rng(1)
    recall = ann_recall(bundle, rng.choice(items, size=min(recall_queries, items), replace=False), k)
    result = {
        "items": items, "dim": dim, "k": k, "index": spec, "search_params": params,
        "job_queries_per_s": items / t_job, "raw_faiss_queries_per_s": items / t_raw,
        "job_vs_raw": (items / t_job) / (items / t_raw),
        "recall_at_10": recall, "recall_queries": min(recall_queries, items),
        "seconds": {"data": t_data, "build_index": t_build, "precompute": t_job, "raw_search": t_raw},
        "job_minutes": (t_build + t_job) / 60.0,
        "peak_rss_mb": peak_rss_mb(),
        "targets": {"job_vs_raw": ">= 0.8", "recall_at_10": ">= 0.95", "job_minutes": "<= 3",
                    "peak_rss_mb": "<= 3072"},
    }
    print(f"{'':24}{'job':>12}{'raw faiss':>12}")
    print(f"{'queries/s':24}{result['job_queries_per_s']:12.0f}{result['raw_faiss_queries_per_s']:12.0f}"
          f"   ratio {result['job_vs_raw']:.2f} (target >= 0.8)")
    print(f"recall@10 vs exact ({result['recall_queries']} queries): {recall:.4f} (target >= 0.95)")
    print(f"index {spec} {params}; build {t_build:.1f}s + precompute {t_job:.1f}s = "
          f"{result['job_minutes']:.2f} min (target <= 3); peak RSS {result['peak_rss_mb']:.0f} MB (target <= 3072)")
    write_result("batch_similar_items", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--index", default="auto")
    a = ap.parse_args()
    run(a.items, a.dim, a.index)
