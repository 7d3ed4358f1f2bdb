"""The numerical core of vector retrieval: tie groups, fold-in of histories, the maximum-inner-product
padding, id lookup, FAISS index reading and search parameters. Arrays in, arrays out; no paths but
the index file ``read_index`` is handed."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy import sparse

LOG = logging.getLogger(__name__)


def tie_groups(vecs: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of rows whose vectors are byte-identical and whose ``eligible`` flags agree.

    vecs (m, d) float32, eligible (m,) bool -> group_of (m,) int32, indptr (G+1,) int64, members (m,)
    int32 sorted by (group, row). Groups are numbered by their smallest row, so without duplicates
    group g is row g."""
    m = vecs.shape[0]
    if m == 0:
        return np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32)
    rows = np.ascontiguousarray(np.column_stack([np.asarray(vecs, np.float32).view(np.uint32),
                                                 np.asarray(eligible, np.uint32)]))
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    # renumber groups by their first row
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group_of = rank[inverse.ravel()].astype(np.int32)
    members = np.lexsort((np.arange(m), group_of)).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=len(first)))]).astype(np.int64)
    return group_of, indptr, members


def mips_pad(vecs: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, d+1) float32: each row extended by sqrt(max_norm^2 - |row|^2), so all rows have
    the largest row's length. Inner products with queries padded by 0 are unchanged; the
    maximum-inner-product search becomes a search among equal-length vectors, which clustering
    indexes (IVF) handle as well as cosine (Bachrach et al., 2014)."""
    vecs = np.asarray(vecs, dtype=np.float32)
    sq = np.einsum("ij,ij->i", vecs.astype(np.float64), vecs)
    extra = np.sqrt(np.maximum(sq.max(initial=0.0) - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.column_stack([vecs, extra]))


def fold_in(item_vecs: np.ndarray, indptr: np.ndarray, items: np.ndarray, metric: str,
            weights: np.ndarray | None = None) -> np.ndarray:
    """Query vectors from histories: (m, d) item (query-side) vectors and a CSR of item indices (n+1,) /
    (nnz,) -> (n, d) float32. Inner product: the (``weights``-weighted, (nnz,) float32) sum of the
    history's vectors (PureSVD's x_u V, EASE's x_u U); cosine: their normalised mean. User vectors and
    session queries both come from here (sessions unweighted)."""
    n = len(indptr) - 1
    if n == 1 and len(items) and weights is None:  # one session on the request path: no sparse matrix to build
        q = np.add.reduce(np.asarray(item_vecs)[np.asarray(items, np.int64)], axis=0, dtype=np.float32)[None]
        return normalise(q) if metric == "cosine" else q
    w = np.ones(len(items), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    x = sparse.csr_matrix((w, np.asarray(items, np.int64), np.asarray(indptr, np.int64)),
                          shape=(n, item_vecs.shape[0]))
    q = np.asarray(x @ np.asarray(item_vecs, dtype=np.float32), dtype=np.float32)
    return normalise(q) if metric == "cosine" else q


def search_parameters(spec: str, meta: dict[str, Any], selector) -> Any:
    """FAISS search parameters carrying ``selector`` and the index's recorded knobs."""
    knobs = meta.get("search_params") or {}
    if spec.startswith("IVF"):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(knobs.get("nprobe", 1)))
    if spec.startswith("HNSW"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(knobs.get("efSearch", 16)))
    return faiss.SearchParameters(sel=selector)


def lookup(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Positions of ``ids`` in the sorted id array, -1 where absent (vectorised)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def read_index(path: Path, spec: str, mmap: bool = True):
    """Read a FAISS index, memory-mapped where the type allows it (the vectors then live in the page
    cache, shared by every worker), else into memory."""
    if mmap:
        flag = faiss.IO_FLAG_MMAP_IFC if spec == "Flat" else faiss.IO_FLAG_MMAP
        try:
            index = faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            LOG.info("%s: no memory-mapped read for %s (%s); reading into memory", path, spec, exc)
        else:
            _no_prefetch_threads(index)
            return index
    return faiss.read_index(str(path))


def _no_prefetch_threads(index) -> None:
    """A memory-mapped IVF index reads its lists through OnDiskInvertedLists, which by default starts
    32 prefetch threads on every search: a single query an order of magnitude slower than without them.
    The lists are already in the page cache, so nothing is gained by prefetching."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0


def lookup_one(sorted_ids: np.ndarray, key: int) -> int:
    pos = int(sorted_ids.searchsorted(key))
    return pos if pos < len(sorted_ids) and sorted_ids[pos] == key else -1


def set_search_params(index, meta: dict[str, Any]) -> None:
    """Apply the recall/speed knobs recorded at training time (efSearch, nprobe)."""
    params = meta.get("search_params") or {}
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
