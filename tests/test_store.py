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


def _as_format_2(store: Store, sid: str) -> str:
    """The snapshot ``sid`` rewritten in the layout of format 2 under a new id: the recommender's and
    the rating model's files together in model/ (the rating meta under "rating"), their precomputed
    arrays in serving/, the tables at the top, a manifest of that format."""
    import json
    import shutil

    from serving.store import layout

    new = "20990101-000000-000002"
    src, dst = store.snapshot_dir(sid), store.snapshot_dir(new)
    (dst / "model").mkdir(parents=True)
    (dst / "serving").mkdir()
    rec, rat = src / "models" / "recommender", src / "models" / "rating"
    arrays = ("similar_row", "similar_ids", "similar_scores", "recs_row", "recs_ids", "recs_scores")
    for p in rec.iterdir():
        stem = p.name.removesuffix(".npy")
        if stem in arrays:
            shutil.copy(p, dst / "serving" / p.name)
        elif p.suffix != ".parquet" and p.name != "meta.json":
            shutil.copy(p, dst / "model" / p.name)
    for p in rat.iterdir():
        if p.name in ("pred_keys.npy", "pred_values.npy"):
            shutil.copy(p, dst / "serving" / p.name)
        elif p.suffix == ".npy" and not (dst / "model" / p.name).exists():
            shutil.copy(p, dst / "model" / p.name)
    meta = json.loads((rec / "meta.json").read_text())
    rating = json.loads((rat / "meta.json").read_text())
    meta["rating"] = {k: v for k, v in rating.items() if k not in ("rating_range", "model_version")}
    meta["rating_range"] = rating["rating_range"]
    (dst / "model" / "meta.json").write_text(json.dumps(meta))
    for table in layout.TABLES:
        shutil.copy(src / layout.table_file(table), dst / f"{table}.parquet")
    for name in (src / "models").iterdir():  # registered models kept their folders in format 2 too
        if name.name not in ("recommender", "rating"):
            shutil.copytree(name, dst / "models" / name.name)
    manifest = store.read_manifest(sid)
    manifest.update(id=new, format_version=2, parent=sid)
    del manifest["recommender"]
    manifest["models"]["rating"]["table"] = "predictions.parquet"
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    manifest["files"] = {p.relative_to(dst).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in files}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return new


def test_a_format_2_snapshot_still_loads_serves_and_rolls_back(workspace):
    """Snapshots written before one folder per model (rollback targets, a rolling upgrade) load as
    they are and answer exactly as the same snapshot in today's layout."""
    from serving.web.app import create_app

    root, settings, _, first = workspace
    store = Store(settings["paths.store"])
    old = _as_format_2(store, first.snapshot_id)
    assert store.format_of(old) == 2 and store.verify(old)["format_version"] == 2
    assert store.table_path(old, "similar_items") == store.snapshot_dir(old) / "similar_items.parquet"
    today = create_app(settings, background=False)
    urls = []
    sim = store.read_table(old, "similar_items").column("item_id").to_pylist()[:5]
    recs = store.read_table(old, "user_recs").column("user_id").to_pylist()[:5]
    preds = store.read_table(old, "predictions").to_pylist()[:5]
    urls += [f"/v1/items/{i}/similar?k=7" for i in sim] + [f"/v1/users/{u}/recommendations?k=7" for u in recs]
    urls += [f"/v1/predictions?user_id={p['user_id']}&item_id={p['item_id']}" for p in preds]
    urls += [f"/v1/recommendations?items={sim[0]},{sim[1]}&k=5"]
    want = [today.test_client().get(u).json for u in urls]
    assert store.rollback(old) == old
    app = create_app(settings, background=False)
    try:
        assert app.extensions["hybridserve"].engine.snapshot.id == old
        for url, w in zip(urls, want):
            got = app.test_client().get(url).json
            assert got["snapshot"] == old and got["source"] == w["source"], url
            for key in ("items", "prediction"):
                assert got.get(key) == w.get(key), url
    finally:
        app.extensions["hybridserve"].close()
        today.extensions["hybridserve"].close()
    nxt = run(settings)  # the next run reads the format-2 CURRENT's row counts and writes today's format
    assert store.format_of(nxt.snapshot_id) == 3 and nxt.manifest["parent"] == old
