"""Writing and publishing one snapshot to the S3 emulator vs to local disk, from the same computed tables.

The tables (similar items at k_max for every item, a model folder of item vectors) are computed once,
in memory, seeded; then each side writes them with the store's writer and publishes: files,
checksums, manifest, CURRENT (on S3: upload, manifest last, the conditional PUT). The emulator is
moto's S3 server in its own process (``moto_server``), so its work is not charged to the client's
GIL. Its own cost is measured beside: a raw put of the same bytes (s3fs ``put``, no store code).

    python tests/bench/bench_s3_publish.py [--items 1000000 --k-max 50 --rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from common import write_result  # noqa: E402
from serving.store import TABLE_SCHEMAS, Store, layout  # noqa: E402

WORK = HERE / ".work" / "s3_publish"


def tables(items: int, k_max: int, dim: int = 64, seed: int = 0) -> tuple[dict[str, pa.Table], np.ndarray]:
    """The contract tables and item vectors of a catalogue of ``items`` (seeded, not trained)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(items, dtype=np.int64)
    # neighbours near each item (as a real index finds): ids close by, so they compress as real lists do
    near = (ids[:, None] + rng.integers(-2000, 2000, size=(items, k_max))) % items
    scores = -np.sort(rng.random((items, k_max), dtype=np.float32), axis=1)
    offsets = np.arange(0, items * k_max + 1, k_max, dtype=np.int32)
    sim = pa.table({"item_id": ids,
                    "neighbor_ids": pa.ListArray.from_arrays(offsets, pa.array(near.ravel())),
                    "scores": pa.ListArray.from_arrays(offsets, pa.array((-scores).ravel()))},
                   schema=TABLE_SCHEMAS["similar_items"])
    genres = pa.array([["g%d" % (i % 7)] for i in range(items)], pa.list_(pa.string()))
    out = {"similar_items": sim, "user_recs": TABLE_SCHEMAS["user_recs"].empty_table(),
           "predictions": TABLE_SCHEMAS["predictions"].empty_table(),
           "items": pa.table({"item_id": ids, "title": pa.array([f"item {i}" for i in range(items)]),
                              "genres": genres}, schema=TABLE_SCHEMAS["items"])}
    return out, rng.standard_normal((items, dim), dtype=np.float32)


def publish(store: Store, data: dict[str, pa.Table], vectors: np.ndarray, k_max: int) -> float:
    """Seconds to write and publish one snapshot of ``data`` into ``store``."""
    t0 = time.perf_counter()
    writer = store.begin()
    np.save(writer.model_folder(layout.RECOMMENDER) / "vectors.npy", vectors)
    for name, table in data.items():
        writer.write_table(name, table)
    writer.publish({"k_max": k_max, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())})
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def run(items: int = 1_000_000, k_max: int = 50, rounds: int = 2, workdir: Path = WORK,
        out_dir: Path | None = None) -> dict:
    import s3fs
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    data, vectors = tables(items, k_max)
    proc, endpoint = _emulator()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "XDG_CACHE_HOME": str(workdir / "cache")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        raw = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        raw.mkdir("bench")
        local_s, s3_s, raw_s, loads = [], [], [], []
        for r in range(rounds):  # side by side, alternating
            loads.append(os.getloadavg()[0])
            local_s.append(publish(Store(workdir / f"disk-{r}"), data, vectors, k_max))
            s3_s.append(publish(Store(f"s3://bench/store-{r}"), data, vectors, k_max))
            # the emulator's own cost: the same files, put as they are (no checksums, manifest or CAS)
            folder = Store(workdir / f"disk-{r}")
            sid = folder.current_id()
            files = [p for p in folder.snapshot_dir(sid).rglob("*") if p.is_file()]
            t0 = time.perf_counter()
            raw.put([str(p) for p in files], [f"bench/raw-{r}/{p.relative_to(folder.snapshot_dir(sid))}" for p in files])
            raw_s.append(time.perf_counter() - t0)
        snapshot_mb = sum(p.stat().st_size for p in files) / 2**20
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    best = {"disk_s": min(local_s), "s3_s": min(s3_s), "raw_put_s": min(raw_s)}
    result = {
        "items": items, "k_max": k_max, "rounds": rounds, "snapshot_mb": snapshot_mb, "files": len(files),
        "load_average": loads, **best, "disk_s_per_round": local_s, "s3_s_per_round": s3_s,
        "raw_put_s_per_round": raw_s,
        "s3_vs_disk": best["s3_s"] / best["disk_s"],
        # what the store adds on S3 above putting the bytes (checksums, manifest, listing, CAS, the local copy)
        "s3_minus_raw_put_vs_disk": (best["s3_s"] - best["raw_put_s"]) / best["disk_s"],
        "emulator_share_of_s3": best["raw_put_s"] / best["s3_s"],
    }
    print(f"publish {items:,} items ({snapshot_mb:,.0f} MB, {len(files)} files), best of {rounds}, "
          f"load {max(loads):.1f}: disk {best['disk_s']:.2f} s | S3 emulator {best['s3_s']:.2f} s "
          f"({result['s3_vs_disk']:.2f}x) | raw put of the same bytes {best['raw_put_s']:.2f} s "
          f"({result['emulator_share_of_s3']:.0%} of the S3 time)")
    write_result("s3_publish", result, out_dir)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--k-max", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    run(a.items, a.k_max, a.rounds)
