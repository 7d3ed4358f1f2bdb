"""Registered models in the batch job: each ``[models.<name>]`` staged by its kind into the snapshot
being written (``Model.stage``: for scikit-learn, the artifact checked and copied with spec.json),
the request log's traffic per model, and the catalog's views of their predictions.

Choosing the inputs to precompute and predicting them is the model kind's own (``Model.keys``,
``answer``: serving.models), the code the API answers with.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import duckdb
import numpy as np

from batch.popularity import decay_weight_sql
from batch.requestlog import RequestLogFiles, log_files
from serving.models.registry import kind_class
from serving.store import Store, layout

LOG = logging.getLogger(__name__)


# --- loading and checking --------------------------------------------------------------------
def stage(folder_of, specs) -> dict[str, dict[str, Any]]:
    """Every registered model loaded, checked and copied by its kind into its folder of the snapshot
    being written (``folder_of(name)``); returns their manifest entries. A bad artifact or schema stops
    the run here, before anything is precomputed."""
    entries = {}
    for spec in specs:
        entries[spec.name] = kind_class(spec.kind).stage(spec, folder_of(spec.name))
        LOG.info("model %s (%s) %s staged", spec.name, spec.kind, entries[spec.name].get("version"))
    return entries


def check(specs) -> None:
    """Every registered model's config checked before any work (the artifact loads and matches its
    schema; its candidates read): a mistake in the fifth model's table stops the run before training,
    not after it. Kinds without a ``check_spec`` are checked when staged."""
    for spec in specs:
        check_spec = getattr(kind_class(spec.kind), "check_spec", None)
        if check_spec is not None:
            check_spec(spec)


def read_model_log(store: Store, now: datetime, half_life_hours: float = 0.0,
                   log: RequestLogFiles | None = None) -> dict[str, tuple[list, np.ndarray]]:
    """Request-log traffic per model: {model: (canonical keys, weights)}; answered requests only,
    older ones weighing less when a half-life is set. ``log``: as popularity.read_request_counts."""
    log = log_files(store) if log is None else log
    weight = decay_weight_sql(now, half_life_hours)
    try:
        frame = log.frame(
            f"SELECT model, input, sum({weight}) AS weight FROM read_parquet(?, union_by_name = true) "
            f"WHERE status < 400 AND model IS NOT NULL AND input IS NOT NULL GROUP BY ALL ORDER BY model, input")
    except duckdb.BinderException:  # only segments from before the model columns existed
        return {}
    if frame is None:
        return {}
    return {str(m): (list(g["input"]), g["weight"].to_numpy(np.float64)) for m, g in frame.groupby("model")}


# --- catalog ---------------------------------------------------------------------------------
def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def table_files(store: Store, name: str, manifests: dict[str, dict]) -> list[str]:
    """Model ``name``'s predictions in every retained snapshot that has them (regular files only)."""
    urls = [store.model_table_url(sid, name) for sid, m in sorted(manifests.items())
            if layout.model_table_file(name) in (m.get("files") or {})]
    return [u for u in urls if store.is_regular(u)]


def catalog_views(store: Store, manifests: dict[str, dict]) -> list[tuple[str, str]]:
    """(view name, SELECT) for every model: ``predictions_<name>`` over the current snapshot,
    ``all_predictions_<name>`` over every retained one (with a ``snapshot`` column)."""
    current = store.current_id()
    views = []
    names = sorted({n for m in manifests.values() for n in (m.get("models") or {}) if n != layout.RATING})
    for name in names:
        files = table_files(store, name, manifests)
        if not files:
            continue
        listed = "[" + ", ".join(map(_sql_str, files)) + "]"
        views.append((f"all_predictions_{name}",
                      f"SELECT regexp_extract(filename, '/snapshots/([^/]+)/', 1) AS snapshot, * EXCLUDE (filename) "
                      f"FROM read_parquet({listed}, filename = true, union_by_name = true)"))
    for name in (manifests.get(current, {}).get("models") or {}) if current else ():
        url = store.model_table_url(current, name)
        views.append((f"predictions_{name}", f"SELECT * FROM read_parquet({_sql_str(url)})"))
    return views


__all__ = ["check", "stage", "read_model_log", "catalog_views"]
