"""Snapshots on object storage, against moto's S3 server mode: a batch run publishes to a bucket, the
API serves from a local copy, CURRENT moves by compare-and-swap (two publishers: one wins), the lock
is a create-if-absent object, retention/rollback/snapshots work there."""
from __future__ import annotations

import threading
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs

from conftest import new_bucket
from serving.errors import PublishConflict, SnapshotError, StoreLockedError
from serving.snapshot import LoadedSnapshot
from serving.store import Store, layout
from serving.store.remote import ObjectStore


def _raw() -> s3fs.S3FileSystem:
    """A filesystem of the test's own, to look at the bucket independently of the Store."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_a_run_publishes_to_the_bucket_and_the_api_serves_a_local_copy(s3, s3_published, tmp_path):
    _, settings, first = s3_published
    url = settings["paths.store"]
    bucket_root = url.removeprefix("s3://")
    raw = _raw()
    assert raw.cat_file(f"{bucket_root}/CURRENT").decode().strip() == first.snapshot_id
    listed = {k.removeprefix(f"{bucket_root}/snapshots/{first.snapshot_id}/")
              for k in raw.find(f"{bucket_root}/snapshots/{first.snapshot_id}")}
    assert set(first.manifest["files"]) | {"manifest.json"} == listed  # every file, no parts left
    store = Store(url, cache_dir=tmp_path / "fresh")  # a server's machine: nothing local yet
    assert isinstance(store, ObjectStore) and store.snapshot_ids() == [first.snapshot_id]
    snap = LoadedSnapshot.load(store, first.snapshot_id)
    assert (tmp_path / "fresh" / "snapshots" / first.snapshot_id / "manifest.json").is_file()
    # The table read straight from the bucket by pyarrow, and the API's answer, agree.
    table = pq.read_table(f"{bucket_root}/snapshots/{first.snapshot_id}/{layout.table_file('similar_items')}",
                          filesystem=raw).to_pandas()
    row = table.iloc[0]
    from serving.web.app import create_app
    app = create_app(settings.replace(paths__store=url), background=False)
    try:
        body = app.test_client().get(f"/v1/items/{int(row.item_id)}/similar?k=5").get_json()
    finally:
        app.extensions["hybridserve"].close()
    assert body["source"] == "precomputed" and body["snapshot"] == snap.id
    assert [n["item_id"] for n in body["items"]] == [int(i) for i in row.neighbor_ids[:5]]


@pytest.fixture(scope="module")
def tables(published):
    """The contract tables of the local published run: enough for a snapshot to publish and verify."""
    root, settings, first = published
    local = Store(settings["paths.store"])
    return {t: local.read_table(first.snapshot_id, t) for t in layout.TABLES}


def _small_writer(store: Store, tables):
    writer = store.begin()
    for name, table in tables.items():
        writer.write_table(name, table)
    return writer


def _manifest():
    return {"k_max": 20, "created_at": pd.Timestamp.now(tz="UTC").isoformat()}


def _bucket_store(tmp_path, tables, name="s"):
    """A new bucket with one small snapshot published: (url, store, its id)."""
    url = f"s3://{new_bucket(name)}/store"
    store = Store(url, cache_dir=tmp_path / "w")
    return url, store, _small_writer(store, tables).publish(_manifest())["id"]


def test_two_publishers_racing_exactly_one_wins(s3, tables, tmp_path):
    url, _, first = _bucket_store(tmp_path, tables, "race")
    a, b = Store(url, cache_dir=tmp_path / "a"), Store(url, cache_dir=tmp_path / "b")
    wa, wb = _small_writer(a, tables), _small_writer(b, tables)
    # Both have read CURRENT (the same ETag) and wait at the last step; then both PUT at once.
    barrier = threading.Barrier(2, timeout=30)
    for w in (wa, wb):
        w._maybe_crash = lambda step: barrier.wait() if step == "current" else None
    outcome: dict[str, object] = {}

    def publish(name, w):
        try:
            outcome[name] = w.publish(_manifest())["id"]
        except PublishConflict as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=publish, args=(n, w)) for n, w in (("a", wa), ("b", wb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [v for v in outcome.values() if isinstance(v, str)]
    lost = [v for v in outcome.values() if isinstance(v, PublishConflict)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert "another publisher won" in str(lost[0])
    fresh = Store(url, cache_dir=tmp_path / "c")
    assert fresh.current_id() == won[0]
    assert fresh.read_manifest(won[0])["parent"] == first
    assert sorted(fresh.snapshot_ids()) == sorted([first, won[0]])  # the loser's is gone
    fresh.verify(won[0])


def test_the_first_publish_needs_an_absent_current(s3, tables, tmp_path):
    a = Store(f"s3://{new_bucket('first')}/x", cache_dir=tmp_path / "a")
    w1, w2 = _small_writer(a, tables), _small_writer(a, tables)
    # w2 read "no CURRENT" and is overtaken by w1's first publish before it writes.
    w2._maybe_crash = lambda step: w1.publish(_manifest()) if step == "current" else None
    with pytest.raises(PublishConflict):
        w2.publish(_manifest())
    assert a.current_id() == w1.id and a.snapshot_ids() == [w1.id]


def test_the_lock_is_exclusive_renewed_and_taken_over_when_its_holder_is_gone(s3, tmp_path):
    bucket = new_bucket("lock")
    url = f"s3://{bucket}/s"
    one, two = Store(url, cache_dir=tmp_path / "1"), Store(url, cache_dir=tmp_path / "2")
    lock = one.lock()
    with pytest.raises(StoreLockedError, match="another run holds the lock"):
        two.lock()
    lock.release()
    two.lock().release()  # free again
    raw = _raw()
    # A lock left by a process of this machine that is gone: taken over at once.
    import json
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    raw.pipe_file(f"{bucket}/s/.batch.lock", json.dumps({"owner": "x", "host": socket.gethostname(),
                                                        "pid": int(dead.stdout), "expires_at": time.time() + 999}).encode())
    one.lock().release()
    # Another machine's lock: held until it expires, then taken over.
    raw.pipe_file(f"{bucket}/s/.batch.lock", json.dumps({"owner": "y", "host": "elsewhere", "pid": 1,
                                                        "expires_at": time.time() + 999}).encode())
    with pytest.raises(StoreLockedError, match="host elsewhere"):
        one.lock()
    raw.pipe_file(f"{bucket}/s/.batch.lock", json.dumps({"owner": "y", "host": "elsewhere", "pid": 1,
                                                        "expires_at": time.time() - 1}).encode())
    held = one.lock()
    assert json.loads(raw.cat_file(f"{bucket}/s/.batch.lock"))["owner"] == held.token
    # Renewal moves expires_at forward (If-Match on its own ETag).
    from serving.store.remote import ObjectLock
    short = ObjectLock(two, ".short.lock", expiry_s=0.6).acquire()
    first_expiry = json.loads(raw.cat_file(f"{bucket}/s/.short.lock"))["expires_at"]
    time.sleep(0.5)
    assert json.loads(raw.cat_file(f"{bucket}/s/.short.lock"))["expires_at"] > first_expiry
    short.release()
    held.release()
    assert not raw.exists(f"{bucket}/s/.batch.lock")


def test_retention_rollback_and_snapshots_on_the_bucket(s3, tables, tmp_path):
    url, store, first = _bucket_store(tmp_path, tables, "keep")
    ids = [first]
    for _ in range(3):
        ids.append(_small_writer(store, tables).publish(_manifest())["id"])
    assert store.current_id() == ids[-1] and store.snapshot_ids() == ids
    listed = store.list_snapshots()
    assert [s["id"] for s in listed] == ids and [s["current"] for s in listed] == [False] * 3 + [True]
    assert store.rollback() == ids[-2] and Store(url, cache_dir=tmp_path / "x").current_id() == ids[-2]
    # keep=1: the newest, CURRENT and the one before CURRENT stay; the first goes, manifest and all.
    assert store.apply_retention(1) == [ids[0]]
    assert not _raw().exists(f"{url.removeprefix('s3://')}/snapshots/{ids[0]}")
    with pytest.raises(SnapshotError, match="not in"):
        store.rollback(ids[0])


def test_the_cache_folder_keeps_two_copies_and_one_lock(s3, tables, tmp_path):
    """A replica that has served four snapshots holds the two newest copies and the one lock file its
    workers copy under, nothing else (a lock file per snapshot once piled up)."""
    url, store, first = _bucket_store(tmp_path, tables, "copies")
    ids = [first] + [_small_writer(store, tables).publish(_manifest())["id"] for _ in range(3)]
    replica = Store(url, cache_dir=tmp_path / "srv")
    for sid in ids:
        assert (replica.local_snapshot(sid) / layout.table_file("items")).is_file()
    assert sorted(p.name for p in (tmp_path / "srv" / "snapshots").iterdir()) == sorted([".copy.lock", *ids[-2:]])


def test_a_corrupt_object_is_refused_by_the_copy(s3, tables, tmp_path):
    url, _, first = _bucket_store(tmp_path, tables, "bad")
    key = f"{url.removeprefix('s3://')}/snapshots/{first}/{layout.table_file('items')}"
    raw = _raw()
    data = bytearray(raw.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    raw.pipe_file(key, bytes(data))
    store = Store(url, cache_dir=tmp_path / "srv")
    with pytest.raises(SnapshotError, match="checksum"):
        LoadedSnapshot.load(store, first)
    assert not (tmp_path / "srv" / "snapshots" / first).exists()  # nothing half-copied kept
    assert [p.name for p in (tmp_path / "srv" / "snapshots").iterdir()] == [".copy.lock"]


def test_a_server_retries_a_copy_the_store_could_not_serve(s3, s3_published, tmp_path):
    """The store going away mid-copy is not the snapshot's fault: the next reload copies it again
    (a corrupt snapshot, in contrast, waits for CURRENT to move)."""
    import socket

    from moto.server import ThreadedMotoServer

    from serving.reloader import Reloader
    _, settings, first = s3_published
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = Store(settings["paths.store"], cache_dir=tmp_path / "srv",
                  storage_options={"endpoint_url": f"http://127.0.0.1:{port}"})
    copy = store.local_snapshot

    def cut_off(sid, checksums=True):
        server.stop()  # the endpoint goes away between reading CURRENT and copying
        return copy(sid, checksums)

    store.local_snapshot = cut_off
    reloader = Reloader(store)
    assert reloader.reload() is False and reloader.snapshot is None
    assert "Could not connect" in reloader.last_error and first.snapshot_id in reloader.last_error
    store.local_snapshot = copy
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        assert reloader.reload() is True and reloader.snapshot.id == first.snapshot_id
    finally:
        server.stop()


def test_files_uploaded_as_written_are_sent_again_if_changed_and_aborted_whole(s3, tables, tmp_path):
    """Each file goes up in the background once written; a file rewritten after it was sent reaches
    the bucket as it is at publish (its manifest checksum too), and an aborted snapshot leaves no
    object behind once its uploads in flight have landed."""
    url = f"s3://{new_bucket('bg')}/store"
    store = Store(url, cache_dir=tmp_path / "w")
    raw, base = _raw(), url.removeprefix("s3://")
    writer = _small_writer(store, tables)
    sent = writer._settle()
    assert {p.relative_to(writer.tmp).as_posix() for p in sent} == {layout.table_file(t) for t in layout.TABLES}
    extra = writer.model_folder(layout.RECOMMENDER) / "extra.bin"
    extra.write_bytes(b"first")
    writer.write_table("items", tables["items"])  # sends extra.bin
    writer._settle()
    extra.write_bytes(b"second, longer")  # changed after it was sent
    sid = writer.publish(_manifest())["id"]
    rel = f"{layout.model_folder(layout.RECOMMENDER)}/extra.bin"
    assert raw.cat_file(f"{base}/snapshots/{sid}/{rel}") == b"second, longer"
    assert LoadedSnapshot.load(Store(url, cache_dir=tmp_path / "srv"), sid).id == sid  # checksums agree
    aborted = _small_writer(store, tables)
    aborted.abort()
    assert not raw.exists(f"{base}/snapshots/{aborted.id}") and store.current_id() == sid
