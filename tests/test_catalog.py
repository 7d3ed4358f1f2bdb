"""The DuckDB catalog answers SQL, and a run survives another process holding it."""
import subprocess
import sys
import textwrap

import duckdb
import pyarrow.parquet as pq

from batch.__main__ import main
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
