"""The SQL deadline holds whatever blocks: only regular files are read, and only the tables the
views need (a FIFO planted in the store, model artifacts read with read_blob)."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from batch.catalog import query
from conftest import REPO
from serving.errors import HybridServeError
from serving.store import Store


def _sql(cfg, sql: str) -> subprocess.CompletedProcess:
    """``batch sql`` in its own process, so that a hang fails this test instead of stalling the suite."""
    return subprocess.run([sys.executable, "-m", "batch", "--config", str(cfg), "sql", "--time-limit-ms", "5000",
                           sql], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_fifo_planted_in_the_store_blocks_nothing(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    rows = sum(pq.read_metadata(p).num_rows for p in store.segments())
    os.mkfifo(store.requests_dir / "seg-planted.parquet")            # a segment that never ends
    table = store.table_path(first.snapshot_id, "items")
    os.replace(table, table.with_name("items.real"))
    os.mkfifo(table)                                                 # a table that never ends
    done = _sql(cfg, "SELECT count(*) FROM requests")
    assert done.returncode == 0 and f"| {rows}" in done.stdout, done.stderr
    done = _sql(cfg, "SELECT count(*) FROM items")
    assert done.returncode == 1 and done.stderr.startswith("error: sql: refused") and done.stderr.count("\n") == 1
    done = _sql(cfg, f"SELECT * FROM read_parquet('{store.requests_dir}/seg-planted.parquet')")
    assert done.returncode == 1 and "refused" in done.stderr


def test_model_artifacts_are_not_readable(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    folder = store.model_dir(first.snapshot_id)
    artifacts = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert artifacts  # the FAISS index, the vectors, the seen items
    for path in artifacts[:3]:
        with pytest.raises(HybridServeError, match="refused"):
            query(store, f"SELECT size FROM read_blob('{path}')")
    with pytest.raises(HybridServeError, match="refused"):
        query(store, f"SELECT * FROM glob('{store.snapshots_dir}/**')")
    # the tables themselves read as ever
    n = pq.read_metadata(store.table_path(first.snapshot_id, "similar_items")).num_rows
    assert query(store, "SELECT count(*) FROM similar_items")[1] == [(n,)]
