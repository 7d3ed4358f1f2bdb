"""Training: embeddings, the FAISS item index, the rating model, and hold-out evaluation.

Functions from frames to a ModelBundle; no paths inside (the job saves the bundle).
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import faiss
import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.ensemble import HistGradientBoostingRegressor

from serving.errors import ConfigError
from serving.model import ModelBundle, normalise, set_search_params
from serving.settings import Settings

LOG = logging.getLogger(__name__)

# Shrink item means towards the global mean with this many pseudo-ratings.
_MEAN_PRIOR = 5.0
# The rating model sees at most this many rows (a seeded sample above it).
_MAX_TRAIN_ROWS = 2_000_000
# Settings that change what training produces; a change in any of them means a new model.
TRAINING_KEYS = ("train.dim", "train.index", "train.flat_max_items", "train.hnsw_ef_search", "train.ivf_nprobe",
                 "train.model_iterations", "train.learning_rate", "train.seed", "batch.candidates")


# Bump when training code changes what it produces, so cached models are not reused across it.
TRAINING_CODE_VERSION = 2


def training_key(fingerprint: str, settings: Settings) -> str:
    """Identifies a trained model: the inputs' fingerprint, every setting training reads, the code version."""
    payload = json.dumps({"inputs": fingerprint, "code": TRAINING_CODE_VERSION,
                          **{k: settings[k] for k in TRAINING_KEYS}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def index_spec(n_items: int, settings: Settings) -> str:
    """The FAISS factory string (the setting is validated against its pattern when loaded)."""
    spec = settings["train.index"]
    if spec == "auto":
        if n_items <= settings["train.flat_max_items"]:
            return "Flat"
        # IVF with ~4 sqrt(n) lists: on 1M clustered items it built 3x faster than HNSW32 and
        # searched 2x faster at higher recall (tests/bench/bench_batch.py).
        nlist = 2 ** int(round(np.log2(4 * np.sqrt(n_items))))
        return f"IVF{nlist},Flat"
    return spec


def build_index(vecs: np.ndarray, spec: str, settings: Settings, seed: int = 0) -> tuple[Any, dict[str, int]]:
    """A cosine (normalised inner-product) FAISS index over (n, d) float32 unit vectors."""
    n, d = vecs.shape
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    params: dict[str, int] = {}
    if spec.startswith("IVF"):
        nlist = int(spec[3:].split(",")[0])
        if nlist > n:
            raise ConfigError(f"{settings.source}: train.index: IVF{nlist} needs at least {nlist} items, have {n}")
        rng = np.random.default_rng(seed)
        sample = vecs[rng.choice(n, size=min(n, nlist * 64), replace=False)]
        index.train(sample)
        params["nprobe"] = settings["train.ivf_nprobe"]
    elif spec.startswith("HNSW"):
        params["efSearch"] = settings["train.hnsw_ef_search"]
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    set_search_params(index, {"search_params": params})
    return index, params


def _embeddings(uidx, iidx, n_users, n_items, dim, seed):
    """TruncatedSVD of the L2-row-normalised binary user x item matrix.

    Returns (user_vecs (n_users, d'), item_vecs (n_items, d')), both unnormalised.
    """
    counts = np.bincount(uidx, minlength=n_users).astype(np.float32)
    vals = 1.0 / np.sqrt(counts[uidx])
    x = sparse.csr_matrix((vals, (uidx, iidx)), shape=(n_users, n_items), dtype=np.float32)
    k = max(1, min(dim, n_items - 1, n_users - 1))
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=seed)
    us = svd.fit_transform(x).astype(np.float32)
    s = np.sqrt(np.maximum(svd.singular_values_, 1e-12)).astype(np.float32)
    return us / s, svd.components_.T.astype(np.float32) * s


def train_bundle(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                 rating_range: tuple[float, float] | None = None) -> ModelBundle:
    """Fit embeddings, index and rating model on ``interactions`` over the ``items`` catalogue."""
    seed = settings["train.seed"]
    item_ids = np.sort(items["item_id"].to_numpy(dtype=np.int64))
    user_ids = np.unique(interactions["user_id"].to_numpy(dtype=np.int64))
    uidx = np.searchsorted(user_ids, interactions["user_id"].to_numpy(dtype=np.int64))
    iidx = np.searchsorted(item_ids, interactions["item_id"].to_numpy(dtype=np.int64))
    ratings = interactions["rating"].to_numpy(dtype=np.float32)
    n_users, n_items = len(user_ids), len(item_ids)

    user_raw, item_raw = _embeddings(uidx, iidx, n_users, n_items, settings["train.dim"], seed)

    # Genres as 0/1 flags; items nobody interacted with borrow their genres' mean vector.
    order = items.set_index("item_id").loc[item_ids]
    vocab = sorted({g for gs in order["genres"] for g in gs})
    gpos = {g: j for j, g in enumerate(vocab)}
    item_genres = np.zeros((n_items, len(vocab)), dtype=np.float32)
    for r, gs in enumerate(order["genres"]):
        for g in gs:
            item_genres[r, gpos[g]] = 1.0
    item_count = np.bincount(iidx, minlength=n_items)
    cold = item_count == 0
    if cold.any() and len(vocab):
        warm = ~cold
        centroid = (item_genres[warm].T @ item_raw[warm]) / np.maximum(item_genres[warm].sum(0), 1)[:, None]
        item_raw[cold] = item_genres[cold] @ centroid
        # A seeded jitter per item id, so cold items sharing genres are not exact duplicates (a tie
        # group hundreds long would make their neighbour lists arbitrary).
        scale = 0.05 * np.linalg.norm(item_raw[cold], axis=1, keepdims=True)
        jitter = np.stack([np.random.default_rng([seed, int(i)]).normal(size=item_raw.shape[1])
                           for i in item_ids[cold]]).astype(np.float32)
        item_raw[cold] += scale * jitter / np.sqrt(item_raw.shape[1])
    item_vecs, user_vecs = normalise(item_raw), normalise(user_raw)

    glob = float(ratings.mean())
    item_sum = np.bincount(iidx, weights=ratings, minlength=n_items)
    item_mean = (item_sum + _MEAN_PRIOR * glob) / (item_count + _MEAN_PRIOR)
    user_count = np.bincount(uidx, minlength=n_users)
    user_mean = (np.bincount(uidx, weights=ratings, minlength=n_users) + _MEAN_PRIOR * glob) / (user_count + _MEAN_PRIOR)
    item_stats = np.column_stack([item_mean, np.log1p(item_count)]).astype(np.float32)
    user_stats = np.column_stack([user_mean, np.log1p(user_count)]).astype(np.float32)

    # Seen items as CSR sorted by (user, item).
    o = np.lexsort((iidx, uidx))
    seen_items = iidx[o].astype(np.int32)
    seen_indptr = np.concatenate([[0], np.cumsum(user_count)]).astype(np.int64)

    spec = index_spec(n_items, settings)
    index, params = build_index(item_vecs, spec, settings, seed)
    lo, hi = rating_range or (float(ratings.min()), float(ratings.max()))
    meta = {"dim": int(item_vecs.shape[1]), "index": spec, "search_params": params, "genres": vocab,
            "candidates": settings["batch.candidates"], "rating_range": [lo, hi], "global_mean": glob,
            "trained_at": datetime.now(timezone.utc).isoformat(), "n_interactions": int(len(ratings))}
    bundle = ModelBundle(item_ids=item_ids, user_ids=user_ids, item_vecs=item_vecs, user_vecs=user_vecs,
                         item_stats=item_stats, user_stats=user_stats, item_genres=item_genres,
                         seen_indptr=seen_indptr, seen_items=seen_items, index=index, regressor=None, meta=meta)

    rows = np.arange(len(ratings))
    if len(rows) > _MAX_TRAIN_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, _MAX_TRAIN_ROWS, replace=False))
    reg = HistGradientBoostingRegressor(max_iter=settings["train.model_iterations"],
                                        learning_rate=settings["train.learning_rate"],
                                        early_stopping=False, random_state=seed)
    x = bundle.features(uidx[rows], iidx[rows])
    # Leave-one-out means for the training rows: a row's own rating must not leak into its features.
    r = ratings[rows].astype(np.float64)
    u_sum = user_mean * (user_count + _MEAN_PRIOR)
    i_sum = item_mean * (item_count + _MEAN_PRIOR)
    x[:, 1] = (u_sum[uidx[rows]] - r) / (user_count[uidx[rows]] - 1 + _MEAN_PRIOR)
    x[:, 3] = (i_sum[iidx[rows]] - r) / (item_count[iidx[rows]] - 1 + _MEAN_PRIOR)
    reg.fit(x, ratings[rows])
    bundle.regressor = reg
    return bundle


def time_split(interactions: pd.DataFrame, holdout_share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The newest ``holdout_share`` of interactions (by timestamp) form the test set."""
    ordered = interactions.sort_values(["ts", "user_id", "item_id"], kind="stable")
    cut = int(round(len(ordered) * (1 - holdout_share)))
    return ordered.iloc[:cut], ordered.iloc[cut:]


def evaluate(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, settings: Settings,
             bundle: ModelBundle | None = None) -> dict[str, Any]:
    """RMSE against an item-mean baseline, recall@10 against a most-popular baseline, on ``test``."""
    bundle = bundle or train_bundle(train, items, settings)
    uidx = bundle.user_index(test["user_id"].to_numpy())
    iidx = bundle.item_index(test["item_id"].to_numpy())
    known = (uidx >= 0) & (iidx >= 0)
    truth = test["rating"].to_numpy(dtype=np.float64)[known]
    pred = bundle.predict(uidx[known], iidx[known]).astype(np.float64)
    item_mean = train.groupby("item_id")["rating"].mean()
    base = test["item_id"][known].map(item_mean).fillna(train["rating"].mean()).to_numpy(dtype=np.float64)

    # recall@10 on users known at training time, a seeded sample of them.
    test_known = test[known]
    users = np.unique(test_known["user_id"].to_numpy())
    rng = np.random.default_rng(settings["train.seed"])
    if len(users) > settings["train.eval_users"]:
        users = np.sort(rng.choice(users, settings["train.eval_users"], replace=False))
    truth_sets = test_known[test_known["user_id"].isin(users)].groupby("user_id")["item_id"].apply(set)
    recs, _ = bundle.recommend(bundle.user_index(users), 10)
    popular = bundle.item_ids[np.argsort(-np.expm1(bundle.item_stats[:, 1]), kind="stable")]
    rec_hits, pop_hits = [], []
    for row, uid in enumerate(users):
        want = truth_sets[uid]
        rec_hits.append(len(want.intersection(recs[row].tolist())) / len(want))
        seen = set(bundle.item_ids[bundle.seen_of(int(bundle.user_index([uid])[0]))].tolist())
        top = [i for i in popular[:10 + len(seen)].tolist() if i not in seen][:10]
        pop_hits.append(len(want.intersection(top)) / len(want))
    return {
        "holdout_share": settings["train.holdout_share"],
        "test_rows": int(len(test)), "test_rows_scored": int(known.sum()),
        "rmse_model": _rmse(pred, truth), "rmse_item_mean": _rmse(base, truth),
        "recall_at_10": float(np.mean(rec_hits)) if rec_hits else None,
        "recall_at_10_popular": float(np.mean(pop_hits)) if pop_hits else None,
        "eval_users": int(len(users)),
    }


def _rmse(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean((a - b) ** 2))) if len(a) else None


def train_and_evaluate(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings
                       ) -> tuple[ModelBundle, dict[str, Any]]:
    """Evaluate on a time-based hold-out, then fit the bundle that ships on all interactions."""
    train, test = time_split(interactions, settings["train.holdout_share"])
    lohi = (float(interactions["rating"].min()), float(interactions["rating"].max()))
    evaluation = evaluate(train, test, items, settings, train_bundle(train, items, settings, lohi))
    LOG.info("evaluation: %s", evaluation)
    return train_bundle(interactions, items, settings, lohi), evaluation
