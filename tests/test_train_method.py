"""The recommender's training method (train.method): EASE factored for FAISS, the recency-weighted
fold-in, the choice on a validation split and its cache, each against a computation written out here."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import batch.train
from batch.evaluate import ease_reference, evaluate, ranking_metrics, temporal_split
from batch.inputs import INTERACTIONS
from batch.job import run
from batch.train import choose_method, ease_factors, history_weights, train_bundle
from conftest import make_settings
from serving.errors import ConfigError


def _binary(n_users=60, n_items=25, density=0.25, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < density).astype(np.float64)
    x[:, 0] = 1.0  # one popular item
    u, i = np.nonzero(x)
    return x, u, i


def _dense_ease(x, lam):
    """Steck's closed form, written out: B = I - P / diag(P), P = (X^T X + lam I)^-1."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    return b


def test_ease_factors_are_the_truncated_svd_of_dense_ease():
    x, u, i = _binary()
    b = _dense_ease(x, 10.0)
    np.testing.assert_allclose(np.diag(b), 0.0, atol=1e-12)
    for dim in (5, 24):  # 24 = n_items - 1, the cap
        query, items = ease_factors(u, i, x.shape[0], x.shape[1], 10.0, dim, seed=0)
        assert query.shape == items.shape == (x.shape[1], dim)
        left, s, vt = np.linalg.svd(b)
        best = (left[:, :dim] * s[:dim]) @ vt[:dim]  # Eckart-Young: the best rank-dim approximation
        np.testing.assert_allclose(query.astype(np.float64) @ items.T, best, atol=1e-4)
    # a repeated (user, item) pair is still one interaction
    q2, v2 = ease_factors(np.concatenate([u, u[:5]]), np.concatenate([i, i[:5]]), x.shape[0], x.shape[1], 10.0, 24, 0)
    np.testing.assert_allclose(q2.astype(np.float64) @ v2.T, best, atol=1e-4)


def test_ease_with_no_penalty_on_a_singular_gram_is_a_clear_error():
    u = np.array([0, 0, 1, 1])
    i = np.array([0, 1, 0, 1])  # items 0 and 1 always together; item 2 never taken: X^T X singular
    with pytest.raises(ConfigError, match="train.ease_lambda: .* not positive definite"):
        ease_factors(u, i, 2, 3, 0.0, 2, 0)


def test_history_weights_halve_per_newer_interaction():
    # user 0: items 5 (t=3), 7 (t=1), 9 (t=2); user 1: items 1 and 2 at the same time (ties by item)
    uidx = np.array([0, 0, 0, 1, 1])
    ts = np.array([3, 1, 2, 7, 7])
    iidx = np.array([5, 7, 9, 2, 1])
    w = history_weights(uidx, ts, iidx, 2.0)
    # newer counts: item 5 newest -> 0, item 7 oldest -> 2, item 9 -> 1; user 1: item 2 after item 1
    np.testing.assert_allclose(w, [1.0, 0.5, 2 ** -0.5, 1.0, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_array_equal(history_weights(uidx, ts, iidx, 0.0), np.ones(5))


def test_recall_is_normalised_by_min_k_and_held_out():
    recs = np.array([[1, 2, 3], [4, 5, 6]])
    # user 0: 5 held out, 2 found among 3 answers -> 2/3 (not 2/5); user 1: 1 held out, found
    recall, ndcg = ranking_metrics(recs, [np.array([1, 3, 10, 11, 12]), np.array([6])])
    np.testing.assert_allclose(recall, [2 / 3, 1.0])
    disc = 1 / np.log2(np.arange(2, 5))
    np.testing.assert_allclose(ndcg, [(disc[0] + disc[2]) / disc.sum(), disc[2] / disc[0]])


def _frame(u, i, ts=None):
    ts = np.arange(len(u)) if ts is None else ts
    return pd.DataFrame({"user_id": np.asarray(u, np.int64) + 100, "item_id": np.asarray(i, np.int64) + 1,
                         "rating": np.full(len(u), 4.0, np.float32),
                         "ts": pd.to_datetime(np.asarray(ts), unit="s", utc=True)})


def test_ease_reference_equals_dense_ease_by_hand():
    x, u, i = _binary(n_users=30, n_items=12, seed=3)
    train = _frame(u, i)
    items = pd.DataFrame({"item_id": np.arange(1, 13, dtype=np.int64), "title": [""] * 12})
    users = np.array([100, 107, 129], np.int64)
    got = ease_reference(train, items, users, 4, lam=5.0)
    s = x @ _dense_ease(x, 5.0)
    for r, uid in enumerate(users):
        row = s[uid - 100].copy()
        row[x[uid - 100] > 0] = -np.inf
        order = np.lexsort((np.arange(12), -row))
        want = [j + 1 for j in order if np.isfinite(row[j])][:4]
        assert got[r][:len(want)].tolist() == want


def test_pinned_ease_above_the_size_line_is_refused_and_pinned_svd_skips_validation(tmp_path, sample_frames,
                                                                                      monkeypatch):
    inter, items = sample_frames
    settings, cfg = make_settings(tmp_path, train={"method": "ease", "ease_max_items": 100})
    with pytest.raises(ConfigError) as err:
        train_bundle(inter, items, settings)
    assert str(err.value) == (f"{cfg}: train.method: 'ease' needs a catalogue of at most train.ease_max_items "
                              f"(100) items, this one has {len(items):,}")

    def no_validation(*a, **k):
        raise AssertionError("a pinned method must not be chosen on validation")
    monkeypatch.setattr(batch.train, "choose_method", no_validation)
    settings, _ = make_settings(tmp_path, train={"method": "svd", "history_half_life": 3.0})
    bundle = train_bundle(inter, items, settings)
    assert bundle.meta["method"] == {"method": "svd", "history_half_life": 3.0, "chosen_by": "setting"}
    assert bundle.query_vecs is None  # PureSVD queries with its item vectors


def test_auto_chooses_the_best_validation_candidate_and_ease_only_where_it_fits(tmp_path, sample_frames):
    inter, items = sample_frames
    settings, _ = make_settings(tmp_path, train={"eval_users": 100})
    choice = choose_method(inter, items, settings)
    rows = choice["validation"]["candidates"]
    assert {r["method"] for r in rows} == {"ease", "svd"}
    best = max(rows, key=lambda r: (r["ndcg_at_10"], r["recall_at_10"]))
    assert (choice["method"], choice["history_half_life"]) == (best["method"], best["history_half_life"])
    assert choice["validation"]["users"] == 100
    small, _ = make_settings(tmp_path, train={"eval_users": 100, "ease_max_items": len(items) - 1})
    assert {r["method"] for r in choose_method(inter, items, small)["validation"]["candidates"]} == {"svd"}


def test_evaluate_chooses_on_training_data_only(tmp_path, sample_frames, monkeypatch):
    """The choice never sees a held-out interaction of the evaluation's split."""
    inter, items = sample_frames
    settings, _ = make_settings(tmp_path, train={"eval_users": 50})
    seen_frames = []
    real = batch.train.choose_method

    def spy(frame, *a, **k):
        seen_frames.append(frame)
        return real(frame, *a, **k)
    monkeypatch.setattr(batch.train, "choose_method", spy)
    report = evaluate(inter, items, settings, folds=2)
    _, test = temporal_split(inter, settings["train.holdout_share"])
    assert len(seen_frames) == 1
    keys = set(zip(seen_frames[0]["user_id"], seen_frames[0]["item_id"], seen_frames[0]["ts"]))
    assert not keys & set(zip(test["user_id"], test["item_id"], test["ts"]))
    rk = report["ranking"]
    assert rk["method"]["method"] in ("ease", "svd") and "recall_at_10" in rk["ease"]
    assert rk["recall_at_10_vs_ease"] == pytest.approx(rk["model"]["recall_at_10"] / rk["ease"]["recall_at_10"])


@pytest.fixture
def choose_calls(monkeypatch) -> list[int]:
    """batch.train.choose_method still chooses; the list gets one entry per call."""
    calls: list[int] = []
    real = batch.train.choose_method

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(batch.train, "choose_method", counting)
    return calls


def test_the_choice_is_cached_with_the_trained_model(workspace, choose_calls):
    """A run on unchanged inputs reuses the model and the choice it carries: no validation again."""
    _, settings, _, first = workspace
    calls = choose_calls
    again = run(settings)
    assert calls == [] and not again.manifest["retrained"]
    method = first.manifest["evaluation"]["method"]
    assert method["chosen_by"] == "validation" and method["method"] in ("ease", "svd")


def test_a_scheduled_run_reuses_the_choice_until_the_inputs_change_materially(workspace, choose_calls):
    """New inputs retrain, but the method chosen on validation is reused while the inputs stay within
    train.revalidate_change of those it was chosen on; --retrain or a material change chooses again,
    and a pinned method never validates."""
    root, settings, _, first = workspace
    calls = choose_calls
    path = root / "inputs" / INTERACTIONS
    full = pd.read_parquet(path)

    def keep(share):  # a day's change to the inputs: a new fingerprint, so a new training
        full.iloc[:int(len(full) * share)].to_parquet(path, index=False)

    keep(0.99)
    again = run(settings)
    chosen = first.manifest["evaluation"]["method"]
    method = again.manifest["evaluation"]["method"]
    assert again.manifest["retrained"] and calls == []
    assert method["reused"] and method["basis"] == chosen["basis"]
    assert {k: method[k] for k in ("method", "history_half_life")} == {k: chosen[k] for k in ("method", "history_half_life")}

    keep(0.98)
    run(settings, retrain=True)  # the user asks
    assert calls == [1]

    calls.clear()
    keep(0.70)  # 30% fewer interactions than the choice was made on: above train.revalidate_change (25%)
    moved = run(settings)
    assert calls == [1] and not moved.manifest["evaluation"]["method"]["reused"]

    calls.clear()
    keep(0.69)
    pinned = run(settings.replace(train__method="svd"))
    assert calls == [] and pinned.manifest["evaluation"]["method"]["chosen_by"] == "setting"
