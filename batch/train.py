"""Training: retrieval vectors (EASE factored, PureSVD, or supplied), the method chosen on a
validation split, the FAISS index, the rating model.

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
from scipy.linalg import lapack
from sklearn.utils.extmath import randomized_svd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from batch.embeddings import Vectors
from batch.protocol import ranking_metrics, temporal_split
from serving.errors import ConfigError, InputError
from serving.models.rating import RatingModel
from serving.models.recommender import ModelBundle
from serving.models.vectors import fold_in, mips_pad, normalise, set_search_params
from serving.store.layout import RATING
from serving.settings import Settings

LOG = logging.getLogger(__name__)

# Settings that change what training produces; a change in any of them means a new model.
TRAINING_KEYS = ("train.method", "train.ease_max_items", "train.ease_lambda", "train.history_half_life", "train.dim", "train.popularity_damping", "train.index", "train.flat_max_items",
                 "train.flat_max_items_ip", "train.hnsw_ef_search", "train.ivf_nprobe", "train.similar_min_support", "train.rating_dim",
                 "train.rating_reg", "train.bias_reg", "train.rating_iterations", "train.holdout_share",
                 "train.eval_users", "train.seed", "embeddings.item_vectors", "embeddings.user_vectors",
                 "embeddings.metric")


# Bump when training code changes what it produces, so cached models are not reused across it.
TRAINING_CODE_VERSION = 7


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
    flip = _fix_signs(vt)
    return np.ascontiguousarray((vt * flip[:, None]).T, dtype=np.float32)


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """Each component's sign fixed (an SVD's sign is arbitrary) so retraining gives the same vectors:
    (k,) +-1 that make each row of ``vt`` largest-magnitude entry positive."""
    return np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])


def ease_factors(uidx: np.ndarray, iidx: np.ndarray, n_users: int, n_items: int, lam: float, dim: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """EASE (Steck 2019) on the binary user x item matrix X, factored for inner-product search.

    B = argmin |X - XB|^2 + lam |B|^2 with diag(B) = 0 has the closed form B = I - P / diag(P),
    P = (X^T X + lam I)^-1; a user's scores are x_u B. B is factored by a truncated SVD, B ~ U V^T
    (U = L S, V = R, rank ``dim``), so scores are (x_u U) . V_i: one FAISS search of the folded-in
    query over the item vectors V. (nnz,) indices -> (query vectors U, item vectors V), (n_items, d')
    float32 each. Memory: one dense float64 items x items matrix, worked on in place."""
    x = sparse.csr_matrix((np.ones(len(uidx)), (uidx, iidx)), shape=(n_users, n_items), dtype=np.float64)
    x.data[:] = 1.0  # a repeated (user, item) pair is one interaction
    g = np.asarray((x.T @ x).todense(), dtype=np.float64, order="F")
    g[np.diag_indices(n_items)] += lam
    c, info = lapack.dpotrf(g, lower=0, overwrite_a=1)
    if info == 0:
        p, info = lapack.dpotri(c, lower=0, overwrite_c=1)
    if info != 0:
        raise ConfigError(f"train.ease_lambda: X^T X + {lam:g} I is not positive definite (LAPACK info {info}); "
                          "use a larger lambda")
    del g, c
    # dpotri fills the upper triangle; mirror it a block at a time (no n^2 index arrays)
    for start in range(0, n_items, 1024):
        stop = min(n_items, start + 1024)
        p[start:stop, :start] = p[:start, start:stop].T
        block = p[start:stop, start:stop]
        block[...] = np.triu(block) + np.triu(block, 1).T
    d = p.diagonal().copy()
    p /= -d[None, :]
    p[np.diag_indices(n_items)] = 0.0
    k = max(1, min(dim, n_items - 1))
    left, sv, vt = randomized_svd(p, n_components=k, n_oversamples=20, n_iter=7, random_state=seed)
    flip = _fix_signs(vt)
    query = (left * (sv * flip)[None, :]).astype(np.float32)
    items = (vt * flip[:, None]).T.astype(np.float32)
    return np.ascontiguousarray(query), np.ascontiguousarray(items)


def _seconds(ts: pd.Series) -> np.ndarray:
    """(n,) int64 seconds since 1970 of a timestamp column (any unit, with or without a time zone)."""
    return ((pd.to_datetime(ts, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def history_weights(uidx: np.ndarray, ts: np.ndarray, iidx: np.ndarray, half_life: float) -> np.ndarray:
    """(nnz,) float32: each interaction's weight in its user's folded-in vector, 0.5 ** (newer /
    half_life), newer = how many of the user's interactions come after it (by time, then item index,
    as the temporal split orders them); half_life 0 -> all 1. The next thing a user takes is most like
    what they took last, so recent history weighs more."""
    if half_life <= 0:
        return np.ones(len(uidx), np.float32)
    order = np.lexsort((iidx, ts, uidx))
    counts = np.bincount(uidx, minlength=int(uidx.max()) + 1 if len(uidx) else 0)
    ends = np.cumsum(counts)
    pos = np.empty(len(uidx), np.int64)
    pos[order] = np.arange(len(uidx))
    newer = ends[uidx] - 1 - pos
    return np.power(0.5, newer / half_life).astype(np.float32)


# auto: the candidates tried on the validation split. EASE's lambda as multiples of the mean
# interactions per item (the penalty competes with the Gram matrix's diagonal, which grows with the
# data, so a fixed number would mean a different model on a denser data set); half-lives in a
# user's own interactions.
EASE_LAMBDA_SCALES = (1.0, 4.0, 16.0)
HALF_LIVES = (0.0, 4.0, 8.0, 16.0, 32.0)
K_VALIDATION = 10


def mean_item_count(iidx: np.ndarray, n_items: int) -> float:
    """Mean interactions per item among items with any (what EASE_LAMBDA_SCALES multiply)."""
    count = np.bincount(iidx, minlength=n_items)
    return float(count.sum() / max(1, int((count > 0).sum())))


def method_vectors(method: dict[str, Any], uidx, iidx, n_users: int, n_items: int,
                   settings: Settings) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The vectors of a resolved method (choose_method / pinned_method): (query vectors or None for
    the item vectors themselves, item vectors, meta entries)."""
    seed = settings["train.seed"]
    if method["method"] == "ease":
        lam = method.get("ease_lambda") or method["ease_lambda_scale"] * mean_item_count(iidx, n_items)
        query, items = ease_factors(uidx, iidx, n_users, n_items, lam, settings["train.dim"], seed)
        return query, items, {"ease_lambda": lam}
    return None, popularity_svd(uidx, iidx, n_users, n_items, settings["train.dim"],
                                settings["train.popularity_damping"], seed), {}


def pinned_method(settings: Settings, n_items: int) -> dict[str, Any]:
    """The method the settings pin (train.method 'ease' or 'svd'), checked against the catalogue."""
    name = settings["train.method"]
    limit = settings["train.ease_max_items"]
    if name == "ease" and n_items > limit:
        raise ConfigError(f"{settings.source}: train.method: 'ease' needs a catalogue of at most "
                          f"train.ease_max_items ({limit:,}) items, this one has {n_items:,}")
    out: dict[str, Any] = {"method": name, "history_half_life": settings["train.history_half_life"],
                           "chosen_by": "setting"}
    if name == "ease":
        out["ease_lambda"] = settings["train.ease_lambda"]
    return out


def _top_k(q: np.ndarray, item_vecs: np.ndarray, seen_indptr: np.ndarray, seen_items: np.ndarray,
           allowed: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item indices (n, k) by inner product, seen and not-allowed items excluded, ties
    by index (as ModelBundle.recommend orders them); -1 padded."""
    out = np.full((len(q), k), -1, np.int64)
    rows = max(1, (1 << 24) // max(1, item_vecs.shape[0]))
    for start in range(0, len(q), rows):
        s = q[start:start + rows] @ item_vecs.T
        s[:, ~allowed] = -np.inf
        for r in range(s.shape[0]):
            u = start + r
            s[r, seen_items[seen_indptr[u]:seen_indptr[u + 1]]] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)
        top = np.take_along_axis(part, order, axis=1)
        top = np.where(np.isfinite(np.take_along_axis(ps, order, axis=1)), top, -1)
        out[start:start + rows, :kk] = top
    return out


def choose_method(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings) -> dict[str, Any]:
    """train.method = 'auto': the method (EASE where the catalogue has at most train.ease_max_items
    items, PureSVD), EASE's lambda and the history half-life with the best NDCG@10 on a validation
    split cut from ``interactions`` (each user's newest train.holdout_share held out, as the
    evaluation does; at most train.eval_users users scored), the vectors scored exactly.
    Returns the choice and every candidate's figures."""
    train, val = temporal_split(interactions, settings["train.holdout_share"])
    item_ids = np.sort(items["item_id"].to_numpy(dtype=np.int64))
    user_ids = np.unique(train["user_id"].to_numpy(dtype=np.int64))
    uidx = np.searchsorted(user_ids, train["user_id"].to_numpy(dtype=np.int64))
    iidx = np.searchsorted(item_ids, train["item_id"].to_numpy(dtype=np.int64))
    ts = _seconds(train["ts"])
    n_users, n_items = len(user_ids), len(item_ids)
    val = val[val["user_id"].isin(user_ids)]
    users = np.unique(val["user_id"].to_numpy(dtype=np.int64))
    fits_ease = n_items <= settings["train.ease_max_items"]
    default = {"method": "ease" if fits_ease else "svd", "history_half_life": 0.0, "chosen_by": "default"}
    if fits_ease:
        default["ease_lambda_scale"] = EASE_LAMBDA_SCALES[1]
    if not len(users):
        return {**default, "validation": {"users": 0, "note": "no user has held-out interactions"}}
    rng = np.random.default_rng(settings["train.seed"])
    if len(users) > settings["train.eval_users"]:
        users = np.sort(rng.choice(users, settings["train.eval_users"], replace=False))
    val = val[val["user_id"].isin(users)]
    truth = [g.to_numpy() for _, g in val.groupby("user_id")["item_id"]]
    urow = np.searchsorted(user_ids, users)
    order = np.lexsort((iidx, uidx))
    counts = np.bincount(uidx, minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    seen = iidx[order]
    # the scored users' histories only
    sel_ptr = np.concatenate([[0], np.cumsum(counts[urow])]).astype(np.int64)
    sel = np.concatenate([np.arange(indptr[u], indptr[u + 1]) for u in urow])
    allowed = np.bincount(iidx, minlength=n_items) >= settings["train.similar_min_support"]
    candidates: list[dict[str, Any]] = [{"method": "svd"}]
    if fits_ease:
        candidates = [{"method": "ease", "ease_lambda_scale": c} for c in EASE_LAMBDA_SCALES] + candidates
    rows = []
    for cand in candidates:
        query, vecs, extra = method_vectors(cand, uidx, iidx, n_users, n_items, settings)
        query = vecs if query is None else query
        for half_life in HALF_LIVES:
            w = history_weights(uidx, ts, iidx, half_life)[order]
            q = fold_in(query, sel_ptr, seen[sel], "ip", w[sel])
            top = _top_k(q, vecs, sel_ptr, seen[sel], allowed, K_VALIDATION)
            recall, ndcg = ranking_metrics(np.where(top >= 0, item_ids[np.maximum(top, 0)], -1), truth)
            rows.append({**cand, **extra, "history_half_life": half_life,
                         "recall_at_10": float(recall.mean()), "ndcg_at_10": float(ndcg.mean())})
            LOG.info("validation: %s", rows[-1])
    best = max(rows, key=lambda r: (r["ndcg_at_10"], r["recall_at_10"]))
    choice = {k: v for k, v in best.items() if k in ("method", "ease_lambda_scale", "history_half_life")}
    return {**choice, "chosen_by": "validation",
            "validation": {"protocol": f"each user's newest {settings['train.holdout_share']:.0%} of the training "
                                       f"data held out (users with >= 5 interactions)",
                           "users": int(len(users)), "candidates": rows}}


# Settings a choice on validation depends on (beside the inputs): a change in any of them chooses again.
CHOICE_KEYS = ("train.method", "train.ease_max_items", "train.dim", "train.popularity_damping",
               "train.similar_min_support", "train.holdout_share", "train.eval_users", "train.seed")


def choice_basis(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings) -> dict[str, Any]:
    """What a choice is made on: the sizes of the inputs and a key of the settings it depends on."""
    key = json.dumps({"code": TRAINING_CODE_VERSION, **{k: settings[k] for k in CHOICE_KEYS}}, sort_keys=True)
    return {"items": int(len(items)), "users": int(interactions["user_id"].nunique()),
            "interactions": int(len(interactions)), "settings": hashlib.sha256(key.encode()).hexdigest()[:16]}


def choose_again(previous: dict[str, Any] | None, basis: dict[str, Any], settings: Settings) -> str | None:
    """Why a choice on validation must be made again instead of reusing ``previous`` (an earlier
    resolve_method result, with its "basis"), or None to reuse it. Sizes are compared with the inputs
    the choice was made on, not the last run's, so slow growth adds up to a new choice too."""
    if not previous or previous.get("chosen_by") != "validation" or "basis" not in previous:
        return "no earlier choice on validation"
    was = previous["basis"]
    if was.get("settings") != basis["settings"]:
        return "a setting the choice depends on changed"
    limit = settings["train.ease_max_items"]
    if (was["items"] <= limit) != (basis["items"] <= limit):
        return f"the catalogue crossed train.ease_max_items ({limit:,} items)"
    share = settings["train.revalidate_change"]
    for name in ("items", "users", "interactions"):
        change = abs(basis[name] - was[name]) / max(1, was[name])
        if change > share:
            return (f"{name} changed by {change:.0%} since the choice ({was[name]:,} -> {basis[name]:,}; "
                    f"train.revalidate_change {share:.0%})")
    return None


def resolve_method(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method to train: as pinned (no validation), or chosen on validation (train.method 'auto'),
    where ``previous`` (the choice the last model carries) is reused while the inputs have not
    changed materially since it was made (choose_again)."""
    if settings["train.method"] != "auto":
        return pinned_method(settings, len(items))
    basis = choice_basis(interactions, items, settings)
    why = choose_again(previous, basis, settings)
    if why is None:
        LOG.info("method: reusing the choice made on %s items, %s users, %s interactions (%s): %s",
                 f"{previous['basis']['items']:,}", f"{previous['basis']['users']:,}",
                 f"{previous['basis']['interactions']:,}", previous.get("chosen_at", "earlier"),
                 {k: v for k, v in previous.items() if k in ("method", "ease_lambda_scale", "history_half_life")})
        # the scale, not the lambda it gave on the earlier data: the penalty follows the data's density
        return {**{k: v for k, v in previous.items() if k != "ease_lambda"}, "reused": True}
    LOG.info("method: choosing on a validation split (%s)", why)
    return {**choose_method(interactions, items, settings), "basis": basis,
            "chosen_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reused": False}


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
                 supplied: dict[str, Vectors | None] | None = None,
                 method: dict[str, Any] | None = None) -> ModelBundle:
    """Fit retrieval vectors (unless supplied), index and rating model on ``interactions``.

    ``supplied``: {"items": Vectors | None, "users": Vectors | None} from batch.embeddings; the
    trainer makes only what is missing (item vectors by ``method``; user vectors folded in from
    history). ``method``: a resolve_method result (chosen once, e.g. on the evaluation's training
    part, and reused); None resolves it here."""
    supplied = supplied or {}
    seed = settings["train.seed"]
    item_ids = np.sort(items["item_id"].to_numpy(dtype=np.int64))
    user_ids = np.unique(interactions["user_id"].to_numpy(dtype=np.int64))
    uidx = np.searchsorted(user_ids, interactions["user_id"].to_numpy(dtype=np.int64))
    iidx = np.searchsorted(item_ids, interactions["item_id"].to_numpy(dtype=np.int64))
    n_users, n_items = len(user_ids), len(item_ids)

    item_v, user_v = supplied.get("items"), supplied.get("users")
    query_vecs, half_life, method_meta = None, 0.0, {}
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
        method = method or resolve_method(interactions, items, settings)
        query_vecs, item_vecs, extra = method_vectors(method, uidx, iidx, n_users, n_items, settings)
        half_life = float(method.get("history_half_life", 0.0))
        method_meta = {**method, **extra}
        source = f"trained ({method['method']})"
    if metric == "cosine":
        item_vecs = normalise(item_vecs)

    item_support = np.bincount(iidx, minlength=n_items).astype(np.int64)
    user_count = np.bincount(uidx, minlength=n_users)
    o = np.lexsort((iidx, uidx))
    seen_items = iidx[o].astype(np.int32)
    seen_indptr = np.concatenate([[0], np.cumsum(user_count)]).astype(np.int64)
    weights = None
    if half_life > 0:
        ts = _seconds(interactions["ts"])
        weights = history_weights(uidx, ts, iidx, half_life)[o]
    user_vecs = fold_in(item_vecs if query_vecs is None else query_vecs, seen_indptr, seen_items, metric, weights)
    if user_v is not None:
        if user_v.vecs.shape[1] != item_vecs.shape[1]:
            raise InputError(user_v.path, "vector", f"dimension {user_v.vecs.shape[1]} differs from the item "
                                                     f"vectors' {item_vecs.shape[1]}")
        given = user_v.vecs if metric == "ip" else normalise(user_v.vecs)
        user_vecs[np.searchsorted(user_ids, user_v.ids)] = given

    meta = {"dim": int(item_vecs.shape[1]), "metric": metric, "vectors": source,
            "user_vectors": str(user_v.path) if user_v is not None else "folded in",
            "min_support": settings["train.similar_min_support"], "method": method_meta,
            "trained_at": datetime.now(timezone.utc).isoformat(), "n_interactions": int(len(uidx))}
    bundle = ModelBundle.from_vectors(item_ids, item_vecs, index_builder(settings, metric, seed),
                                      user_ids=user_ids, user_vecs=user_vecs,
                                      item_support=item_support, seen_indptr=seen_indptr, seen_items=seen_items,
                                      meta=meta, query_vecs=query_vecs)
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

