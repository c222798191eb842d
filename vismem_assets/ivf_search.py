"""IVF-Flat inner-product search for batches, list by list instead of query by query.

FAISS's IVF search scans each query's `nprobe` lists one query at a time (one thread per
query), so a batch of m queries reads the probed lists m times over: for large batches it
stays at its single-query rate, bound by memory. Here a large batch is searched list by list:

* coarse assignment of the whole batch (the quantizer, `nprobe` lists per query, as FAISS does);
* the (query, list) pairs are grouped by list, and each probed list is read once for all the
  queries that probe it: one matrix product (the list's vectors x those queries) when enough
  queries share it, else FAISS's SIMD kernel `fvec_inner_products_ny` per query, back to back,
  while the list is still in cache (OpenBLAS's small-matrix products are slower than that for
  a few queries, and its threads contend with ours, so they run in the calling thread, alone);
* each pair keeps its best k (`np.argpartition` over that list's scores), and each query then
  takes its k best over its pairs' nprobe x k candidates.

The lists are read in place, as zero-copy read-only numpy views of the index's inverted lists
(`invlists.get_codes(l)` / `get_ids(l)`), built once per searcher and kept with the index, so a
read-only memory-mapped index (`faiss.IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY`) is never written.
The searcher assumes its index is not modified while it searches (a changed `ntotal` rebuilds
the views). Small batches, below `MIN_BATCH`, go to `index.search`: few queries share a list,
and FAISS's own scan is then as fast or faster (benchmarks/index_types.py measures both).

Results are FAISS's: the same candidates (the same coarse assignment, every vector of each
probed list), the same best k, best first, padded with similarity -FLT_MAX and id -1 (FAISS's
padding) when a query has fewer than k candidates. Similarities agree to float32 rounding
(a matrix product sums in another order than FAISS's scan); exactly tied neighbours may come
in another order, or another of them be kept at the k-th place.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from .search import _WORKERS

MIN_BATCH = 32      # queries a call from which the list-by-list path is used (below: index.search)
GEMM_MIN = 32       # queries sharing a list from which their scores are one matrix product
_PAD = np.float32(-np.finfo(np.float32).max)  # FAISS's similarity for "no neighbour" (inner product)


def _ivf_flat_ip(index):
    """The IndexIVFFlat (inner product, plain array lists) this index is, else None."""
    import faiss

    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None  # IVF-SQ8, IVF-PQ, IVFFlatDedup, wrapped indexes...: FAISS searches them
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists) or lists.code_size != 4 * ivf.d:
        return None  # (a memory-mapped index has array lists too, over the mapped file)
    return ivf


class _Lists:
    """Read-only views of every non-empty inverted list's vectors, and all ids in list order."""

    def __init__(self, ivf):
        import faiss

        lists, d = ivf.invlists, ivf.d
        self.ntotal = ivf.ntotal
        self.sizes = np.array([lists.list_size(l) for l in range(ivf.nlist)], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.vectors: list = [None] * ivf.nlist
        ids = []
        for l in np.flatnonzero(self.sizes):
            n = int(self.sizes[l])
            v = faiss.rev_swig_ptr(lists.get_codes(int(l)), n * d * 4).view(np.float32).reshape(n, d)
            v.flags.writeable = False
            self.vectors[l] = v
            ids.append(faiss.rev_swig_ptr(lists.get_ids(int(l)), n))
        # ids are copied into one array (8 bytes a vector beside the vectors' 4 d): one gather maps
        # a (list, offset) to its id
        self.ids = np.concatenate(ids).astype(np.int64) if ids else np.empty(0, np.int64)


class IVFSearcher:
    """`search(queries, k)` with `index.search`'s results, list by list for large batches.

    Only an IVF-Flat inner-product index (IndexIVFFlat, bare, with or without a direct map,
    possibly memory-mapped read-only) gets the list-by-list path; for any other index (IVF-SQ8,
    IVF-PQ, ...) this searcher simply delegates to `index.search`. The searcher keeps the index
    alive (its views read the index's memory)."""

    def __init__(self, index, min_batch: int = MIN_BATCH, gemm_min: int = GEMM_MIN):
        self.index = index
        self.min_batch = min_batch
        self.gemm_min = gemm_min
        self._ivf = _ivf_flat_ip(index)
        self._lists: _Lists | None = None

    @property
    def list_batched(self) -> bool:
        """Whether large batches take the list-by-list path (IVF-Flat, inner product)."""
        return self._ivf is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (nq, k) float32, ids (nq, k) int64), best first, at the index's nprobe."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ivf = self._ivf
        if (ivf is None or queries.ndim != 2 or len(queries) < self.min_batch or k < 1
                or queries.shape[1] != ivf.d or ivf.max_codes or ivf.ntotal == 0):
            return self.index.search(queries, k)  # (also raises FAISS's own errors)
        if self._lists is None or self._lists.ntotal != ivf.ntotal:
            self._lists = _Lists(ivf)
        return self._search_lists(queries, int(k), self._lists)

    def _search_lists(self, queries: np.ndarray, k: int, lists: _Lists) -> tuple[np.ndarray, np.ndarray]:
        ivf = self._ivf
        nq = len(queries)
        nprobe = min(ivf.nprobe, ivf.nlist)  # as FAISS clamps it
        _, assign = ivf.quantizer.search(queries, nprobe)  # (nq, nprobe) list numbers, -1: none
        flat = assign.ravel()
        order = np.argsort(flat, kind="stable")  # pairs grouped by list, queries ascending within
        listed = flat[order]
        probed = np.flatnonzero(np.r_[True, listed[1:] != listed[:-1]])
        ends = np.r_[probed[1:], len(listed)]
        groups = [(int(listed[s]), int(s), int(e)) for s, e in zip(probed, ends)
                  if listed[s] >= 0 and lists.sizes[listed[s]] > 0]
        kk = min(k, int(lists.sizes[[g[0] for g in groups]].max())) if groups else 1  # slots per pair
        # each pair's best kk: similarity and position among all ids (rows in the grouped order)
        best = np.full((len(order), kk), -np.inf, np.float32)
        where = np.full((len(order), kk), -1, np.int64)
        qrows = order // nprobe  # the query of each grouped pair

        def top(l: int, s: int, scores: np.ndarray) -> None:
            """scores (queries, list size) of one list: each row's best kk into best/where."""
            m, n = scores.shape
            if n <= kk:
                best[s:s + m, :n] = scores
                where[s:s + m, :n] = lists.starts[l] + np.arange(n)
                return
            at = np.argpartition(scores, n - kk, axis=1)[:, n - kk:]
            best[s:s + m] = np.take_along_axis(scores, at, axis=1)
            where[s:s + m] = lists.starts[l] + at

        def scan(part) -> None:
            """A few queries per list: FAISS's exact k-NN over the list (SIMD scan, one query after
            another while the list stays in cache, each keeping its best in a heap): one call a list."""
            import faiss

            for l, s, e in part:
                x = lists.vectors[l]
                n = len(x)
                kl = min(kk, n)
                out_d, out_i = (best[s:e], where[s:e]) if kl == kk else (
                    np.empty((e - s, kl), np.float32), np.empty((e - s, kl), np.int64))
                faiss.knn_inner_product(faiss.swig_ptr(qg[s:e]), faiss.swig_ptr(x), ivf.d, e - s, n, kl,
                                        faiss.swig_ptr(out_d), faiss.swig_ptr(out_i))
                out_i += lists.starts[l]
                if kl < kk:
                    best[s:e, :kl], where[s:e, :kl] = out_d, out_i

        qg = queries[qrows]  # the queries in grouped order: each list's are contiguous rows
        many = [g for g in groups if g[2] - g[1] >= self.gemm_min]
        few = [g for g in groups if g[2] - g[1] < self.gemm_min]
        for l, s, e in many:  # OpenBLAS spreads each product over the CPUs itself
            top(l, s, (lists.vectors[l] @ qg[s:e].T).T)
        _parallel(scan, few, lists.sizes)

        # Each query's pairs in probe order: nprobe x kk candidates, of which the best k.
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        cand = best[rank].reshape(nq, nprobe * kk)
        width = cand.shape[1]
        if width > k:
            pick = np.argpartition(cand, width - k, axis=1)[:, width - k:]
        else:
            pick = np.broadcast_to(np.arange(width), (nq, width))
        vals = np.take_along_axis(cand, pick, axis=1)
        desc = np.argsort(-vals, axis=1, kind="stable")
        pick, vals = np.take_along_axis(pick, desc, axis=1), np.take_along_axis(vals, desc, axis=1)
        pos = where[rank.reshape(nq, nprobe)[np.arange(nq)[:, None], pick // kk], pick % kk]
        sims = np.full((nq, k), _PAD, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        found = pos >= 0
        sims[:, :width] = np.where(found, vals, _PAD)
        ids[:, :width] = np.where(found, lists.ids[np.maximum(pos, 0)], -1)
        return sims, ids

def _parallel(fn, groups: list, sizes: np.ndarray) -> None:
    """fn over the groups, cut into parts of about equal work (list size x queries), one per
    CPU, in this module's threads (FAISS releases the GIL)."""
    if not groups:
        return
    pool = _pool()
    if pool is None or len(groups) < 2 * _WORKERS:
        fn(groups)
        return
    work = np.cumsum([sizes[l] * (e - s) for l, s, e in groups])
    cuts = np.searchsorted(work, work[-1] * np.arange(1, _WORKERS) / _WORKERS)
    for job in [pool.submit(fn, [groups[i] for i in part]) for part in np.split(np.arange(len(groups)), cuts)]:
        job.result()


def _pool():
    """Threads for the per-list scans, each running FAISS's OpenMP code on one thread (the
    parallelism is across lists); a forked child gets its own."""
    global _executor
    if _WORKERS < 2:
        return None
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():
            import faiss
            from concurrent.futures import ThreadPoolExecutor

            _executor = (os.getpid(), ThreadPoolExecutor(_WORKERS, thread_name_prefix="vismem-ivf",
                                                         initializer=faiss.omp_set_num_threads, initargs=(1,)))
        return _executor[1]


_executor = None
_executor_lock = threading.Lock()


def ivf_searcher(index) -> IVFSearcher | None:
    """The list-batched searcher for an IVF-Flat inner-product index, else None."""
    if index is None or index.ntotal == 0 or _ivf_flat_ip(index) is None:
        return None
    return IVFSearcher(index)
