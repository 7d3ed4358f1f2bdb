"""A published snapshot ready for microsecond lookups: verified, then its arrays memory-mapped.

Precomputed lists are (n, k_max) matrices addressed through the bundle's dense item/user index;
predictions a sorted key array. No DuckDB and no Parquet read on the request path.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from serving.errors import SnapshotError
from serving.model import ModelBundle
from serving.models import load_models, rating_model
from serving.store import Store

LOG = logging.getLogger(__name__)


ARRAY_NAMES = ("similar_row", "similar_ids", "similar_scores", "recs_row", "recs_ids", "recs_scores",
               "pred_keys", "pred_values")


def serving_arrays(bundle: ModelBundle, similar_keys: np.ndarray, similar_ids: np.ndarray,
                   similar_scores: np.ndarray, rec_keys: np.ndarray, rec_ids: np.ndarray, rec_scores: np.ndarray,
                   pred_users: np.ndarray, pred_items: np.ndarray, pred_values: np.ndarray) -> dict[str, np.ndarray]:
    """The precomputed answers in the shape the API reads them (written once by the batch job).

    similar/recs: ``row`` (n_items or n_users,) int32 maps a dense index to a row of ``ids`` /
    ``scores`` (n_rows, k_max), -1 where not precomputed; predictions: sorted keys
    (user index * n_items + item index) and their values."""
    def rows(keys_idx, n):
        row = np.full(n, -1, dtype=np.int32)
        ok = keys_idx >= 0
        row[keys_idx[ok]] = np.flatnonzero(ok).astype(np.int32)
        return row

    u, i = bundle.user_index(pred_users), bundle.item_index(pred_items)
    ok = (u >= 0) & (i >= 0)
    keys = u[ok] * bundle.n_items + i[ok]
    order = np.argsort(keys, kind="stable")
    return {"similar_row": rows(bundle.item_index(similar_keys), bundle.n_items),
            "similar_ids": np.asarray(similar_ids, np.int64), "similar_scores": np.asarray(similar_scores, np.float32),
            "recs_row": rows(bundle.user_index(rec_keys), bundle.n_users),
            "recs_ids": np.asarray(rec_ids, np.int64), "recs_scores": np.asarray(rec_scores, np.float32),
            "pred_keys": keys[order].astype(np.int64),
            "pred_values": np.asarray(pred_values, np.float32)[ok][order]}


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

    @classmethod
    def none(cls, n: int) -> "Precomputed":
        """Nothing precomputed for any of ``n`` keys."""
        return cls(np.full(n, -1, np.int32), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))


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
        self.models = rating_model(self)  # name -> Served; registered models are added by load()

    @classmethod
    def load(cls, store: Store, snapshot_id: str, checksums: bool = True) -> "LoadedSnapshot":
        """Verify (manifest, checksums, schema) and load. Raises SnapshotError on any problem.

        Nothing is decoded: the bundle's arrays, its FAISS index and the serving arrays are
        memory-mapped, so loading is fast and extra workers share the pages."""
        t0 = time.perf_counter()
        manifest = store.verify(snapshot_id, checksums=checksums)
        try:
            bundle = ModelBundle.load(store.model_dir(snapshot_id))
            a = store.read_arrays(snapshot_id, ARRAY_NAMES)
            models = load_models(store.snapshot_dir(snapshot_id), manifest)
        except Exception as exc:  # a damaged bundle or model of any kind refuses the snapshot
            raise SnapshotError(f"snapshot {snapshot_id}: does not load: {exc}") from exc
        if len(a["similar_row"]) != bundle.n_items or len(a["recs_row"]) != bundle.n_users:
            raise SnapshotError(f"snapshot {snapshot_id}: serving arrays do not match the model bundle")
        snap = cls(snapshot_id, manifest, bundle, Precomputed(a["similar_row"], a["similar_ids"], a["similar_scores"]),
                   Precomputed(a["recs_row"], a["recs_ids"], a["recs_scores"]), a["pred_keys"], a["pred_values"],
                   time.perf_counter() - t0)
        snap.models.update(models)
        LOG.info("loaded snapshot %s in %.2fs (%d similar, %d recs, %d predictions)", snapshot_id,
                 snap.loaded_in_s, len(snap.similar.ids), len(snap.recs.ids), len(snap.pred_values))
        return snap

    @classmethod
    def live_only(cls, bundle: ModelBundle) -> "LoadedSnapshot":
        """No precomputed answers: a trained model alone, for a worker with no valid snapshot."""
        manifest = {"id": f"model:{bundle.model_version}", "created_at": bundle.meta["trained_at"], "k_max": 0,
                    "live_only": True, "model_version": bundle.model_version}
        return cls(manifest["id"], manifest, bundle, Precomputed.none(bundle.n_items), Precomputed.none(bundle.n_users), np.zeros(0, np.int64),
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
