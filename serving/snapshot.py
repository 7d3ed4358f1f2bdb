"""A published snapshot ready for microsecond lookups: verified, then each of its models loaded from its
folder (arrays memory-mapped). No DuckDB and no Parquet scan on the request path."""
from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq

from serving.catalogue import Catalogue
from serving.errors import SnapshotError
from serving.models.base import Model
from serving.models.recommender import ModelBundle, RecommenderModel
from serving.models.registry import load_models
from serving.store import Store, layout

LOG = logging.getLogger(__name__)


class LoadedSnapshot:
    """A verified snapshot: its manifest and its models by name."""

    def __init__(self, snapshot_id: str, manifest: dict[str, Any], models: dict[str, Model], loaded_in_s: float,
                 items: Catalogue | None = None):
        self.id, self.manifest, self.models = snapshot_id, manifest, models
        # item titles and genres, in memory (GET /v1/items, ?fields=); the recommender's items, untitled, without
        self.items = items if items is not None else catalogue(None, models)
        self.k_max = int(manifest["k_max"])
        self.created_at = datetime.fromisoformat(manifest["created_at"]).timestamp()
        self.loaded_in_s = loaded_in_s

    @classmethod
    def load(cls, store: Store, snapshot_id: str, checksums: bool = True) -> "LoadedSnapshot":
        """Verify (manifest, checksums, schema) and load. Raises SnapshotError on any problem.

        Nothing is decoded: arrays and FAISS indexes are memory-mapped, so loading is fast and extra
        workers share the pages."""
        t0 = time.perf_counter()
        manifest = store.verify(snapshot_id, checksums=checksums)
        folder = store.local_snapshot(snapshot_id)
        try:
            models = load_models(folder, manifest)
            items_file = folder / layout.table_file("items", manifest.get("format_version", layout.FORMAT_VERSION))
            items = catalogue(pq.read_table(items_file, columns=["item_id", "title", "genres"]), models)
        except Exception as exc:  # a damaged model of any kind refuses the snapshot
            raise SnapshotError(f"snapshot {snapshot_id}: does not load: {exc}") from exc
        snap = cls(snapshot_id, manifest, models, time.perf_counter() - t0, items)
        items.build_search_in_background()  # seconds at 1M items: not part of the load
        LOG.info("loaded snapshot %s in %.2fs (%s)", snapshot_id, snap.loaded_in_s,
                 ", ".join(f"{n} {m.precomputed()}" for n, m in models.items()))
        return snap

    @classmethod
    def live_only(cls, bundle: ModelBundle, rating: Model | None = None) -> "LoadedSnapshot":
        """No precomputed answers: a trained model alone, for a worker with no valid snapshot."""
        manifest = {"id": f"model:{bundle.model_version}", "created_at": bundle.meta["trained_at"], "k_max": 0,
                    "live_only": True, "model_version": bundle.model_version}
        models: dict[str, Model] = {layout.RECOMMENDER: RecommenderModel.live_only(bundle, layout.RECOMMENDER)}
        if rating is not None:
            models[layout.RATING] = rating
        return cls(manifest["id"], manifest, models, 0.0)

    @property
    def live_only_mode(self) -> bool:
        return bool(self.manifest.get("live_only"))


def catalogue(table: pa.Table | None, models: dict[str, Model]) -> Catalogue:
    """The items table joined once with the recommender's items and their interaction counts (search
    ranks by them); an item only one side knows has no title, genres or count."""
    rec = models.get(layout.RECOMMENDER)
    bundle = getattr(rec, "bundle", None)
    if bundle is None:
        known, support = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        known, support = np.asarray(bundle.item_ids), np.asarray(bundle.item_support)
    return Catalogue.from_table(table, known, support)
