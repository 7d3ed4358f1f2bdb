"""Training: retrieval vectors (PureSVD, or supplied), the FAISS index, the rating model.

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
from sklearn.utils.extmath import randomized_svd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from batch.embeddings import Vectors
from serving.errors import ConfigError, InputError
from serving.models.rating import RatingModel
from serving.models.recommender import ModelBundle
from serving.models.vectors import fold_in, mips_pad, normalise, set_search_params
from serving.store.layout import RATING
from serving.settings import Settings

LOG = logging.getLogger(__name__)

# Settings that change what training produces; a change in any of them means a new model.
TRAINING_KEYS = ("train.dim", "train.popularity_damping", "train.index", "train.flat_max_items",
                 "train.flat_max_items_ip", "train.hnsw_ef_search", "train.ivf_nprobe", "train.similar_min_support", "train.rating_dim",
                 "train.rating_reg", "train.bias_reg", "train.rating_iterations", "train.holdout_share",
                 "train.eval_users", "train.seed", "embeddings.item_vectors", "embeddings.user_vectors",
                 "embeddings.metric")


# Bump when training code changes what it produces, so cached models are not reused across it.
TRAINING_CODE_VERSION = 6


def training_key(fingerprint: str, settings: Settings) -> str:
    """Identifies a trained model: the inputs' fingerprint, every setting training reads, the code version."""
    payload = json.dumps({"inputs": fingerprint, "code": TRAINING_CODE_VERSION,
                          **{k: settings[k] for k in TRAINING_KEYS}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def index_spec(n_items: int, settings: Settings, metric: str = "cosine") -> str:
    """The FAISS factory string (the setting is validated against its pattern when loaded)."""
    spec = settings["train.index"]
    if spec == "auto":
        limit = settings["train.flat_max_items_ip" if metric == "ip" else "train.flat_max_items"]
        if n_items <= limit:
            return "Flat"
        if metric == "ip":
            # Unnormalised (PureSVD) vectors: an HNSW graph built with the inner product itself had the
            # best recall@10 of the fast indexes measured (tests/bench/bench_index.py); padded IVF was
            # faster at a little less recall, HNSW over padded vectors far worse. The figures:
            # docs/performance.md, "Index choice for inner-product vectors".
            return "HNSW32"
        # IVF with ~4 sqrt(n) lists: on 1M clustered items it built faster than HNSW32 and searched
        # faster at higher recall (tests/bench/bench_batch.py; figures in docs/performance.md).
        nlist = 2 ** int(round(np.log2(4 * np.sqrt(n_items))))
        return f"IVF{nlist},Flat"
    return spec


def build_index(vecs: np.ndarray, spec: str, settings: Settings, seed: int = 0) -> tuple[Any, dict[str, int]]:
    """An inner-product FAISS index over (n, d) float32 vectors (unit vectors for cosine)."""
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


def index_builder(settings: Settings, metric: str, seed: int = 0):
    """The ModelBundle.from_vectors builder: (G, d) group vectors -> (index, meta entries).

    Inner-product vectors go to an IVF index with one padding coordinate (serving.models.vectors.mips_pad), so
    k-means lists see equal-length vectors; an HNSW graph or Flat gets them as they are (padding
    costs a graph much of its recall: the padding coordinate then dominates the neighbourhoods of
    short vectors; measured in docs/performance.md)."""
    def builder(group_vecs: np.ndarray) -> tuple[Any, dict[str, Any]]:
        spec = index_spec(len(group_vecs), settings, metric)
        pad = metric == "ip" and spec.startswith("IVF")
        index, params = build_index(mips_pad(group_vecs) if pad else group_vecs, spec, settings, seed)
        return index, {"index": spec, "search_params": params, "mips_pad": pad}
    return builder


def popularity_svd(uidx: np.ndarray, iidx: np.ndarray, n_users: int, n_items: int, dim: int, damping: float,
                   seed: int) -> np.ndarray:
    """PureSVD item vectors: the right singular vectors of the binary user x item matrix whose columns
    are scaled by count ** -damping. (nnz,) user and item indices -> (n_items, d') float32.

    Scores are then a user's history folded in (the sum of its items' vectors) times the item vectors,
    unnormalised, so an item's popularity stays in its vector's length."""
    count = np.bincount(iidx, minlength=n_items).astype(np.float64)
    weight = np.power(np.maximum(count, 1.0), -damping)
    x = sparse.csr_matrix((weight[iidx], (uidx, iidx)), shape=(n_users, n_items), dtype=np.float64)
    k = max(1, min(dim, n_items - 1, n_users - 1))
    _, _, vt = randomized_svd(x, n_components=k, n_oversamples=20, n_iter=7, random_state=seed)
    # fix each component's sign (an SVD's sign is arbitrary) so retraining gives the same vectors
    flip = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    return np.ascontiguousarray((vt * flip[:, None]).T, dtype=np.float32)


def fit_biases(uidx, iidx, ratings, n_users, n_items, reg, iterations=10):
    """Regularised user and item biases: (global mean, user (n,), item (m,)) float64."""
    mu = float(ratings.mean())
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    cu = np.bincount(uidx, minlength=n_users)
    ci = np.bincount(iidx, minlength=n_items)
    for _ in range(iterations):
        bi = np.bincount(iidx, ratings - mu - bu[uidx], n_items) / (ci + reg)
        bu = np.bincount(uidx, ratings - mu - bi[iidx], n_users) / (cu + reg)
    return mu, bu, bi


def _ridge_rows(rows, cols, y, design, reg, n_rows, block: int = 4096):
    """For every row r: argmin_x sum_j (y_j - design[cols_j] . x)^2 + reg * n_r * |x|^2 (ALS-WR).

    (nnz,) rows, cols, targets and (p, f) design -> (n_rows, f). Each row's normal equations are one
    small BLAS product; they are solved a block of rows at a time, so memory stays bounded."""
    f = design.shape[1]
    order = np.argsort(rows, kind="stable")
    cols, y = cols[order], np.asarray(y, np.float64)[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    design = np.asarray(design, np.float64)
    out = np.zeros((n_rows, f))
    eye = np.eye(f)
    # thousands of tiny products: a multi-threaded BLAS spends longer waking threads than computing
    with threadpool_limits(1, user_api="blas"):
        _ridge_blocks(indptr, cols, y, design, reg, eye, out, block)
    return out


def _ridge_blocks(indptr, cols, y, design, reg, eye, out, block):
    n_rows, f = out.shape
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        a = np.empty((stop - start, f, f))
        b = np.empty((stop - start, f))
        for r in range(start, stop):
            lo, hi = indptr[r], indptr[r + 1]
            d = design[cols[lo:hi]]
            a[r - start] = d.T @ d
            b[r - start] = y[lo:hi] @ d
        cnt = np.diff(indptr[start:stop + 1])
        a += (reg * np.maximum(cnt, 1))[:, None, None] * eye
        out[start:stop] = np.linalg.solve(a, b[..., None])[..., 0]


def fit_rating_model(uidx, iidx, ratings, n_users, n_items, settings: Settings) -> dict[str, Any]:
    """Biased matrix factorisation by alternating ridge regressions (ALS-WR), started from the
    regularised biases. Returns the arrays ModelBundle.predict reads and the "rating" meta."""
    r = np.asarray(ratings, dtype=np.float64)
    mu, bu, bi = fit_biases(uidx, iidx, r, n_users, n_items, settings["train.bias_reg"])
    f = settings["train.rating_dim"]
    reg = settings["train.rating_reg"]
    rng = np.random.default_rng(settings["train.seed"])
    p = rng.normal(scale=0.1, size=(n_users, f))
    q = rng.normal(scale=0.1, size=(n_items, f))
    bu_mf, bi_mf = bu.copy(), bi.copy()
    # a bar in a terminal only (disable=None): on a large catalogue these sweeps are most of the training
    for _ in tqdm(range(settings["train.rating_iterations"]), desc="rating model", unit="sweep", disable=None,
                  leave=False):
        x = _ridge_rows(uidx, iidx, r - mu - bi_mf[iidx], np.column_stack([q, np.ones(n_items)]), reg, n_users)
        p, bu_mf = x[:, :f], x[:, f]
        x = _ridge_rows(iidx, uidx, r - mu - bu_mf[uidx], np.column_stack([p, np.ones(n_users)]), reg, n_items)
        q, bi_mf = x[:, :f], x[:, f]
    # predict() computes w0 + w1 (mu + bu + bi) + w2 (p . q): the factor model's own biases are used
    # and it is blended with weight 1 (no held-out blend fitted here)
    return {"user_bias": bu_mf.astype(np.float32), "item_bias": bi_mf.astype(np.float32),
            "user_factors": p.astype(np.float32), "item_factors": q.astype(np.float32),
            "meta": {"global_mean": mu, "blend": [0.0, 1.0, 1.0], "dim": f, "reg": reg}}


def train_bundle(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                 supplied: dict[str, Vectors | None] | None = None) -> ModelBundle:
    """Fit retrieval vectors (unless supplied), index and rating model on ``interactions``.

    ``supplied``: {"items": Vectors | None, "users": Vectors | None} from batch.embeddings; the
    trainer makes only what is missing (PureSVD item vectors; user vectors folded in from history)."""
    supplied = supplied or {}
    seed = settings["train.seed"]
    item_ids = np.sort(items["item_id"].to_numpy(dtype=np.int64))
    user_ids = np.unique(interactions["user_id"].to_numpy(dtype=np.int64))
    uidx = np.searchsorted(user_ids, interactions["user_id"].to_numpy(dtype=np.int64))
    iidx = np.searchsorted(item_ids, interactions["item_id"].to_numpy(dtype=np.int64))
    n_users, n_items = len(user_ids), len(item_ids)

    item_v, user_v = supplied.get("items"), supplied.get("users")
    if item_v is not None:
        metric = settings["embeddings.metric"]
        item_vecs = np.zeros((n_items, item_v.vecs.shape[1]), np.float32)
        item_vecs[np.searchsorted(item_ids, item_v.ids)] = item_v.vecs
        missing = n_items - len(item_v.ids)
        if missing:
            LOG.warning("%s: %d catalogue items have no vector; they get zero vectors", item_v.path, missing)
        source = str(item_v.path)
    else:
        metric = "ip"
        item_vecs = popularity_svd(uidx, iidx, n_users, n_items, settings["train.dim"],
                                   settings["train.popularity_damping"], seed)
        source = "trained"
    if metric == "cosine":
        item_vecs = normalise(item_vecs)

    item_support = np.bincount(iidx, minlength=n_items).astype(np.int64)
    user_count = np.bincount(uidx, minlength=n_users)
    o = np.lexsort((iidx, uidx))
    seen_items = iidx[o].astype(np.int32)
    seen_indptr = np.concatenate([[0], np.cumsum(user_count)]).astype(np.int64)
    user_vecs = fold_in(item_vecs, seen_indptr, seen_items, metric)
    if user_v is not None:
        if user_v.vecs.shape[1] != item_vecs.shape[1]:
            raise InputError(user_v.path, "vector", f"dimension {user_v.vecs.shape[1]} differs from the item "
                                                     f"vectors' {item_vecs.shape[1]}")
        given = user_v.vecs if metric == "ip" else normalise(user_v.vecs)
        user_vecs[np.searchsorted(user_ids, user_v.ids)] = given

    meta = {"dim": int(item_vecs.shape[1]), "metric": metric, "vectors": source,
            "user_vectors": str(user_v.path) if user_v is not None else "folded in",
            "min_support": settings["train.similar_min_support"],
            "trained_at": datetime.now(timezone.utc).isoformat(), "n_interactions": int(len(uidx))}
    bundle = ModelBundle.from_vectors(item_ids, item_vecs, index_builder(settings, metric, seed),
                                      user_ids=user_ids, user_vecs=user_vecs,
                                      item_support=item_support, seen_indptr=seen_indptr, seen_items=seen_items,
                                      meta=meta)
    return bundle


def train_rating(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                 rating_range: tuple[float, float] | None = None) -> RatingModel:
    """The rating model (serving.models.rating) fitted on ``interactions``, over the same sorted user
    and item ids as train_bundle's; predictions are clipped to ``rating_range`` (default: the range
    of the ratings)."""
    item_ids = np.sort(items["item_id"].to_numpy(dtype=np.int64))
    user_ids = np.unique(interactions["user_id"].to_numpy(dtype=np.int64))
    uidx = np.searchsorted(user_ids, interactions["user_id"].to_numpy(dtype=np.int64))
    iidx = np.searchsorted(item_ids, interactions["item_id"].to_numpy(dtype=np.int64))
    ratings = interactions["rating"].to_numpy(dtype=np.float32)
    fit = fit_rating_model(uidx, iidx, ratings, len(user_ids), len(item_ids), settings)
    lo, hi = rating_range or (float(ratings.min()), float(ratings.max()))
    meta = {**fit.pop("meta"), "rating_range": [lo, hi]}
    return RatingModel(RATING, {"user_ids": user_ids, "item_ids": item_ids, **fit}, meta)

