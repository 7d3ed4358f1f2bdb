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


def test_serving_modes_benchmark_small(tmp_path):
    import bench_modes
    r = bench_modes.run(items=600, users=200, interactions=6000, requests=400, concurrency=4, loadgen="python",
                        workdir=tmp_path / "work", out_dir=tmp_path, ceiling_seconds=1.0, rounds=2)
    assert set(r["modes"]) == {"live-only", "ttl-cache", "hybrid"}
    for m in r["modes"].values():  # each mode replayed twice, reported by a round it ran
        assert len(m["rounds_requests_per_s"]) == 2 and m["requests_per_s"] in m["rounds_requests_per_s"]
    assert len(r["hybrid_vs_live_only_rps_per_round"]) == 2
    for mode, m in r["modes"].items():
        assert m["answered"] == 400 and m["errors"] == 0, mode
        assert m["requests_per_s"] > 0 and m["app_latency_ms"]["p50"] <= m["app_latency_ms"]["p99"]
    assert r["modes"]["live-only"]["hit_rate"] == 0 and r["modes"]["live-only"]["no_live_compute_rate"] == 0
    assert set(r["modes"]["live-only"]["per_source"]) == {"live"}
    assert r["modes"]["ttl-cache"]["hit_rate"] == 0 and "cache" in r["modes"]["ttl-cache"]["per_source"]
    assert r["modes"]["hybrid"]["hit_rate"] > 0.5
    assert r["modes"]["live-only"]["live_compute_cpu_s"] > r["modes"]["hybrid"]["live_compute_cpu_s"]
    assert r["coverage_curve"]["items"]["covered"][-1] == 1.0
    assert r["all_hits"]["paths"] == round(r["modes"]["hybrid"]["hit_rate"] * 400)
    assert r["all_hits"]["client"]["non_2xx"] == 0 and r["ceiling_vs_live_only_rps"] > 0
    for png in ("latency_cdf.png", "hit_rate_after_deploy.png", "coverage_curve.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_snapshot_benchmark_small(tmp_path):
    import bench_snapshot
    r = bench_snapshot.run(items=3000, dim=16, k_max=10, workers=2, workdir=tmp_path / "work", out_dir=tmp_path,
                           requests=40)
    assert r["snapshot_mb"] > 0 and r["load_s"]["first_load_s"] > 0
    assert r["one_worker"]["workers"] == 1 and len(r["n_workers"]["pss_per_worker_mb"]) == 2
    assert r["extra_worker_mb"] > 0
    assert json.loads((tmp_path / "snapshot_load_memory.json").read_text())["items"] == 3000


def test_summary_table(tmp_path):
    import run_all
    (tmp_path / "batch_similar_items.json").write_text(json.dumps(
        {"items": 10, "index": "Flat", "job_vs_raw": 0.9, "recall_at_10": 1.0, "job_minutes": 0.1, "peak_rss_mb": 50}))
    text = run_all.summary(tmp_path)
    assert "| batch: job vs raw FAISS queries/s (10 items, Flat) | 0.90x | >= 0.8x | yes |" in text
    assert (tmp_path / "summary.md").read_text() == text


def test_models_benchmark_small(tmp_path):
    """The registered-model benchmark end to end on a tiny sample, with the Python load generator."""
    import bench_models
    r = bench_models.run(items=600, users=200, interactions=6000, seconds=0.5, loadgen="python",
                         workdir=tmp_path / "work", out_dir=tmp_path, rounds=1, live_n=80, grid_steps=11)
    saved = json.loads((tmp_path / "models.json").read_text())
    assert saved["model"] == "demand" and saved["loadgen"] == "python"
    for key in ("model_16", "similar_16"):
        assert r[key]["requests_per_s"] > 0 and r[key]["non_2xx"] == 0, key
    assert r["model_live_1"]["requests"] > 0 and r["model_live_1"]["non_2xx"] == 0
    assert r["live"]["live_answers_equal_to_predict"] == r["live"]["requests"] == 30
    assert r["grid"]["grid_rows"] == 18 * 7 * 11 and r["grid"]["grid_vs_model_predict"] > 0


def test_server_benchmark_small(tmp_path, workspace):
    """The server benchmark end to end on a tiny catalogue, granian only (nginx, Redis and the former
    gunicorn worker come with make bench), Python load generator: slow clients stall nothing."""
    import bench_server
    r = bench_server.run(seconds=0.5, rounds=1, loadgen="python", workdir=tmp_path / "work", out_dir=tmp_path,
                         servers=("granian",), n_paths=50, config=workspace[2])
    saved = json.loads((tmp_path / "server.json").read_text())
    assert saved["servers"] == ["granian"] and saved["paths"] == 50 and saved["body_bytes_median"] > 100
    for key in ("at_16", "at_1"):
        assert r["granian"][key]["requests"] > 0 and r["granian"][key]["non_2xx"] == 0
    slow = r["slow_clients"]["granian"]
    assert slow["at_16"]["requests"] > 0 and r["slow_clients_granian_failed"] == 0
    assert slow["trickling_dropped_by_server"] == 0  # 0.5 s runs: well inside the header timeout
