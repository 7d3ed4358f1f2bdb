"""The snapshot's items table in memory: an item's title and genres by id, and title search.

Built once per snapshot when it is loaded (never a Parquet read or a join per request). Search folds
case and accents once at load (NFKD, combining marks dropped, casefold) and keeps every folded title
in one string, most popular first, so a query is a few ``str.find`` calls in C: prefix matches
first, then substring matches, each in popularity order, stopping at the limit.
"""
from __future__ import annotations

import bisect
import re
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
    strings; ``popularity`` (n,) interactions per item in the training data (ranks search hits)."""

    def __init__(self, ids: np.ndarray, titles: list[str | None], genres: list[list[str]],
                 popularity: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if not (len(ids) == len(titles) == len(genres) == len(popularity)):
            raise ValueError("ids, titles, genres and popularity differ in length")
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        if len(self.ids) > 1 and (np.diff(self.ids) == 0).any():
            raise ValueError("duplicate item ids")
        self._ids_list = self.ids.tolist()
        self.titles = [titles[i] for i in order.tolist()]
        self.genres = [list(genres[i]) for i in order.tolist()]
        pop = np.asarray(popularity, dtype=np.int64)[order]
        # search order: most popular first, then by id; untitled items are not searchable
        rank = [int(i) for i in np.lexsort((self.ids, -pop)) if self.titles[i]]
        folded = fold(_SEP.join(self.titles[i].replace(_SEP, " ") for i in rank)).split(_SEP) if rank else []
        if len(folded) != len(rank):  # folding never makes or removes a separator, but be sure
            raise ValueError("title folding changed the number of titles")
        self._rank = rank
        self._text = _SEP + _SEP.join(folded) + _SEP
        self._starts: list[int] = []
        pos = 1
        for t in folded:
            self._starts.append(pos)
            pos += len(t) + 1

    def __len__(self) -> int:
        return len(self.ids)

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
        genres = [g or [] for g in table.column("genres").to_pylist()]
        sort = np.argsort(known)
        pos = np.searchsorted(known[sort], t_ids)
        pos = np.minimum(pos, max(len(known) - 1, 0))
        found = (known[sort][pos] == t_ids) if len(known) else np.zeros(len(t_ids), bool)
        pop = np.where(found, support[sort][pos] if len(known) else 0, 0)
        extra = np.setdiff1d(known, t_ids)
        extra_pop = support[sort][np.searchsorted(known[sort], extra)] if len(extra) else np.zeros(0, np.int64)
        return cls(np.concatenate([t_ids, extra]), titles + [None] * len(extra),
                   genres + [[] for _ in range(len(extra))], np.concatenate([pop, extra_pop]))

    # --- by id ----------------------------------------------------------------------
    def position(self, item_id: int) -> int:
        """The item's row, or -1."""
        i = bisect.bisect_left(self._ids_list, item_id)
        return i if i < len(self._ids_list) and self._ids_list[i] == item_id else -1

    def get(self, item_id: int) -> dict[str, Any] | None:
        """{"title", "genres"} of an item, None when the catalogue has no such item."""
        i = self.position(item_id)
        return None if i < 0 else {"title": self.titles[i], "genres": self.genres[i]}

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
                    row["genres"] = self.genres[i] if i >= 0 else []
            out.append(row)
        return out

    # --- search ---------------------------------------------------------------------
    def search(self, query: str, limit: int) -> list[int]:
        """Rows of the titles matching ``query`` (folded), at most ``limit``: titles that start with it,
        then titles that contain it elsewhere; each group most popular first, then by id."""
        q = fold(query).replace(_SEP, " ")
        if not q or limit <= 0:
            return []
        text, starts, rank = self._text, self._starts, self._rank
        hits: list[int] = []
        taken: set[int] = set()
        pos = text.find(_SEP + q)
        while pos >= 0 and len(hits) < limit:
            r = bisect.bisect_right(starts, pos + 1) - 1
            hits.append(r)
            taken.add(r)
            pos = text.find(_SEP + q, pos + 1)
        pos = text.find(q)
        while pos >= 0 and len(hits) < limit:
            r = bisect.bisect_right(starts, pos) - 1
            if r not in taken:
                hits.append(r)
                taken.add(r)
            # the next title: one hit per title is enough
            pos = text.find(q, starts[r + 1] if r + 1 < len(starts) else len(text))
        return [rank[r] for r in hits]
