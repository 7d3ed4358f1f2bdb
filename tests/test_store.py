"""Publishing is atomic; retention and rollback keep what must be kept."""
import hashlib

import numpy as np
import pytest

from batch.job import run
from serving.errors import SnapshotError
from serving.store import PUBLISH_STEPS, InjectedCrash, Store, sha256_file, sha256_files


def _snapshot_state(store: Store):
    return store.current_id(), store.snapshot_ids()


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_crash_at_each_publish_step_leaves_current_at_old_snapshot(workspace, step):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    before = store.current_id()
    with pytest.raises(InjectedCrash):
        run(settings, crash_at=step)
    assert store.current_id() == before == first.snapshot_id
    store.verify(before)  # complete and intact
    # Only a crash after the rename may leave the new (complete) snapshot in snapshots/.
    extra = set(store.snapshot_ids()) - {before}
    if step in ("rename", "current"):
        assert len(extra) == 1
        store.verify(extra.pop())
    else:
        assert not extra
    # The next run cleans the leftovers and publishes normally.
    nxt = run(settings)
    assert store.current_id() == nxt.snapshot_id
    assert not [p for p in store.snapshots_dir.iterdir() if p.name.startswith(".")]
    assert not store.current_path.with_name("CURRENT.tmp").exists()


def test_failed_run_is_recorded(workspace):
    root, settings, _, _ = workspace
    with pytest.raises(InjectedCrash):
        run(settings, crash_at="manifest")
    from batch.catalog import query
    cols, rows, _ = query(Store(settings["paths.store"]),
                          "SELECT status, error FROM runs ORDER BY started_at DESC LIMIT 1")
    assert rows == [("failed", "InjectedCrash: injected crash at manifest")]


def test_retention_keeps_newest_and_never_current_or_its_predecessor(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    ids = [first.snapshot_id] + [run(settings).snapshot_id for _ in range(4)]
    keep = settings["batch.keep"]
    assert store.snapshot_ids() == ids[-keep:]
    # Roll back to the oldest retained, then publish twice: the rolled-back CURRENT's
    # predecessor and CURRENT itself must survive although they are old.
    old = store.snapshot_ids()[0]
    store.rollback(old)
    assert store.current_id() == old
    prev = store.previous_id(old)
    store.apply_retention(2)
    assert old in store.snapshot_ids()
    if prev is not None:
        assert prev in store.snapshot_ids()


def test_rollback_moves_current_back_and_refuses_bad_targets(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    second = run(settings)
    assert store.current_id() == second.snapshot_id
    assert store.rollback() == first.snapshot_id
    assert store.current_id() == first.snapshot_id
    with pytest.raises(SnapshotError, match="not in"):
        store.rollback("20990101-000000-000000")
    # a corrupted snapshot is refused and CURRENT stays
    victim = store.table_path(second.snapshot_id, "predictions")
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SnapshotError, match="checksum"):
        store.rollback(second.snapshot_id)
    assert store.current_id() == first.snapshot_id


def test_verify_detects_missing_and_truncated_files(workspace):
    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    sid = first.snapshot_id
    path = store.model_dir(sid) / "item_vecs.npy"
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(SnapshotError, match="size"):
        store.verify(sid)
    path.unlink()
    with pytest.raises(SnapshotError, match="missing"):
        store.verify(sid)


def test_sha256_files_match_hashlib_for_every_file(tmp_path):
    rng = np.random.default_rng(3)
    blobs = {tmp_path / f"f{i}.bin": rng.bytes(n) for i, n in enumerate((0, 1, 4095, 1 << 20, (3 << 20) + 7))}
    for path, data in blobs.items():
        path.write_bytes(data)
    digests = sha256_files(list(blobs))
    assert digests == {path: hashlib.sha256(data).hexdigest() for path, data in blobs.items()}
    assert all(sha256_file(path) == digests[path] for path in blobs)
