"""The DuckDB catalog: run history and views over the stored Parquet, for people and tools.

If another process holds the catalog open, a run's record waits in the store's
pending-runs folder and is ingested, with the views refreshed, the next time.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import duckdb

from batch.requestlog import log_files, requests_select
from serving.errors import HybridServeError, SnapshotError
from serving.store import TABLES, Store

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


def record_pending(store: Store, run: dict[str, Any]) -> Path | str:
    """Leave a run record for the next catalog update (used directly by a run that found the lock taken).
    Written as ``<name>.json.tmp`` then renamed: a reader sees a whole record or none."""
    return store.write_pending(f"{run['run_id']}-{os.getpid()}.json", json.dumps(run, default=str).encode())


def recover_pending(store: Store) -> list[str]:
    """Finish the records of runs killed while renaming theirs: a complete ``*.json.tmp`` becomes the
    ``.json`` it was going to be; a partial one is removed (record_run rebuilds that run's record from
    its snapshot's manifest). Files of a writer that is still alive (pid in the name) are left alone."""
    done: list[str] = []
    if store.remote or not store.pending_runs_dir.is_dir():  # an object is written whole by one PUT
        return done
    for tmp in sorted(store.pending_runs_dir.glob("*.json.tmp")):
        pid = tmp.name.removesuffix(".json.tmp").rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            rec = json.loads(tmp.read_text())
            complete = isinstance(rec, dict) and isinstance(rec.get("run_id"), str)
        except (ValueError, UnicodeDecodeError):
            complete = False
        if complete:
            os.replace(tmp, tmp.with_suffix(""))
            done.append(f"{tmp.name}: recovered")
        else:
            tmp.unlink()
            done.append(f"{tmp.name}: incomplete, removed")
    if done:
        LOG.info("pending run records of interrupted runs: %s", "; ".join(done))
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _from_manifest(store: Store, sid: str, manifest: dict[str, Any], parents: set[str]) -> dict[str, Any]:
    """The run record of a snapshot whose run never reached the catalog (killed, or a full disk),
    rebuilt from what its manifest says. A snapshot that never became CURRENT (nor anyone's parent)
    was renamed into place by a run killed before CURRENT moved: not published."""
    published = sid == store.current_id() or sid in parents
    popularity = manifest.get("popularity") or {}
    return {"run_id": manifest["run_id"], "started_at": manifest.get("created_at"), "ended_at": None,
            "status": "published" if published else "interrupted",
            "error": "run record rebuilt from the snapshot manifest (the run ended before recording itself)"
                     + ("" if published else "; CURRENT never moved to it"),
            "snapshot_id": sid, "model_version": manifest.get("model_version"),
            "retrained": manifest.get("retrained"), "row_counts": manifest.get("row_counts"),
            "stage_seconds": None, "expected_hit_rate": popularity.get("expected_hit_rate"),
            "observed_hit_rate": manifest.get("observed_hit_rate_since_previous")}


def _insert(con: duckdb.DuckDBPyConnection, rec: dict[str, Any], run_id: str) -> None:
    values = [rec.get(c) for c in RUN_COLUMNS]
    values[0] = run_id
    for i in (8, 9):
        values[i] = json.dumps(values[i]) if values[i] is not None else None
    con.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})", values)


def record_run(store: Store, run: dict[str, Any]) -> str | None:
    """Append ``run`` (and any records left pending) to the catalog and refresh its views.

    Returns None when done, else why not: the catalog held by another process, or a full or read-only
    disk. Never raises for those: the run's snapshot may be live already. Whatever could not be added
    stays in pending-runs (or, if even that could not be written, is rebuilt from its snapshot's
    manifest) and is added by the next run that reaches the catalog."""
    pending = None
    try:
        pending = record_pending(store, run)
        recover_pending(store)
    except OSError as exc:
        LOG.warning("run record not kept in pending-runs: %s: %s", exc.filename, exc.strerror)
    kept = f"run recorded in {pending}" if pending else "a published run's record is rebuilt from its manifest"
    ingested: list[str] = []
    try:
        store.catalog_path.parent.mkdir(parents=True, exist_ok=True)
        con = store.connect_sql(str(store.catalog_path))
    except duckdb.Error as exc:
        why = str(exc).splitlines()[0]
        if "lock" in why.lower():
            why = f"{store.catalog_path} is held by another process"
        LOG.warning("catalog not updated (%s); %s by the next run", why, kept)
        return why
    try:
        con.execute(_RUNS_DDL)
        con.execute("BEGIN TRANSACTION")
        try:
            records = store.pending_records()
        except OSError as exc:  # the store unreachable: this run's record still reaches the catalog
            LOG.warning("pending run records not read: %s", exc)
            records = []
            if pending is not None:
                _insert(con, run, run["run_id"])
        for name, data in records:
            rec = json.loads(data)
            run_id = rec.get("run_id")
            if rec.get("status") == "locked":  # a run that never started: keep its own id distinct
                run_id = f"{run_id}-locked-{name.removesuffix('.json').rsplit('-', 1)[-1]}"
            _insert(con, rec, run_id)
            ingested.append(name)
        if pending is None:  # not kept on disk, but the catalog takes it
            _insert(con, run, run["run_id"])
        known = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
        manifests = {}
        try:
            retained = store.snapshot_ids()
        except OSError as exc:
            LOG.warning("snapshots not listed: %s", exc)
            retained = []
        for sid in retained:
            try:
                manifests[sid] = store.read_manifest(sid)
            except (SnapshotError, OSError):
                continue
        parents = {m.get("parent") for m in manifests.values()}
        for sid, m in manifests.items():
            if isinstance(m.get("run_id"), str) and m["run_id"] not in known:
                LOG.warning("run %s left snapshot %s but no record: rebuilt from the manifest", m["run_id"], sid)
                _insert(con, _from_manifest(store, sid, m, parents), m["run_id"])
        con.execute("COMMIT")
        _refresh_views(con, store)
    except (duckdb.Error, OSError) as exc:
        why = (str(exc).splitlines()[0] if isinstance(exc, duckdb.Error) or exc.filename is None
               else f"{exc.filename}: {exc.strerror}")
        LOG.warning("catalog not updated (%s); %s by the next run", why, kept)
        return why
    finally:
        con.close()
    for name in ingested:  # only these: a locked run may have added one meanwhile
        try:
            store.remove_pending(name)
        except OSError as exc:  # ingested again next time: INSERT OR REPLACE keeps one row
            LOG.warning("pending run record %s not removed: %s", name, exc)
    return None


def _refresh_views(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    current = store.current_id()
    for table in TABLES:
        if current is not None:
            path = store.table_url(current, table)
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({_sql_str(path)})")
        paths = store.table_paths(table)  # each retained snapshot's file, in whichever format it was written
        if paths:
            files = "[" + ", ".join(map(_sql_str, paths)) + "]"
            con.execute(
                f"CREATE OR REPLACE VIEW all_{table} AS SELECT regexp_extract(filename, {_sql_str(_SNAPSHOT_ID)}, 1) "
                f"AS snapshot, * EXCLUDE (filename) FROM read_parquet({files}, filename = true)")
    _model_views(con, store, store.snapshot_ids())
    # The segments readable now, listed (a glob would read a planted symlink or FIFO, and fail on a
    # damaged file); `batch sql` lists them again at each query (query), so it sees every segment.
    con.execute(f"CREATE OR REPLACE VIEW requests AS {requests_select(log_files(store).paths)}")
    rows = [(s["id"], s.get("created_at"), s.get("model_version"), json.dumps(s.get("rows", {})), s["current"],
             s.get("parent"), json.dumps(s.get("models", {}))) for s in store.list_snapshots()]
    con.execute("CREATE OR REPLACE TABLE snapshots (id VARCHAR, created_at TIMESTAMPTZ, model_version VARCHAR, "
                "row_counts JSON, is_current BOOLEAN, parent VARCHAR, model_rows JSON)")
    if rows:
        con.executemany("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


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
    store.catalog_path.parent.mkdir(parents=True, exist_ok=True)  # an object store's cache folder, maybe new
    try:
        con = store.connect_sql(str(store.catalog_path))
    except duckdb.IOException:
        LOG.warning("catalog %s is held by another process; views refresh next run", store.catalog_path)
        return False
    try:
        con.execute(_RUNS_DDL)
        _refresh_views(con, store)
    finally:
        con.close()
    return True


# Only statements that read. DuckDB parses WITH, FROM, VALUES, TABLE, DESCRIBE, SHOW and SUMMARIZE as a
# SELECT too. EXPLAIN is not among them: EXPLAIN ANALYZE runs the statement it explains, a COPY included.
_READ_STATEMENTS = (duckdb.StatementType.SELECT,)
_BATCH_ROWS = 2048  # rows DuckDB hands over at a time while the printed rows are gathered


def view_files(store: Store) -> tuple[list[str], list[str]]:
    """(every file the catalog's views read, the request log's segments): the retained snapshots'
    tables and registered models' predictions, and the segments -- regular files only, as SQL names
    them (``s3://...`` on object storage). Nothing else: no model artifact, FAISS index or vectors."""
    from batch.models import table_files
    tables: list[str] = []
    manifests = {}
    for sid in store.snapshot_ids():
        try:
            manifests[sid] = store.read_manifest(sid)
        except SnapshotError:
            continue
        tables += [store.table_url(sid, t) for t in TABLES]
    for name in sorted({n for m in manifests.values() for n in (m.get("models") or {}) if n != "rating"}):
        tables += table_files(store, name, manifests)
    segments = log_files(store).paths  # the schema seed and the whole, regular segments
    regular = [f for f in dict.fromkeys(tables + segments) if store.is_regular(f)]
    return regular, [f for f in segments if f in regular]


def open_readonly(store: Store, readable: list[str] | None = None) -> duckdb.DuckDBPyConnection:
    """The catalog for ad-hoc SQL, read-only at the engine level.

    ``read_only`` alone still lets a query write files (COPY TO, EXPORT DATABASE), attach other
    databases and read any file on the machine. So external access is switched off, except for the
    very files the catalog's views read (``view_files``: regular files only, so a FIFO planted in the
    store cannot block a query where no deadline reaches it), and the configuration is locked so that
    no statement can switch it back on. On object storage the store's own filesystem is registered on
    this connection and DuckDB never loads an extension. DuckDB's allowed paths also admit writes,
    which is why :func:`query` accepts only reading statements.
    """
    if readable is None:  # ``readable``: view_files' first list, when the caller listed them already
        readable, _ = view_files(store)
    con = store.connect_sql(str(store.catalog_path), read_only=True)
    try:
        con.execute("SET allowed_directories = []")
        con.execute("SET allowed_paths = $paths", {"paths": readable})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def query(store: Store | str | os.PathLike, sql: str, max_rows: int = 1000, time_limit_ms: int = 30_000,
          sink: Callable[[list[str], list[tuple]], None] | None = None) -> tuple[list[str], list[tuple], bool]:
    """Run one reading statement against the catalog of ``store`` (a Store, or its catalog's path);
    returns (column names, rows, truncated).

    At most ``max_rows`` rows are fetched, streamed in batches: a query with millions of rows
    stops after the first batches instead of being computed whole. The query is interrupted after
    ``time_limit_ms``. Refused statements, file access outside the store, a deadline passed and any
    DuckDB error raise HybridServeError with one line. ``sink(columns, rows)``: each batch of rows as it
    is streamed (for CSV or JSON written as it comes; the connection refuses COPY); nothing is kept
    then, and the rows returned are empty.
    """
    if not isinstance(store, Store):
        path = Path(store)
        store = Store(path.parent)
        if store.catalog_path != path:
            raise ValueError(f"{path}: not a store's catalog (expected {store.catalog_path.name})")
    if not store.catalog_path.is_file():
        raise FileNotFoundError(store.catalog_path)
    try:
        readable, segments = view_files(store)  # listed once: a damaged segment is warned of once
        con = open_readonly(store, readable)
    except (duckdb.Error, OSError) as exc:
        raise HybridServeError(f"sql: {store.catalog_path}: {_first_line(exc)}") from None
    fired = threading.Event()

    def interrupt() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(time_limit_ms / 1000, interrupt)
    timer.daemon = True
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1:
            raise HybridServeError(f"sql: one statement at a time, got {len(statements)}")
        kind = statements[0].type
        if kind not in _READ_STATEMENTS:
            raise HybridServeError(f"sql: refused: only reading statements are allowed (SELECT, WITH, FROM, "
                                   f"VALUES, DESCRIBE, SHOW, SUMMARIZE), got {kind.name}")
        # The request log as it is now, damaged and planted files left out (a TEMP view shadows the stored one).
        con.execute(f"CREATE OR REPLACE TEMP VIEW requests AS {requests_select(segments)}")
        timer.start()
        rel = con.sql(sql)
        cols = list(rel.columns)
        rows: list[tuple] = []
        reader = rel.to_arrow_reader(_BATCH_ROWS)
        truncated = False
        seen = 0
        try:
            for batch in reader:
                room = max_rows - seen
                if batch.num_rows > room:
                    batch, truncated = batch.slice(0, room), True
                got = list(zip(*(column.to_pylist() for column in batch.columns)))
                seen += len(got)
                if sink is not None:
                    if got:
                        sink(cols, got)
                else:
                    rows.extend(got)
                if truncated or seen == max_rows and _more(reader):
                    truncated = True
                    break
        finally:
            reader.close()
    except duckdb.InterruptException:
        if not fired.is_set():
            raise
        raise HybridServeError(f"sql: stopped after {time_limit_ms} ms (batch.sql_time_limit_ms, or "
                               f"--time-limit-ms)") from None
    except duckdb.PermissionException as exc:
        raise HybridServeError(f"sql: refused: {_first_line(exc)} (only the tables of the store's snapshots "
                               f"and its request-log segments are readable)") from None
    except duckdb.Error as exc:
        raise HybridServeError(f"sql: {_first_line(exc)}") from None
    finally:
        timer.cancel()
        con.close()
    return cols, rows, truncated


def _more(reader) -> bool:
    """Whether the stream has another non-empty batch (read only once the cap is reached)."""
    for batch in reader:
        if batch.num_rows:
            return True
    return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def format_table(cols: list[str], rows: list[tuple], width: int | None = 80) -> str:
    """A text table; cells longer than ``width`` are cut with "..." (None: never cut)."""
    cells = [[cell(v, width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |", line]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    out += [line, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"]
    return "\n".join(out)


def cell(v, width: int | None = 80) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = "NULL" if v is None else str(v)
    return text if width is None or len(text) <= width else text[:width - 3] + "..."
