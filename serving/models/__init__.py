"""Registered models as the API serves them: each model with its precomputed answers from the snapshot.

``serving.models.base`` holds the schema and the one canonicalisation; ``serving.models.predictor``
the model kinds. A snapshot keeps every registered model under ``models/<name>/``.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from serving.models.base import ModelSpec, canonical_key
from serving.models.predictor import RATING, TABLE_FILE, RatingPredictor, load_predictor

LOG = logging.getLogger(__name__)

MODELS_DIR = "models"


class Served:
    """One model with its precomputed answers: canonical key -> prediction."""

    def __init__(self, model, table: dict[str, Any] | None = None):
        self.model, self.spec, self.version = model, model.spec, model.version
        self.table = table or {}

    def lookup(self, key: str, values: tuple) -> Any:
        return self.table.get(key)

    def precomputed_rows(self) -> int:
        return len(self.table)

    def answer_one(self, values: tuple) -> Any:
        """One live prediction through the same vectorised answer the batch job used (a model kind
        may build its one-row input faster, as ``SklearnPredictor.answer_one`` does)."""
        one = getattr(self.model, "answer_one", None)
        if one is not None:
            return _plain(one(values))
        cols = [np.array([v], dtype=object if v is None or isinstance(v, str) else None) for v in values]
        return _plain(self.model.answer(cols)[0])


class ServedRating(Served):
    """The built-in rating model: precomputed pairs are the snapshot's prediction arrays."""

    def __init__(self, model: RatingPredictor, snap):
        super().__init__(model)
        # A weak reference: the snapshot holds this object, and a cycle would keep a swapped-out
        # snapshot alive until a garbage collection (workers freeze the collector, serving/gunicorn_conf.py).
        # Whoever asks holds the snapshot while asking.
        self._snap = weakref.ref(snap)

    def lookup(self, key: str, values: tuple) -> Any:
        b = self.model.bundle
        uidx, iidx = b.user_index_one(values[0]), b.item_index_one(values[1])  # the scalar form: a hit's lookup
        return None if uidx < 0 or iidx < 0 else self._snap().prediction(uidx, iidx)

    def precomputed_rows(self) -> int:
        return len(self._snap().pred_values)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def read_table(folder: Path, spec: ModelSpec) -> dict[str, Any]:
    """A model's precomputed Parquet as a dict keyed by the canonical input."""
    path = Path(folder) / TABLE_FILE
    t = pq.read_table(path, columns=["input", "prediction"])
    return dict(zip(t.column("input").to_pylist(), t.column("prediction").to_pylist()))


def rating_model(snap) -> dict[str, Served]:
    """The built-in rating model of a loaded snapshot (every snapshot has one)."""
    return {RATING: ServedRating(RatingPredictor(snap.bundle), snap)}


def load_models(snapshot_dir: Path, manifest: dict[str, Any]) -> dict[str, Served]:
    """Every registered model the manifest lists, loaded from the snapshot folder."""
    out: dict[str, Served] = {}
    for name, meta in (manifest.get("models") or {}).items():
        if meta.get("kind") == "rating":
            continue
        folder = Path(snapshot_dir) / MODELS_DIR / name
        model = load_predictor(folder)
        out[name] = Served(model, read_table(folder, model.spec))
        LOG.info("model %s %s: %d precomputed", name, model.version, len(out[name].table))
    return out


__all__ = ["Served", "ServedRating", "load_models", "rating_model", "canonical_key", "MODELS_DIR"]
