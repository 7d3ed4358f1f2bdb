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
    assert len(r["hybrid_vs_live_only_cpu_per_round"]) == 2 and r["ceiling_vs_live_only_cpu"] >= 0
    assert all(m["cpu_us_per_request"] >= 0 and len(m["rounds_cpu_us_per_request"]) == 2 for m in r["modes"].values())
    for mode, m in r["modes"].items():
        assert m["answered"] == 400 and m["errors"] == 0, mode
        assert m["requests_per_s"] > 0 and m["app_latency_ms"]["p50"] <= m["app_latency_ms"]["p99"]
    assert r["modes"]["live-only"]["hit_rate"] == 0 and r["modes"]["live-only"]["no_live_compute_rate"] == 0
    assert set(r["modes"]["live-only"]["per_source"]) == {"live"}
    assert r["modes"]["ttl-cache"]["hit_rate"] == 0 and "cache" in r["modes"]["ttl-cache"]["per_source"]
    assert r["modes"]["hybrid"]["hit_rate"] > 0.5
    assert r["modes"]["live-only"]["live_compute_cpu_s"] > r["modes"]["hybrid"]["live_compute_cpu_s"]
    assert r["coverage_curve"]["items"]["covered"][-1] == 1.0
    sessions = r["modes"]["hybrid"]["per_endpoint"].get("session", {}).get("precomputed", 0)
    assert r["all_hits"]["paths"] == round(r["modes"]["hybrid"]["hit_rate"] * 400) - sessions
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


def test_summary_reports_recommender_quality(tmp_path):
    import run_all
    (tmp_path / "recommender_quality.json").write_text(json.dumps({
        "ranking": {"model": {"recall_at_10": 0.11, "ndcg_at_10": 0.15}, "most_popular": {"recall_at_10": 0.05,
                    "ndcg_at_10": 0.11}, "recall_at_10_vs_most_popular": 2.2, "ndcg_at_10_vs_most_popular": 15 / 11},
        "rating": {"model": {"rmse": 0.95}, "bias": {"rmse": 0.94}},
        "similar_items": {"rare_neighbours": 0, "neighbours": 50}}))
    text = run_all.summary(tmp_path)
    assert "| 2.20x (0.110 vs 0.050) | >= 1.5x | yes |" in text
    assert "| 1.36x (0.150 vs 0.110) | >= 1.5x | **no** |" in text
    assert "| 0.9500 (0.9400) | <= 0.93 | **no** |" in text
    assert "| 0 of 50 | 0 | yes |" in text


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
    """The server benchmark end to end on a tiny catalogue, granian (8 app threads and 1) and its floor
    (nginx, Redis and the former gunicorn worker come with make bench), Python load generator: slow
    clients stall nothing."""
    import bench_server
    names = ("granian", "granian_floor", "granian_1thread")
    r = bench_server.run(seconds=0.5, rounds=1, loadgen="python", workdir=tmp_path / "work", out_dir=tmp_path,
                         servers=names, n_paths=50, config=workspace[2])
    saved = json.loads((tmp_path / "server.json").read_text())
    assert saved["servers"] == list(names) and saved["paths"] == 50
    assert saved["body_bytes_median"] > 100
    for name in names:  # the floor answered the same bytes (checked at start) under load
        for key in ("at_16", "at_1"):
            assert r[name][key]["requests"] > 0 and r[name][key]["non_2xx"] == 0
            assert r[name][key]["cpu_us_per_request"] >= 0
    assert r["granian_vs_granian_floor_rps"] > 0 and r["granian_vs_granian_1thread_cpu"] > 0
    slow = r["slow_clients"]["granian"]
    assert slow["at_16"]["requests"] > 0 and r["slow_clients_granian_failed"] == 0
    assert slow["trickling_dropped_by_server"] == 0  # 0.5 s runs: well inside the header timeout


def test_cpu_per_request_counts_the_whole_process_tree(tmp_path):
    """bench/cpu.py finds a server's descendants and counts their CPU time (not the wall time)."""
    import subprocess
    import sys
    import time

    from cpu import cpu_s, measured, tree

    go = tmp_path / "go"
    burn = (f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(60)\n")
    # a parent that sleeps, a child that burns 0.4 s of CPU when told, then sleeps
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(60)\n"])
    try:
        deadline = time.monotonic() + 30
        while len(tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = tree(parent.pid)
        assert pids[0] == parent.pid and len(pids) == 2
        before = cpu_s(pids)
        assert before < 0.3  # two idle interpreters

        def load():  # what a load generator would do; the CPU burnt meanwhile is the server tree's
            go.touch()
            while cpu_s(pids) - before < 0.4 and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"requests": 4}

        res = measured(load, [parent.pid])()
        assert 0.35 <= res["server_cpu_s"] < 1.5
        assert res["requests"] == 4 and res["cpu_us_per_request"] == res["server_cpu_s"] / 4 * 1e6
        assert cpu_s([2 ** 22 + 12345]) == 0.0  # a pid that does not exist counts nothing
    finally:
        for pid in reversed(tree(parent.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait(10)


def test_summary_reports_the_fleet_ratio(tmp_path):
    import run_all
    (tmp_path / "fleet_shared_cache.json").write_text(json.dumps(
        {"replicas": 4, "shared_computations_per_missed_key": 1.0, "local_computations_per_missed_key": 1.3}))
    text = run_all.summary(tmp_path)
    assert ("| fleet: 4 replicas, live computations per distinct missed key of the serving-modes trace, with the "
            "shared Redis tier (without: 1.30x) | 1.000x | <= 1.05x | yes |") in text


def test_summary_reports_the_swaps_verdict(tmp_path):
    import run_all
    (tmp_path / "fleet_swaps.json").write_text(json.dumps(
        {"replicas": 2, "requests": 12345, "failed": 0, "reload_interval_s": 0.5, "every_replica_moved_every_time": True,
         "swaps": [{}, {}, {}], "time_to_move_s": {"min": 0.61, "max": 2.04}}))
    text = run_all.summary(tmp_path)
    assert ("| fleet: failed requests across 3 snapshot swaps under load on S3 (2 replicas, 12,345 requests; "
            "CURRENT moved -> every replica serving it: 0.6-2.0 s at reload_interval_s 0.5) | 0 | 0 | yes |") in text


def test_search_benchmark_small(tmp_path):
    """The search-as-you-type benchmark end to end on a tiny catalogue: every request answered 200."""
    import bench_search
    r = bench_search.run(items=600, users=200, interactions=6000, titles_typed=10, workdir=tmp_path / "work",
                         out_dir=tmp_path)
    saved = json.loads((tmp_path / "item_search.json").read_text())
    assert saved["items"] == 600 and set(saved["search_by_kind"]) == {"prefix", "substring", "no match"}
    assert r["search"]["requests"] == sum(k["requests"] for k in r["search_by_kind"].values()) > 100
    assert 0 < r["search"]["p50_ms"] <= r["search"]["p99_ms"] and r["item_by_id"]["requests"] == r["search"]["requests"]


def test_s3_publish_benchmark_small(tmp_path):
    """Both sides publish the same snapshot; the emulator runs in its own process."""
    import bench_s3_publish
    r = bench_s3_publish.run(items=2000, k_max=10, rounds=1, workdir=tmp_path / "work", out_dir=tmp_path)
    saved = json.loads((tmp_path / "s3_publish.json").read_text())
    assert saved["items"] == 2000 and saved["files"] == 6  # four tables, the vectors, the manifest
    assert r["disk_s"] > 0 and r["s3_s"] > 0 and r["raw_put_s"] > 0
    assert r["s3_vs_disk"] == r["s3_s"] / r["disk_s"]
