"""SQL over a store in a bucket: the catalog's views read the snapshots and the request log through
the store's s3fs filesystem registered on the querying connection; DuckDB loads no extension; reads
outside the store's files and writes to the bucket are refused."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import s3fs

from batch.catalog import open_readonly, query, refresh_views
from conftest import new_bucket
from serving.errors import HybridServeError
from serving.store import Store, layout


@pytest.fixture
def bucket_store(s3, s3_published, tmp_path):
    """The published bucket seen from a fresh machine, whose catalog is built from the bucket."""
    _, settings, first = s3_published
    store = Store(settings["paths.store"], cache_dir=tmp_path / "analyst")
    assert refresh_views(store)
    return store, first


def _raw():
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_the_views_read_the_bucket(bucket_store):
    store, first = bucket_store
    base = store.url.removeprefix("s3://")
    for table in ("similar_items", "user_recs", "predictions", "items"):
        want = pq.read_metadata(f"{base}/snapshots/{first.snapshot_id}/{layout.table_file(table)}",
                                filesystem=_raw()).num_rows
        assert query(store, f"SELECT count(*) FROM {table}")[1] == [(want,)], table
    assert query(store, "SELECT DISTINCT snapshot FROM all_user_recs")[1] == [(first.snapshot_id,)]
    raw = _raw()  # the request log as pyarrow reads it from the bucket (other tests may have served)
    logged = sum(pq.read_metadata(k, filesystem=raw).num_rows for k in raw.find(f"{base}/requests")
                 if k.endswith(".parquet"))
    assert query(store, "SELECT count(*) FROM requests")[1] == [(logged,)]
    assert query(store, "SELECT id, is_current FROM snapshots")[1] == [(first.snapshot_id, True)]
    con = store.connect_sql()  # the same connection settings, without the lock (to list extensions)
    try:
        con.execute(f"SELECT count(*) FROM read_parquet('{store.table_url(first.snapshot_id, 'items')}')").fetchall()
        loaded = con.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded AND "
                             "extension_name IN ('httpfs', 'aws')").fetchall()
        assert loaded == []  # read through the registered fsspec filesystem; nothing was downloaded
    finally:
        con.close()


def test_reads_outside_the_views_and_writes_to_the_bucket_are_refused(bucket_store):
    store, first = bucket_store
    raw, base = _raw(), store.url.removeprefix("s3://")
    other = new_bucket("other")
    raw.pipe_file(f"{other}/secret.parquet", raw.cat_file(f"{base}/requests/{layout.SCHEMA_SEGMENT}"))
    raw.pipe_file(f"{base.split('/')[0]}/elsewhere/secret.parquet", raw.cat_file(f"{base}/requests/{layout.SCHEMA_SEGMENT}"))
    artifact = next(k for k in raw.find(f"{base}/snapshots/{first.snapshot_id}/models/recommender")
                    if not k.endswith(".parquet"))
    before = sorted(raw.find(base))
    for sql in (f"SELECT * FROM read_parquet('s3://{other}/secret.parquet')",
                f"SELECT * FROM read_parquet('s3://{base.split('/')[0]}/elsewhere/secret.parquet')",
                f"SELECT * FROM read_parquet('s3://{base}/requests/../../elsewhere/secret.parquet')",
                f"SELECT size FROM read_blob('s3://{artifact}')",
                f"SELECT * FROM glob('s3://{base}/**')"):
        with pytest.raises(HybridServeError, match="refused"):
            query(store, sql)
    with pytest.raises(HybridServeError, match="only reading statements"):
        query(store, f"COPY (SELECT 1) TO 's3://{base}/requests/seg-evil.parquet'")
    con = open_readonly(store)  # the engine refuses too, without the statement check
    try:
        import duckdb
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1) TO 's3://{other}/evil.parquet'")
    finally:
        con.close()
    assert sorted(raw.find(base)) == before and not raw.exists(f"{other}/evil.parquet")


def test_the_sql_command_on_a_bucket(s3, s3_published, tmp_path, capsys):
    from batch.__main__ import main
    from conftest import make_settings
    _, settings, first = s3_published
    _, cfg = make_settings(tmp_path, paths={"store": settings["paths.store"]})
    assert main(["--config", str(cfg), "sql", "SELECT 1"]) == 1  # no catalog on this machine yet
    assert "no catalog yet" in capsys.readouterr().err
    refresh_views(Store(settings["paths.store"]))
    assert main(["--config", str(cfg), "sql", "SELECT id FROM snapshots WHERE is_current"]) == 0
    assert first.snapshot_id in capsys.readouterr().out
