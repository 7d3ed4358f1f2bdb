"""The DuckDB catalog: run history and views over the stored Parquet, for people and tools.

If another process holds the catalog open, a run's record waits in the store's
pending-runs folder and is ingested, with the views refreshed, the next time.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import duckdb

from serving.store import TABLES, Store, write_atomic

LOG = logging.getLogger(__name__)

RUN_COLUMNS = ("run_id", "started_at", "ended_at", "status", "error", "snapshot_id", "model_version", "retrained",
               "row_counts", "stage_seconds", "expected_hit_rate", "observed_hit_rate")
_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, status VARCHAR, error VARCHAR,
    snapshot_id VARCHAR, model_version VARCHAR, retrained BOOLEAN, row_counts JSON, stage_seconds JSON,
    expected_hit_rate DOUBLE, observed_hit_rate DOUBLE)
"""
_SNAPSHOT_ID = r"/snapshots/(\d{8}-\d{6}-\d{6})/"


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def record_pending(store: Store, run: dict[str, Any]) -> Path:
    """Leave a run record for the next catalog update (used directly by a run that found the lock taken)."""
    store.pending_runs_dir.mkdir(parents=True, exist_ok=True)
    pending = store.pending_runs_dir / f"{run['run_id']}-{os.getpid()}.json"
    write_atomic(pending, json.dumps(run, default=str).encode())
    return pending


def record_run(store: Store, run: dict[str, Any]) -> bool:
    """Append ``run`` to the catalog and refresh its views. False (and the record kept pending)
    when another process holds the catalog."""
    pending = record_pending(store, run)
    try:
        con = duckdb.connect(str(store.catalog_path))
    except duckdb.IOException as exc:
        LOG.warning("catalog %s is held by another process (%s); run recorded in %s, catalog refreshed next run",
                    store.catalog_path, str(exc).splitlines()[0], pending)
        return False
    try:
        con.execute(_RUNS_DDL)
        ingested = sorted(store.pending_runs_dir.glob("*.json"))
        for path in ingested:
            rec = json.loads(path.read_text())
            values = [rec.get(c) for c in RUN_COLUMNS]
            for i in (8, 9):
                values[i] = json.dumps(values[i]) if values[i] is not None else None
            if rec.get("status") == "locked":  # a run that never started: keep its own id distinct
                values[0] = f"{values[0]}-locked-{path.stem.rsplit('-', 1)[-1]}"
            con.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})", values)
        _refresh_views(con, store)
    finally:
        con.close()
    for path in ingested:  # only these: a locked run may have added one meanwhile
        os.unlink(path)
    return True


def _refresh_views(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    current = store.current_id()
    retained = store.snapshot_ids()
    for table in TABLES:
        if current is not None:
            path = str(store.table_path(current, table).resolve())
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({_sql_str(path)})")
        if retained:
            con.execute(
                f"CREATE OR REPLACE VIEW all_{table} AS SELECT regexp_extract(filename, {_sql_str(_SNAPSHOT_ID)}, 1) "
                f"AS snapshot, * EXCLUDE (filename) FROM read_parquet({_sql_str(store.table_glob(table))}, "
                f"filename = true) WHERE regexp_matches(filename, {_sql_str(_SNAPSHOT_ID)})")
    _model_views(con, store, retained)
    con.execute(f"CREATE OR REPLACE VIEW requests AS SELECT * FROM read_parquet("
                f"{_sql_str(store.requests_glob())}, union_by_name = true)")
    rows = [(s["id"], s.get("created_at"), s.get("model_version"), json.dumps(s.get("rows", {})), s["current"],
             s.get("parent")) for s in store.list_snapshots()]
    con.execute("CREATE OR REPLACE TABLE snapshots (id VARCHAR, created_at TIMESTAMPTZ, model_version VARCHAR, "
                "row_counts JSON, is_current BOOLEAN, parent VARCHAR)")
    if rows:
        con.executemany("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?)", rows)


def _model_views(con: duckdb.DuckDBPyConnection, store: Store, retained: list[str]) -> None:
    """predictions_<model> (current snapshot) and all_predictions_<model> (every retained one); views
    of models no longer in any retained snapshot are dropped."""
    from batch.models import catalog_views
    manifests = {}
    for sid in retained:
        try:
            manifests[sid] = store.read_manifest(sid)
        except Exception:  # a damaged manifest: its snapshot has no model views
            continue
    views = catalog_views(store, manifests)
    wanted = {name for name, _ in views}
    for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND "
                               "(view_name LIKE 'predictions\\_%' ESCAPE '\\' OR "
                               "view_name LIKE 'all\\_predictions\\_%' ESCAPE '\\')").fetchall():
        if name not in wanted:
            con.execute(f'DROP VIEW "{name}"')
    for name, sql in views:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def refresh_views(store: Store) -> bool:
    """Refresh the views only (after a rollback); False when the catalog is held elsewhere."""
    try:
        con = duckdb.connect(str(store.catalog_path))
    except duckdb.IOException:
        LOG.warning("catalog %s is held by another process; views refresh next run", store.catalog_path)
        return False
    try:
        con.execute(_RUNS_DDL)
        _refresh_views(con, store)
    finally:
        con.close()
    return True


def query(catalog: Path, sql: str, max_rows: int = 1000):
    """Run ``sql`` read-only against the catalog; returns (column names, rows, truncated)."""
    if not Path(catalog).is_file():
        raise FileNotFoundError(catalog)
    con = duckdb.connect(str(catalog), read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchmany(max_rows + 1)
    finally:
        con.close()
    return cols, rows[:max_rows], len(rows) > max_rows


def format_table(cols: list[str], rows: list[tuple]) -> str:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |", line]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    out += [line, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"]
    return "\n".join(out)


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = "NULL" if v is None else str(v)
    return text if len(text) <= 80 else text[:77] + "..."
