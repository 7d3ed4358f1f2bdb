"""Re-signed corrupt snapshots (the manifest's checksums recomputed, so only a bounds check can catch
them) are refused before a swap, with a line naming the file: k_max past the stored lists' width, a row
index past the end of the arrays, prediction keys out of range."""
from __future__ import annotations

import json

import numpy as np
import pytest

from serving.errors import SnapshotError
from serving.snapshot import LoadedSnapshot
from serving.store import MANIFEST, Store, sha256_file


def _resign(store: Store, sid: str, edit_manifest=None) -> None:
    """Recompute every file's checksum and size in the manifest (after ``edit_manifest``)."""
    folder = store.snapshot_dir(sid)
    manifest = json.loads((folder / MANIFEST).read_text())
    if edit_manifest:
        edit_manifest(manifest)
    for rel in manifest["files"]:
        manifest["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _edit_array(path, change) -> None:
    a = np.load(path)
    change(a)
    np.save(path, a)


@pytest.fixture
def live(workspace):
    root, settings, cfg, first = workspace
    store = Store(settings["paths.store"])
    LoadedSnapshot.load(store, first.snapshot_id)  # loads as published
    return store, first.snapshot_id


def test_k_max_past_the_stored_lists_is_refused(live):
    store, sid = live

    def huge(m):
        m["k_max"] = 10**9
        m["recommender"]["k_max"] = 10**9
    _resign(store, sid, huge)
    store.verify(sid)  # checksums and shape pass: only the bound can refuse it
    with pytest.raises(SnapshotError, match=r"does not load: k_max 1000000000 in the manifest, but similar_ids\.npy "
                                            r"holds lists of 20"):
        LoadedSnapshot.load(store, sid)


def test_a_row_index_out_of_range_is_refused(live):
    store, sid = live
    folder = store.model_dir(sid, "recommender")
    n = len(np.load(folder / "recs_ids.npy"))

    def past_the_end(row):
        row[np.flatnonzero(row >= 0)[0]] = n + 5
    _edit_array(folder / "recs_row.npy", past_the_end)
    _resign(store, sid)
    store.verify(sid)
    with pytest.raises(SnapshotError, match=rf"recs_row\.npy: row index {n + 5} out of range for the {n} rows of "
                                            r"recs_ids\.npy"):
        LoadedSnapshot.load(store, sid)


def test_a_prediction_key_out_of_range_is_refused(live):
    store, sid = live
    folder = store.model_dir(sid, "rating")
    n_users, n_items = len(np.load(folder / "user_ids.npy")), len(np.load(folder / "item_ids.npy"))

    def past_the_end(keys):
        keys[-1] = n_users * n_items + 3
    _edit_array(folder / "pred_keys.npy", past_the_end)
    _resign(store, sid)
    with pytest.raises(SnapshotError, match=r"pred_keys\.npy: keys must increase within"):
        LoadedSnapshot.load(store, sid)


def test_a_short_factor_array_is_refused(live):
    store, sid = live
    folder = store.model_dir(sid, "rating")
    np.save(folder / "item_bias.npy", np.load(folder / "item_bias.npy")[:-1])
    _resign(store, sid)
    with pytest.raises(SnapshotError, match=r"item_bias\.npy has \d+ rows for \d+ items"):
        LoadedSnapshot.load(store, sid)
