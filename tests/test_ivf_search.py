"""IVFSearcher: list-by-list search of an IVF-Flat inner-product index gives FAISS's own results
(similarities to float rounding, the same ids up to near ties, FAISS's padding), on real indexes built
by index_types' own functions over clustered vectors: both sides of the small-batch crossover,
k above list sizes and above a query's candidates, empty lists, ids from add_with_ids, with and
without the direct map, memory-mapped read-only from a file; and it is the exact top k of the
probed lists (brute force). Other index types are searched by FAISS."""
from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pytest

from benchmarks.synthetic import clustered_vectors
from vismem_assets import ivf_search
from vismem_assets.index_kinds.ivf import IVF_FLAT, fill, nlist_for, train_ivf, training_size
from vismem_assets.ivf_search import MIN_BATCH, MIN_BYTES, IVFSearcher, ivf_searcher

D = 32
N = 20_000
NPROBE = 8


def build(kind: str = "ivf-flat", n: int = N, ids=None, seed: int = 0, nlist: int | None = None, direct_map=True):
    x, _ = clustered_vectors(n + 400, D, seed=seed)
    x, queries = x[:n], np.ascontiguousarray(x[n:])
    nlist = nlist or nlist_for(n)
    train = x[np.random.default_rng(1).choice(n, min(n, training_size(kind, nlist)), replace=False)]
    index = train_ivf(kind, train, nlist)
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    if direct_map:
        fill(index, ids, x)  # as a build fills it: add_with_ids + hash-table direct map
    else:
        index.add_with_ids(x, ids)
    index.nprobe = NPROBE
    return index, x, ids, queries


@pytest.fixture(scope="module")
def flat_ivf():
    return build()


ROUNDING = 1e-6  # the kernel sums in another order than FAISS: similarities agree to float rounding


def assert_same(got, want):
    """FAISS's results up to float rounding: similarities within ROUNDING, best first, FAISS's
    padding where FAISS pads; ids equal row by row, except that of neighbours whose similarities
    are within rounding of the row's k-th best any may be kept, in any order."""
    (gs, gi), (ws, wi) = got, want
    assert gs.dtype == np.float32 and gi.dtype == np.int64 and gs.shape == ws.shape and gi.shape == wi.shape
    np.testing.assert_allclose(gs, ws, rtol=0, atol=ROUNDING)
    np.testing.assert_array_equal(gi == -1, wi == -1)
    assert np.all(gs[gi == -1] == -np.finfo(np.float32).max)
    assert np.all(np.diff(gs, axis=1) <= 0)  # best first
    for row in range(len(gs)):
        sure = ws[row] > ws[row, -1] + ROUNDING  # clearly above the k-th: no near tie can swap them out
        assert set(wi[row, sure]) <= set(gi[row]), row
        score_of = dict(zip(wi[row].tolist(), ws[row].tolist()))
        for i, score in zip(gi[row].tolist(), gs[row].tolist()):
            if i in score_of:
                assert abs(score - score_of[i]) <= ROUNDING, (row, i)
        assert len(set(gi[row])) == len(gi[row]) or (gi[row] == -1).any(), row  # no id twice


def probed_top_k(index, x, ids, queries, k):
    """Brute force in float64 over every vector of each query's probed lists."""
    ivf = faiss.extract_index_ivf(index)
    _, lists = ivf.quantizer.search(queries, ivf.nprobe)
    members = {}
    for l in np.unique(lists[lists >= 0]).tolist():
        size = ivf.invlists.list_size(l)
        members[l] = faiss.rev_swig_ptr(ivf.invlists.get_ids(l), size).copy() if size else np.empty(0, np.int64)
    row_of = {int(i): r for r, i in enumerate(ids)}
    out = []
    for q, probes in zip(queries, lists):
        cand = np.concatenate([members[l] for l in probes if l >= 0])
        scores = x[[row_of[int(i)] for i in cand]].astype(np.float64) @ q.astype(np.float64)
        top = np.argsort(-scores, kind="stable")[:k]
        out.append((cand[top], scores[top], cand, scores))
    return out


@pytest.mark.parametrize("nq", [1, MIN_BATCH - 1, MIN_BATCH, MIN_BATCH + 37])
def test_equals_faiss_on_both_sides_of_the_crossover(flat_ivf, nq):
    index, _, _, queries = flat_ivf
    searcher = ivf_searcher(index)
    assert isinstance(searcher, IVFSearcher) and searcher.list_batched
    searcher.min_bytes = 0  # this index is small: by default FAISS would search it at any batch size
    assert_same(searcher.search(queries[:nq], 10), index.search(queries[:nq], 10))


def test_large_batches_of_a_large_index_take_the_list_path(flat_ivf, monkeypatch):
    index, _, _, queries = flat_ivf
    calls = []
    for min_bytes in (0, MIN_BYTES):
        searcher = IVFSearcher(index, min_bytes=min_bytes)
        monkeypatch.setattr(searcher, "_search", lambda q, k: calls.append((min_bytes, len(q))) or index.search(q, k))
        searcher.search(queries[:MIN_BATCH - 1], 5)
        searcher.search(queries[:MIN_BATCH], 5)
    assert 4 * D * N < MIN_BYTES and calls == [(0, MIN_BATCH)]


@pytest.mark.parametrize("k", [1, 100, 400])
def test_list_path_is_the_exact_top_k_of_the_probed_lists(flat_ivf, k):
    index, x, ids, queries = flat_ivf
    q = queries[:60]
    sims, found = IVFSearcher(index, min_batch=1, min_bytes=0).search(q, k)
    lists = faiss.extract_index_ivf(index).invlists
    sizes = [lists.list_size(l) for l in range(lists.nlist)]
    assert k == 1 or min(sizes) < k  # k above some lists' sizes (k = 400: above some queries' candidates)
    for row, (top, top_scores, cand, scores) in enumerate(probed_top_k(index, x, ids, q, k)):
        m, kth = len(top), top_scores[-1]
        assert set(found[row, :m]) <= set(cand) and np.all(found[row, m:] == -1)  # only probed vectors
        assert np.all(scores[np.isin(cand, found[row])] >= kth - 1e-6)  # none worse than the k-th best
        assert set(top[top_scores > kth + 1e-6]) <= set(found[row])  # every clearly better one found
        np.testing.assert_allclose(sims[row, :m], top_scores, atol=1e-5)
        assert np.all(sims[row, m:] == -np.finfo(np.float32).max)
    assert_same((sims, found), index.search(q, k))


def test_k_above_a_querys_candidates_is_padded_as_faiss_pads():
    index, _, _, queries = build(n=3_000, nlist=64)
    index.nprobe = 2
    k = 1000  # 2 lists of ~47 vectors: fewer candidates than k
    got = IVFSearcher(index, min_batch=1, min_bytes=0).search(queries[:40], k)
    want = index.search(queries[:40], k)
    assert (want[1] == -1).any(axis=1).all()
    assert_same(got, want)
    assert np.all(got[0][got[1] == -1] == -np.finfo(np.float32).max)


def test_nprobe_one_and_nprobe_above_nlist(flat_ivf):
    index, _, _, queries = flat_ivf
    searcher = IVFSearcher(index, min_batch=1, min_bytes=0)
    try:
        for nprobe in (1, 2, index.nlist + 10):
            index.nprobe = nprobe
            assert_same(searcher.search(queries[:50], 20), index.search(queries[:50], 20))
    finally:
        index.nprobe = NPROBE


def test_empty_lists():
    # Only a few clusters' vectors stored: most lists trained on the others stay empty, and queries
    # from all clusters probe them.
    x, labels = clustered_vectors(N, D, seed=3)
    nlist = 128
    index = train_ivf("ivf-flat", x[np.random.default_rng(1).choice(N, 48 * nlist, replace=False)], nlist)
    keep = labels < 10
    fill(index, np.flatnonzero(keep).astype(np.int64), x[keep])
    index.nprobe = 16
    sizes = np.array([index.invlists.list_size(l) for l in range(nlist)])
    queries = np.ascontiguousarray(x[~keep][:80])
    _, probed = index.quantizer.search(queries, index.nprobe)
    assert (sizes == 0).sum() > nlist // 2 and (sizes[probed] == 0).any()
    assert_same(IVFSearcher(index, min_batch=1, min_bytes=0).search(queries, 50), index.search(queries, 50))
    # forgetting empties lists too
    IVF_FLAT.drop(index, np.arange(N // 2, dtype=np.int64))
    assert_same(IVFSearcher(index, min_batch=1, min_bytes=0).search(queries, 50), index.search(queries, 50))


@pytest.mark.parametrize("direct_map", [True, False])
def test_ids_from_add_with_ids(direct_map):
    rng = np.random.default_rng(5)
    ids = rng.choice(10**12, N, replace=False).astype(np.int64)
    index, _, _, queries = build(ids=ids, direct_map=direct_map, seed=5)
    got = IVFSearcher(index, min_batch=1, min_bytes=0).search(queries[:100], 30)
    assert np.isin(got[1], ids).all()
    assert_same(got, index.search(queries[:100], 30))


def test_memory_mapped_read_only_index(flat_ivf, tmp_path):
    index, _, _, queries = flat_ivf
    path = tmp_path / "ivf.index"
    faiss.write_index(index, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    searcher = ivf_searcher(mapped)
    assert searcher is not None and searcher.list_batched
    searcher.min_batch, searcher.min_bytes = 1, 0
    q = queries[:100]
    want = index.search(q, 25)
    assert_same(searcher.search(q, 25), want)
    assert_same(mapped.search(q, 25), want)
    del mapped  # the searcher keeps the mapped index alive
    assert_same(searcher.search(q, 25), want)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("workers", [1, 3])
def test_any_number_of_threads_and_chunks(flat_ivf, monkeypatch, workers):
    index, _, _, queries = flat_ivf
    monkeypatch.setattr(ivf_search, "WORKERS", workers)
    monkeypatch.setattr(ivf_search, "MAX_CHUNK", 70)  # 250 queries: four chunks
    assert_same(IVFSearcher(index, min_batch=1, min_bytes=0).search(queries[:250], 15), index.search(queries[:250], 15))


def test_searches_from_several_threads_at_once(flat_ivf):
    """One searcher, four callers at once (a Dagster run's threads, a notebook's): the kernel and
    the shared worker pool keep each call's heaps its own."""
    from concurrent.futures import ThreadPoolExecutor

    index, _, _, queries = flat_ivf
    searcher = IVFSearcher(index, min_batch=1, min_bytes=0)
    parts = [queries[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as callers:
        results = list(callers.map(lambda q: [searcher.search(q, 12) for _ in range(3)], parts))
    for q, runs in zip(parts, results):
        want = index.search(q, 12)
        for got in runs:
            assert_same(got, want)


def test_other_index_types_are_searched_by_faiss():
    index, _, _, queries = build("ivf-sq8", n=5_000)
    assert ivf_searcher(index) is None
    searcher = IVFSearcher(index)
    assert not searcher.list_batched
    got, want = searcher.search(queries[:100], 10), index.search(queries[:100], 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    assert ivf_searcher(flat) is None
    l2 = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, 16)  # an L2 IVF-Flat: not this searcher's metric
    assert ivf_searcher(l2) is None


def test_bad_queries_raise_as_faiss_does(flat_ivf):
    index, _, _, queries = flat_ivf
    searcher = IVFSearcher(index, min_batch=1, min_bytes=0)
    with pytest.raises(Exception):
        searcher.search(queries[:, :D - 1], 5)
    empty = searcher.search(queries[:0], 5)
    assert empty[0].shape == (0, 5) and empty[1].shape == (0, 5)


def test_an_ivf_flat_memory_searches_through_the_list_batched_searcher(tmp_path):
    """Memory.search hands an IVF-Flat live index to IVFSearcher (cached with it), and what it
    returns for a large batch is FAISS's own search of the version's file."""
    from benchmarks.synthetic import QueryVectors, build_memory
    from vismem_assets.index_types import IndexPolicy

    memory = build_memory(tmp_path / "home", 20_000, QueryVectors(64), index_policy=IndexPolicy(kind="ivf-flat"))
    _, index = memory.live_index()
    queries = clustered_vectors(300, 64, seed=4)[0]
    sims, ids = memory.search(queries, 20)
    assert isinstance(memory.recall.live_files().searchers()[0][0], IVFSearcher)
    plain = faiss.read_index(str(memory.layout.absolute(memory.indexes.live().path)))
    ref_sims, ref_ids = plain.search(queries, 20)
    assert_same((sims, ids), (ref_sims, ref_ids))
