"""Your own embeddings: validation with one-line errors, and answers equal to brute-force search over
the supplied vectors (similar items, user recs, session recs), through a real batch run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.__main__ import main
from batch.embeddings import ids_path, read_vectors, write_vectors
from batch.job import run
from serving.models.recommender import ModelBundle
from serving.store import Store
from conftest import make_settings


def _inputs(root):
    inter = pd.read_parquet(root / "inputs" / "interactions.parquet")
    items = pd.read_parquet(root / "inputs" / "items.parquet")
    return inter, items


def _order(scores: np.ndarray, drop: np.ndarray, k: int) -> np.ndarray:
    """Brute force: indices by (score desc, index asc), dropped ones excluded."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[~drop[order]][:k]


@pytest.fixture(scope="module")
def supplied(tmp_path_factory, published):
    """A run with supplied item vectors (cosine) for every item but the last, and user vectors for half
    the users; exact duplicate vectors included, so validation meets exact ties."""
    import shutil
    root0, _, _ = published
    root = tmp_path_factory.mktemp("supplied")
    shutil.copytree(root0 / "inputs", root / "inputs")
    inter, items = _inputs(root)
    rng = np.random.default_rng(5)
    item_ids = np.sort(items["item_id"].to_numpy())[:-1]
    vecs = rng.normal(size=(len(item_ids), 12)).astype(np.float32)
    vecs[1::7] = vecs[0]  # a large group of identical vectors: exact ties everywhere
    write_vectors(root / "items.parquet", item_ids, vecs)
    users = np.unique(inter["user_id"])[::2]
    uvecs = rng.normal(size=(len(users), 12)).astype(np.float32)
    np.save(root / "users.npy", uvecs)
    np.save(ids_path(root / "users.npy"), users)
    settings, cfg = make_settings(root, embeddings={"item_vectors": str(root / "items.parquet"),
                                                    "user_vectors": str(root / "users.npy"), "metric": "cosine"},
                                  train={"similar_min_support": 0})
    result = run(settings)
    store = Store(settings["paths.store"])
    bundle = ModelBundle.load(store.model_dir(result.snapshot_id))
    return root, settings, cfg, result, bundle, (item_ids, vecs), (users, uvecs)


def test_supplied_vectors_serve_similar_items_like_brute_force(supplied):
    root, settings, _, result, bundle, (item_ids, vecs), _ = supplied
    assert result.manifest["validation"]["similar_items_mismatches"] == 0
    assert bundle.meta["metric"] == "cosine" and bundle.meta["vectors"].endswith("items.parquet")
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    all_ids = bundle.item_ids
    full = np.zeros((len(all_ids), unit.shape[1]))
    full[np.searchsorted(all_ids, item_ids)] = unit  # the item without a vector gets zeros
    k = settings["batch.k_max"]
    table = Store(settings["paths.store"]).read_table(result.snapshot_id, "similar_items").to_pandas()
    for row in table.sample(30, random_state=0).itertuples():
        i = int(np.searchsorted(all_ids, row.item_id))
        drop = np.zeros(len(all_ids), bool)
        drop[i] = True
        want = _order(full @ full[i], drop, k)
        np.testing.assert_array_equal(row.neighbor_ids, all_ids[want])


def test_supplied_user_vectors_used_and_the_rest_folded_in(supplied):
    root, settings, _, result, bundle, (item_ids, vecs), (users, uvecs) = supplied
    inter, _ = _inputs(root)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    full = np.zeros((bundle.n_items, unit.shape[1]))
    full[np.searchsorted(bundle.item_ids, item_ids)] = unit
    seen = inter.groupby("user_id")["item_id"].apply(lambda s: np.searchsorted(bundle.item_ids, np.sort(s.to_numpy())))
    given = dict(zip(users.tolist(), uvecs))
    checked = {"supplied": 0, "folded": 0}
    for uid in np.unique(inter["user_id"])[:40]:
        q = given.get(int(uid))
        kind = "supplied" if q is not None else "folded"
        if q is None:  # cosine: the normalised mean of the history's unit vectors
            q = full[seen[uid]].mean(axis=0)
        q = q / np.linalg.norm(q)
        drop = np.asarray(bundle.item_support) < bundle.min_support  # rare items: never recommended
        drop[seen[uid]] = True
        want = bundle.item_ids[_order(full @ q, drop, 10)]
        got, _ = bundle.recommend(bundle.user_index([uid]), 10)
        np.testing.assert_array_equal(got[0], want)
        checked[kind] += 1
    assert checked["supplied"] and checked["folded"]


def test_session_recs_fold_in_the_session_like_a_history(supplied):
    _, _, _, _, bundle, (item_ids, vecs), _ = supplied
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    full = np.zeros((bundle.n_items, unit.shape[1]))
    full[np.searchsorted(bundle.item_ids, item_ids)] = unit
    session = np.array([3, 17, 40])
    q = full[session].mean(axis=0)
    drop = np.zeros(bundle.n_items, bool)
    drop[session] = True
    want = bundle.item_ids[_order(full @ (q / np.linalg.norm(q)), drop, 12)]
    got, _ = bundle.recommend_for_items([session], 12)
    np.testing.assert_array_equal(got[0], want)


def _write_list_parquet(path, ids, rows):
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()),
                             "vector": pa.array(rows, pa.list_(pa.float32()))}), path)


BAD = {
    "ragged": ("vector", "dimension is not constant"),
    "nan": ("vector", "1 vectors hold NaN"),
    "dup": ("item_id", "1 ids appear more than once (first: 1, 2 times)"),
    "unknown": ("item_id", "1 ids are not in the catalogue (first: 999999)"),
    "string_ids": ("item_id", "expected int64 ids, got string"),
    "npy_no_ids": ("item_id", "file not found"),
    "npy_count": ("item_id", "2 ids for 3 vectors"),
    "no_vector_column": ("vector", "missing column"),
}


def _bad_file(kind, root):
    if kind == "ragged":
        _write_list_parquet(root / "v.parquet", [1, 2], [[1.0, 2.0], [1.0, 2.0, 3.0]])
    elif kind == "nan":
        write_vectors(root / "v.parquet", [1, 2], np.array([[1, np.nan], [1, 2]], np.float32))
    elif kind == "dup":
        write_vectors(root / "v.parquet", [1, 1, 2], np.ones((3, 4), np.float32))
    elif kind == "unknown":
        write_vectors(root / "v.parquet", [1, 999999], np.ones((2, 4), np.float32))
    elif kind == "string_ids":
        pq.write_table(pa.table({"item_id": ["a"], "vector": pa.array([[1.0]], pa.list_(pa.float32()))}),
                       root / "v.parquet")
    elif kind == "no_vector_column":
        pq.write_table(pa.table({"item_id": pa.array([1], pa.int64()), "vec": [1.0]}), root / "v.parquet")
    elif kind == "npy_no_ids":
        np.save(root / "v.npy", np.ones((3, 4), np.float32))
        return root / "v.npy", ids_path(root / "v.npy")
    elif kind == "npy_count":
        np.save(root / "v.npy", np.ones((3, 4), np.float32))
        np.save(ids_path(root / "v.npy"), np.array([1, 2]))
        return root / "v.npy", ids_path(root / "v.npy")
    return root / "v.parquet", root / "v.parquet"


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_vectors_one_line_exit_1_store_untouched(workspace, capsys, kind):
    root, settings, cfg, first = workspace
    path, named = _bad_file(kind, root)
    cfg.write_text(cfg.read_text() + f'[embeddings]\nitem_vectors = "{path}"\n')
    rc = main(["--config", str(cfg), "run"])
    err = capsys.readouterr().err
    field, message = BAD[kind]
    assert rc == 1
    assert err.startswith(f"error: {named}: {field}: ") and message in err, err
    assert err.count("\n") == 1, err
    assert Store(settings["paths.store"]).current_id() == first.snapshot_id


def test_parquet_and_npy_read_alike(tmp_path):
    rng = np.random.default_rng(0)
    ids, vecs = np.array([5, 2, 9]), rng.normal(size=(3, 6)).astype(np.float32)
    write_vectors(tmp_path / "a.parquet", ids, vecs)
    np.save(tmp_path / "a.npy", vecs.astype(np.float64))
    np.save(ids_path(tmp_path / "a.npy"), ids.astype(np.int32))
    for name in ("a.parquet", "a.npy"):
        got_ids, got = read_vectors(tmp_path / name, "item_id")
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got, vecs)
        assert got.dtype == np.float32 and got_ids.dtype == np.int64
