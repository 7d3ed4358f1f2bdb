"""How far the built-in trainer fits in one machine's memory: peak RSS of `python -m batch train`
(evaluation on the hold-out, PureSVD vectors, the FAISS index, the ALS rating model, the save) against
the catalogue and interaction count, on the seeded generator's samples.

Each size: the sample is generated and written in one process, then a fresh process trains on it;
its peak RSS is that process's own (wait4), so one size never inherits another's.

    python tests/bench/bench_train_memory.py [--sizes 20000x5000x1000000,...]   (users x items x interactions)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZES = ((5_000, 3_000, 300_000), (20_000, 10_000, 1_000_000), (60_000, 30_000, 3_000_000))


def _child(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process, which must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def run(sizes=SIZES, out_dir=None) -> dict:
    rows = []
    load_start = list(os.getloadavg())
    for users, items, interactions in sizes:
        with tempfile.TemporaryDirectory() as work:
            env = {**os.environ, "HYBRIDSERVE_PATHS_STORE": f"{work}/store", "HYBRIDSERVE_PATHS_INPUTS": f"{work}/in",
                   "HYBRIDSERVE_SAMPLE_USERS": str(users), "HYBRIDSERVE_SAMPLE_ITEMS": str(items),
                   "HYBRIDSERVE_SAMPLE_INTERACTIONS": str(interactions)}
            env.pop("HYBRIDSERVE_CONFIG", None)  # the defaults: what `python -m batch train` trains with
            # The generator alone (generate-sample also fits the demand model, which training never reads).
            gen_s, gen_mb = _child([sys.executable, "-c", "from batch.inputs import generate_sample, write_inputs; "
                                    f"write_inputs({work + '/in'!r}, *generate_sample({users}, {items}, {interactions}))"],
                                   env)
            train_s, train_mb = _child([sys.executable, "-m", "batch", "train"], env)
            inputs_mb = sum(p.stat().st_size for p in Path(work, "in").glob("*.parquet")) / 2**20
        row = {"users": users, "items": items, "interactions": interactions, "train_peak_rss_mb": train_mb,
               "train_seconds": train_s, "generate_peak_rss_mb": gen_mb, "inputs_parquet_mb": inputs_mb,
               "bytes_per_interaction": train_mb * 2**20 / interactions}
        rows.append(row)
        print(f"{users:>9,} users {items:>8,} items {interactions:>11,} interactions: train peak RSS "
              f"{train_mb:8,.0f} MB in {train_s:6.1f} s ({row['bytes_per_interaction']:.0f} B per interaction)",
              flush=True)
        # Written after each size: the largest sizes take long, and a run stopped there keeps the rest.
        result = {"sizes": rows, "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                  "command": "python tests/bench/bench_train_memory.py"}
        write_result("train_memory", result, out_dir)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="", help="users x items x interactions, comma-separated")
    a = ap.parse_args()
    run(tuple(tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")) if a.sizes else SIZES)
