"""The DuckDB catalog answers SQL, and a run survives another process holding it."""
import subprocess
import sys
import textwrap

import duckdb
import pyarrow.parquet as pq
import pytest

from batch.__main__ import main
from batch.catalog import open_readonly, query
from batch.job import run
from serving.store import Store


def test_sql_command_answers_over_the_catalog(workspace, capsys):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    rc = main(["--config", str(cfg), "sql", "SELECT count(*) AS n FROM predictions"])
    out = capsys.readouterr().out
    want = pq.read_metadata(store.table_path(first.snapshot_id, "predictions")).num_rows
    assert rc == 0
    assert f"| {want}" in out and "(1 row)" in out
    rc = main(["--config", str(cfg), "sql", "SELECT status, snapshot_id FROM runs"])
    assert rc == 0 and first.snapshot_id in capsys.readouterr().out
    rc = main(["--config", str(cfg), "sql", "SELECT * FROM runs"])  # TIMESTAMPTZ and JSON columns print
    out = capsys.readouterr().out
    assert rc == 0 and "published" in out and "started_at" in out
    rc = main(["--config", str(cfg), "sql", "SELECT * FROM no_such_table"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: sql: Catalog Error") and err.count("\n") == 1


def test_catalog_views_across_versions(workspace):
    root, settings, _, first = workspace
    second = run(settings)
    con = duckdb.connect(str(Store(settings["paths.store"]).catalog_path), read_only=True)
    try:
        per_snapshot = dict(con.execute("SELECT snapshot, count(*) FROM all_similar_items GROUP BY 1").fetchall())
        assert set(per_snapshot) == {first.snapshot_id, second.snapshot_id}
        assert con.execute("SELECT id FROM snapshots WHERE is_current").fetchall() == [(second.snapshot_id,)]
        assert con.execute("SELECT count(*) FROM requests").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'published'").fetchall()[0][0] >= 2
        # the live views follow CURRENT
        n = con.execute("SELECT count(*) FROM user_recs").fetchall()[0][0]
        assert n == second.manifest["row_counts"]["user_recs"]
    finally:
        con.close()


def test_run_publishes_while_another_process_holds_the_catalog(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys
            con = duckdb.connect({str(store.catalog_path)!r})
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            blocked = run(settings)
            assert blocked.catalog_updated is False
            assert store.current_id() == blocked.snapshot_id  # published regardless
            assert list(store.pending_runs_dir.glob("*.json"))
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(timeout=30)
    after = run(settings)
    assert after.catalog_updated is True
    assert not list(store.pending_runs_dir.glob("*.json"))
    con = duckdb.connect(str(store.catalog_path), read_only=True)
    try:
        ids = {r[0] for r in con.execute("SELECT snapshot_id FROM runs").fetchall()}
    finally:
        con.close()
    assert {blocked.snapshot_id, after.snapshot_id} <= ids


# --- `python -m batch sql` is read-only at the engine level ---------------------------------------------
def _store_state(store: Store) -> dict[str, bytes]:
    """Every file in the store with its bytes: nothing a refused statement does may change any of them."""
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}


def _escapes(store: Store, outside) -> dict[str, str]:
    s, snap = store.root, store.snapshots_dir
    current = store.current_id()
    return {
        "copy over CURRENT": f"COPY (SELECT 'garbage') TO '{s}/CURRENT' (FORMAT csv, HEADER false)",
        "copy over the catalog": f"COPY (SELECT 'garbage') TO '{store.catalog_path}'",
        # DuckDB's allowed directories admit writes too: only the statement check stops this one
        "copy over a snapshot table": f"COPY (SELECT 1 AS x) TO '{snap}/{current}/predictions.parquet'",
        "copy into the snapshots folder": f"COPY (SELECT 1 AS x) TO '{snap}/new.csv'",
        "explain analyze copy": f"EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{snap}/new.csv'",
        "attach read-write": f"ATTACH '{s}/other.duckdb' AS other (READ_WRITE)",
        "attach the catalog again": f"ATTACH '{store.catalog_path}' AS again",
        "export database": f"EXPORT DATABASE '{snap}/exported'",
        "install": "INSTALL httpfs",
        "load": "LOAD httpfs",
        "set locked config": "SET enable_external_access = true",
        "reset locked config": "RESET lock_configuration",
        "set threads": "SET threads = 1",
        "create temp table": "CREATE TEMP TABLE t AS SELECT 1",
        "insert": "INSERT INTO runs (run_id) VALUES ('x')",
        "checkpoint": "CHECKPOINT",
        "two statements": "SELECT 1; COPY (SELECT 1) TO 'x.csv'",
        "read_csv outside": f"SELECT * FROM read_csv('{outside}')",
        "read_text outside": f"SELECT * FROM read_text('{outside}')",
        "read_blob outside": f"SELECT * FROM read_blob('{outside}')",
        "glob outside": f"SELECT * FROM glob('{outside.parent}/*')",
        "read_text through ..": f"SELECT * FROM read_text('{snap}/../CURRENT')",
        "sniff_csv outside": f"SELECT * FROM sniff_csv('{outside}')",
        "read_csv of /etc/passwd": "SELECT * FROM read_csv('/etc/passwd', sep = ':')",
    }


ESCAPES = list(_escapes(Store("s"), Store("s").root / "x"))


@pytest.mark.parametrize("name", ESCAPES)
def test_sql_refuses_every_escape_in_one_line_and_changes_nothing(workspace, capsys, name):
    root, settings, cfg, _ = workspace
    store = Store(settings["paths.store"])
    outside = root / "secret.txt"
    outside.write_text("secret,line\n1,2\n")
    before = _store_state(store)
    rc = main(["--config", str(cfg), "sql", _escapes(store, outside)[name]])
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert captured.err.startswith("error: sql: ") and captured.err.count("\n") == 1, captured.err
    assert "secret" not in captured.out + captured.err.replace(str(outside), "")
    assert _store_state(store) == before


def test_readonly_connection_holds_without_the_statement_check(workspace):
    """The engine itself refuses: the statement check is a second wall, not the only one."""
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    outside = root / "secret.txt"
    outside.write_text("secret\n")
    con = open_readonly(store)
    try:
        for sql in (f"COPY (SELECT 'garbage') TO '{store.current_path}'", f"SELECT * FROM read_text('{outside}')",
                    f"ATTACH '{root}/other.duckdb' AS other (READ_WRITE)", "LOAD httpfs"):
            with pytest.raises(duckdb.PermissionException):
                con.execute(sql)
        for sql in ("SET enable_external_access = true", "SET allowed_directories = ['/']"):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                con.execute(sql)
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("CREATE TABLE t AS SELECT 1")
        # ...while the catalog's own views over the store's Parquet read as ever
        n = con.execute("SELECT count(*) FROM predictions").fetchall()[0][0]
        assert n == pq.read_metadata(store.table_path(first.snapshot_id, "predictions")).num_rows
        assert con.execute("SELECT count(DISTINCT snapshot) FROM all_user_recs").fetchall() == [(1,)]
        assert con.execute("SELECT count(*) FROM requests").fetchall() == [(0,)]
    finally:
        con.close()
    assert store.current_id() == first.snapshot_id and not (root / "other.duckdb").exists()


def test_sql_deadline_interrupts_a_runaway_query(workspace, capsys):
    root, settings, cfg, _ = workspace
    runaway = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t"
    rc = main(["--config", str(cfg), "sql", "--time-limit-ms", "300", runaway])
    err = capsys.readouterr().err
    assert rc == 1 and err == "error: sql: stopped after 300 ms (batch.sql_time_limit_ms, or --time-limit-ms)\n"
    # the setting is the default deadline
    cfg.write_text(cfg.read_text().replace("[batch]", "[batch]\nsql_time_limit_ms = 200"))
    rc = main(["--config", str(cfg), "sql", runaway])
    assert rc == 1 and "stopped after 200 ms" in capsys.readouterr().err


def test_sql_row_cap_streams_and_says_it_truncated(workspace, capsys):
    root, settings, cfg, _ = workspace
    # Ten billion rows: computed whole this would run into the deadline; streamed it stops at the cap.
    rc = main(["--config", str(cfg), "sql", "--max-rows", "5", "--time-limit-ms", "60000",
               "SELECT range AS i FROM range(10000000000)"])
    out = capsys.readouterr().out
    assert rc == 0
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:] == \
        ["0", "1", "2", "3", "4"]
    assert "(5 rows)" in out and "(truncated: the first 5 rows are shown; --max-rows for more)" in out
    # exactly the cap, and a batch boundary: not truncated; one more row: truncated
    store = Store(settings["paths.store"])
    assert query(store, "SELECT * FROM range(4096)", max_rows=4096)[2] is False
    assert query(store, "SELECT * FROM range(4097)", max_rows=4096)[2] is True
    cols, rows, truncated = query(store, "SELECT * FROM range(3)", max_rows=10)
    assert cols == ["range"] and rows == [(0,), (1,), (2,)] and truncated is False


def test_query_takes_a_store_or_its_catalog_path(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    sql = "SELECT snapshot_id FROM runs WHERE status = 'published'"
    assert query(store, sql) == query(store.catalog_path, sql) == query(str(store.catalog_path), sql)
    assert (first.snapshot_id,) in query(store, sql)[1]
    with pytest.raises(ValueError, match="not a store's catalog"):
        query(root / "other.duckdb", sql)
