"""Tiny versions of the benchmarks: they run end to end and produce sane results (never timings)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))


@pytest.mark.parametrize("index", ["auto", "IVF64,Flat"])
def test_batch_benchmark_small(tmp_path, index):
    import bench_batch
    result = bench_batch.run(items=4000, dim=16, index=index, recall_queries=200, out_dir=tmp_path)
    saved = json.loads((tmp_path / "batch_similar_items.json").read_text())
    assert saved["items"] == 4000 and saved["machine"]["cores"] >= 1
    assert saved["index"] == ("Flat" if index == "auto" else "IVF64,Flat")
    assert 0.9 <= result["recall_at_10"] <= 1.0
    if index == "auto":
        assert result["recall_at_10"] == 1.0  # exact index
    assert result["job_queries_per_s"] > 0 and result["raw_faiss_queries_per_s"] > 0
    assert result["peak_rss_mb"] > 0


def test_api_benchmark_small(tmp_path):
    """The API benchmark end to end on a tiny catalogue, with the Python load generator."""
    import bench_api
    r = bench_api.run(items=600, users=200, interactions=6000, seconds=0.5, loadgen="python",
                      workdir=tmp_path / "work", out_dir=tmp_path, rounds=1)
    saved = json.loads((tmp_path / "api_latency.json").read_text())
    assert saved["items"] == 600 and saved["loadgen"] == "python"
    for key in ("hybrid_16", "minimal_16", "hybrid_no_cors_16", "hybrid_1", "minimal_1", "live_similar_1",
                "live_user_recs_1"):
        assert r[key]["requests"] > 0 and r[key]["non_2xx"] == 0, key
        assert 0 < r[key]["p50_ms"] <= r[key]["p99_ms"], key
    assert r["hit_vs_minimal_rps"] > 0 and r["body_bytes"] > 100
