"""Offline evaluation by the two standard protocols, against simple baselines.

- ranking: a per-user temporal split (each user's newest ``holdout_share`` of interactions held out;
  users with fewer than 5 keep all in training); recall@10 (hits over min(10, |held out|)) and
  NDCG@10 over users with held-out items, items seen in training excluded; the model's answers are
  ModelBundle.recommend's, the function the API answers with. References: EASE (Steck 2019, dense,
  lambda 250, where the catalogue has at most train.ease_max_items items), most-popular, and items
  ranked by their bias or their mean rating.
- rating: 5-fold cross-validation (KFold, shuffled, seed 0) RMSE; baselines item mean and the
  regularised user + item bias model.
Plus the similar-items support check: how many of famous items' top-10 neighbours are rare.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.model_selection import KFold

from batch.embeddings import Vectors
from batch.protocol import MIN_INTERACTIONS, ranking_metrics, temporal_split  # noqa: F401 (re-exported)
from batch.train import fit_biases, fit_rating_model, resolve_method, train_bundle, train_rating
from serving.models.rating import RatingModel
from serving.models.recommender import ModelBundle
from serving.settings import Settings

LOG = logging.getLogger(__name__)

K = 10
EASE_REFERENCE_LAMBDA = 250.0  # the reference of the issue and of Steck's paper for MovieLens
# Famous titles (MovieLens spellings); when none is in the catalogue the most-rated items stand in.
FAMOUS = (r"Toy Story \(1995\)", r"Star Wars(: Episode IV - A New Hope)? \(1977\)", r"Godfather, The \(1972\)",
          r"Pulp Fiction \(1994\)", r"Fargo \(1996\)")
RARE_BELOW = 20


def most_popular(train: pd.DataFrame, user_ids: np.ndarray, k: int) -> np.ndarray:
    """(n, k) ids: the most-interacted items in ``train`` (ties by id), each user's seen items excluded."""
    return rank_by_item_score(train, train.groupby("item_id").size(), user_ids, k)


def rank_by_item_score(train: pd.DataFrame, score: pd.Series, user_ids: np.ndarray, k: int) -> np.ndarray:
    """(n, k) ids: items by ``score`` (item_id -> float, desc; ties by id), each user's seen items excluded."""
    ranked = score.index.to_numpy()[np.lexsort((score.index.to_numpy(), -score.to_numpy()))]
    seen = train.groupby("user_id")["item_id"].apply(lambda s: set(s.tolist()))
    out = np.full((len(user_ids), k), -1, dtype=np.int64)
    for r, uid in enumerate(user_ids):
        s = seen.get(uid, set())
        top = [i for i in ranked[:k + len(s)].tolist() if i not in s][:k]
        out[r, :len(top)] = top
    return out


def ease_reference(train: pd.DataFrame, items: pd.DataFrame, user_ids: np.ndarray, k: int,
                   lam: float = EASE_REFERENCE_LAMBDA, block: int = 1024) -> np.ndarray:
    """(n, k) ids: dense EASE (Steck 2019), B = I - P / diag(P), P = (X^T X + lam I)^-1 on the binary
    matrix of ``train``, exact scores x_u B, seen items excluded, ties by id. The reference, not a
    served model: an items x items matrix, so callers keep it to catalogues that fit."""
    item_ids = np.sort(items["item_id"].to_numpy(np.int64))
    all_users = np.unique(train["user_id"].to_numpy(np.int64))
    u = np.searchsorted(all_users, train["user_id"].to_numpy(np.int64))
    i = np.searchsorted(item_ids, train["item_id"].to_numpy(np.int64))
    x = sparse.csr_matrix((np.ones(len(u)), (u, i)), shape=(len(all_users), len(item_ids)))
    x.data[:] = 1.0
    g = np.asarray((x.T @ x).todense(), dtype=np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    rows = np.searchsorted(all_users, user_ids)
    out = np.full((len(user_ids), k), -1, dtype=np.int64)
    for start in range(0, len(rows), block):
        xs = x[rows[start:start + block]]
        s = np.asarray(xs @ b)
        s[xs.toarray() > 0] = -np.inf
        order = np.lexsort((np.broadcast_to(np.arange(len(item_ids)), s.shape), -s), axis=1)[:, :k]
        out[start:start + block] = np.where(np.isfinite(np.take_along_axis(s, order, axis=1)), item_ids[order], -1)
    return out


def reference_rankings(train: pd.DataFrame, items: pd.DataFrame, users: np.ndarray, settings: Settings
                       ) -> dict[str, np.ndarray | str]:
    """The reference rows' answers for ``users``: EASE (or why it was skipped), most-popular, and items
    by their regularised bias and by their mean rating (the rating baselines as rankers)."""
    out: dict[str, np.ndarray | str] = {}
    n_items, limit = len(items), settings["train.ease_max_items"]
    if n_items <= limit:
        out["ease"] = ease_reference(train, items, users, K)
    else:
        out["ease"] = f"skipped: {n_items:,} items, above train.ease_max_items ({limit:,})"
    out["most_popular"] = most_popular(train, users, K)
    ids = np.unique(train["item_id"].to_numpy(np.int64))
    users_all = np.unique(train["user_id"].to_numpy(np.int64))
    r = train["rating"].to_numpy(np.float64)
    _, _, bi = fit_biases(np.searchsorted(users_all, train["user_id"].to_numpy(np.int64)),
                          np.searchsorted(ids, train["item_id"].to_numpy(np.int64)), r, len(users_all), len(ids),
                          settings["train.bias_reg"])
    out["bias"] = rank_by_item_score(train, pd.Series(bi, index=ids), users, K)
    out["item_mean"] = rank_by_item_score(train, train.groupby("item_id")["rating"].mean(), users, K)
    return out


def ranking_report(train: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                   supplied: dict[str, Vectors | None] | None = None, max_users: int | None = None,
                   bundle: ModelBundle | None = None, references: bool = False) -> dict[str, Any]:
    """recall@10 / NDCG@10 on ``test`` of the model trained on ``train`` and of most-popular (and with
    ``references`` of EASE, item bias and item mean too)."""
    bundle = bundle or train_bundle(train, items, settings, supplied=supplied)
    test = test[test["user_id"].isin(bundle.user_ids)]
    users = np.unique(test["user_id"].to_numpy())
    if max_users is not None and len(users) > max_users:
        rng = np.random.default_rng(settings["train.seed"])
        users = np.sort(rng.choice(users, max_users, replace=False))
    test = test[test["user_id"].isin(users)]
    truth = [g.to_numpy() for _, g in test.groupby("user_id")["item_id"]]
    out: dict[str, Any] = {"users": int(len(users)), "k": K}
    if not len(users):
        return out
    recs, _ = bundle.recommend(bundle.user_index(users), K)
    answers: dict[str, Any] = {"model": recs}
    if references:
        answers.update(reference_rankings(train, items, users, settings))
    else:
        answers["most_popular"] = most_popular(train, users, K)
    for name, ids in answers.items():
        if isinstance(ids, str):
            out[name] = {"skipped": ids}
            continue
        recall, ndcg = ranking_metrics(ids, truth)
        out[name] = {"recall_at_10": float(recall.mean()), "ndcg_at_10": float(ndcg.mean())}
    for m in ("recall_at_10", "ndcg_at_10"):
        for ref in ("most_popular", "ease"):
            base = out.get(ref, {}).get(m)
            if base is not None:
                out[f"{m}_vs_{ref}"] = out["model"][m] / base if base > 0 else None
    out["method"] = {k: v for k, v in bundle.meta.get("method", {}).items() if k != "validation"}
    return out


def rmse_baselines(train: pd.DataFrame, test: pd.DataFrame, settings: Settings) -> dict[str, float]:
    """RMSE on ``test`` of the rating model, the bias model and the item mean, all fitted on ``train``."""
    users = np.unique(np.concatenate([train["user_id"].to_numpy(), test["user_id"].to_numpy()]))
    items = np.unique(np.concatenate([train["item_id"].to_numpy(), test["item_id"].to_numpy()]))
    u, i = np.searchsorted(users, train["user_id"].to_numpy()), np.searchsorted(items, train["item_id"].to_numpy())
    tu, ti = np.searchsorted(users, test["user_id"].to_numpy()), np.searchsorted(items, test["item_id"].to_numpy())
    r = train["rating"].to_numpy(np.float64)
    truth = test["rating"].to_numpy(np.float64)
    lo, hi = float(min(r.min(), truth.min())), float(max(r.max(), truth.max()))
    model = fit_rating_model(u, i, r, len(users), len(items), settings)
    meta = model["meta"]
    w = meta["blend"]
    base = meta["global_mean"] + model["user_bias"][tu].astype(np.float64) + model["item_bias"][ti]
    inter = np.einsum("ij,ij->i", model["user_factors"][tu].astype(np.float64), model["item_factors"][ti])
    pred_model = w[0] + w[1] * base + w[2] * inter
    mu, bu, bi = fit_biases(u, i, r, len(users), len(items), settings["train.bias_reg"])
    pred_bias = mu + bu[tu] + bi[ti]
    count = np.bincount(i, minlength=len(items))
    mean = np.divide(np.bincount(i, r, len(items)), count, out=np.full(len(items), r.mean()), where=count > 0)
    pred_mean = mean[ti]
    return {name: float(np.sqrt(np.mean((np.clip(p, lo, hi) - truth) ** 2)))
            for name, p in (("model", pred_model), ("bias", pred_bias), ("item_mean", pred_mean))}


def cross_validate(interactions: pd.DataFrame, settings: Settings, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """k-fold (shuffled, seeded) RMSE of the rating model and the baselines; per fold and overall."""
    per_fold: dict[str, list[float]] = {}
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(interactions):
        for name, value in rmse_baselines(interactions.iloc[tr], interactions.iloc[te], settings).items():
            per_fold.setdefault(name, []).append(value)
    # overall RMSE from the folds' mean squared errors (folds are equal-sized within one row)
    return {"folds": folds, "seed": seed,
            **{name: {"rmse": float(np.sqrt(np.mean(np.square(v)))), "per_fold": v} for name, v in per_fold.items()}}


def famous_items(items: pd.DataFrame, interactions: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The FAMOUS titles found in the catalogue, else the ``n`` most-rated items: item_id, title."""
    found = []
    for pattern in FAMOUS:
        hit = items[items["title"].str.fullmatch(pattern)]
        if len(hit):
            found.append(hit.iloc[0])
    if found:
        return pd.DataFrame(found)[["item_id", "title"]].reset_index(drop=True)
    top = interactions.groupby("item_id").size().sort_values(ascending=False, kind="stable").index[:n]
    return items.set_index("item_id").loc[top, ["title"]].reset_index()


def similar_support(bundle: ModelBundle, items: pd.DataFrame, interactions: pd.DataFrame,
                    rare_below: int = RARE_BELOW) -> dict[str, Any]:
    """For famous items, their top-10 similar items and how many have fewer than ``rare_below`` ratings."""
    famous = famous_items(items, interactions)
    counts = interactions.groupby("item_id").size()
    titles = items.set_index("item_id")["title"]
    ids, _ = bundle.similar_items(bundle.item_index(famous["item_id"].to_numpy()), K)
    rows, rare = [], 0
    for (iid, title), neigh in zip(famous.itertuples(index=False), ids):
        neigh = [int(x) for x in neigh if x >= 0]
        low = [x for x in neigh if counts.get(x, 0) < rare_below]
        rare += len(low)
        rows.append({"item_id": int(iid), "title": title, "neighbours": [titles.get(x, "") for x in neigh],
                     "rare": len(low)})
    return {"rare_below": rare_below, "items": rows, "rare_neighbours": rare,
            "neighbours": int(sum(len(r["neighbours"]) for r in rows))}


def holdout_report(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                   supplied: dict[str, Vectors | None] | None = None,
                   method: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batch job's check on its model: the temporal split, recall on a sample of users, RMSE on
    the held-out ratings (model against item mean). ``method``: as train_bundle's."""
    train, test = temporal_split(interactions, settings["train.holdout_share"])
    bundle = train_bundle(train, items, settings, supplied, method)
    rank = ranking_report(train, test, items, settings, supplied, settings["train.eval_users"], bundle)
    known = test[test["user_id"].isin(bundle.user_ids) & test["item_id"].isin(bundle.item_ids)]
    rmse = rmse_baselines(train, known, settings) if len(known) else {}
    return {"protocol": "per-user temporal split", "holdout_share": settings["train.holdout_share"],
            "test_rows": int(len(test)), "test_rows_scored": int(len(known)),
            "rmse_model": rmse.get("model"), "rmse_item_mean": rmse.get("item_mean"), "rmse_bias": rmse.get("bias"),
            "recall_at_10": rank.get("model", {}).get("recall_at_10"),
            "recall_at_10_popular": rank.get("most_popular", {}).get("recall_at_10"),
            "ndcg_at_10": rank.get("model", {}).get("ndcg_at_10"),
            "ndcg_at_10_popular": rank.get("most_popular", {}).get("ndcg_at_10"),
            "eval_users": rank["users"], "method": rank.get("method")}


def train_and_evaluate(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
                       supplied: dict[str, Vectors | None] | None = None,
                       previous: dict[str, Any] | None = None) -> tuple[ModelBundle, RatingModel, dict[str, Any]]:
    """What the batch job trains: evaluate on the per-user temporal hold-out (``holdout_report``), then
    fit the recommender and the rating model that ship on all interactions (batch.train).

    The method (train.method 'auto') is chosen once, on a validation split cut from the hold-out's
    training part, and used for both models: the hold-out's test users never take part in the
    choice, and the shipped model carries it. ``previous``, the choice the last model carries, is
    reused instead while the inputs have not changed materially (batch.train.choose_again)."""
    lohi = (float(interactions["rating"].min()), float(interactions["rating"].max()))
    method = None
    if not (supplied or {}).get("items"):
        train, _ = temporal_split(interactions, settings["train.holdout_share"])
        method = resolve_method(train, items, settings, previous)
    evaluation = holdout_report(interactions, items, settings, supplied, method)
    LOG.info("evaluation: %s", evaluation)
    return (train_bundle(interactions, items, settings, supplied, method),
            train_rating(interactions, items, settings, lohi), evaluation)


def evaluate(interactions: pd.DataFrame, items: pd.DataFrame, settings: Settings,
             supplied: dict[str, Vectors | None] | None = None, folds: int = 5) -> dict[str, Any]:
    """Both protocols and the support check on the given inputs: the report `batch evaluate` prints."""
    train, test = temporal_split(interactions, settings["train.holdout_share"])
    method = None if (supplied or {}).get("items") else resolve_method(train, items, settings)
    bundle = train_bundle(train, items, settings, supplied, method)
    ranking = ranking_report(train, test, items, settings, supplied, bundle=bundle, references=True)
    ranking["validation"] = (method or {}).get("validation")
    LOG.info("ranking: %s", ranking)
    rating = cross_validate(interactions, settings, folds)
    LOG.info("rating: %s", rating)
    full = train_bundle(interactions, items, settings, supplied, method)
    return {"interactions": int(len(interactions)), "users": int(interactions["user_id"].nunique()),
            "items": int(len(items)),
            "ranking": {"protocol": f"per-user temporal split, newest {settings['train.holdout_share']:.0%} of each "
                                    f"user with >= {MIN_INTERACTIONS} interactions held out", **ranking},
            "rating": {"protocol": f"{folds}-fold cross-validation, KFold shuffle seed 0", **rating},
            "similar_items": similar_support(full, items, interactions),
            "settings": {k: settings[k] for k in ("train.method", "train.ease_max_items", "train.ease_lambda",
                                                  "train.history_half_life", "train.dim", "train.popularity_damping", "train.rating_dim",
                                                  "train.rating_reg", "train.bias_reg", "train.similar_min_support",
                                                  "embeddings.item_vectors", "embeddings.metric")}}


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    """The report as (columns, rows) for a printed table: one row per method."""
    rk, rt = report["ranking"], report["rating"]
    cols = ["method", "recall@10", "NDCG@10", "RMSE (5-fold)", "recall vs EASE", "NDCG vs EASE",
            "recall vs most-popular", "NDCG vs most-popular"]
    pop, ease = rk.get("most_popular", {}), rk.get("ease", {})

    def ratio(x, base):
        return f"{x / base:.3f}x" if x is not None and base else None

    def row(label, key, rmse=None):
        m = rk.get(key, {})
        r, n = m.get("recall_at_10"), m.get("ndcg_at_10")
        return (label, r, n, rmse, ratio(r, ease.get("recall_at_10")), ratio(n, ease.get("ndcg_at_10")),
                ratio(r, pop.get("recall_at_10")), ratio(n, pop.get("ndcg_at_10")))

    chosen = rk.get("method") or {}
    label = f"model ({chosen['method']})" if chosen.get("method") else "model"
    ease_label = f"EASE (lambda {EASE_REFERENCE_LAMBDA:g})" if "skipped" not in ease else f"EASE ({ease['skipped']})"
    return cols, [row(label, "model", rt["model"]["rmse"]), row(ease_label, "ease"), row("most-popular", "most_popular"),
                  row("user+item bias", "bias", rt["bias"]["rmse"]), row("item mean", "item_mean", rt["item_mean"]["rmse"])]
