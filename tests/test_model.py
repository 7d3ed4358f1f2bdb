"""The model bundle: memory-mapped indexes, and exact ties answered alike in batch and live."""
import faiss
import numpy as np

from serving.models.recommender import ModelBundle
from serving.models.vectors import fold_in, mips_pad, read_index, tie_groups
from serving.settings import load_settings


def test_memory_mapped_ivf_index_matches_and_does_not_prefetch(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    path = tmp_path / "items.faiss"
    faiss.write_index(index, str(path))
    mapped, loaded = read_index(path, "IVF16,Flat", mmap=True), read_index(path, "IVF16,Flat", mmap=False)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # really memory-mapped
    # OnDiskInvertedLists starts 32 prefetch threads per search by default: 17x slower single queries.
    assert lists.prefetch_nthread == 0
    for ix in (mapped, loaded):
        faiss.extract_index_ivf(ix).nprobe = 4
    q = x[:50]
    d1, i1 = mapped.search(q, 10)
    d2, i2 = loaded.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def _tied_bundle(n_items=5000, n_users=600, distinct=40, d=8, seed=0):
    """Many items sharing exactly identical vectors (40 distinct vectors for 5,000 items): every
    query meets tie groups far longer than any search margin."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(distinct, d)).astype(np.float32)
    vecs = base[rng.integers(0, distinct, n_items)]
    item_ids = np.arange(10, 10 + n_items, dtype=np.int64) * 3
    counts = rng.integers(1, 30, n_users)
    seen = [np.sort(rng.choice(n_items, c, replace=False)).astype(np.int32) for c in counts]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.concatenate(seen)
    support = np.bincount(items, minlength=n_items)
    user_vecs = fold_in(vecs, indptr, items, "ip")

    def flat(g):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index, {"index": "Flat", "search_params": {}}
    return ModelBundle.from_vectors(item_ids, vecs, flat, user_ids=np.arange(n_users, dtype=np.int64),
                                    user_vecs=user_vecs, item_support=support, seen_indptr=indptr,
                                    seen_items=items, meta={"min_support": 3})


def _brute(scores, drop, k):
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[~drop[order]][:k]


def test_exact_ties_batch_equals_live_and_brute_force():
    """Batch of 4,096 against single queries and a batch of 200: identical lists, ties by item id."""
    bundle = _tied_bundle()
    assert bundle.n_groups < 100 and bundle.max_group > 100
    k = 50
    all_items = np.arange(bundle.n_items)
    big_ids, big_scores = bundle.similar_items(all_items[:4096], k)
    sample = np.random.default_rng(1).choice(4096, 200, replace=False)
    small_ids, small_scores = bundle.similar_items(all_items[sample], k)
    np.testing.assert_array_equal(big_ids[sample], small_ids)
    np.testing.assert_array_equal(big_scores[sample], small_scores)
    for r in sample[:20]:
        one, _ = bundle.similar_items(np.array([r]), k)
        np.testing.assert_array_equal(one[0], big_ids[r])
    vecs = np.asarray(bundle.item_vecs, np.float64)
    rare = np.asarray(bundle.item_support) < 3
    assert rare.any()
    for r in sample[:30]:
        drop = rare.copy()
        drop[r] = True
        np.testing.assert_array_equal(big_ids[r], bundle.item_ids[_brute(vecs @ vecs[r], drop, k)])

    users = np.arange(bundle.n_users)
    rec_big, _ = bundle.recommend(np.resize(users, 4096), k)
    rec_small, _ = bundle.recommend(users[:200], k)
    np.testing.assert_array_equal(rec_big[:200], rec_small)
    for u in users[:30]:
        one, _ = bundle.recommend(np.array([u]), k)
        np.testing.assert_array_equal(one[0], rec_big[u])
        drop = rare.copy()  # rare items are left out of user recommendations too (one minimum-support rule)
        drop[bundle.seen_of(u)] = True
        q = vecs[bundle.seen_of(u)].sum(axis=0)
        np.testing.assert_array_equal(one[0], bundle.item_ids[_brute(vecs @ q, drop, k)])


def test_user_search_depth_follows_the_users_own_history_not_the_longest():
    """A user's search asks for k + their own history (rounded up to a power of two) + the margin:
    one user who has seen 2,000 items must not make every other query ask for 2,000 candidates
    (the live p99 it cost); answers stay exact, batch and single alike."""
    rng = np.random.default_rng(5)
    n_items, d = 3000, 8
    vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    counts = np.array([2000, 3, 5, 12, 1])
    seen = [np.sort(rng.choice(n_items, c, replace=False)).astype(np.int32) for c in counts]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.concatenate(seen)

    def flat(g):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index, {"index": "Flat", "search_params": {}}
    bundle = ModelBundle.from_vectors(np.arange(n_items, dtype=np.int64), vecs, flat,
                                      user_ids=np.arange(len(counts), dtype=np.int64),
                                      user_vecs=fold_in(vecs, indptr, items, "ip"), seen_indptr=indptr,
                                      seen_items=items)
    asked = []
    index = bundle.index
    bundle.search = lambda q, k, params=None: (asked.append((len(q), k)), index.search(q, k, params=params))[1]
    k = 10
    for u in range(1, len(counts)):
        asked.clear()
        one, _ = bundle.recommend(np.array([u]), k)
        assert asked == [(1, k + int(2 ** np.ceil(np.log2(counts[u]))) + 8)]
        drop = np.zeros(n_items, bool)
        drop[seen[u]] = True
        np.testing.assert_array_equal(one[0], _brute(vecs.astype(np.float64) @ bundle.user_vecs[u], drop, k))
    asked.clear()
    batch, _ = bundle.recommend(np.arange(len(counts)), k)
    assert sorted(asked) == sorted((1, k + b + 8) for b in (2048, 4, 8, 16, 1))  # one search per depth
    for u in range(len(counts)):
        np.testing.assert_array_equal(batch[u], bundle.recommend(np.array([u]), k)[0][0])


def test_tie_groups_split_on_eligibility_and_number_by_first_row():
    v = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], np.float32)
    group_of, indptr, members = tie_groups(v, np.array([True, True, True, False, True]))
    np.testing.assert_array_equal(group_of, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(indptr, [0, 2, 4, 5])
    np.testing.assert_array_equal(members, [0, 2, 1, 4, 3])


def _popularity_vectors(n=20_000, d=16, seed=4):
    """Clustered vectors whose lengths spread like item popularity (lognormal), as PureSVD's are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    vecs = centres[rng.integers(0, 30, n)] + 0.5 * rng.normal(size=(n, d))
    return (vecs * rng.lognormal(0, 1, (n, 1))).astype(np.float32)


def test_inner_product_search_on_ivf_keeps_recall_with_padding():
    """Unnormalised vectors in an IVF index: the padding coordinate makes maximum-inner-product search
    as easy for k-means lists as cosine (recall@10 0.976 here; 0.887 unpadded); the scores stay the
    plain inner products."""
    from serving.models.recommender import ann_recall
    vecs = _popularity_vectors()

    def ivf(g):
        g = mips_pad(g)
        index = faiss.index_factory(g.shape[1], "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(g)
        index.add(g)
        faiss.extract_index_ivf(index).nprobe = 8
        return index, {"index": "IVF64,Flat", "search_params": {"nprobe": 8}, "mips_pad": True}
    bundle = ModelBundle.from_vectors(np.arange(20_000, dtype=np.int64), vecs, ivf)
    assert bundle.meta["mips_pad"] and bundle.index.d == 17
    assert ann_recall(bundle, np.arange(0, 20_000, 40), 10) >= 0.95
    ids, scores = bundle.similar_items(np.array([7]), 5)  # queries padded with 0 by search_groups
    np.testing.assert_allclose(scores[0], vecs[ids[0]] @ vecs[7], rtol=1e-5)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def test_auto_index_for_inner_product_is_hnsw_with_brute_force_recall():
    """Above train.flat_max_items_ip, index='auto' builds an HNSW graph with the inner product over the
    unpadded vectors; similar items (with the minimum-support filter), user recommendations (seen
    items left out) and the validation's ANN recall all reach 0.95 recall@10 against numpy brute
    force, and one query answers exactly as the same query inside a batch."""
    from serving.models.recommender import ann_recall
    from batch.train import index_builder, index_spec
    n, n_users = 20_000, 300
    vecs = _popularity_vectors(n)
    rng = np.random.default_rng(5)
    settings = load_settings(env={}).replace(train__flat_max_items_ip=5_000)
    assert index_spec(5_000, settings, "ip") == "Flat" and index_spec(5_001, settings, "ip") == "HNSW32"
    ivf = settings.replace(train__index="IVF64,Flat")  # the trainer pads for IVF lists only
    assert index_builder(ivf, "ip")(vecs[:5_000])[1]["mips_pad"] and not index_builder(ivf, "cosine")(vecs[:5_000])[1]["mips_pad"]
    counts = rng.integers(1, 40, n_users)
    items = np.concatenate([np.sort(rng.choice(n, c, replace=False)) for c in counts]).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    support = rng.integers(0, 10, n)  # items below 3 are never similar items
    bundle = ModelBundle.from_vectors(np.arange(n, dtype=np.int64) * 2 + 1, vecs, index_builder(settings, "ip"),
                                      user_ids=np.arange(n_users, dtype=np.int64),
                                      user_vecs=fold_in(vecs, indptr, items, "ip"), item_support=support,
                                      seen_indptr=indptr, seen_items=items, meta={"min_support": 3})
    assert bundle.meta["index"] == "HNSW32" and not bundle.meta["mips_pad"] and bundle.index.d == 16
    assert isinstance(bundle.index, faiss.IndexHNSWFlat) and bundle.index.metric_type == faiss.METRIC_INNER_PRODUCT
    queries = rng.choice(n, 300, replace=False)
    assert ann_recall(bundle, queries, 10) >= 0.95

    v = vecs.astype(np.float64)
    ids, scores = bundle.similar_items(queries, 10)
    want = []
    for q in queries:
        drop = support < 3
        drop[q] = True
        want.append(bundle.item_ids[_brute(v @ v[q], drop, 10)])
    assert _recall(ids, want) >= 0.95
    found = ids >= 0
    np.testing.assert_allclose(scores[found], np.einsum("nd,nkd->nk", v[queries], v[(ids - 1) // 2])[found],
                               rtol=1e-4)  # exact scores, whatever the graph proposed
    users = np.arange(n_users)
    rec, _ = bundle.recommend(users, 10)
    want = []
    for u in users:
        drop = support < 3  # the minimum support holds for user recommendations too
        drop[bundle.seen_of(u)] = True
        want.append(bundle.item_ids[_brute(v @ v[bundle.seen_of(u)].sum(axis=0), drop, 10)])
    assert _recall(rec, want) >= 0.95
    for u in users[:20]:  # the live path (one query) is the batch path
        np.testing.assert_array_equal(bundle.recommend(np.array([u]), 10)[0][0], rec[u])
    for r in range(20):
        np.testing.assert_array_equal(bundle.similar_items(queries[r:r + 1], 10)[0][0], ids[r])


def test_hnsw_bundle_saved_and_loaded_answers_alike(tmp_path):
    """The HNSW index and its efSearch survive save/load (the served bundle is the one validated)."""
    from batch.train import index_builder
    vecs = _popularity_vectors(3_000, seed=6)
    settings = load_settings(env={}).replace(train__index="HNSW16", train__hnsw_ef_search=40)
    bundle = ModelBundle.from_vectors(np.arange(3_000, dtype=np.int64), vecs, index_builder(settings, "ip"))
    bundle.save(tmp_path)
    loaded = ModelBundle.load(tmp_path)
    assert loaded.meta["search_params"] == {"efSearch": 40} and loaded.index.hnsw.efSearch == 40
    items = np.arange(0, 3_000, 7)
    for a, b in zip(bundle.similar_items(items, 10), loaded.similar_items(items, 10)):
        np.testing.assert_array_equal(a, b)


def test_ann_recall_counts_tied_answers_and_catches_a_poor_index():
    """The validation's recall gate: for an item without interactions (a zero vector) every candidate
    ties, so any answer is right; for the others a kernel returning arbitrary groups must fail it."""
    from serving.models.recommender import ann_recall
    vecs = _popularity_vectors(4_000, seed=7)
    vecs[::3] = 0.0

    def flat(g):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index, {"index": "Flat", "search_params": {}}
    bundle = ModelBundle.from_vectors(np.arange(4_000, dtype=np.int64), vecs, flat)
    zero, other = np.arange(0, 4_000, 3), np.setdiff1d(np.arange(0, 4_000, 5), np.arange(0, 4_000, 3))
    assert ann_recall(bundle, np.concatenate([zero[:100], other]), 10) == 1.0
    rng = np.random.default_rng(8)
    bundle.search = lambda q, k, params=None: (None, rng.choice(bundle.n_groups, (len(q), k)))
    assert ann_recall(bundle, zero, 10) == 1.0
    assert ann_recall(bundle, other, 10) < 0.2


def _lists(bundle, given, depth):
    ids, scores = bundle.similar_items(np.asarray(given), depth)
    return bundle.item_index(ids), scores


def test_sessions_from_similar_lists_equal_the_search_or_are_refused():
    """Ties, rare items left out, sessions of 1-5 items, k up to beyond the lists' depth: every
    answer the lists give equals the exact search's; the rest are refused (None), never wrong."""
    bundle = _tied_bundle(n_items=3000, distinct=300, d=8, seed=2)
    rng = np.random.default_rng(7)
    given_from = np.flatnonzero(bundle.item_support >= 0)
    answered = refused = 0
    for _ in range(300):
        given = rng.choice(given_from, size=int(rng.integers(1, 6)), replace=False)
        k = int(rng.choice([1, 3, 10, 25, 60]))
        neighbours, scores = _lists(bundle, given, 50)
        found = bundle.session_from_lists(given, neighbours, scores, k)
        ids, want_scores = bundle.recommend_for_items([given], k)
        valid = ids[0] >= 0
        if found is None:
            refused += 1
            continue
        answered += 1
        np.testing.assert_array_equal(found[0], ids[0][valid])
        np.testing.assert_array_equal(found[1], want_scores[0][valid])
    assert answered > 50 and refused > 0, (answered, refused)


def test_session_lists_refuse_an_item_they_cannot_see():
    """The best item for a two-item session is in neither item's list (it is second best to each):
    the bound catches it and the lists refuse; the search finds it."""
    d = 3
    e1, e2 = np.eye(d, dtype=np.float32)[:2]
    rng = np.random.default_rng(0)
    near1 = e1 + rng.normal(scale=1e-3, size=(20, d)).astype(np.float32)
    near2 = e2 + rng.normal(scale=1e-3, size=(20, d)).astype(np.float32)
    both = (0.8 * (e1 + e2))[None]
    vecs = np.vstack([e1[None], e2[None], near1, near2, both]).astype(np.float32)
    ids = np.arange(len(vecs), dtype=np.int64)

    def flat(g):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index, {"index": "Flat", "search_params": {}}
    bundle = ModelBundle.from_vectors(ids, vecs, flat, item_support=np.full(len(vecs), 10))
    given = np.array([0, 1])
    neighbours, scores = _lists(bundle, given, 10)
    assert len(vecs) - 1 not in set(neighbours.ravel())  # the lists do not hold it
    assert bundle.session_from_lists(given, neighbours, scores, 1) is None
    assert bundle.recommend_for_items([given], 1)[0][0, 0] == len(vecs) - 1
    # with lists deep enough to hold every item, the same session is answered, and exactly
    neighbours, scores = _lists(bundle, given, len(vecs))
    found = bundle.session_from_lists(given, neighbours, scores, 3)
    np.testing.assert_array_equal(found[0], bundle.recommend_for_items([given], 3)[0][0])


def test_sessions_from_lists_under_cosine():
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(2000, 12)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    def flat(g):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index, {"index": "Flat", "search_params": {}}
    bundle = ModelBundle.from_vectors(np.arange(2000, dtype=np.int64), vecs, flat,
                                      item_support=rng.integers(0, 20, 2000), meta={"metric": "cosine", "min_support": 2})
    answered = 0
    for _ in range(100):
        given = rng.choice(2000, size=int(rng.integers(1, 4)), replace=False)
        neighbours, scores = _lists(bundle, given, 50)
        found = bundle.session_from_lists(given, neighbours, scores, 5)
        if found is not None:
            answered += 1
            ids, want = bundle.recommend_for_items([given], 5)
            np.testing.assert_array_equal(found[0], ids[0])
            np.testing.assert_allclose(found[1], want[0], rtol=1e-6)
            assert (bundle.item_support[bundle.item_index(found[0])] >= 2).all()
    assert answered > 30, answered


def test_fold_in_of_one_history_equals_the_sparse_product():
    """One history (a session) skips the sparse matrix: the same float32 sums, bit for bit."""
    rng = np.random.default_rng(9)
    vecs = rng.normal(size=(500, 24)).astype(np.float32)
    for m in (1, 2, 5, 40):
        items = rng.choice(500, size=m, replace=False)
        both = np.concatenate([items, items])  # the same history twice: the sparse path for n = 2
        many = fold_in(vecs, np.array([0, m, 2 * m]), both, "ip")
        for metric in ("ip", "cosine"):
            one = fold_in(vecs, np.array([0, m]), items, metric)
            want = fold_in(vecs, np.array([0, m, 2 * m]), both, metric)[:1]
            np.testing.assert_array_equal(one, want)
        np.testing.assert_array_equal(many[0], many[1])
