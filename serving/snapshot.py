"""A published snapshot held in memory for microsecond lookups: verified, then loaded into arrays.

Precomputed lists become (n, k_max) matrices indexed by the bundle's dense item/user index;
predictions become a sorted key array. No DuckDB and no Parquet read on the request path.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving.errors import SnapshotError
from serving.model import ModelBundle
from serving.store import Store

LOG = logging.getLogger(__name__)


def list_matrix(column: pa.ChunkedArray, k: int, fill, dtype) -> np.ndarray:
    """A list<...> column -> (n, k) array, short lists padded with ``fill``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    out = np.full((n, k), fill, dtype=dtype)
    if n == 0:
        return out
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if (lengths == k).all():
        return values.reshape(n, k)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < k
    out[rows[keep], cols[keep]] = values[keep]
    return out


@dataclass
class Precomputed:
    """Rows of one list table addressed by dense index: row[idx] = -1 when not precomputed."""

    row: np.ndarray      # (n_keys_in_bundle,) int32
    ids: np.ndarray      # (n_rows, k_max) int64, -1 padded
    scores: np.ndarray   # (n_rows, k_max) float32, nan padded

    @classmethod
    def build(cls, keys_idx: np.ndarray, n: int, ids: np.ndarray, scores: np.ndarray) -> "Precomputed":
        row = np.full(n, -1, dtype=np.int32)
        ok = keys_idx >= 0
        row[keys_idx[ok]] = np.flatnonzero(ok).astype(np.int32)
        return cls(row, ids, scores)

    def get(self, idx: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        r = self.row[idx]
        if r < 0:
            return None
        ids, scores = self.ids[r, :k], self.scores[r, :k]
        valid = ids >= 0
        return ids[valid], scores[valid]

    def __len__(self) -> int:
        return int((self.row >= 0).sum())


class _EmptyRows:
    def get(self, idx: int, k: int):
        return None

    def __len__(self) -> int:
        return 0


class LoadedSnapshot:
    """A verified snapshot: manifest, model bundle, and precomputed answers in arrays."""

    def __init__(self, snapshot_id: str, manifest: dict[str, Any], bundle: ModelBundle, similar: Precomputed,
                 recs: Precomputed, pred_keys: np.ndarray, pred_values: np.ndarray, loaded_in_s: float):
        self.id, self.manifest, self.bundle = snapshot_id, manifest, bundle
        self.similar, self.recs = similar, recs
        self.pred_keys, self.pred_values = pred_keys, pred_values
        self.k_max = int(manifest["k_max"])
        self.created_at = datetime.fromisoformat(manifest["created_at"]).timestamp()
        self.loaded_in_s = loaded_in_s

    @classmethod
    def load(cls, store: Store, snapshot_id: str, checksums: bool = True) -> "LoadedSnapshot":
        """Verify (manifest, checksums, schema) and load. Raises SnapshotError on any problem."""
        t0 = time.perf_counter()
        manifest = store.verify(snapshot_id, checksums=checksums)
        try:
            bundle = ModelBundle.load(store.model_dir(snapshot_id))
        except Exception as exc:  # a damaged bundle of any kind refuses the snapshot
            raise SnapshotError(f"snapshot {snapshot_id}: model bundle does not load: {exc}") from exc
        k_max = int(manifest["k_max"])
        sim = store.read_table(snapshot_id, "similar_items")
        similar = Precomputed.build(bundle.item_index(sim.column("item_id").to_numpy()), bundle.n_items,
                                    list_matrix(sim.column("neighbor_ids"), k_max, -1, np.int64),
                                    list_matrix(sim.column("scores"), k_max, np.nan, np.float32))
        rec = store.read_table(snapshot_id, "user_recs")
        recs = Precomputed.build(bundle.user_index(rec.column("user_id").to_numpy()), bundle.n_users,
                                 list_matrix(rec.column("item_ids"), k_max, -1, np.int64),
                                 list_matrix(rec.column("scores"), k_max, np.nan, np.float32))
        pred = store.read_table(snapshot_id, "predictions")
        u = bundle.user_index(pred.column("user_id").to_numpy())
        i = bundle.item_index(pred.column("item_id").to_numpy())
        ok = (u >= 0) & (i >= 0)
        keys = u[ok] * bundle.n_items + i[ok]
        order = np.argsort(keys, kind="stable")
        values = pred.column("prediction").to_numpy()[ok][order].astype(np.float32)
        snap = cls(snapshot_id, manifest, bundle, similar, recs, keys[order], values, time.perf_counter() - t0)
        LOG.info("loaded snapshot %s in %.2fs (%d similar, %d recs, %d predictions)", snapshot_id,
                 snap.loaded_in_s, len(similar), len(recs), len(values))
        return snap

    @classmethod
    def live_only(cls, bundle: ModelBundle) -> "LoadedSnapshot":
        """No precomputed answers: a trained model alone, for a worker with no valid snapshot."""
        manifest = {"id": f"model:{bundle.model_version}", "created_at": bundle.meta["trained_at"], "k_max": 0,
                    "live_only": True, "model_version": bundle.model_version}
        return cls(manifest["id"], manifest, bundle, _EmptyRows(), _EmptyRows(), np.zeros(0, np.int64),
                   np.zeros(0, np.float32), 0.0)

    @property
    def live_only_mode(self) -> bool:
        return bool(self.manifest.get("live_only"))

    def prediction(self, uidx: int, iidx: int) -> float | None:
        key = uidx * self.bundle.n_items + iidx
        pos = int(np.searchsorted(self.pred_keys, key))
        if pos < len(self.pred_keys) and self.pred_keys[pos] == key:
            return float(self.pred_values[pos])
        return None
