"""Recommender quality on MovieLens 100K, through the commands a user runs:

    python -m batch import-movielens <ml-100k> --out <tmp>/inputs
    python -m batch --config <tmp>/config.toml evaluate --out tests/bench/results/recommender_quality.json

Both protocols (per-user temporal split recall@10 / NDCG@10 against EASE, most-popular, item bias and
item mean; 5-fold RMSE against the bias and item-mean baselines) and the similar-items support check. The data is not in the repo
(its licence forbids copying); the default path is the shared copy beside the checkout.

    python tests/bench/bench_quality.py [--data ../shared/data/ml-100k]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from common import RESULTS, machine  # noqa: E402

ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def run(data: Path = ML100K, out_dir: Path | None = None, folds: int = 5) -> dict | None:
    data = Path(data)
    if not (data / "u.data").is_file():
        print(f"recommender quality: skipped, MovieLens 100K not found at {data}", file=sys.stderr)
        return None
    out = Path(out_dir or RESULTS) / "recommender_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "config.toml"
        cfg.write_text(f'[paths]\nstore = "{tmp / "store"}"\ninputs = "{tmp / "inputs"}"\n')
        batch = [sys.executable, "-m", "batch"]
        subprocess.run(batch + ["import-movielens", str(data), "--out", str(tmp / "inputs")], cwd=REPO, check=True)
        subprocess.run(batch + ["--config", str(cfg), "evaluate", "--folds", str(folds), "--out", str(out)],
                       cwd=REPO, check=True)
    report = json.loads(out.read_text())
    report.update(benchmark="recommender_quality", data="MovieLens 100K", machine=machine(),
                  targets={"recall_at_10_vs_ease": ">= 1.0 (aim 1.05)", "ndcg_at_10_vs_ease": ">= 1.0 (aim 1.05)",
                           "recall_at_10_vs_most_popular": ">= 1.5", "ndcg_at_10_vs_most_popular": ">= 1.5",
                           "rmse": "<= 0.92", "rare_similar_neighbours": "0"})
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ML100K)
    run(ap.parse_args().data)
