"""The model bundle and the vectorised query functions that answer every query.

The batch job calls these with thousands of queries at a time, the API with one, so batch
and live answers agree by construction. Functions take and return arrays; ids outside the
bundle map to index -1 and are the caller's to reject.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import joblib
import numpy as np
from scipy import sparse

LOG = logging.getLogger(__name__)

# Files of a saved bundle (inside a snapshot's model/ folder).
_ARRAYS = ("item_ids", "user_ids", "item_vecs", "user_vecs", "item_stats", "user_stats",
           "item_genres", "seen_indptr", "seen_items")
_INDEX_FILE = "items.faiss"
_REGRESSOR_FILE = "regressor.joblib"
_META_FILE = "meta.json"

# Extra candidates asked of FAISS beyond what is kept, so exact re-scoring decides the cut.
_MARGIN = 8

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class ModelBundle:
    """Everything a query needs. Shapes: n users, m items, d dims, g genres.

    item_ids (m,) int64 sorted; user_ids (n,) int64 sorted; item_vecs (m, d) and user_vecs (n, d)
    float32, L2-normalised; item_stats / user_stats (., 2) float32 = (mean rating, log1p count);
    item_genres (m, g) float32 0/1; seen_indptr (n+1,) int64 + seen_items (nnz,) int32: CSR of the
    items each user has interacted with, sorted per user.
    """

    item_ids: np.ndarray
    user_ids: np.ndarray
    item_vecs: np.ndarray
    user_vecs: np.ndarray
    item_stats: np.ndarray
    user_stats: np.ndarray
    item_genres: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    index: Any
    regressor: Any
    meta: dict[str, Any] = field(default_factory=dict)
    search: SearchFn | None = None  # the kNN kernel; defaults to the FAISS index

    def __post_init__(self) -> None:
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        if self.item_vecs.shape[0] != n_items or self.user_vecs.shape[0] != n_users:
            raise ValueError("vectors do not match the id arrays")
        if self.seen_indptr.shape != (n_users + 1,):
            raise ValueError("seen_indptr must have n_users + 1 entries")
        counts = np.diff(self.seen_indptr)
        # Sorted (user, item) keys: membership of any candidate is one searchsorted.
        self._seen_keys = (np.repeat(np.arange(n_users, dtype=np.int64), counts) * n_items
                           + np.asarray(self.seen_items, dtype=np.int64))
        self._user_genre = _user_genre_profile(self.seen_indptr, self.seen_items, self.item_genres)
        self.max_seen = int(counts.max()) if n_users else 0
        if self.search is None:
            self.search = self.index.search

    # --- ids --------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def model_version(self) -> str:
        return self.meta.get("model_version", "unknown")

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """External item ids (any shape) -> row indices, -1 where unknown."""
        return lookup(self.item_ids, ids)

    def user_index(self, ids: np.ndarray) -> np.ndarray:
        return lookup(self.user_ids, ids)

    def item_index_one(self, item_id: int) -> int:
        """One id -> row index or -1 (the request path's fast form of item_index)."""
        return _lookup_one(self.item_ids, item_id)

    def user_index_one(self, user_id: int) -> int:
        return _lookup_one(self.user_ids, user_id)

    def seen_mask(self, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """(n, c) bool: whether user uidx[r] has seen item iidx[r, j]. iidx may hold -1."""
        keys = uidx.astype(np.int64)[:, None] * self.n_items + iidx.astype(np.int64)
        pos = np.searchsorted(self._seen_keys, keys)
        pos = np.minimum(pos, max(len(self._seen_keys) - 1, 0))
        if len(self._seen_keys) == 0:
            return np.zeros(keys.shape, dtype=bool)
        return (self._seen_keys[pos] == keys) & (iidx >= 0)

    def seen_of(self, uidx: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[uidx]:self.seen_indptr[uidx + 1]]

    # --- the queries ------------------------------------------------------------
    def features(self, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """(n,) user and (n,) item indices -> (n, 6 + g) float32 rows for the rating model: cosine,
        user mean and log count, item mean and log count, the user's affinity to the item's genres,
        then the item's genre flags."""
        uidx, iidx = np.asarray(uidx, dtype=np.int64), np.asarray(iidx, dtype=np.int64)
        if uidx.shape != iidx.shape or uidx.ndim != 1:
            raise ValueError("uidx and iidx must be 1-d and of equal length")
        cos = np.einsum("ij,ij->i", self.user_vecs[uidx], self.item_vecs[iidx])
        genres = self.item_genres[iidx]
        affinity = np.einsum("ij,ij->i", self._user_genre[uidx], genres)
        return np.column_stack([cos, self.user_stats[uidx], self.item_stats[iidx], affinity, genres]
                               ).astype(np.float32, copy=False)

    def predict(self, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """Predicted ratings, (n,) float32, clipped to the rating range seen in training."""
        if len(uidx) == 0:
            return np.zeros(0, dtype=np.float32)
        pred = self.regressor.predict(self.features(uidx, iidx))
        lo, hi = self.meta.get("rating_range", (-np.inf, np.inf))
        return np.clip(pred, lo, hi).astype(np.float32)

    def similar_items(self, iidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours of each item, itself excluded.

        iidx (n,) item indices -> (ids (n, k) int64, scores (n, k) float32 cosine), padded with -1 / nan.
        """
        iidx = np.asarray(iidx, dtype=np.int64)
        q = np.ascontiguousarray(self.item_vecs[iidx])
        _, idx = self.search(q, min(k + 1 + _MARGIN, self.n_items))
        scores, idx = self._rescore(q, idx, drop=idx == iidx[:, None])
        return self._to_ids(idx[:, :k], scores[:, :k], idx[:, :k] >= 0, k)

    def recommend(self, uidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS candidates for each user's vector, unseen only, ranked by the rating model.

        uidx (n,) -> (ids (n, k) int64, predicted ratings (n, k) float32), padded with -1 / nan.
        The search depth depends on the bundle alone, so one query and a batch agree.
        """
        uidx = np.asarray(uidx, dtype=np.int64)
        n_cand = int(self.meta.get("candidates", 100))
        q = np.ascontiguousarray(self.user_vecs[uidx])
        _, idx = self.search(q, min(self.n_items, n_cand + self.max_seen + _MARGIN))
        _, idx = self._rescore(q, idx, drop=self.seen_mask(uidx, idx))
        return self._rank_candidates(uidx, idx, idx >= 0, n_cand, k)

    def recommend_for_items(self, item_lists: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Session recommendations: the mean of the given items' vectors, those items excluded.

        item_lists: n arrays of item indices -> (ids (n, k) int64, cosine scores (n, k) float32).
        """
        q = np.stack([self.item_vecs[np.asarray(lst, dtype=np.int64)].mean(axis=0) for lst in item_lists])
        q = normalise(q.astype(np.float32))
        longest = max(len(lst) for lst in item_lists)
        _, idx = self.search(q, min(self.n_items, k + longest + _MARGIN))
        given = np.full((len(item_lists), longest), -2, dtype=np.int64)
        for r, lst in enumerate(item_lists):
            given[r, :len(lst)] = lst
        scores, idx = self._rescore(q, idx, drop=(idx[:, :, None] == given[:, None, :]).any(axis=2))
        return self._to_ids(idx[:, :k], scores[:, :k], idx[:, :k] >= 0, k)

    # --- helpers ----------------------------------------------------------------
    def _rescore(self, q: np.ndarray, idx: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine of each candidate, computed row by row the same way for one query or many,
        then ordered by (score desc, item index asc); dropped and missing candidates go last as -1.

        FAISS proposes the candidates; its batched and single-query kernels round differently, which
        reorders near-ties. Ordering here makes batch and live answers identical.
        """
        idx = np.where(drop, -1, idx)
        scores = np.full(idx.shape, -np.inf, dtype=np.float32)
        rows = max(1, (1 << 22) // max(1, idx.shape[1] * q.shape[1]))  # bounded temporary memory
        for start in range(0, len(idx), rows):
            part = idx[start:start + rows]
            vecs = self.item_vecs[np.maximum(part, 0)]
            s = np.einsum("kd,knd->kn", q[start:start + rows], vecs)
            scores[start:start + rows] = np.where(part >= 0, s, -np.inf)
        order = np.lexsort((np.where(idx >= 0, idx, np.iinfo(np.int64).max), -scores), axis=1)
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)

    def _rank_candidates(self, uidx, idx, keep, n_cand, k):
        # First n_cand kept candidates per row, in search order.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :n_cand]
        cand = np.take_along_axis(idx, order, axis=1)
        valid = np.take_along_axis(keep, order, axis=1)
        rows = np.repeat(uidx, cand.shape[1])
        flat_valid = valid.ravel()
        pred = np.full(cand.size, -np.inf, dtype=np.float32)
        pred[flat_valid] = self.predict(rows[flat_valid], cand.ravel()[flat_valid])
        pred = pred.reshape(cand.shape)
        # Highest prediction first; ties keep search order (stable sort).
        rank = np.argsort(-pred, axis=1, kind="stable")[:, :k]
        return self._to_ids(np.take_along_axis(cand, rank, axis=1), np.take_along_axis(pred, rank, axis=1),
                            np.take_along_axis(valid, rank, axis=1), k)

    def _to_ids(self, idx, scores, valid, k):
        n = idx.shape[0]
        ids = np.full((n, k), -1, dtype=np.int64)
        out = np.full((n, k), np.nan, dtype=np.float32)
        w = idx.shape[1]
        ids[:, :w] = np.where(valid, self.item_ids[np.where(valid, idx, 0)], -1)
        out[:, :w] = np.where(valid, scores, np.nan)
        return ids, out

    # --- persistence ------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        faiss.write_index(self.index, str(folder / _INDEX_FILE))
        joblib.dump(self.regressor, folder / _REGRESSOR_FILE)
        (folder / _META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @staticmethod
    def read_meta(folder: Path) -> dict[str, Any]:
        return json.loads((Path(folder) / _META_FILE).read_text())

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> "ModelBundle":
        """Load a saved bundle; arrays are memory-mapped so worker processes share pages."""
        folder = Path(folder)
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None) for name in _ARRAYS}
        meta = json.loads((folder / _META_FILE).read_text())
        index = read_index(folder / _INDEX_FILE, meta.get("index", ""), mmap)
        set_search_params(index, meta)
        regressor = joblib.load(folder / _REGRESSOR_FILE)
        return cls(**arrays, index=index, regressor=regressor, meta=meta)


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
    32 prefetch threads on every search: 1.7 ms for a single query that takes 0.1 ms without them.
    The lists are already in the page cache, so nothing is gained by prefetching."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0


def _lookup_one(sorted_ids: np.ndarray, key: int) -> int:
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


def _user_genre_profile(indptr: np.ndarray, items: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """(n_users, g): the share of each user's items in each genre."""
    n_users, n_items = len(indptr) - 1, genres.shape[0]
    counts = np.diff(indptr)
    seen = sparse.csr_matrix((np.ones(len(items), dtype=np.float32), np.asarray(items), np.asarray(indptr)),
                             shape=(n_users, n_items))
    prof = np.asarray(seen @ np.asarray(genres, dtype=np.float32))
    return (prof / np.maximum(counts, 1)[:, None]).astype(np.float32)
