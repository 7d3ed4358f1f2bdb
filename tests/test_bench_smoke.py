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
