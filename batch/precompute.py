"""The one precompute function: answer one partition of one model's keys and write its Parquet part.

A ``Part`` is a small descriptor (the store's URL, the id of the snapshot being written, which model
and query, the keys of the partition): that is all that travels to a worker. The worker loads the
staged models from the snapshot being written, once per process (``staged_models``), answers with
the model's own vectorised ``answer`` -- the function the API calls live with one key -- and writes
the part. The job then assembles each query's parts into the model's folder.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from serving.models.base import Model
from serving.models.registry import kind_class
from serving.store import SnapshotWriter, Store, layout

LOG = logging.getLogger(__name__)

# Keys per partition: a ranked query's FAISS search holds (n, k + depth) candidates; a prediction is cheap.
PREDICTIONS_PER_RANKED = 16


@dataclass(frozen=True)
class Staged:
    """A snapshot being written: where, which id, and the manifest entries of its models."""

    store: str
    snapshot: str
    entries: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Part:
    """One partition of one model's query: its keys as columns."""

    model: str
    query: str
    number: int
    columns: tuple[np.ndarray, ...]
    k: int | None

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0


def partitions(model: str, query: str, columns: Sequence[np.ndarray], size: int, k: int | None) -> Iterator[Part]:
    """The keys cut into parts of ``size`` rows, in order (every backend maps exactly these parts)."""
    n = len(columns[0]) if len(columns) else 0
    for number, start in enumerate(range(0, n, size)):
        yield Part(model, query, number, tuple(c[start:start + size] for c in columns), k)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str], dict[str, Model]] = {}


def staged_models(staged: Staged) -> dict[str, Model]:
    """The staged snapshot's models, loaded from its folders once per process and kept while it is
    being written (a worker answers many parts of it)."""
    key = (staged.store, staged.snapshot)
    with _cache_lock:
        models = _cache.get(key)
        if models is None:
            _cache.clear()  # one snapshot at a time: the previous one's models go
            folder = SnapshotWriter.reopen(Store(staged.store), staged.snapshot).local_folder()
            models = _cache[key] = {name: kind_class(entry["kind"]).load(folder / layout.model_folder(name), name, entry)
                                    for name, entry in staged.entries.items()}
    return models


def forget(staged: Staged) -> None:
    """Drop a finished snapshot's models from this process."""
    with _cache_lock:
        _cache.pop((staged.store, staged.snapshot), None)


def release(staged: Staged) -> None:
    """Drop a finished snapshot's models from this worker process, and the copy of them it fetched to
    its machine's cache folder (a worker elsewhere than the job keeps no copy of every run)."""
    forget(staged)
    store = Store(staged.store)
    store.writer_class(store, staged.snapshot, create=False).drop_local_copy()


def precompute_part(staged: Staged, part: Part) -> int:
    """Answer one part with its model's vectorised answer and write it as a Parquet part. Returns its rows.
    A retried part writes the same file again (whole or not at all)."""
    model = staged_models(staged)[part.model]
    answers = model.answer(part.query, list(part.columns), part.k)
    table = model.part(part.query, list(part.columns), answers)
    SnapshotWriter.reopen(Store(staged.store), staged.snapshot).write_part(part.model, part.query, part.number, table)
    return table.num_rows
