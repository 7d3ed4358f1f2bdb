"""API benchmark through the server (granian), side by side in one run:

- the precomputed hit path against a minimal Flask route returning a body of the same size, on the
  same server settings: requests/s at 16 connections, p50/p99 at 1 connection;
- the live path (nothing precomputed is fresh, no cache): p50/p99 for similar items and user
  recommendations, on a catalogue of 100,000 items and 50,000 users.

    python tests/bench/bench_api.py [--items 100000 --users 50000 --interactions 1000000 --seconds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from batch.tools.demo import ApiServer, http_get  # noqa: E402
from batch.inputs import INTERACTIONS, generate_sample, write_inputs  # noqa: E402
from batch.job import run as run_batch  # noqa: E402
from common import write_result  # noqa: E402
from loadgen import LOADGENS  # noqa: E402
from serving.models.recommender import ModelBundle  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.errors import SnapshotError  # noqa: E402
from serving.store import Store  # noqa: E402

WORK = HERE / ".work"


def prepare(items: int, users: int, interactions: int, workdir: Path | None = None, dim: int = 64):
    """Inputs, a trained model and a published snapshot for this size (reused when present)."""
    workdir = Path(workdir or WORK / f"api-{items}-{users}-{interactions}")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "config.toml"
    cfg.write_text(f'[paths]\nstore = "{workdir / "store"}"\ninputs = "{workdir / "inputs"}"\n'
                   f"[sample]\nusers = {users}\nitems = {items}\ninteractions = {interactions}\n"
                   f"[train]\ndim = {dim}\n"
                   # the benchmark measures serving; keep the request log out of the loop
                   # and every row kept: past log_max_buffer the log would drop rows instead
                   f"[serving]\nlog_flush_interval_s = 0.0\nlog_flush_rows = 5000000\nlog_max_buffer = 5000000\n")
    settings = load_settings(cfg, env={})
    if not (workdir / "inputs" / INTERACTIONS).is_file():
        print(f"generating {users:,} users x {items:,} items x {interactions:,} interactions ...", file=sys.stderr)
        write_inputs(workdir / "inputs", *generate_sample(users, items, interactions, seed=11))
    store = Store(settings["paths.store"])
    if not _servable(store):
        print("training and publishing a snapshot ...", file=sys.stderr)
        run_batch(settings)
    return cfg, settings, store


def _servable(store: Store) -> bool:
    """A current snapshot this version of the code serves (a left-over from an older format is not)."""
    sid = store.current_id()
    try:
        return sid is not None and bool(store.verify(sid, checksums=False))
    except SnapshotError:
        return False


def _median_run(runs: list[dict]) -> dict:
    """Per-metric medians over repeated runs, with every run kept."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out = {k: float(np.median([r[k] for r in runs])) for k in keys}
    out["runs"] = runs
    return out


def run(items: int = 100_000, users: int = 50_000, interactions: int = 1_000_000, seconds: float = 5.0,
        loadgen: str = "wrk", workdir: Path | None = None, out_dir: Path | None = None, rounds: int = 3) -> dict:
    measure = LOADGENS[loadgen]
    cfg, settings, store = prepare(items, users, interactions, workdir)
    load_start = list(os.getloadavg())
    sid = store.current_id()
    manifest = store.read_manifest(sid)
    bundle = ModelBundle.load(store.model_dir(sid))
    rng = np.random.default_rng(0)
    hot_items = store.read_table(sid, "similar_items").column("item_id").to_numpy()
    hot_paths = [f"/v1/items/{i}/similar?k=10" for i in rng.permutation(hot_items)[:5000]]
    live_items = [f"/v1/items/{i}/similar?k=10" for i in rng.choice(bundle.item_ids, 5000)]
    live_users = [f"/v1/users/{u}/recommendations?k=10" for u in rng.choice(bundle.user_ids, 5000)]
    workers = settings["serving.workers"]
    result: dict = {"items": bundle.n_items, "users": bundle.n_users, "index": bundle.meta["index"],
                    "snapshot": sid, "workers": workers, "server": "granian", "loadgen": loadgen,
                    "k": 10, "seconds_per_run": seconds, "rounds": rounds,
                    "method": "hybrid and minimal servers run side by side; short runs alternate; medians"}

    status, _, body = 0, {}, b""
    hybrid = ApiServer(cfg).start()
    try:
        status, _, body = http_get(hybrid.base + hot_paths[0])
        if status != 200 or json.loads(body)["source"] != "precomputed":
            raise RuntimeError(f"expected a precomputed answer, got {status} {body[:200]!r}")
        result["body_bytes"] = len(body)
        body_file = Path(workdir or WORK) / "minimal-body.json"
        body_file.parent.mkdir(parents=True, exist_ok=True)
        body_file.write_bytes(body)
        minimal = ApiServer(cfg, env={"MINIMAL_BODY_FILE": str(body_file), "PYTHONPATH": str(HERE)},
                                 app="minimal_app:create_app").start()
        # The same app with CORS off (serving.cors_origins = ""), to show what CORS costs per response.
        no_cors = ApiServer(cfg, env={"HYBRIDSERVE_SERVING_CORS_ORIGINS": ""}).start()
        try:
            # The machine is shared and noisy: alternate short runs of the servers, report medians.
            runs: dict[str, list] = {"hybrid_16": [], "minimal_16": [], "hybrid_no_cors_16": [], "hybrid_1": [],
                                     "minimal_1": []}
            for _ in range(rounds):
                runs["hybrid_16"].append(measure(hybrid.base, hot_paths, 16, seconds))
                runs["minimal_16"].append(measure(minimal.base, hot_paths, 16, seconds))
                runs["hybrid_no_cors_16"].append(measure(no_cors.base, hot_paths, 16, seconds))
                runs["hybrid_1"].append(measure(hybrid.base, hot_paths, 1, seconds))
                runs["minimal_1"].append(measure(minimal.base, hot_paths, 1, seconds))
            for key, values in runs.items():
                result[key] = _median_run(values)
        finally:
            minimal.stop()
            no_cors.stop()
    finally:
        hybrid.stop()
    live_env = {"HYBRIDSERVE_SERVING_MAX_AGE_S": "0", "HYBRIDSERVE_SERVING_CACHE_TTL_S": "0"}
    with ApiServer(cfg, env=live_env) as server:
        status, _, body = http_get(server.base + live_items[0])
        if json.loads(body)["source"] != "live":
            raise RuntimeError("the live server answered from somewhere else")
        result["live_similar_1"] = _median_run([measure(server.base, live_items, 1, seconds) for _ in range(rounds)])
        result["live_user_recs_1"] = _median_run([measure(server.base, live_users, 1, seconds)
                                                  for _ in range(rounds)])

    result["hit_vs_minimal_rps"] = result["hybrid_16"]["requests_per_s"] / result["minimal_16"]["requests_per_s"]
    result["hit_no_cors_vs_minimal_rps"] = (result["hybrid_no_cors_16"]["requests_per_s"]
                                            / result["minimal_16"]["requests_per_s"])
    result["targets"] = {"hit_vs_minimal_rps": ">= 0.8", "hybrid_1.p99_ms": "<= 1.2",
                         "live_similar_1.p99_ms": "<= 2", "live_user_recs_1.p99_ms": "<= 10"}
    result["snapshot_row_counts"] = manifest["row_counts"]
    print(f"{'':34}{'req/s @16':>12}{'p50 ms @1':>12}{'p99 ms @1':>12}")
    for label, a, b in (("precomputed hit (hybridserve)", "hybrid_16", "hybrid_1"),
                        ("minimal Flask route, same body", "minimal_16", "minimal_1")):
        print(f"{label:34}{result[a]['requests_per_s']:12.0f}{result[b]['p50_ms']:12.3f}{result[b]['p99_ms']:12.3f}")
    for label, key in (("live similar items", "live_similar_1"), ("live user recommendations", "live_user_recs_1")):
        print(f"{label:34}{'':12}{result[key]['p50_ms']:12.3f}{result[key]['p99_ms']:12.3f}")
    print(f"{'precomputed hit, CORS off':34}{result['hybrid_no_cors_16']['requests_per_s']:12.0f}")
    print(f"hit path / minimal route requests/s: {result['hit_vs_minimal_rps']:.2f} (target >= 0.8); "
          f"with CORS off {result['hit_no_cors_vs_minimal_rps']:.2f}; "
          f"{result['items']:,} items, index {result['index']}, {workers} granian workers, {loadgen}")
    result["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    print("load average at start %.1f, at end %.1f" % (load_start[0], result["load_average"]["end"][0]))
    write_result("api_latency", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loadgen", choices=sorted(LOADGENS), default="wrk")
    a = ap.parse_args()
    run(a.items, a.users, a.interactions, a.seconds, a.loadgen, rounds=a.rounds)
