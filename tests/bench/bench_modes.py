"""What hybrid serving buys: three serving modes, one run, same data, models, server settings and trace.

- live-only: every request computed live (serving.mode = "live-only");
- ttl-cache: live results cached on first request with a TTL, no snapshot answers ("ttl-cache");
- hybrid: the published snapshot, then the cache, then live ("hybrid").

"Yesterday" is a trace from the same Zipf law, written as the request log the batch job learns
from; the snapshot built from it is deployed, and each mode's server starts fresh (empty caches)
before "today's" trace is replayed once, in order, at fixed concurrency with wrk. Every mode does
that --rounds times (in a rotating order, so drift on a shared machine hits all modes alike) and
is reported by its median round. Per-request source and time in the app come from the servers'
own request log.

    python tests/bench/bench_modes.py [--requests 20000 --exponent 1.1 --concurrency 16 --rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_api import prepare  # noqa: E402
from batch.tools.demo import ApiServer, http_get  # noqa: E402
from batch.inputs import load_inputs  # noqa: E402
from batch.job import run as run_batch  # noqa: E402
from batch.popularity import coverage_curve, read_request_counts  # noqa: E402
from batch.tools.trace import make_trace, popularity_order, request_log_rows, shown_items  # noqa: E402
from common import write_result  # noqa: E402
from cpu import measured  # noqa: E402
from loadgen import LOADGENS  # noqa: E402
from serving.models.recommender import ModelBundle  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.store import REQUEST_LOG_SCHEMA, Store  # noqa: E402

MODES = ("live-only", "ttl-cache", "hybrid")
LOOKUPS = ("similar_items", "user_recs", "prediction", "session")


def _answered(text: str) -> float:
    """Lookups answered so far, from a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hybridserve_requests_total{") and any(f'endpoint="{e}"' in line for e in LOOKUPS):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _answered_from(prom_dir: Path) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    return _answered(generate_latest(registry).decode())


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _pct(values: np.ndarray, p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else float("nan")


def prepare_modes_store(items, users, interactions, requests, exponent, workdir: Path | None,
                        order: str = "interactions", coverage: float | None = None):
    """A store whose snapshot was chosen from yesterday's traffic (the bench_api dataset and model)."""
    cfg_api, settings_api, store_api = prepare(items, users, interactions, workdir)
    root = cfg_api.parent / "modes"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    store_root = root / "store"
    # Reuse the trained model: hard links, the cache key is unchanged.
    shutil.copytree(store_api.models_dir, store_root / "models", copy_function=os.link)
    cfg = root / "config.toml"
    # Request logs flush when each mode's server stops; they are read after that.
    cfg.write_text(cfg_api.read_text().replace(f'store = "{settings_api["paths.store"]}"', f'store = "{store_root}"')
                   + (f"[batch]\ncoverage = {coverage}\n" if coverage is not None else ""))
    settings = load_settings(cfg, env={})
    store = Store(store_root)
    store.ensure_layout()
    inputs = load_inputs(Path(settings["paths.inputs"]))
    bundle = ModelBundle.load(store.trained_models()[0] / "recommender")
    item_ids = np.sort(inputs.items["item_id"].to_numpy())
    users_all = bundle.user_ids
    shown = shown_items(bundle, users_all)
    # What is requested follows the interaction history loosely (lognormal noise on the counts);
    # order="random" makes them unrelated, the adversarial case.
    inter = inputs.interactions
    if order == "interactions":
        ranks = {"item_order": popularity_order(item_ids, inter["item_id"].value_counts().reindex(item_ids, fill_value=0)
                                                .to_numpy(), seed=5),
                 "user_order": popularity_order(users_all, inter["user_id"].value_counts().reindex(users_all,
                                                fill_value=0).to_numpy(), seed=6)}
    else:
        ranks = {}
    yesterday = make_trace(item_ids, users_all, requests * 5, exponent=exponent, seed=100, shown=shown, **ranks)
    rows = request_log_rows(yesterday, datetime.now(timezone.utc) - timedelta(hours=1))
    rows = rows.reindex(columns=REQUEST_LOG_SCHEMA.names)  # columns the trace has no use for (model, input): null
    pq.write_table(pa.Table.from_pandas(rows, schema=REQUEST_LOG_SCHEMA,
                                        preserve_index=False), store.requests_dir / "yesterday.parquet")
    result = run_batch(settings)
    today = make_trace(item_ids, users_all, requests, exponent=exponent, seed=101, shown=shown, **ranks)
    return cfg, settings, store, result, today


def _replay(cfg: Path, store: Store, mode: str, paths: list[str], concurrency: int, measure) -> tuple:
    """A fresh server (a deploy: empty caches) in ``mode`` answers ``paths`` once, in order.
    Returns (its request-log rows for the lookups, wrk's report, its /metrics page)."""
    before = set(store.requests_dir.glob("seg-*.parquet"))
    prom = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    server = ApiServer(cfg, env={"HYBRIDSERVE_SERVING_MODE": mode, "PROMETHEUS_MULTIPROC_DIR": str(prom)}).start()
    try:
        progress = {"count": -1.0, "since": time.monotonic()}

        def done() -> bool:
            # Read the workers' metric files directly: an HTTP poll waits behind the load. A request
            # the client lost (a closed connection, which wrk does not retry) would never be counted:
            # so also stop once the count has not moved for 3 s.
            count = _answered_from(prom)
            if count != progress["count"]:
                progress.update(count=count, since=time.monotonic())
            return count >= len(paths) or (count > 0 and time.monotonic() - progress["since"] > 3.0)

        # CPU of the server's processes over the replay: per trace request, a view the machine's load
        # moves less than requests/s (it includes the few /healthz requests wrk sends after the trace).
        client = measured(measure, [server.proc.pid])(server.base, paths, concurrency, 900, once=True, done=done)
        metrics = http_get(server.base + "/metrics")[2].decode()
    finally:
        server.stop()  # workers flush their request logs
        shutil.rmtree(prom, ignore_errors=True)
    segs = sorted(set(store.requests_dir.glob("seg-*.parquet")) - before)
    log = pd.concat([pd.read_parquet(p) for p in segs]).sort_values("ts", kind="stable").reset_index(drop=True)
    return log[log["endpoint"].isin(LOOKUPS)].reset_index(drop=True), client, metrics


def _mode_stats(log: pd.DataFrame, client: dict, metrics: str, n_trace: int) -> dict:
    lat = log["latency_us"].to_numpy() / 1000.0
    per_source = {src: {"requests": int(len(g)), "p50_ms": _pct(g["latency_us"] / 1000.0, 50),
                        "p95_ms": _pct(g["latency_us"] / 1000.0, 95), "p99_ms": _pct(g["latency_us"] / 1000.0, 99)}
                  for src, g in log.groupby("source")}
    first = log.iloc[:1000]
    span = (log["ts"].iloc[-1] - log["ts"].iloc[0]).total_seconds() if len(log) > 1 else float("nan")
    return {
        # Throughput from the server's own log (first to last answer): the client's elapsed time
        # may include the few seconds of waiting for a request wrk lost (see done()).
        "requests_per_s": len(log) / span if span and span > 0 else client["requests_per_s"],
        "cpu_us_per_request": client["server_cpu_s"] / max(len(log), 1) * 1e6,
        "client": client,
        "answered": int(len(log)), "lost_by_client": int(n_trace - len(log)),
        "errors": int((log["status"] >= 400).sum()),
        "app_latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99)},
        "per_source": per_source,
        "hit_rate": float((log["source"] == "precomputed").mean()),
        "per_endpoint": {ep: {src: int(n) for src, n in g["source"].value_counts().items()}
                         for ep, g in log.groupby("endpoint")},
        "no_live_compute_rate": float(log["source"].isin(["precomputed", "cache"]).mean()),
        "first_1000_from_snapshot": float((first["source"] == "precomputed").mean()),
        "first_1000_without_live_compute": float(first["source"].isin(["precomputed", "cache"]).mean()),
        "live_compute_cpu_s": _metric(metrics, "hybridserve_live_compute_seconds_total"),
        "first_requests_latency_ms": _bins(log.iloc[:2000], 200),
    }


def run(items: int = 100_000, users: int = 50_000, interactions: int = 1_000_000, requests: int = 20_000,
        exponent: float = 1.1, concurrency: int = 16, loadgen: str = "wrk", workdir: Path | None = None,
        out_dir: Path | None = None, plots: bool = True, order: str = "interactions",
        coverage: float | None = None, name: str = "serving_modes", ceiling_seconds: float = 5.0,
        rounds: int = 3) -> dict:
    """Each round replays the trace once per mode, each on a fresh server, the modes in a rotating
    order; a mode's figures are those of its median round by requests/s."""
    measure = LOADGENS[loadgen]
    load_start = list(os.getloadavg())
    cfg, settings, store, published, today = prepare_modes_store(items, users, interactions, requests, exponent,
                                                                 workdir, order, coverage)
    sid = published.snapshot_id
    result: dict = {"items": items, "users": users, "requests": len(today), "exponent": exponent,
                    "request_popularity_order": order, "coverage_target": settings["batch.coverage"],
                    "concurrency": concurrency, "loadgen": loadgen, "workers": settings["serving.workers"],
                    "server": "granian", "blocking_threads": settings["serving.blocking_threads"],
                    "cache_ttl_s": settings["serving.cache_ttl_s"], "snapshot": sid,
                    "snapshot_rows": published.manifest["row_counts"],
                    "expected_hit_rate": published.manifest["popularity"]["expected_hit_rate"],
                    "trace_mix": dict(pd.Series(today.endpoints).value_counts(normalize=True).round(4)),
                    "rounds": rounds, "method": "per round, each mode on a fresh server, rotating order; "
                    "per mode the median round by requests/s", "modes": {}}
    runs: dict[str, list[tuple[dict, pd.DataFrame]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            log, client, metrics = _replay(cfg, store, mode, today.paths, concurrency, measure)
            runs[mode].append((_mode_stats(log, client, metrics, len(today)), log))
    logs: dict[str, pd.DataFrame] = {}
    for mode in MODES:
        ranked = sorted(runs[mode], key=lambda run_: run_[0]["requests_per_s"])
        stats, logs[mode] = ranked[(len(ranked) - 1) // 2]
        stats["rounds_requests_per_s"] = [run_[0]["requests_per_s"] for run_ in runs[mode]]
        result["modes"][mode] = stats
    lo = result["modes"]["live-only"]["requests_per_s"]
    result["hybrid_vs_live_only_rps"] = result["modes"]["hybrid"]["requests_per_s"] / lo
    result["hybrid_vs_live_only_rps_per_round"] = [
        h[0]["requests_per_s"] / live[0]["requests_per_s"] for h, live in zip(runs["hybrid"], runs["live-only"])]
    # The same comparison by the servers' CPU per request (live-only's over hybrid's), round by round.
    result["hybrid_vs_live_only_cpu_per_round"] = [
        live[0]["cpu_us_per_request"] / h[0]["cpu_us_per_request"] for h, live in zip(runs["hybrid"], runs["live-only"])]
    result["hybrid_vs_live_only_cpu"] = float(np.median(result["hybrid_vs_live_only_cpu_per_round"]))
    for mode in MODES:
        result["modes"][mode]["rounds_cpu_us_per_request"] = [run_[0]["cpu_us_per_request"] for run_ in runs[mode]]
    # The ceiling of that ratio on this stack: the hybrid server answering only the trace's requests it
    # served from the snapshot (every request a hit), against the live-only replay of the whole trace.
    # Sessions are left out: the request log does not keep a session's items.
    hits = _paths(logs["hybrid"][logs["hybrid"]["source"] == "precomputed"])
    with ApiServer(cfg, env={"HYBRIDSERVE_SERVING_MODE": "hybrid"}) as server:
        all_hits = measured(measure, [server.proc.pid])(server.base, hits, concurrency, ceiling_seconds)
    result["all_hits"] = {"requests_per_s": all_hits["requests_per_s"], "paths": len(hits),
                          "cpu_us_per_request": all_hits["cpu_us_per_request"],
                          "seconds": ceiling_seconds, "client": all_hits}
    result["ceiling_vs_live_only_rps"] = all_hits["requests_per_s"] / result["modes"]["live-only"]["client"][
        "requests_per_s"]
    result["ceiling_vs_live_only_cpu"] = (float(np.median(result["modes"]["live-only"]["rounds_cpu_us_per_request"]))
                                          / all_hits["cpu_us_per_request"])
    result["load_average_start"], result["load_average_end"] = load_start, list(os.getloadavg())
    result["ttl_cache_vs_live_only_rps"] = result["modes"]["ttl-cache"]["requests_per_s"] / lo
    result["targets"] = {"hybrid_vs_live_only_rps": ">= 6 (aim 8)", "hybrid.first_1000_from_snapshot": ">= 0.9"}
    counts = read_request_counts(store, datetime.now(timezone.utc) - timedelta(hours=1) + timedelta(seconds=1))
    result["coverage_curve"] = _coverage_points(counts)
    _print(result)
    out = write_result(name, result, out_dir)
    if plots:
        _plots(result, logs, out.parent)
    return result


def _paths(log: pd.DataFrame) -> list[str]:
    """The request paths behind request-log rows of similar items, user recommendations and predictions."""
    out = []
    for ep, item, user, k in zip(log["endpoint"], log["item_id"], log["user_id"], log["k"]):
        if ep == "similar_items":
            out.append(f"/v1/items/{int(item)}/similar?k={int(k)}")
        elif ep == "user_recs":
            out.append(f"/v1/users/{int(user)}/recommendations?k={int(k)}")
        elif ep == "prediction":
            out.append(f"/v1/predictions?user_id={int(user)}&item_id={int(item)}")
    return out


def _bins(log: pd.DataFrame, size: int) -> list[dict]:
    out = []
    for start in range(0, len(log), size):
        part = log.iloc[start:start + size]
        lat = part["latency_us"].to_numpy() / 1000.0
        out.append({"from": start, "to": start + len(part), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                    "from_snapshot": float((part["source"] == "precomputed").mean())})
    return out


def _coverage_points(counts: pd.DataFrame) -> dict:
    """Share of yesterday's traffic covered by the top-n keys, per kind of key (a few points each)."""
    out = {}
    for kind, endpoint, col in (("items", "similar_items", "item_id"), ("users", "user_recs", "user_id")):
        w = counts.loc[counts["endpoint"] == endpoint].groupby(col)["weight"].sum().to_numpy()
        curve = coverage_curve(w)
        n = np.unique(np.geomspace(1, max(1, len(curve)), 40).astype(int))
        out[kind] = {"keys": n.tolist(), "covered": [float(curve[i - 1]) for i in n] if len(curve) else []}
    return out


def _print(r: dict) -> None:
    print(f"{'mode':<11}{'req/s':>9}{'CPU us/req':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'hit rate':>10}"
          f"{'first 1000 snap':>17}{'live CPU s':>12}")
    for mode, m in r["modes"].items():
        a = m["app_latency_ms"]
        print(f"{mode:<11}{m['requests_per_s']:>9.0f}{m['cpu_us_per_request']:>11.1f}{a['p50']:>9.3f}{a['p95']:>9.3f}{a['p99']:>9.3f}"
              f"{m['hit_rate']:>10.3f}{m['first_1000_from_snapshot']:>17.3f}{m['live_compute_cpu_s']:>12.1f}"
              f"   rounds: {', '.join(f'{x:.0f}' for x in m['rounds_requests_per_s'])}")
    print(f"every request a snapshot hit: {r['all_hits']['requests_per_s']:.0f} req/s (client), "
          f"{r['ceiling_vs_live_only_rps']:.1f}x live-only (client): the ceiling of the ratio on this stack")
    print(f"hybrid / live-only CPU per request: {r['hybrid_vs_live_only_cpu']:.1f}x (per round "
          f"{', '.join(f'{x:.1f}x' for x in r['hybrid_vs_live_only_cpu_per_round'])}); every request a hit: "
          f"{r['ceiling_vs_live_only_cpu']:.1f}x; load average at end {r['load_average_end'][0]:.1f}")
    print(f"hybrid / live-only requests/s: {r['hybrid_vs_live_only_rps']:.1f}x (target >= 6, aim 8; per round "
          f"{', '.join(f'{x:.1f}x' for x in r['hybrid_vs_live_only_rps_per_round'])}); "
          f"{r['requests']:,} requests, Zipf {r['exponent']}, {r['concurrency']} connections, {r['loadgen']}")


def _plots(r: dict, logs: dict[str, pd.DataFrame], out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, log in logs.items():
        lat = np.sort(log["latency_us"].to_numpy() / 1000.0)
        ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("time in the app per request (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF per serving mode")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, log in logs.items():
        first = log.iloc[:5000]
        served = first["source"].isin(["precomputed", "cache"]).to_numpy()
        n = np.arange(1, len(served) + 1)
        ax.plot(n, np.cumsum(served) / n, label=f"{mode}: snapshot or cache")
    hyb = logs["hybrid"].iloc[:5000]
    snap = (hyb["source"] == "precomputed").to_numpy()
    ax.plot(np.arange(1, len(snap) + 1), np.cumsum(snap) / np.arange(1, len(snap) + 1), "--",
            label="hybrid: snapshot only")
    ax.set_xlabel("requests since deploy")
    ax.set_ylabel("share answered without live computation")
    ax.set_ylim(0, 1)
    ax.set_title("Hit rate over the first requests after a deploy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "hit_rate_after_deploy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, c in r["coverage_curve"].items():
        if c["keys"]:
            ax.plot(c["keys"], c["covered"], marker=".", label=f"{kind} ({'similar items' if kind == 'items' else 'user recommendations'})")
    ax.axhline(0.95, color="grey", linestyle=":", label="coverage target 0.95")
    ax.set_xscale("log")
    ax.set_xlabel("keys precomputed (log scale)")
    ax.set_ylabel("share of traffic covered")
    ax.set_title(f"Coverage curve (Zipf {r['exponent']} traffic)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "coverage_curve.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--exponent", type=float, default=1.1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--loadgen", choices=sorted(LOADGENS), default="wrk")
    ap.add_argument("--order", choices=("interactions", "random"), default="interactions",
                    help="what is requested: follows the interaction history loosely, or unrelated to it")
    ap.add_argument("--coverage", type=float, default=None, help="batch.coverage for the snapshot (default 0.95)")
    ap.add_argument("--name", default="serving_modes", help="results file name")
    ap.add_argument("--rounds", type=int, default=3, help="replays per mode (medians)")
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.requests, a.exponent, a.concurrency, a.loadgen, order=a.order,
        coverage=a.coverage, name=a.name, plots=a.name == "serving_modes", rounds=a.rounds)
