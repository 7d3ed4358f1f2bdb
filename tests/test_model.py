"""FAISS indexes read back memory-mapped answer as the in-memory ones, without per-search threads."""
import faiss
import numpy as np

from serving.model import read_index


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
