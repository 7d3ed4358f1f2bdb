"""The model bundle and the vectorised query functions that answer every query.

The batch job calls these with thousands of queries at a time, the API with one, so batch
and live answers agree by construction. Functions take and return arrays; ids outside the
bundle map to index -1 and are the caller's to reject. Every list is ordered by (score desc, item
id asc), exactly, in batch and live alike.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
from scipy import sparse

LOG = logging.getLogger(__name__)

# Files of a saved bundle (inside a snapshot's model/ folder).
_ARRAYS = ("item_ids", "user_ids", "item_vecs", "user_vecs", "item_support", "seen_indptr", "seen_items",
           "group_of", "group_indptr", "group_items", "user_bias", "item_bias", "user_factors", "item_factors")
_INDEX_FILE = "items.faiss"
_META_FILE = "meta.json"

# Extra candidate groups asked of FAISS beyond what is kept, so exact re-scoring decides the cut.
_MARGIN = 8

METRICS = ("ip", "cosine")

# (queries (n, d), k[, params]) -> (scores, group indices), as faiss.Index.search
SearchFn = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class ModelBundle:
    """Everything a query needs. Shapes: n users, m items, d retrieval dims, r rating factors, G tie groups.

    item_ids (m,) int64 sorted; user_ids (n,) int64 sorted; item_vecs (m, d) and user_vecs (n, d) float32,
    scored by inner product (unit rows when meta["metric"] is "cosine"); item_support (m,) int64
    interactions per item; seen_indptr (n+1,) int64 + seen_items (nnz,) int32: CSR of each user's items,
    sorted. Tie groups: items whose vectors (and similar-item eligibility) are byte-identical share one
    row of the FAISS index: group_of (m,) int32, group_indptr (G+1,) int64 + group_items (m,) int32 the
    members of each group in id order. Rating model: user_bias (n,), item_bias (m,) float32,
    user_factors (n, r), item_factors (m, r) float32, with meta["rating"] holding the global mean and
    the blend weights.
    """

    item_ids: np.ndarray
    user_ids: np.ndarray
    item_vecs: np.ndarray
    user_vecs: np.ndarray
    item_support: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    group_of: np.ndarray
    group_indptr: np.ndarray
    group_items: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    index: Any
    meta: dict[str, Any] = field(default_factory=dict)
    search: SearchFn | None = None  # the kNN kernel over group vectors; defaults to the FAISS index

    def __post_init__(self) -> None:
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        if self.item_vecs.shape[0] != n_items or self.user_vecs.shape[0] != n_users:
            raise ValueError("vectors do not match the id arrays")
        if self.seen_indptr.shape != (n_users + 1,):
            raise ValueError("seen_indptr must have n_users + 1 entries")
        if self.group_of.shape != (n_items,) or self.group_items.shape != (n_items,):
            raise ValueError("tie groups do not match the item ids")
        counts = np.diff(self.seen_indptr)
        # Sorted (user, item) keys: membership of any candidate is one searchsorted.
        self._seen_keys = (np.repeat(np.arange(n_users, dtype=np.int64), counts) * n_items
                           + np.asarray(self.seen_items, dtype=np.int64))
        self.max_seen = int(counts.max()) if n_users else 0
        self._group_size = np.diff(self.group_indptr)
        self._group_rep = np.asarray(self.group_items[self.group_indptr[:-1]], dtype=np.int64)
        self.max_group = int(self._group_size.max()) if len(self._group_size) else 0
        if self.search is None:
            index = self.index  # not self: a closure over self would be a reference cycle
            self.search = lambda q, k, params=None: index.search(q, k, params=params)
        # Similar items only among items with enough support: a FAISS selector over the groups
        # (groups never mix eligible and ineligible items), so the cut is exact inside the search.
        eligible = self.item_support[self._group_rep] >= self.min_support
        self._n_eligible = int(self._group_size[eligible].sum())  # items a similar list can hold
        self._similar_params = None
        if not eligible.all():
            self._bitmap = np.packbits(eligible, bitorder="little")  # the selector reads this memory
            self._selector = faiss.IDSelectorBitmap(len(eligible), faiss.swig_ptr(self._bitmap))
            self._similar_params = search_parameters(self.meta.get("index", "Flat"), self.meta, self._selector)

    # --- ids --------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_groups(self) -> int:
        return len(self._group_rep)

    @property
    def model_version(self) -> str:
        return self.meta.get("model_version", "unknown")

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "ip")

    @property
    def min_support(self) -> int:
        return int(self.meta.get("min_support", 0))

    def search_groups(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of (n, d) float32 queries over the group vectors -> (scores, group indices) (n, k).

        With meta["mips_pad"] the index holds each vector with one more coordinate,
        sqrt(max_norm^2 - |v|^2), so that all have the same length and an IVF index clusters them
        as well as unit vectors; queries get a 0 there, so every inner product is unchanged."""
        if self.meta.get("mips_pad"):
            q = np.ascontiguousarray(np.column_stack([q, np.zeros(len(q), np.float32)]), dtype=np.float32)
        return self.search(q, k, params) if params is not None else self.search(q, k)

    def group_vecs(self) -> np.ndarray:
        """(G, d) float32: the vectors the FAISS index holds, one per tie group."""
        return np.ascontiguousarray(self.item_vecs[self._group_rep])

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
        if len(self._seen_keys) == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.searchsorted(self._seen_keys, keys)
        pos = np.minimum(pos, len(self._seen_keys) - 1)
        return (self._seen_keys[pos] == keys) & (iidx >= 0)

    def seen_of(self, uidx: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[uidx]:self.seen_indptr[uidx + 1]]

    # --- the queries ------------------------------------------------------------
    def predict(self, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """Predicted ratings for (n,) user and (n,) item indices -> (n,) float32, clipped to the rating
        range seen in training: a blend of the regularised bias baseline and the biased factor model."""
        uidx, iidx = np.asarray(uidx, dtype=np.int64), np.asarray(iidx, dtype=np.int64)
        if uidx.shape != iidx.shape or uidx.ndim != 1:
            raise ValueError("uidx and iidx must be 1-d and of equal length")
        if len(uidx) == 0:
            return np.zeros(0, dtype=np.float32)
        r = self.meta["rating"]
        base = r["global_mean"] + self.user_bias[uidx].astype(np.float64) + self.item_bias[iidx]
        inter = np.einsum("ij,ij->i", self.user_factors[uidx].astype(np.float64), self.item_factors[iidx])
        w = r["blend"]  # [intercept, weight of the baseline, weight of the interaction term]
        pred = w[0] + w[1] * base + w[2] * inter
        lo, hi = self.meta.get("rating_range", (-np.inf, np.inf))
        return np.clip(pred, lo, hi).astype(np.float32)

    def similar_items(self, iidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours of each item by the bundle's metric, itself excluded, only items with at
        least meta["min_support"] interactions.

        iidx (n,) item indices -> (ids (n, k) int64, scores (n, k) float32), padded with -1 / nan.
        """
        iidx = np.asarray(iidx, dtype=np.int64)
        q = np.ascontiguousarray(self.item_vecs[iidx])
        idx, scores = self._candidates(q, k + 1, k + 1, params=self._similar_params)
        return self._finish(idx, scores, idx == iidx[:, None], k)

    def recommend(self, uidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unseen items for each user, by inner product of the user's vector with the item vectors.

        uidx (n,) -> (ids (n, k) int64, scores (n, k) float32), padded with -1 / nan. The search
        depth depends on the bundle and k alone, so one query and a batch agree.
        """
        uidx = np.asarray(uidx, dtype=np.int64)
        q = np.ascontiguousarray(self.user_vecs[uidx])
        need = k + self.max_seen
        idx, scores = self._candidates(q, need, need)
        return self._finish(idx, scores, self.seen_mask(uidx, idx), k)

    def recommend_for_items(self, item_lists: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Session recommendations: the session is folded in exactly as a user's history is (see
        fold_in), then searched like a user among the items similar items come from (at least
        meta["min_support"] interactions), the given items excluded.

        item_lists: n arrays of item indices -> (ids (n, k) int64, scores (n, k) float32).
        """
        lists = [np.asarray(lst, dtype=np.int64) for lst in item_lists]
        indptr = np.concatenate([[0], np.cumsum([len(lst) for lst in lists])]).astype(np.int64)
        flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        q = fold_in(self.item_vecs, indptr, flat, self.metric)
        longest = max((len(lst) for lst in lists), default=0)
        idx, scores = self._candidates(q, k + longest, k + longest, params=self._similar_params)
        given = np.full((len(lists), max(longest, 1)), -2, dtype=np.int64)
        for r, lst in enumerate(lists):
            given[r, :len(lst)] = lst
        drop = (idx[:, :, None] == given[:, None, :]).any(axis=2)
        return self._finish(idx, scores, drop, k)

    def session_from_lists(self, given: np.ndarray, neighbours: np.ndarray, list_scores: np.ndarray,
                           k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A session's recommendations assembled from its items' similar-item lists, or None when the
        lists cannot prove them (Fagin's threshold algorithm).

        given (m,) item indices; neighbours (m, D) item indices of each one's similar items (-1
        padded) with their scores (m, D), all lists equally deep, as similar_items(given, D) returns
        them. The session's score of an item is its inner product with the folded-in query, a
        positive multiple c of the sum of the given vectors; so an item in none of the lists scores
        at most c * (the sum of each list's last score). Every listed item is scored exactly as the
        search scores it; when the k-th best beats that bound the top k are exactly the search's
        (with an exact index; with an approximate one, as exact as the lists). A list shorter than
        D holds every item there is, and then nothing is unlisted.

        -> (ids (k',) int64, scores (k',) float32) with k' <= k, as recommend_for_items gives them.
        """
        given = np.asarray(given, dtype=np.int64)
        neighbours = np.asarray(neighbours, dtype=np.int64)
        list_scores = np.asarray(list_scores, dtype=np.float32)
        m, depth = neighbours.shape
        if m == 0 or depth == 0 or m != len(given):
            return None
        lengths = (neighbours >= 0).sum(axis=1)
        own = (self.item_support[given] >= self.min_support).astype(np.int64)  # a list leaves out its item
        complete = lengths == self._n_eligible - own
        if not complete.any() and (lengths < depth).any():
            return None  # a short list that is not the whole catalogue: nothing to bound with
        raw = fold_in(self.item_vecs, np.array([0, m], dtype=np.int64), given, "ip")
        norm = float(np.linalg.norm(raw))
        if norm == 0.0:
            return None
        q, scale = (normalise(raw), 1.0 / norm) if self.metric == "cosine" else (raw, 1.0)  # as fold_in
        cand = np.unique(neighbours[neighbours >= 0])
        cand = cand[~(cand[:, None] == given[None, :]).any(axis=1)]
        if len(cand) == 0:
            return None
        scores = np.einsum("kd,knd->kn", q, self.item_vecs[cand][None])[0]
        order = np.lexsort((cand, -scores))[:k]
        ids, top = cand[order], scores[order]
        if not complete.any():
            last = list_scores[np.arange(m), lengths - 1].astype(np.float64)
            bound = scale * float(last.sum())
            # strictly above, with room for float32 rounding in the lists' and these scores
            margin = 1e-5 * (abs(bound) + abs(float(top[-1]))) + 1e-6
            if len(ids) < k or not float(top[-1]) > bound + margin:
                return None
        return self.item_ids[ids].astype(np.int64), top

    # --- helpers ----------------------------------------------------------------
    def _candidates(self, q: np.ndarray, depth: int, cap: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS proposes ``depth`` + margin tie groups per query; each is re-scored exactly with its one
        vector and expanded into its first ``cap`` members (in id order), every member carrying the
        group's score, so identical vectors tie exactly whatever kernel FAISS used.

        Returns item indices (n, c) (-1 = none) and float32 scores (n, c) (-inf = none)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n = q.shape[0]
        depth = min(self.n_groups, depth + _MARGIN)
        if n == 0 or depth == 0:
            return np.full((n, 0), -1, np.int64), np.full((n, 0), -np.inf, np.float32)
        _, groups = self.search_groups(q, depth, params)
        groups = np.asarray(groups, dtype=np.int64)
        ok = groups >= 0
        scores = np.full(groups.shape, -np.inf, dtype=np.float32)
        rows = max(1, (1 << 22) // max(1, groups.shape[1] * q.shape[1]))  # bounded temporary memory
        for start in range(0, n, rows):
            part = groups[start:start + rows]
            vecs = self.item_vecs[self._group_rep[np.maximum(part, 0)]]
            s = np.einsum("kd,knd->kn", q[start:start + rows], vecs)
            scores[start:start + rows] = np.where(part >= 0, s, -np.inf)
        if self.max_group <= 1:
            return np.where(ok, self._group_rep[np.maximum(groups, 0)], -1), scores
        sizes = np.where(ok, np.minimum(self._group_size[np.maximum(groups, 0)], cap), 0)
        per_row = sizes.sum(axis=1)
        flat_sizes = sizes.ravel()
        flat_groups = np.repeat(groups.ravel(), flat_sizes)
        within = np.arange(len(flat_groups)) - np.repeat(np.cumsum(flat_sizes) - flat_sizes, flat_sizes)
        members = self.group_items[self.group_indptr[flat_groups] + within]
        row = np.repeat(np.arange(n), per_row)
        col = np.arange(len(members)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        width = int(per_row.max()) if n else 0
        idx = np.full((n, width), -1, dtype=np.int64)
        out = np.full((n, width), -np.inf, dtype=np.float32)
        idx[row, col] = members
        out[row, col] = np.repeat(scores.ravel(), flat_sizes)
        return idx, out

    def _finish(self, idx: np.ndarray, scores: np.ndarray, drop: np.ndarray, k: int):
        """Drop what must not be shown, order by (score desc, item id asc) and keep k, as ids."""
        idx = np.where(drop, -1, idx)
        scores = np.where(idx >= 0, scores, -np.inf)
        # item indices follow item ids (both sorted), so the index is the id tie-break
        order = np.lexsort((np.where(idx >= 0, idx, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
        idx, scores = np.take_along_axis(idx, order, axis=1), np.take_along_axis(scores, order, axis=1)
        n = idx.shape[0]
        ids = np.full((n, k), -1, dtype=np.int64)
        out = np.full((n, k), np.nan, dtype=np.float32)
        w = idx.shape[1]
        valid = idx >= 0
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
        (folder / _META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @staticmethod
    def read_meta(folder: Path) -> dict[str, Any]:
        return json.loads((Path(folder) / _META_FILE).read_text())

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> "ModelBundle":
        """Load a saved bundle; arrays are memory-mapped so worker processes share pages."""
        folder = Path(folder)
        # plain ndarray views of the maps: indexing a np.memmap costs microseconds of subclass bookkeeping
        arrays = {name: np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None))
                  for name in _ARRAYS}
        meta = json.loads((folder / _META_FILE).read_text())
        index = read_index(folder / _INDEX_FILE, meta.get("index", ""), mmap)
        set_search_params(index, meta)
        return cls(**arrays, index=index, meta=meta)

    @classmethod
    def from_vectors(cls, item_ids: np.ndarray, item_vecs: np.ndarray,
                     index_builder: Callable[[np.ndarray], tuple[Any, dict[str, Any]]],
                     user_ids: np.ndarray | None = None, user_vecs: np.ndarray | None = None,
                     item_support: np.ndarray | None = None, seen_indptr: np.ndarray | None = None,
                     seen_items: np.ndarray | None = None, rating: dict[str, np.ndarray] | None = None,
                     meta: dict[str, Any] | None = None) -> "ModelBundle":
        """A bundle from vectors: tie groups computed, the index built over one vector per group by
        ``index_builder((G, d) float32) -> (FAISS index, meta entries such as "index" and
        "search_params", and "mips_pad" when it indexed mips_pad(vectors))``. Missing parts default
        to empty / zero."""
        meta = dict(meta or {})
        meta.setdefault("metric", "ip")
        meta.setdefault("rating", {"global_mean": 0.0, "blend": [0.0, 1.0, 1.0]})
        n_items, d = item_vecs.shape
        user_ids = np.zeros(0, np.int64) if user_ids is None else user_ids
        user_vecs = np.zeros((len(user_ids), d), np.float32) if user_vecs is None else user_vecs
        item_support = np.zeros(n_items, np.int64) if item_support is None else item_support
        seen_indptr = np.zeros(len(user_ids) + 1, np.int64) if seen_indptr is None else seen_indptr
        seen_items = np.zeros(0, np.int32) if seen_items is None else seen_items
        rating = rating or {}
        eligible = item_support >= int(meta.get("min_support", 0))
        group_of, group_indptr, group_items = tie_groups(item_vecs, eligible)
        group_vecs = np.ascontiguousarray(item_vecs[group_items[group_indptr[:-1]]], dtype=np.float32)
        # the builder decides whether its index holds the vectors padded (meta "mips_pad", see mips_pad)
        index, index_meta = index_builder(group_vecs)
        meta.update(index_meta)
        return cls(item_ids=item_ids, user_ids=user_ids, item_vecs=item_vecs, user_vecs=user_vecs,
                   item_support=np.asarray(item_support, np.int64), seen_indptr=seen_indptr, seen_items=seen_items,
                   group_of=group_of, group_indptr=group_indptr, group_items=group_items,
                   user_bias=rating.get("user_bias", np.zeros(len(user_ids), np.float32)),
                   item_bias=rating.get("item_bias", np.zeros(n_items, np.float32)),
                   user_factors=rating.get("user_factors", np.zeros((len(user_ids), 1), np.float32)),
                   item_factors=rating.get("item_factors", np.zeros((n_items, 1), np.float32)),
                   index=index, meta=meta)


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


def fold_in(item_vecs: np.ndarray, indptr: np.ndarray, items: np.ndarray, metric: str) -> np.ndarray:
    """Query vectors from histories: (m, d) item vectors and a CSR of item indices (n+1,) / (nnz,) ->
    (n, d) float32. Inner product: the sum of the history's vectors (PureSVD's x_u V); cosine: their
    normalised mean. User vectors and session queries both come from here."""
    n = len(indptr) - 1
    if n == 1 and len(items):  # one history (a session on the request path): no sparse matrix to build
        q = np.add.reduce(np.asarray(item_vecs)[np.asarray(items, np.int64)], axis=0, dtype=np.float32)[None]
        return normalise(q) if metric == "cosine" else q
    x = sparse.csr_matrix((np.ones(len(items), dtype=np.float32), np.asarray(items, np.int64),
                           np.asarray(indptr, np.int64)), shape=(n, item_vecs.shape[0]))
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
