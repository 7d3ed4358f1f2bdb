"""The ranking protocol shared by validation (batch.train, choosing a method) and evaluation
(batch.evaluate): the per-user temporal split and recall@k / NDCG@k.

Both sides use these same two functions, so the method chosen on a validation split is chosen by
exactly the measure the evaluation reports.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MIN_INTERACTIONS = 5


def temporal_split(interactions: pd.DataFrame, share: float, min_interactions: int = MIN_INTERACTIONS
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's newest ``share`` of interactions (at least one; ties by item id) -> test, the rest
    -> train; users with fewer than ``min_interactions`` keep all in train."""
    ordered = interactions.sort_values(["user_id", "ts", "item_id"], kind="stable")
    pos = ordered.groupby("user_id").cumcount().to_numpy()
    n = ordered.groupby("user_id")["item_id"].transform("size").to_numpy()
    n_test = np.where(n >= min_interactions, np.maximum(1, (n * share).astype(np.int64)), 0)
    test = pos >= n - n_test
    return ordered[~test], ordered[test]


def ranking_metrics(rec_ids: np.ndarray, truth: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) recommended ids (-1 padded) and n arrays of held-out ids -> recall@k (n,), NDCG@k (n,).

    Recall is the hits over min(k, |held out|): a user with 30 held-out items can reach 1.0 with
    10 answers (dividing by |held out| caps such a user at 1/3 and weighs heavy users down)."""
    k = rec_ids.shape[1]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg = np.zeros(len(truth)), np.zeros(len(truth))
    for r, want in enumerate(truth):
        hit = np.isin(rec_ids[r], want) & (rec_ids[r] >= 0)
        recall[r] = hit.sum() / min(len(want), k)
        ndcg[r] = (hit * disc).sum() / disc[:min(len(want), k)].sum()
    return recall, ndcg
