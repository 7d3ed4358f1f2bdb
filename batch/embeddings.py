"""Your own embeddings: read and validate supplied item (and user) vectors.

Two formats, told apart by the file name:
    *.parquet   columns <key> int64 and vector fixed_size_list<float32, d> (or list<float>, constant d)
    *.npy       an (n, d) float array, with the ids beside it in <name>.ids.npy (n,) integers

Every problem is an InputError naming the file and field (the CLI prints it as one line, exit 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.errors import InputError

LOG = logging.getLogger(__name__)


@dataclass
class Vectors:
    """Supplied vectors aligned to known ids: ids (n,) int64 sorted, vecs (n, d) float32."""

    ids: np.ndarray
    vecs: np.ndarray
    path: Path


def ids_path(path: Path) -> Path:
    """Where the ids of an .npy vector file live: items.npy -> items.ids.npy."""
    return Path(path).with_suffix(".ids.npy")


def read_vectors(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, vecs (n, d) float32) as stored, checked for shape, finiteness and unique ids."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    if path.suffix == ".npy":
        vecs = _load_npy(path, "vector")
        ids = _load_npy(ids_path(path), key)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(ids_path(path), key, f"expected a 1-d integer array, got {ids.dtype} {ids.shape}")
        if vecs.ndim != 2 or vecs.shape[1] == 0:
            raise InputError(path, "vector", f"expected an (n, d) array, got shape {vecs.shape}")
        if not (np.issubdtype(vecs.dtype, np.floating) or np.issubdtype(vecs.dtype, np.integer)):
            raise InputError(path, "vector", f"expected numbers, got {vecs.dtype}")
        if len(ids) != len(vecs):
            raise InputError(ids_path(path), key, f"{len(ids)} ids for {len(vecs)} vectors in {path.name}")
    elif path.suffix == ".parquet":
        ids, vecs = _read_parquet(path, key)
    else:
        raise InputError(path, None, "expected a .parquet or .npy file")
    ids = ids.astype(np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        vecs32 = vecs.astype(np.float32)
    bad = ~np.isfinite(vecs32).all(axis=1)
    if bad.any():
        raise InputError(path, "vector", f"{int(bad.sum())} vectors hold NaN, infinity or values beyond float32 "
                                         f"(first: {key} {ids[bad][0]})")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise InputError(path, key, f"{len(dup)} ids appear more than once (first: {dup[0]}, {counts[counts > 1][0]} times)")
    if len(ids) == 0:
        raise InputError(path, None, "no vectors")
    return ids, vecs32


def load_vectors(path: Path, key: str, known_ids: np.ndarray, what: str) -> Vectors:
    """Read, validate and align supplied vectors to ``known_ids`` (sorted int64): every id must be known."""
    ids, vecs = read_vectors(path, key)
    pos = np.searchsorted(known_ids, ids)
    pos = np.minimum(pos, max(len(known_ids) - 1, 0))
    unknown = (known_ids[pos] != ids) if len(known_ids) else np.ones(len(ids), bool)
    if unknown.any():
        raise InputError(Path(path), key, f"{int(unknown.sum())} ids are not in the {what} (first: {ids[unknown][0]})")
    order = np.argsort(ids, kind="stable")
    LOG.info("%s: %d %s vectors of dimension %d", path, len(ids), key, vecs.shape[1])
    return Vectors(ids[order], np.ascontiguousarray(vecs[order]), Path(path))


def _load_npy(path: Path, field: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, field, "file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, field, f"not a readable .npy array ({str(exc).splitlines()[0]})") from None


def _read_parquet(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, None, f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    for name in (key, "vector"):
        if name not in table.column_names:
            raise InputError(path, name, "missing column")
        if table.column(name).null_count:
            raise InputError(path, name, f"{table.column(name).null_count} null values")
    id_col = table.column(key)
    if not pa.types.is_integer(id_col.type):
        raise InputError(path, key, f"expected int64 ids, got {id_col.type}")
    col = table.column("vector").combine_chunks()
    t = col.type
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = np.asarray(col.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            first = int(np.flatnonzero(lengths != lengths[0])[0])
            raise InputError(path, "vector", f"dimension is not constant: row 0 has {lengths[0]}, "
                                             f"row {first} ({key} {id_col[first].as_py()}) has {lengths[first]}")
        d = int(lengths[0]) if len(lengths) else 0
    else:
        raise InputError(path, "vector", f"expected fixed_size_list<float32>, got {t}")
    values = col.flatten()
    if values.null_count:
        raise InputError(path, "vector", f"{values.null_count} null values inside vectors")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise InputError(path, "vector", f"expected float values, got {values.type}")
    if d == 0:
        raise InputError(path, "vector", "vectors have dimension 0")
    vecs = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(len(col), d)
    return np.asarray(id_col.to_numpy()), vecs


def write_vectors(path: Path, ids: np.ndarray, vecs: np.ndarray, key: str = "item_id") -> None:
    """Write vectors in the Parquet format read_vectors reads (for examples and tests)."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), vecs.shape[1])
    pq.write_table(pa.table({key: pa.array(np.asarray(ids, np.int64), pa.int64()), "vector": arr}), path)
