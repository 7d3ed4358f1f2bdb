"""The recommender: item and user vectors searched with FAISS -- similar items, user recommendations
and sessions -- as one model kind, with the vectorised query functions that answer every query.

The batch job calls these with thousands of queries at a time, the API with one, so batch and live
answers agree by construction. Functions take and return arrays; ids outside the bundle map to index
-1 and are the caller's to reject. Every list is ordered by (score desc, item id asc), exactly, in
batch and live alike. The vectors are trained by batch.train (EASE factored, or PureSVD) or supplied by
the user.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa

from serving.errors import NotFound
from serving.models.base import Lists, Model, Plan, Query
from serving.models.vectors import (fold_in, lookup, lookup_one, normalise, read_index, search_parameters,
                                    set_search_params, tie_groups)
from serving.store.writer import save_array

LOG = logging.getLogger(__name__)

# Files of a saved bundle (in the recommender's folder of a snapshot, and of the trained-model cache).
_ARRAYS = ("item_ids", "user_ids", "item_vecs", "user_vecs", "item_support", "seen_indptr", "seen_items",
           "group_of", "group_indptr", "group_items")
# The query side of a model whose scores are x_u U V^T with U != V (EASE factored): (m, d), or
# (0, d) when queries use the item vectors themselves (PureSVD, supplied vectors). Bundles saved
# before it existed have no such file and read as the latter.
_QUERY_FILE = "query_vecs.npy"
_INDEX_FILE = "items.faiss"
_META_FILE = "meta.json"
BUNDLE_FILES = tuple(f"{a}.npy" for a in _ARRAYS) + (_QUERY_FILE, _INDEX_FILE, _META_FILE)

# Extra candidate groups asked of FAISS beyond what is kept, so exact re-scoring decides the cut.
_MARGIN = 8

METRICS = ("ip", "cosine")

# (queries (n, d), k[, params]) -> (scores, group indices), as faiss.Index.search
SearchFn = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class ModelBundle:
    """Everything a query needs. Shapes: n users, m items, d retrieval dims, G tie groups.

    item_ids (m,) int64 sorted; user_ids (n,) int64 sorted; item_vecs (m, d) and user_vecs (n, d) float32,
    scored by inner product (unit rows when meta["metric"] is "cosine"); item_support (m,) int64
    interactions per item; seen_indptr (n+1,) int64 + seen_items (nnz,) int32: CSR of each user's items,
    sorted. Tie groups: items whose vectors (and similar-item eligibility) are byte-identical share one
    row of the FAISS index: group_of (m,) int32, group_indptr (G+1,) int64 + group_items (m,) int32 the
    members of each group in id order. query_vecs (m, d) float32 or None: what an item contributes
    to a query (a similar-items query, a session, a folded-in user) when that differs from what it
    is searched by (EASE's B ~ U V^T: queries sum rows of U, the index holds V); None: item_vecs.
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
    index: Any
    meta: dict[str, Any] = field(default_factory=dict)
    search: SearchFn | None = None  # the kNN kernel over group vectors; defaults to the FAISS index
    query_vecs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        if self.item_vecs.shape[0] != n_items or self.user_vecs.shape[0] != n_users:
            raise ValueError("vectors do not match the id arrays")
        if self.query_vecs is not None and len(self.query_vecs) == 0:
            self.query_vecs = None
        if self.query_vecs is not None and self.query_vecs.shape != self.item_vecs.shape:
            raise ValueError("query_vecs must have the item vectors' shape")
        if self.seen_indptr.shape != (n_users + 1,):
            raise ValueError("seen_indptr must have n_users + 1 entries")
        if self.group_of.shape != (n_items,) or self.group_items.shape != (n_items,):
            raise ValueError("tie groups do not match the item ids")
        counts = np.diff(self.seen_indptr)
        # Sorted (user, item) keys: membership of any candidate is one searchsorted.
        self._seen_keys = (np.repeat(np.arange(n_users, dtype=np.int64), counts) * n_items
                           + np.asarray(self.seen_items, dtype=np.int64))
        self._group_size = np.diff(self.group_indptr)
        self._group_rep = np.asarray(self.group_items[self.group_indptr[:-1]], dtype=np.int64)
        self.max_group = int(self._group_size.max()) if len(self._group_size) else 0
        if self.search is None:
            index = self.index  # not self: a closure over self would be a reference cycle
            self.search = lambda q, k, params=None: index.search(q, k, params=params)
        # Similar items, user and session recommendations only among items with enough support (one
        # rule for every list: a rare item's vector is noise): a FAISS selector over the groups
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

    @property
    def queries(self) -> np.ndarray:
        """(m, d): each item's query-side vector (query_vecs, else the item vectors)."""
        return self.item_vecs if self.query_vecs is None else self.query_vecs

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
        return lookup_one(self.item_ids, item_id)

    def user_index_one(self, user_id: int) -> int:
        return lookup_one(self.user_ids, user_id)

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
    def similar_items(self, iidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours of each item by the bundle's metric, itself excluded, only items with at
        least meta["min_support"] interactions.

        iidx (n,) item indices -> (ids (n, k) int64, scores (n, k) float32), padded with -1 / nan.
        """
        iidx = np.asarray(iidx, dtype=np.int64)
        q = np.ascontiguousarray(self.queries[iidx])
        idx, scores = self._candidates(q, k + 1, k + 1, params=self._similar_params)
        return self._finish(idx, scores, idx == iidx[:, None], k)

    def recommend(self, uidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unseen items for each user, by inner product of the user's vector with the item vectors,
        only items with at least meta["min_support"] interactions (as similar items).

        uidx (n,) -> (ids (n, k) int64, scores (n, k) float32), padded with -1 / nan. The search
        depth depends on k and the user's own history length alone, so one query and a batch agree.
        """
        uidx = np.asarray(uidx, dtype=np.int64)
        q = np.ascontiguousarray(self.user_vecs[uidx])
        # A user's seen items can take at most |history| of the candidates, so k + |history| always
        # leaves k unseen ones. The depth is each user's own (rounded up to a power of two, so a batch
        # needs a handful of searches), never the longest history of all: one user with 861 items made
        # every query ask HNSW for 879 candidates and re-score and sort them all.
        need = k + history_bucket(self.seen_indptr[uidx + 1] - self.seen_indptr[uidx])
        depths = np.unique(need)
        if len(depths) <= 1:
            d = int(depths[0]) if len(depths) else k
            idx, scores = self._candidates(q, d, d, params=self._similar_params)
        else:  # one search per depth; each user's answer is what the search alone would give it
            parts = []
            for d in depths:
                rows = np.flatnonzero(need == d)
                parts.append((rows, *self._candidates(q[rows], int(d), int(d), params=self._similar_params)))
            width = max(part[1].shape[1] for part in parts)
            idx = np.full((len(uidx), width), -1, np.int64)
            scores = np.full((len(uidx), width), -np.inf, np.float32)
            for rows, part_idx, part_scores in parts:
                idx[rows, :part_idx.shape[1]] = part_idx
                scores[rows, :part_idx.shape[1]] = part_scores
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
        q = fold_in(self.queries, indptr, flat, self.metric)
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
        raw = fold_in(self.queries, np.array([0, m], dtype=np.int64), given, "ip")
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
        if self.max_group <= 1 or self._group_size[np.maximum(groups, 0)].max(initial=0) <= 1:
            # no candidate stands for more than one item (the usual case: ties are mostly rare items,
            # which no list shows): nothing to expand
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
            save_array(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        query = self.query_vecs if self.query_vecs is not None else np.zeros((0, self.item_vecs.shape[1]), np.float32)
        save_array(folder / _QUERY_FILE, np.ascontiguousarray(query))
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
        query = folder / _QUERY_FILE
        query_vecs = np.asarray(np.load(query, mmap_mode="r" if mmap else None)) if query.is_file() else None
        meta = json.loads((folder / _META_FILE).read_text())
        index = read_index(folder / _INDEX_FILE, meta.get("index", ""), mmap)
        set_search_params(index, meta)
        return cls(**arrays, index=index, meta=meta, query_vecs=query_vecs)

    @classmethod
    def from_vectors(cls, item_ids: np.ndarray, item_vecs: np.ndarray,
                     index_builder: Callable[[np.ndarray], tuple[Any, dict[str, Any]]],
                     user_ids: np.ndarray | None = None, user_vecs: np.ndarray | None = None,
                     item_support: np.ndarray | None = None, seen_indptr: np.ndarray | None = None,
                     seen_items: np.ndarray | None = None, meta: dict[str, Any] | None = None,
                     query_vecs: np.ndarray | None = None) -> "ModelBundle":
        """A bundle from vectors: tie groups computed, the index built over one vector per group by
        ``index_builder((G, d) float32) -> (FAISS index, meta entries such as "index" and
        "search_params", and "mips_pad" when it indexed mips_pad(vectors))``. Missing parts default
        to empty / zero."""
        meta = dict(meta or {})
        meta.setdefault("metric", "ip")
        n_items, d = item_vecs.shape
        user_ids = np.zeros(0, np.int64) if user_ids is None else user_ids
        user_vecs = np.zeros((len(user_ids), d), np.float32) if user_vecs is None else user_vecs
        item_support = np.zeros(n_items, np.int64) if item_support is None else item_support
        seen_indptr = np.zeros(len(user_ids) + 1, np.int64) if seen_indptr is None else seen_indptr
        seen_items = np.zeros(0, np.int32) if seen_items is None else seen_items
        eligible = item_support >= int(meta.get("min_support", 0))
        group_of, group_indptr, group_items = tie_groups(item_vecs, eligible)
        group_vecs = np.ascontiguousarray(item_vecs[group_items[group_indptr[:-1]]], dtype=np.float32)
        # the builder decides whether its index holds the vectors padded (meta "mips_pad", see mips_pad)
        index, index_meta = index_builder(group_vecs)
        meta.update(index_meta)
        return cls(item_ids=item_ids, user_ids=user_ids, item_vecs=item_vecs, user_vecs=user_vecs,
                   item_support=np.asarray(item_support, np.int64), seen_indptr=seen_indptr, seen_items=seen_items,
                   group_of=group_of, group_indptr=group_indptr, group_items=group_items,
                   index=index, meta=meta, query_vecs=query_vecs)




def history_bucket(lengths: np.ndarray) -> np.ndarray:
    """(n,) history lengths -> (n,) int64: 0 for none, else the next power of two at or above each."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.where(lengths > 0, 1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64), 0)


def ann_recall(bundle: ModelBundle, iidx: np.ndarray, k: int) -> float:
    """Recall@k of the bundle's index against exact inner-product search over the same (one per tie
    group) vectors, for the given query items. An answer counts as found when its exact score
    reaches the exact k-th score: among tied scores (every candidate of a zero-vector item, an
    item without interactions) which ids exact search keeps is arbitrary, and counting ids read a
    near-perfect index as far worse (docs/performance.md)."""
    q = np.ascontiguousarray(bundle.queries[np.asarray(iidx)])
    groups = bundle.group_vecs()
    k = min(k, len(groups))
    if len(q) == 0 or k == 0:
        return 1.0
    _, approx = bundle.search_groups(q, k)
    exact, _ = faiss.knn(q, groups, k, faiss.METRIC_INNER_PRODUCT)
    approx = np.asarray(approx, np.int64)
    got = np.einsum("nd,nkd->nk", q.astype(np.float64), groups[np.maximum(approx, 0)])
    got[approx < 0] = -np.inf
    # float32 rounding of a score is relative to |q| |g|, not to the score (which may cancel to ~0)
    tol = 1e-5 * np.linalg.norm(q, axis=1, keepdims=True) * np.sqrt(np.einsum("ij,ij->i", groups, groups).max())
    return float((got >= exact[:, -1:] - tol).sum() / exact.size)


# --- the recommender as a model kind ---------------------------------------------------------
SIMILAR, RECS, SESSION = "similar_items", "user_recs", "session"
# each precomputed query: (its key column, its list column, the arrays that address it by dense index)
_LISTS = {SIMILAR: ("item_id", "neighbor_ids", ("similar_row", "similar_ids", "similar_scores")),
          RECS: ("user_id", "item_ids", ("recs_row", "recs_ids", "recs_scores"))}


@dataclass
class Precomputed:
    """Rows of one list table addressed by dense index: row[idx] = -1 when not precomputed."""

    row: np.ndarray      # (n_keys_in_bundle,) int32
    ids: np.ndarray      # (n_rows, k_max) int64, -1 padded
    scores: np.ndarray   # (n_rows, k_max) float32, nan padded

    def get(self, idx: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        r = self.row[idx]
        if r < 0:
            return None
        ids, scores = self.ids[r, :k], self.scores[r, :k]
        valid = ids >= 0
        return ids[valid], scores[valid]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def none(cls, n: int) -> "Precomputed":
        """Nothing precomputed for any of ``n`` keys."""
        return cls(np.full(n, -1, np.int32), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))

    @classmethod
    def read(cls, folder: Path, names: tuple[str, str, str], n: int) -> "Precomputed":
        """Memory-mapped from ``folder`` (workers share the pages); plain ndarray views of the maps."""
        row, ids, scores = (np.asarray(np.load(Path(folder) / f"{a}.npy", mmap_mode="r")) for a in names)
        if row.ndim != 1 or row.dtype.kind not in "iu" or len(row) != n:
            raise ValueError(f"{names[0]}.npy: {row.ndim}-d {row.dtype} addressing {len(row)} keys, the bundle "
                             f"has {n} (1-d integers expected)")
        if ids.ndim != 2 or scores.shape != ids.shape:
            raise ValueError(f"{names[1]}.npy {ids.shape} and {names[2]}.npy {scores.shape}: two (rows, k_max) "
                             f"matrices of one shape expected")
        # Bounds, not only lengths: a row past the end would be an IndexError on a request (a 500).
        if len(row) and (int(row.min()) < -1 or int(row.max()) >= len(ids)):
            bad = int(row.max()) if int(row.max()) >= len(ids) else int(row.min())
            raise ValueError(f"{names[0]}.npy: row index {bad} out of range for the {len(ids)} rows of "
                             f"{names[1]}.npy")
        return cls(row, ids, scores)


def list_table(key_name: str, keys: np.ndarray, ids_name: str, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """(n,) keys and (n, k) ids/scores padded with -1 -> a table with list columns (padding dropped)."""
    valid = ids >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    return pa.table({key_name: pa.array(keys, pa.int64()),
                     ids_name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[valid], pa.int64())),
                     "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[valid], pa.float32()))})


def list_matrices(table: pa.Table, ids_name: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of list_table: list columns -> (n, k) ids padded with -1 and scores padded with nan."""
    lists = table.column(ids_name).combine_chunks()
    scores = table.column("scores").combine_chunks()
    n = len(lists)
    lengths = np.diff(np.asarray(lists.offsets)) if n else np.zeros(0, np.int64)
    if (lengths > k).any():
        raise ValueError(f"{ids_name}: a list holds {int(lengths.max())} entries, more than k_max {k}")
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.full((n, k), -1, dtype=np.int64)
    out = np.full((n, k), np.nan, dtype=np.float32)
    ids[rows, cols] = lists.flatten().to_numpy()
    out[rows, cols] = scores.flatten().to_numpy()
    return ids, out


def rows_of(dense: np.ndarray, n: int) -> np.ndarray:
    """(n,) int32: the table row of each dense index, -1 where it has none."""
    row = np.full(n, -1, dtype=np.int32)
    ok = dense >= 0
    row[dense[ok]] = np.flatnonzero(ok).astype(np.int32)
    return row


class RecommenderModel(Model):
    """Similar items, a user's recommendations and a session's, from one ModelBundle. Similar items
    and user recommendations are precomputed for the popular keys (k_max entries each, any k <= k_max a
    slice); a session is answered from its items' similar lists when they prove it (Fagin's threshold
    algorithm, ModelBundle.session_from_lists), else live."""

    kind = "recommender"
    queries = {SIMILAR: Query(SIMILAR, "similar_items", ranked=True, label="similar-item list"),
               RECS: Query(RECS, "user_recs", ranked=True, label="user recommendation list"),
               SESSION: Query(SESSION, "session", ranked=True, label="session list")}

    def __init__(self, name: str, bundle: ModelBundle, similar: Precomputed, recs: Precomputed, k_max: int,
                 version: str | None = None):
        self.name, self.bundle, self.k_max = name, bundle, k_max
        self.similar, self.recs = similar, recs
        self.version = version or bundle.model_version
        self._stored = {SIMILAR: similar, RECS: recs}

    @classmethod
    def load(cls, folder: Path, name: str, entry: dict[str, Any]) -> "RecommenderModel":
        """The bundle and its precomputed lists from the recommender's folder, memory-mapped."""
        return cls.from_folders(folder, folder, name, entry)

    @classmethod
    def from_folders(cls, bundle_dir: Path, arrays_dir: Path, name: str, entry: dict[str, Any]) -> "RecommenderModel":
        """As ``load``, with the bundle and the precomputed arrays in two folders (format 2 kept them apart)."""
        bundle = ModelBundle.load(bundle_dir)
        sizes = {SIMILAR: bundle.n_items, RECS: bundle.n_users}
        # a model staged in a snapshot being written has nothing precomputed yet; a published one must
        staged = "rows" not in entry and not (Path(arrays_dir) / f"{_LISTS[SIMILAR][2][0]}.npy").is_file()
        lists = {q: Precomputed.none(sizes[q]) if staged else Precomputed.read(arrays_dir, _LISTS[q][2], sizes[q])
                 for q in _LISTS}
        k_max = entry.get("k_max", 0)
        if type(k_max) is not int or k_max < 0:
            raise ValueError(f"k_max {k_max!r} in the manifest: a non-negative integer expected")
        for q, stored in lists.items():
            # k <= k_max is answered as a slice of the stored lists: k_max past their width would answer
            # "precomputed" with fewer entries than asked for
            if not staged and stored.ids.shape[1] < k_max:
                raise ValueError(f"k_max {k_max} in the manifest, but {_LISTS[q][2][1]}.npy holds lists of "
                                 f"{stored.ids.shape[1]}")
        return cls(name, bundle, lists[SIMILAR], lists[RECS], int(entry.get("k_max", 0)), entry.get("version"))

    @classmethod
    def live_only(cls, bundle: ModelBundle, name: str) -> "RecommenderModel":
        """A trained bundle with nothing precomputed (a worker with no valid snapshot)."""
        return cls(name, bundle, Precomputed.none(bundle.n_items), Precomputed.none(bundle.n_users), 0)

    # --- answering --------------------------------------------------------------------
    def check(self, query: str, key: tuple) -> None:
        b = self.bundle
        if query == SESSION:
            idx = b.item_index(np.array(key[0], dtype=np.int64))
            unknown = [i for i, x in zip(key[0], idx) if x < 0]
            if unknown:
                raise NotFound(f"items not in the catalogue: {', '.join(map(str, unknown))}")
        elif query == SIMILAR:
            if b.item_index_one(key[0]) < 0:
                raise NotFound(f"item {key[0]} is not in the catalogue")
        elif b.user_index_one(key[0]) < 0:
            raise NotFound(f"user {key[0]} is unknown")

    def answer(self, query: str, columns: Sequence[np.ndarray], k: int | None = None) -> Lists:
        b, k = self.bundle, int(k or self.k_max)
        if query == SIMILAR:
            return Lists(*b.similar_items(b.item_index(np.asarray(columns[0], np.int64)), k))
        if query == RECS:
            return Lists(*b.recommend(b.user_index(np.asarray(columns[0], np.int64)), k))
        return Lists(*b.recommend_for_items([b.item_index(np.array(items, np.int64)) for items in columns[0]], k))

    def answer_one(self, query: str, key: tuple, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        b, k = self.bundle, int(k or self.k_max)
        if query == SIMILAR:
            return Lists(*b.similar_items(np.array([b.item_index_one(key[0])]), k)).row(0)
        if query == RECS:
            return Lists(*b.recommend(np.array([b.user_index_one(key[0])]), k)).row(0)
        return Lists(*b.recommend_for_items([b.item_index(np.array(key[0], np.int64))], k)).row(0)

    def stored(self, query: str, key: tuple, k: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        k = int(k or self.k_max)
        if k > self.k_max:
            return None
        b = self.bundle
        if query == SESSION:
            return self.session_from_lists(b.item_index(np.array(key[0], dtype=np.int64)), k)
        idx = b.item_index_one(key[0]) if query == SIMILAR else b.user_index_one(key[0])
        return self._stored[query].get(idx, k) if idx >= 0 else None

    def session_from_lists(self, iidx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A session answer from the precomputed similar lists of its items, when each has one and they prove it."""
        if (iidx < 0).any():
            return None
        rows = self.similar.row[iidx]
        if (rows < 0).any():
            return None
        b = self.bundle
        return b.session_from_lists(iidx, b.item_index(self.similar.ids[rows]), self.similar.scores[rows], k)

    def cache_key(self, query: str, key: tuple) -> tuple:
        return (tuple(sorted(key[0])),) if query == SESSION else key

    def precomputed(self) -> dict[str, int]:
        return {SIMILAR: len(self.similar), RECS: len(self.recs)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version, "k_max": self.k_max,
                "items": self.bundle.n_items, "users": self.bundle.n_users, "precomputed": self.precomputed()}

    # --- precomputing -----------------------------------------------------------------
    def keys(self, query: str, plan: Plan) -> tuple[list[np.ndarray], dict[str, Any]]:
        if query == SESSION:  # answered from the similar lists
            return [], {}
        return [np.asarray(plan.popular("items" if query == SIMILAR else "users"), np.int64)], {}

    def part(self, query: str, columns: Sequence[np.ndarray], answers: Lists) -> pa.Table:
        key_name, ids_name, _ = _LISTS[query]
        return list_table(key_name, np.asarray(columns[0], np.int64), ids_name, answers.ids, answers.scores)

    def assemble(self, query: str, table: pa.Table, folder: Path, k_max: int) -> dict[str, Any]:
        """The contract table (similar_items / user_recs.parquet) and the arrays the API maps."""
        key_name, ids_name, (row_name, ids_file, scores_file) = _LISTS[query]
        b = self.bundle
        keys = table.column(key_name).to_numpy()
        dense = b.item_index(keys) if query == SIMILAR else b.user_index(keys)
        ids, scores = list_matrices(table, ids_name, k_max)
        folder = Path(folder)
        for name, arr in ((row_name, rows_of(dense, b.n_items if query == SIMILAR else b.n_users)),
                          (ids_file, ids), (scores_file, scores)):
            save_array(folder / f"{name}.npy", np.ascontiguousarray(arr))
        return {"rows": int(table.num_rows)}

    def key_columns(self, query: str) -> list[str]:
        return [_LISTS[query][0]]

    def audit(self, rng: np.random.Generator, n: int) -> dict[str, float]:
        b = self.bundle
        return {"ann_recall_at_10": ann_recall(b, rng.choice(b.n_items, size=min(n, b.n_items), replace=False), 10)}


def save_lists(folder: Path, query: str, n_keys: int) -> None:
    """Empty precomputed arrays for ``query`` (a model with none of its keys precomputed)."""
    row_name, ids_file, scores_file = _LISTS[query][2]
    save_array(Path(folder) / f"{row_name}.npy", np.full(n_keys, -1, np.int32))
    save_array(Path(folder) / f"{ids_file}.npy", np.zeros((0, 0), np.int64))
    save_array(Path(folder) / f"{scores_file}.npy", np.zeros((0, 0), np.float32))
