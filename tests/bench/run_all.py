"""`make bench`: every benchmark under tests/bench/, one JSON each, then a summary table.

    python tests/bench/run_all.py [--quick]      (--quick: small sizes, to check the pipeline)
    python tests/bench/run_all.py --only server   (only the named benchmarks, e.g. server,modes)

Writes tests/bench/results/<benchmark>.json, summary.md (the table the README quotes) and the
plots of the serving-modes benchmark (latency_cdf.png, hit_rate_after_deploy.png, coverage_curve.png).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import bench_api  # noqa: E402
import bench_batch  # noqa: E402
import bench_dask  # noqa: E402
import bench_fleet  # noqa: E402
import bench_front  # noqa: E402
import bench_models  # noqa: E402
import bench_modes  # noqa: E402
import bench_quality  # noqa: E402
import bench_search  # noqa: E402
import bench_s3_publish  # noqa: E402
import bench_server  # noqa: E402
import bench_snapshot  # noqa: E402
import bench_swaps  # noqa: E402
from common import RESULTS, machine  # noqa: E402


def _row(name, measured, target, ok):
    return f"| {name} | {measured} | {target} | {'yes' if ok else '**no**'} |"


def summary(results_dir: Path = RESULTS) -> str:
    def load(name):
        path = results_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    rows = []
    b = load("batch_similar_items")
    if b:
        rows += [_row(f"batch: job vs raw FAISS queries/s ({b['items']:,} items, {b['index']})",
                      f"{b['job_vs_raw']:.2f}x", ">= 0.8x", b["job_vs_raw"] >= 0.8),
                 _row("batch: recall@10 vs exact", f"{b['recall_at_10']:.3f}", ">= 0.95", b["recall_at_10"] >= 0.95),
                 _row("batch: total minutes", f"{b['job_minutes']:.2f}", "<= 3", b["job_minutes"] <= 3),
                 _row("batch: peak RSS", f"{b['peak_rss_mb']:,.0f} MB", "<= 3,072 MB", b["peak_rss_mb"] <= 3072)]
    dk = load("batch_dask")
    if dk:
        rows.append(_row(f"batch: Dask backend, {dk['dask']['workers']} local workers, vs local backend precompute "
                         f"queries/s ({dk['items']:,} items; same rows: {'yes' if dk['same_rows_bit_for_bit'] else 'no'})",
                         f"{dk['dask_vs_local']:.2f}x", ">= 0.8x", dk["dask_vs_local"] >= 0.8))
    a = load("api_latency")
    if a:
        rows += [_row(f"API: hit path vs minimal Flask route, req/s at 16 ({a['items']:,} items)",
                      f"{a['hit_vs_minimal_rps']:.2f}x ({a['hit_no_cors_vs_minimal_rps']:.2f}x CORS off)", ">= 0.8x",
                      a["hit_vs_minimal_rps"] >= 0.8),
                 _row("API: hit path p99 at 1 connection", f"{a['hybrid_1']['p99_ms']:.2f} ms", "<= 1.2 ms",
                      a["hybrid_1"]["p99_ms"] <= 1.2),
                 _row("API: live similar items p99", f"{a['live_similar_1']['p99_ms']:.2f} ms", "<= 2 ms",
                      a["live_similar_1"]["p99_ms"] <= 2),
                 _row("API: live user recommendations p99", f"{a['live_user_recs_1']['p99_ms']:.2f} ms", "<= 10 ms",
                      a["live_user_recs_1"]["p99_ms"] <= 10)]
    for name in ("serving_modes", "serving_modes_coverage_099", "serving_modes_random_order"):
        m = load(name)
        if not m:
            continue
        h = m["modes"]["hybrid"]
        what = (f"coverage {m.get('coverage_target', 0.95)}, requests follow "
                + ("interactions" if m.get("request_popularity_order", "random") == "interactions" else "nothing"))
        per_round = m.get("hybrid_vs_live_only_rps_per_round", [])
        spread = f" (rounds {min(per_round):.1f}-{max(per_round):.1f}x)" if len(per_round) > 1 else ""
        if "hybrid_vs_live_only_cpu" in m:  # the load-robust view beside it; met when both views show it
            c = m["hybrid_vs_live_only_cpu_per_round"]
            spread += (f"; by CPU per request {m['hybrid_vs_live_only_cpu']:.1f}x"
                       + (f" (rounds {min(c):.1f}-{max(c):.1f}x)" if len(c) > 1 else ""))
        # issue 14 set 6x (aim 8x) on the main trace; its variants keep the earlier 5x
        goal, goal_text = (6, ">= 6x (aim 8x)") if name == "serving_modes" else (5, ">= 5x")
        rows += [_row(f"modes ({what}): hybrid vs live-only req/s, median of {m.get('rounds', 1)} rounds",
                      f"{m['hybrid_vs_live_only_rps']:.1f}x{spread}", goal_text,
                      m["hybrid_vs_live_only_rps"] >= goal and m.get("hybrid_vs_live_only_cpu", goal) >= goal),
                 _row(f"modes ({what}): first 1,000 requests after deploy from the snapshot",
                      f"{h['first_1000_from_snapshot']:.3f} (ttl-cache "
                      f"{m['modes']['ttl-cache']['first_1000_from_snapshot']:.3f})", ">= 0.9",
                      h["first_1000_from_snapshot"] >= 0.9)]
        if "ceiling_vs_live_only_rps" in m:
            rows.append(f"| modes ({what}): ceiling, every request a snapshot hit, vs live-only req/s | "
                        f"{m['ceiling_vs_live_only_rps']:.1f}x | (the most any hit rate can give) | - |")
    f = load("fleet_shared_cache")
    if f:
        rows.append(_row(f"fleet: {f['replicas']} replicas, live computations per distinct missed key of the "
                         f"serving-modes trace, with the shared Redis tier (without: "
                         f"{f['local_computations_per_missed_key']:.2f}x)",
                         f"{f['shared_computations_per_missed_key']:.3f}x", "<= 1.05x",
                         f["shared_computations_per_missed_key"] <= 1.05))
    sw = load("fleet_swaps")
    if sw:
        t = sw["time_to_move_s"]
        moved = (f"CURRENT moved -> every replica serving it: {t['min']:.1f}-{t['max']:.1f} s"
                 if t["min"] is not None else "no replica moved")
        rows.append(_row(f"fleet: failed requests across {len(sw['swaps'])} snapshot swaps under load on S3 "
                         f"({sw['replicas']} replicas, {sw['requests']:,} requests; {moved} at reload_interval_s "
                         f"{sw['reload_interval_s']})",
                         f"{sw['failed']}", "0", sw["failed"] == 0 and sw["every_replica_moved_every_time"]
                         and len(sw["swaps"]) >= 3))
    md = load("models")
    if md:
        lv, g = md["live"], md["grid"]
        rows += [_row("models: precomputed model prediction vs precomputed similar items, req/s at 16",
                      f"{md['model_vs_similar_rps']:.2f}x", ">= 0.9x", md["model_vs_similar_rps"] >= 0.9),
                 _row("models: live answer above the model's own one-row predict (p50)",
                      f"+{lv['live_overhead_ms']:.3f} ms (the predict itself: "
                      f"{lv['model_predict_one_row_p50_ms']:.1f} ms" + (
                          f"; not the target: {lv['live_overhead_above_frame_and_predict_ms']:+.3f} ms above "
                          "building the one-row DataFrame by hand and predicting"
                          if "live_overhead_above_frame_and_predict_ms" in lv else "") + ")",
                      "<= 0.2 ms", lv["live_overhead_ms"] <= 0.2),
                 _row(f"models: grid precompute vs the model's batch predict ({g['grid_rows']:,} rows)",
                      f"{g['grid_vs_model_predict']:.2f}x", ">= 0.8x", g["grid_vs_model_predict"] >= 0.8)]
    v = load("server")
    if v:
        def spread(key):
            rounds_ = v.get(key + "_per_round", [])
            out = f" (rounds {min(rounds_):.2f}-{max(rounds_):.2f}x)" if len(rounds_) > 1 else ""
            cpu = key.replace("_rps", "_cpu")
            if cpu in v:  # the load-robust view beside it; a target is met when both views show it
                c = v[cpu + "_per_round"]
                out += f"; by CPU per request {v[cpu]:.2f}x (rounds {min(c):.2f}-{max(c):.2f}x)"
            return out

        def both(key, goal):  # met only when req/s and, where measured, CPU per request both show it
            return v[key + "_rps"] >= goal and v.get(key + "_cpu", goal) >= goal
        if "granian_vs_nginx_rps" in v:
            rows.append(_row(f"server: granian hits vs nginx serving the same bytes statically, req/s at 16 "
                             f"({v['granian']['at_16']['requests_per_s']:,.0f} vs {v['nginx']['at_16']['requests_per_s']:,.0f})",
                             f"{v['granian_vs_nginx_rps']:.2f}x" + spread("granian_vs_nginx_rps"), ">= 0.4x (aim 0.5x)", both("granian_vs_nginx", 0.4)))
        if "granian_vs_fastapi_redis_rps" in v:
            rows.append(_row(f"server: granian hits vs FastAPI + uvicorn + Redis cache, req/s at 16 "
                             f"({v['fastapi_redis']['at_16']['requests_per_s']:,.0f})",
                             f"{v['granian_vs_fastapi_redis_rps']:.1f}x" + spread("granian_vs_fastapi_redis_rps"), ">= 10x", both("granian_vs_fastapi_redis", 10)))
        if "granian_floor_vs_fastapi_redis_rps" in v:  # the limits of this machine for that target
            rows.append("| server: the most a server shows vs FastAPI + Redis here, req/s at 16: nginx static; granian "
                        "with an app that only looks the bytes up (its floor) | "
                        f"{v['nginx_vs_fastapi_redis_rps']:.1f}x; {v['granian_floor_vs_fastapi_redis_rps']:.1f}x "
                        f"(by CPU per request {v['nginx_vs_fastapi_redis_cpu']:.1f}x; "
                        f"{v['granian_floor_vs_fastapi_redis_cpu']:.1f}x); the app on granian does "
                        f"{v['granian_vs_granian_floor_rps']:.2f}x its floor's req/s | (the limit under the 10x) | - |")
        if "granian_vs_gunicorn_loop_rps" in v:
            rows += [_row(f"server: granian hits vs the former gunicorn loop worker, req/s at 16 "
                          f"({v['gunicorn_loop']['at_16']['requests_per_s']:,.0f})",
                          f"{v['granian_vs_gunicorn_loop_rps']:.1f}x" + spread("granian_vs_gunicorn_loop_rps"), "(chosen on it)", v["granian_vs_gunicorn_loop_rps"] >= 1),
                     _row("server: one connection's hit p99, granian vs loop worker",
                          f"{v['granian_p99_1_ms']:.2f} ms vs {v['gunicorn_loop_p99_1_ms']:.2f} ms", "not worse",
                          v["granian_p99_1_ms"] <= v["gunicorn_loop_p99_1_ms"])]
        if "granian_vs_granian_1thread_rps" in v:  # what the pool of app threads costs the hits
            rows.append("| server: granian hits with the default 8 app threads per worker vs 1 "
                        "(serving.blocking_threads), req/s at 16 | "
                        f"{v['granian_vs_granian_1thread_rps']:.2f}x" + spread("granian_vs_granian_1thread_rps") +
                        " | (the cost of not stalling on a slow model) | - |")
        rows.append(_row("server: hits at 16 with 50 trickling + 50 half-sent connections open: p99, failed or reset",
                         f"{v['slow_clients_granian_p99_ms']:.2f} ms, {v['slow_clients_granian_failed']}",
                         "< 50 ms, 0", v["slow_clients_granian_p99_ms"] < 50 and v["slow_clients_granian_failed"] == 0))
    fr = load("front")
    if fr:
        per_round = fr["front_vs_static_rps_per_round"]
        rows.append(_row(f"front: hits through config/nginx.conf's proxy_cache vs nginx serving the same bytes "
                         f"statically, req/s at 16 ({fr['front']['at_16']['requests_per_s']:,.0f} vs "
                         f"{fr['static']['at_16']['requests_per_s']:,.0f})",
                         f"{fr['front_vs_static_rps']:.2f}x (rounds {min(per_round):.2f}-{max(per_round):.2f}x; "
                         f"by CPU per request {fr['front_vs_static_cpu']:.2f}x)", ">= 0.8x",
                         fr["front_vs_static_rps"] >= 0.8))
    se = load("item_search")
    if se:
        rows.append(_row(f"search as you type through the server, p99 ({se['items']:,} items; GET /v1/items/<id> "
                         f"{se['item_by_id']['p99_ms']:.2f} ms)", f"{se['search']['p99_ms']:.2f} ms", "<= 50 ms",
                         se["search"]["p99_ms"] <= 50))
    s = load("snapshot_load_memory")
    if s:
        rows += [_row(f"snapshot load ({s['items']:,} items, {s['snapshot_mb']:,.0f} MB), fresh worker",
                      f"{s['load_s']['first_load_s']:.2f} s", "<= 2 s", s["load_s"]["first_load_s"] <= 2),
                 _row("memory added per extra server worker (PSS)",
                      f"{s['extra_worker_mb']:,.0f} MB = {s['extra_worker_share_of_snapshot']:.0%} of the snapshot",
                      "<= 25%", s["extra_worker_share_of_snapshot"] <= 0.25)]
    p = load("s3_publish")
    if p:
        rows.append(_row(f"publish a {p['items']:,}-item snapshot ({p['snapshot_mb']:,.0f} MB) to the S3 emulator vs "
                         f"local disk (a raw put of the same bytes: {p['emulator_share_of_s3']:.0%} of the S3 time)",
                         f"{p['s3_vs_disk']:.2f}x ({p['s3_s']:.1f} s vs {p['disk_s']:.1f} s)", "<= 3x",
                         p["s3_vs_disk"] <= 3))
    q = load("recommender_quality")
    if q:
        rk, rt, sim = q["ranking"], q["rating"], q["similar_items"]
        rows += [_row("quality, MovieLens 100K: recall@10 vs most-popular (per-user temporal split)",
                      f"{rk['recall_at_10_vs_most_popular']:.2f}x ({rk['model']['recall_at_10']:.3f} vs "
                      f"{rk['most_popular']['recall_at_10']:.3f})", ">= 1.5x", rk["recall_at_10_vs_most_popular"] >= 1.5),
                 _row("quality, MovieLens 100K: NDCG@10 vs most-popular",
                      f"{rk['ndcg_at_10_vs_most_popular']:.2f}x ({rk['model']['ndcg_at_10']:.3f} vs "
                      f"{rk['most_popular']['ndcg_at_10']:.3f})", ">= 1.5x", rk["ndcg_at_10_vs_most_popular"] >= 1.5),
                 *[_row(f"quality, MovieLens 100K: {label}@10 vs EASE (lambda 250)",
                        f"{rk[f'{m}_vs_ease']:.3f}x ({rk['model'][m]:.3f} vs {rk['ease'][m]:.3f})", ">= 1.0x (aim 1.05x)",
                        rk[f"{m}_vs_ease"] >= 1.0)
                   for label, m in (("recall", "recall_at_10"), ("NDCG", "ndcg_at_10")) if f"{m}_vs_ease" in rk],
                 _row("quality, MovieLens 100K: 5-fold RMSE (bias baseline)",
                      f"{rt['model']['rmse']:.4f} ({rt['bias']['rmse']:.4f})", "<= 0.93", rt["model"]["rmse"] <= 0.93),
                 _row("quality, MovieLens 100K: famous movies' top-10 similar items with < 20 ratings",
                      f"{sim['rare_neighbours']} of {sim['neighbours']}", "0", sim["rare_neighbours"] == 0)]
    mach = machine()
    head = (f"Machine: {mach['cores']} cores, Python {mach['python']}, "
            + ", ".join(f"{k} {v}" for k, v in mach["packages"].items()) + "\n\n"
            "| measure | result | target | met |\n| --- | --- | --- | --- |")
    text = head + "\n" + "\n".join(rows) + "\n"
    (results_dir / "summary.md").write_text(text)
    return text


# What --only NAME runs: one entry a line, so a bench added is a line added.
PARTS = {
    "batch": lambda: bench_batch.run(1_000_000, 64, "auto"),
    "dask": lambda: bench_dask.run(),
    "api": lambda: bench_api.run(),
    "server": lambda: bench_server.run(),
    "front": lambda: bench_front.run(),
    "fleet": lambda: bench_fleet.run(),
    "swaps": lambda: bench_swaps.run(),
    "modes": lambda: bench_modes.run(rounds=5),
    "snapshot": lambda: bench_snapshot.run(),
    "s3": lambda: bench_s3_publish.run(),
    "quality": lambda: bench_quality.run(),
    "models": lambda: bench_models.run(),
    "search": lambda: bench_search.run(),
}


def main(quick: bool = False, only: str = "") -> None:
    if only:  # e.g. "server" or "server,modes": the named parts of the full run, then the summary
        for name in only.split(","):
            PARTS[name]()
        print(summary())
        return
    if quick:  # small sizes, into results/quick/ so the real results stay as they are
        out = RESULTS / "quick"
        work = HERE / ".work" / "quick"
        bench_batch.run(items=20_000, dim=32, index="auto", out_dir=out)
        bench_dask.run(items=20_000, dim=32, out_dir=out)
        bench_api.run(items=3000, users=1000, interactions=30_000, seconds=2, rounds=1, workdir=work, out_dir=out)
        bench_modes.run(items=3000, users=1000, interactions=30_000, requests=3000, workdir=work, out_dir=out,
                        rounds=2)
        bench_snapshot.run(items=20_000, workers=2, workdir=work / "snapshot", out_dir=out)
        bench_front.run(items=3000, users=1000, interactions=30_000, seconds=2, rounds=1, workdir=work, out_dir=out,
                        n_paths=300)
        bench_s3_publish.run(items=20_000, rounds=1, workdir=work / "s3_publish", out_dir=out)
        bench_quality.run(out_dir=out, folds=2)
        bench_models.run(items=3000, users=1000, interactions=30_000, seconds=2, rounds=1, workdir=work / "models",
                         out_dir=out, live_n=300, grid_steps=101)
        bench_search.run(items=3000, users=1000, interactions=30_000, titles_typed=30, workdir=work / "search",
                         out_dir=out)
        print(summary(out))
        return
    bench_batch.run(1_000_000, 64, "auto")
    bench_dask.run()
    bench_api.run()
    bench_server.run()
    bench_front.run()
    bench_modes.run(rounds=5)  # the main comparison: five rounds, as the hybrid replay is the noisiest figure
    bench_modes.run(coverage=0.99, name="serving_modes_coverage_099", plots=False)
    bench_modes.run(order="random", name="serving_modes_random_order", plots=False)
    bench_fleet.run()
    bench_swaps.run()
    bench_snapshot.run()
    bench_s3_publish.run()
    bench_quality.run()
    bench_models.run()
    bench_search.run()
    print(summary())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated: " + ", ".join(PARTS))
    a = ap.parse_args()
    main(a.quick, a.only)
