"""The snapshot's items table in memory: an item's title and genres by id, and title search.

Built once per snapshot when it is loaded (never a Parquet read or a join per request). Search folds
case and accents once at load (NFKD, combining marks dropped, casefold) and keeps every folded title
in one string, most popular first, so a query is a few ``str.find`` calls in C: prefix matches
first, then substring matches, each in popularity order, stopping at the limit.
"""
from __future__ import annotations

import bisect
import re
import threading
import unicodedata
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

_SEP = "\x00"  # between titles in the search text; removed from the titles themselves
# Combining marks left by NFKD (accents): the blocks Latin, Greek and Cyrillic titles use.
_MARKS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def fold(text: str) -> str:
    """Case- and accent-insensitive form: 'Misérables' -> 'miserables', 'STRASSE' == 'Straße'."""
    return _MARKS.sub("", unicodedata.normalize("NFKD", text)).casefold()


class Catalogue:
    """Items by id: title (None where the items table has none) and genres; title search.

    ``ids`` (n,) int64 (any order, unique); ``titles`` n strings or None; ``genres`` n lists of
    strings (or a pyarrow list<string> array); ``popularity`` (n,) interactions per item in the
    training data (ranks search hits)."""

    def __init__(self, ids: np.ndarray, titles: list[str | None], genres, popularity: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if not isinstance(genres, (pa.Array, pa.ChunkedArray)):
            genres = pa.array([list(g) for g in genres], pa.list_(pa.string()))
        if isinstance(genres, pa.ChunkedArray):
            genres = genres.combine_chunks()
        if not (len(ids) == len(titles) == len(genres) == len(popularity)):
            raise ValueError("ids, titles, genres and popularity differ in length")
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        if len(self.ids) > 1 and (np.diff(self.ids) == 0).any():
            raise ValueError("duplicate item ids")
        self._ids_list = self.ids.tolist()
        rows = order.tolist()
        self.titles = [titles[i] for i in rows]
        # genres as one flat list and offsets in the input's row order: no list per item to build
        self._row = rows
        self._genre_values = genres.flatten().to_pylist()
        self._genre_offsets = (np.asarray(genres.offsets) - genres.offsets[0].as_py()).tolist() if len(genres) else [0]
        self._pop = np.asarray(popularity, dtype=np.int64)[order]
        # the search index is built on the first search, not at load: a snapshot of 1M items would
        # spend seconds on it before it could serve, and an API-only deployment may never search
        self._index: _Index | None = None
        self._index_lock = threading.Lock()

    def _search_index(self) -> "_Index":
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    self._index = _Index(self.ids, self.titles, self._pop)
        return self._index

    def build_search_in_background(self) -> None:
        """Build the search index on a daemon thread (a served snapshot: ready before the first
        search usually, without delaying the swap)."""
        threading.Thread(target=self._search_index, name="catalogue-search-index", daemon=True).start()

    def __len__(self) -> int:
        return len(self.ids)

    def genres_of(self, position: int) -> list[str]:
        row = self._row[position]
        return self._genre_values[self._genre_offsets[row]:self._genre_offsets[row + 1]]

    @classmethod
    def empty(cls) -> "Catalogue":
        return cls(np.zeros(0, np.int64), [], [], np.zeros(0, np.int64))

    @classmethod
    def from_table(cls, table: pa.Table | None, known: np.ndarray, support: np.ndarray) -> "Catalogue":
        """The items table (item_id, title, genres) joined once with the model's items ``known`` (n,)
        and their ``support`` (n,) interactions; items of either side without the other's data get
        no title / no genres / no interactions."""
        known = np.asarray(known, dtype=np.int64)
        support = np.asarray(support, dtype=np.int64)
        if table is None or table.num_rows == 0:
            return cls(known, [None] * len(known), [[] for _ in known], support)
        t_ids = table.column("item_id").to_numpy().astype(np.int64)
        titles = [t if t else None for t in table.column("title").to_pylist()]
        genres = table.column("genres").combine_chunks()
        sort = np.argsort(known)
        k_sorted, s_sorted = known[sort], support[sort]
        if len(known):
            pos = np.minimum(np.searchsorted(k_sorted, t_ids), len(known) - 1)
            found = k_sorted[pos] == t_ids
            pop = np.where(found, s_sorted[pos], 0)
            listed = np.zeros(len(known), bool)
            listed[pos[found]] = True
            extra, extra_pop = k_sorted[~listed], s_sorted[~listed]
        else:
            pop, extra, extra_pop = np.zeros(len(t_ids), np.int64), known, support
        if len(extra):
            genres = pa.concat_arrays([genres, pa.array([[]] * len(extra), genres.type)])
        return cls(np.concatenate([t_ids, extra]), titles + [None] * len(extra), genres,
                   np.concatenate([pop, extra_pop]))

    # --- by id ----------------------------------------------------------------------
    def position(self, item_id: int) -> int:
        """The item's row, or -1."""
        i = bisect.bisect_left(self._ids_list, item_id)
        return i if i < len(self._ids_list) and self._ids_list[i] == item_id else -1

    def get(self, item_id: int) -> dict[str, Any] | None:
        """{"title", "genres"} of an item, None when the catalogue has no such item."""
        i = self.position(item_id)
        return None if i < 0 else {"title": self.titles[i], "genres": self.genres_of(i)}

    def fields(self, item_ids: Iterable[int], names: tuple[str, ...]) -> list[dict[str, Any]]:
        """For each id, the asked-for fields (title None and genres [] for an item it does not hold)."""
        out = []
        for item_id in item_ids:
            i = self.position(item_id)
            row = {}
            for name in names:
                if name == "title":
                    row["title"] = self.titles[i] if i >= 0 else None
                else:
                    row["genres"] = self.genres_of(i) if i >= 0 else []
            out.append(row)
        return out

    # --- search ---------------------------------------------------------------------
    def search(self, query: str, limit: int) -> list[int]:
        """Rows of the titles matching ``query`` (folded), at most ``limit``: titles that start with it,
        then titles that contain it elsewhere; each group most popular first, then by id."""
        q = fold(query).replace(_SEP, " ")
        if not q or limit <= 0:
            return []
        # titles starting with q: a range of the sorted titles, the most popular of it first
        ix = self._search_index()
        lo = bisect.bisect_left(ix.sorted, q)
        hi = bisect.bisect_left(ix.sorted, q + "\U0010ffff", lo)
        text, starts = ix.text, ix.starts
        if hi - lo <= 32 * limit:
            first = ix.sorted_rank[lo:hi]
            if len(first) > limit:
                first = np.partition(first, limit - 1)[:limit]
            hits = np.sort(first).tolist()
        else:  # many: the search-ordered text holds enough of them near its start
            hits = []
            pos = text.find(_SEP + q)
            while pos >= 0 and len(hits) < limit:
                hits.append(bisect.bisect_right(starts, pos + 1) - 1)
                pos = text.find(_SEP + q, pos + 1)
        taken = set(hits)
        # then titles containing it elsewhere, in search order: one scan, stopped at the limit
        pos = text.find(q)
        while pos >= 0 and len(hits) < limit:
            r = bisect.bisect_right(starts, pos) - 1
            if r not in taken:
                hits.append(r)
                taken.add(r)
            # the next title: one hit per title is enough
            pos = text.find(q, starts[r + 1] if r + 1 < len(starts) else len(text))
        return [ix.rank[r] for r in hits]


class _Index:
    """The folded titles in search order (most popular first, then by id) as one string, where each
    starts, and sorted (for prefixes), each with its place in that order. Untitled items are left out."""

    def __init__(self, ids: np.ndarray, titles: list[str | None], popularity: np.ndarray):
        rank = [int(i) for i in np.lexsort((ids, -popularity)) if titles[i]]
        folded = fold(_SEP.join(titles[i].replace(_SEP, " ") for i in rank)).split(_SEP) if rank else []
        if len(folded) != len(rank):  # folding never makes or removes a separator, but be sure
            raise ValueError("title folding changed the number of titles")
        self.rank = rank
        self.text = _SEP + _SEP.join(folded) + _SEP
        lengths = np.fromiter((len(t) + 1 for t in folded), dtype=np.int64, count=len(folded))
        self.starts: list[int] = (1 + np.concatenate([[0], np.cumsum(lengths)[:-1]])).tolist() if rank else []
        by_text = sorted(range(len(folded)), key=folded.__getitem__)
        self.sorted = [folded[r] for r in by_text]
        self.sorted_rank = np.asarray(by_text, dtype=np.int64)
