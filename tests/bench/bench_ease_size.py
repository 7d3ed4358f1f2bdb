"""Both sides of the EASE size line (train.ease_max_items): training time and peak memory of the
recommender's vectors and index (batch.train.train_bundle, the method pinned, so no validation) with
EASE and with PureSVD, on generated catalogues below and above the line.

Each (size, method) trains in a fresh process on inputs generated once per size (2 users and 40
interactions per item, as the sample generator makes them); its peak RSS is that process's own
(wait4), and the process reports its RSS before training (the inputs read) so EASE's own share shows.

    python tests/bench/bench_ease_size.py [--items 5000,10000] [--methods ease,svd]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def child(folder: str, method: str) -> None:
    """Train once on the inputs in ``folder``; print the seconds and the RSS before training (JSON)."""
    from batch.inputs import load_inputs
    from batch.train import train_bundle
    from serving.settings import load_settings
    # the line lifted for this measurement only: a pinned 'ease' above it is refused
    settings = load_settings(env={}).replace(train__method=method, train__history_half_life=4.0,
                                             train__ease_max_items=10**9)
    inputs = load_inputs(Path(folder), settings["train.rating_min"], settings["train.rating_max"])
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    train_bundle(inputs.interactions, inputs.items, settings)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_train_mb": before_mb}))


def _run_child(args: list[str]) -> tuple[dict, float]:
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} exited {os.waitstatus_to_exitcode(status)}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024.0


def run(items=(5_000, 10_000), methods=("ease", "svd"), out_dir=None) -> dict:
    rows = []
    result: dict = {"load_average_start": list(os.getloadavg()), "rows": rows,
                    "command": "python tests/bench/bench_ease_size.py",
                    "what": "train_bundle (vectors, fold-in, tie groups, index; no validation, no rating "
                            "model), method pinned, history_half_life 4, one fresh process each"}
    for n_items in items:
        users, interactions = 2 * n_items, 40 * n_items
        with tempfile.TemporaryDirectory() as work:
            subprocess.run([sys.executable, "-c", "from batch.inputs import generate_sample, write_inputs; "
                            f"write_inputs({work!r}, *generate_sample({users}, {n_items}, {interactions}))"],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            for method in methods:
                load = os.getloadavg()[0]
                got, peak = _run_child([sys.executable, __file__, "--child", work, method])
                row = {"items": n_items, "users": users, "interactions": interactions, "method": method,
                       "train_seconds": round(got["seconds"], 1), "peak_rss_mb": round(peak),
                       "rss_before_train_mb": round(got["rss_before_train_mb"]), "load_average_1min": load,
                       "ease_matrix_mb": round(n_items * n_items * 8 / 2**20) if method == "ease" else 0}
                rows.append(row)
                print(f"{n_items:>7,} items {method:>4}: {row['train_seconds']:7.1f} s, peak RSS "
                      f"{row['peak_rss_mb']:6,} MB (before training {row['rss_before_train_mb']:,} MB; "
                      f"load {load:.1f})", flush=True)
                result["load_average_end"] = list(os.getloadavg())
                write_result("ease_size_line", result, out_dir)  # after each row: a stopped run keeps the rest
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="5000,10000")
    ap.add_argument("--methods", default="ease,svd")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
    else:
        run(tuple(int(v) for v in a.items.split(",")), tuple(a.methods.split(",")))
