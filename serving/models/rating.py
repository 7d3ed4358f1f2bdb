"""The built-in rating model: a user's predicted rating of an item (biased matrix factorisation,
trained by batch.train), served as the model ``rating`` (GET /v1/predictions is its alias).

Its precomputed pairs are a sorted array of keys (user index * items + item index) and their values,
memory-mapped; the contract table predictions.parquet holds the same rows for SQL.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving.errors import NotFound
from serving.models.base import Input, Model, ModelSpec, Plan, Query
from serving.models.vectors import lookup, lookup_one
from serving.store.writer import save_array

PREDICT = "predict"
_ARRAYS = ("user_ids", "item_ids", "user_bias", "item_bias", "user_factors", "item_factors")
_META = "meta.json"
_STORED = ("pred_keys", "pred_values")
MODEL_FILES = tuple(f"{a}.npy" for a in _ARRAYS) + (_META,)


def _check_arrays(a: dict[str, np.ndarray], keys: np.ndarray | None, values: np.ndarray | None) -> None:
    """Shapes and bounds a lookup relies on (ValueError naming the file): an index past an array's end
    would be an IndexError on a request, and an unsorted key array a wrong answer."""
    n, m = len(a["user_ids"]), len(a["item_ids"])
    for key, rows in (("user_bias", n), ("user_factors", n), ("item_bias", m), ("item_factors", m)):
        if len(a[key]) != rows:
            raise ValueError(f"{key}.npy has {len(a[key])} rows for {rows} {key.split('_')[0]}s")
    if a["user_factors"].ndim != 2 or a["item_factors"].ndim != 2 or \
            a["user_factors"].shape[1] != a["item_factors"].shape[1]:
        raise ValueError(f"user_factors.npy {a['user_factors'].shape} and item_factors.npy "
                         f"{a['item_factors'].shape}: (n, r) and (m, r) expected")
    if keys is None:
        return
    if keys.ndim != 1 or values is None or values.shape != keys.shape:
        raise ValueError(f"pred_keys.npy {keys.shape} and pred_values.npy "
                         f"{None if values is None else values.shape}: two arrays of one length expected")
    if len(keys) and (int(keys[0]) < 0 or int(keys[-1]) >= n * m or not bool(np.all(keys[1:] > keys[:-1]))):
        raise ValueError(f"pred_keys.npy: keys must increase within [0, {n} users x {m} items)")


class RatingModel(Model):
    """Predicted ratings for (user_id, item_id): w0 + w1 (mu + b_u + b_i) + w2 (p_u . q_i), clipped to
    the rating range seen in training. Shapes: n users, m items, r factors; ids sorted int64."""

    kind = "rating"
    needs = ("recommender",)  # its keys follow the recommender's user recommendations
    queries = {PREDICT: Query(PREDICT, "prediction", label="prediction")}

    def __init__(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                 pred_keys: np.ndarray | None = None, pred_values: np.ndarray | None = None,
                 max_age_s: float | None = None):
        self.name, self.meta, self.max_age_s = name, meta, max_age_s
        for key in _ARRAYS:
            setattr(self, key, arrays[key])
        self.version = meta.get("model_version", "unknown")
        self.pred_keys = np.zeros(0, np.int64) if pred_keys is None else pred_keys
        self.pred_values = np.zeros(0, np.float32) if pred_values is None else pred_values
        # the catalogue's id ranges: what /v1/models and the OpenAPI document show a client
        span = lambda ids: {"min": int(ids.min()), "max": int(ids.max())} if len(ids) else {"min": 0}  # noqa: E731
        self.spec = ModelSpec(name=name, kind="rating", inputs=(Input("user_id", "int", **span(self.user_ids)),
                                                               Input("item_id", "int", **span(self.item_ids))),
                              version=self.version, artifact=None, grid_max_rows=0, max_age_s=max_age_s)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    # --- files ------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The trained model (not its precomputed pairs) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for key in _ARRAYS:
            save_array(folder / f"{key}.npy", np.ascontiguousarray(getattr(self, key)))
        (folder / _META).write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path, name: str, entry: dict[str, Any], stored: Path | None = None) -> "RatingModel":
        """The model from its folder, memory-mapped, with its precomputed pairs (from ``stored``, when
        format 2 kept them apart; absent in a trained-model cache entry)."""
        folder = Path(folder)
        arrays = {key: np.asarray(np.load(folder / f"{key}.npy", mmap_mode="r")) for key in _ARRAYS}
        meta = json.loads((folder / _META).read_text())
        if "rating" in meta:  # format 2: the recommender's bundle meta, holding the rating model's under "rating"
            meta = {**meta["rating"], "rating_range": meta.get("rating_range"), "model_version": meta.get("model_version")}
        base = Path(stored or folder)
        pairs = [np.asarray(np.load(base / f"{n}.npy", mmap_mode="r")) for n in _STORED] \
            if (base / f"{_STORED[0]}.npy").is_file() else [None, None]
        _check_arrays(arrays, *pairs)
        return cls(name, arrays, meta, *pairs, max_age_s=entry.get("max_age_s"))

    # --- answering --------------------------------------------------------------------
    def predict(self, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        """Predicted ratings for (n,) user and (n,) item indices -> (n,) float32."""
        uidx, iidx = np.asarray(uidx, dtype=np.int64), np.asarray(iidx, dtype=np.int64)
        if uidx.shape != iidx.shape or uidx.ndim != 1:
            raise ValueError("uidx and iidx must be 1-d and of equal length")
        if len(uidx) == 0:
            return np.zeros(0, dtype=np.float32)
        m = self.meta
        base = m["global_mean"] + self.user_bias[uidx].astype(np.float64) + self.item_bias[iidx]
        inter = np.einsum("ij,ij->i", self.user_factors[uidx].astype(np.float64), self.item_factors[iidx])
        w = m["blend"]  # [intercept, weight of the baseline, weight of the interaction term]
        pred = w[0] + w[1] * base + w[2] * inter
        lo, hi = m.get("rating_range") or (-np.inf, np.inf)
        return np.clip(pred, lo, hi).astype(np.float32)

    def check(self, query: str, key: tuple) -> None:
        user_id, item_id = key
        if lookup_one(self.user_ids, user_id) < 0:
            raise NotFound(f"user {user_id} is unknown")
        if lookup_one(self.item_ids, item_id) < 0:
            raise NotFound(f"item {item_id} is not in the catalogue")

    def answer(self, query: str, columns: Sequence[np.ndarray], k: int | None = None) -> np.ndarray:
        return self.predict(lookup(self.user_ids, np.asarray(columns[0])), lookup(self.item_ids, np.asarray(columns[1])))

    def answer_one(self, query: str, key: tuple, k: int | None = None) -> float:
        u, i = lookup_one(self.user_ids, key[0]), lookup_one(self.item_ids, key[1])
        return float(self.predict(np.array([u]), np.array([i]))[0])

    def stored(self, query: str, key: tuple, k: int | None = None) -> float | None:
        u, i = lookup_one(self.user_ids, key[0]), lookup_one(self.item_ids, key[1])  # the scalar form: a hit's
        if u < 0 or i < 0:
            return None
        dense = u * self.n_items + i
        pos = int(self.pred_keys.searchsorted(dense))
        if pos < len(self.pred_keys) and self.pred_keys[pos] == dense:
            return float(self.pred_values[pos])
        return None

    def precomputed(self) -> dict[str, int]:
        return {PREDICT: len(self.pred_values)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version,
                "inputs": [i.describe() for i in self.spec.inputs], "output": "predict"}

    # --- precomputing -----------------------------------------------------------------
    def keys(self, query: str, plan: Plan) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Before any request log: each popular user against their own top recommended items (the pairs a
        frontend is most likely to show); then the pairs actually asked for, first."""
        per_user, cap = plan.setting("batch.pairs_per_user"), plan.setting("batch.max_pairs")
        recs = plan.answers("recommender", "user_recs")  # the contract table user_recs (user_id, item_ids, ...)
        pairs = np.zeros((0, 2), np.int64)
        if recs is not None and recs.num_rows and per_user > 0:
            top = pc.list_slice(recs.column("item_ids").combine_chunks(), 0, per_user)
            users = np.repeat(recs.column("user_id").to_numpy(), pc.list_value_length(top).to_numpy())
            pairs = np.column_stack([users, top.flatten().to_numpy()]).astype(np.int64)[:cap]
        plan.add("pairs", pairs)
        logged = np.asarray(plan.popular("pairs"), np.int64).reshape(-1, 2)
        if len(logged):
            both = np.concatenate([logged, pairs])
            _, first = np.unique(both, axis=0, return_index=True)
            pairs = both[np.sort(first)][:cap]
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        return [pairs[:, 0].copy(), pairs[:, 1].copy()], {}

    def part(self, query: str, columns: Sequence[np.ndarray], answers: np.ndarray) -> pa.Table:
        return pa.table({"user_id": pa.array(columns[0], pa.int64()), "item_id": pa.array(columns[1], pa.int64()),
                         "prediction": pa.array(np.asarray(answers, np.float32), pa.float32())})

    def assemble(self, query: str, table: pa.Table, folder: Path, k_max: int) -> dict[str, Any]:
        u = lookup(self.user_ids, table.column("user_id").to_numpy())
        i = lookup(self.item_ids, table.column("item_id").to_numpy())
        ok = (u >= 0) & (i >= 0)
        keys = u[ok] * self.n_items + i[ok]
        order = np.argsort(keys, kind="stable")
        save_array(Path(folder) / "pred_keys.npy", keys[order].astype(np.int64))
        save_array(Path(folder) / "pred_values.npy", table.column("prediction").to_numpy()[ok][order].astype(np.float32))
        return {"rows": int(table.num_rows)}

    def key_columns(self, query: str) -> list[str]:
        return ["user_id", "item_id"]
