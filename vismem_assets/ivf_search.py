"""IVF-Flat inner-product search for batches, list by list instead of query by query.

FAISS's IVF search scans each query's `nprobe` lists one query at a time (a thread per slice of
queries), so a batch of m queries reads the probed lists from memory m times over: for large
batches it stays at its single-query rate, bound by memory bandwidth. Here a large batch is
searched list by list:

* the whole batch is coarse-assigned (the quantizer, `nprobe` lists per query, as FAISS does);
* the (query, list) pairs are grouped by list, and each probed list is scanned for all the
  queries probing it, one query after the other, so that the list is read from memory once and
  from cache for the others;
* each query keeps one heap of its best k across all its lists (so that after its first lists
  nearly every vector is rejected by one comparison), one heap per worker thread: the lists are
  shared among the threads, and the threads' heaps are merged at the end.

The scan is FAISS's own: a private `IndexIVFFlat` over the index's quantizer and inverted lists
(no copy; it owns neither, and writes neither: a read-only memory-mapped index is fine) runs
`search_preassigned` on one list for that list's queries (`nprobe` 1), continuing the heaps it
is handed instead of starting them afresh (`PARALLEL_MODE_NO_HEAP_INIT`). So the scores are
FAISS's (the same SIMD inner products, bit for bit) and so is the padding (similarity -FLT_MAX,
id -1 when a query has fewer than k candidates); only the order in which a query's lists are
visited differs, so of exactly tied neighbours at the k-th place another may be kept, and
exactly tied neighbours may be listed in another order.

Why not one matrix product per list (list x its queries): measured on the 2-core machine this
was written on (N = 10^6, d = 384, 2,048 lists, nprobe 16), a list is probed by 1-2 queries of a
batch of 100 and by 9 (median; at most ~20) of a batch of 1,000. At those widths OpenBLAS's
sgemm is no faster than this scan from cache (~35-60 ns per query and vector either way, against
~25 for the scan's own selection and heap when each (query, list) pair keeps its own top k), its
threads collapse 5-10x when another process holds a CPU, and per-pair top-k selection in numpy
cost as much again. A matrix product pays only from ~32 queries a list (batches of ~4,000+).

Small batches (below `MIN_BATCH` queries) go to `index.search`: few queries share a list, and the
per-list calls cost more than they save (benchmarks/index_types.py measures both paths).
The searcher reads the index's inverted lists as they are at each search: it must not be
searched while the index is being modified, as for FAISS itself.
"""
from __future__ import annotations

import os
import threading

import numpy as np

MIN_BATCH = 32      # queries a call from which the list-by-list path is used (below: index.search)
MAX_CHUNK = 4096    # queries searched together (bounds the scratch: ~24 KiB a query at nprobe 16, k 100)
_PAD = np.float32(-np.finfo(np.float32).max)  # FAISS's similarity for "no neighbour" (inner product)
_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _ivf_flat_ip(index):
    """The IndexIVFFlat (inner product, array inverted lists) this index is, else None."""
    import faiss

    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None  # IVF-SQ8, IVF-PQ, IVFFlatDedup, wrapped indexes...: FAISS searches them
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return None  # (a memory-mapped index has array lists too, over the mapped file)
    return ivf


def _list_scanner(ivf):
    """An IndexIVFFlat sharing ivf's quantizer and inverted lists (owning neither) that searches
    the one list it is given per query and continues the result heaps it is handed."""
    import faiss

    view = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ivf.metric_type)
    view.replace_invlists(ivf.invlists, False)
    view.ntotal = ivf.ntotal
    view.nprobe = 1
    view.parallel_mode = view.PARALLEL_MODE_NO_HEAP_INIT  # (mode 0: no threads of its own)
    return view


class IVFSearcher:
    """`search(queries, k)` with `index.search`'s results, list by list for large batches.

    Only an IVF-Flat inner-product index (a bare IndexIVFFlat, with or without a direct map,
    possibly memory-mapped read-only) gets the list-by-list path; for any other index (IVF-SQ8,
    IVF-PQ, wrapped or L2 indexes) this searcher just delegates to `index.search`. It keeps
    the index alive (its scanner reads the index's lists)."""

    def __init__(self, index, min_batch: int = MIN_BATCH):
        self.index = index
        self.min_batch = min_batch
        self._ivf = _ivf_flat_ip(index)
        self._scanner = None if self._ivf is None else _list_scanner(self._ivf)
        # list sizes, to share the scanning evenly among the threads (only that: if the index
        # changes, the shares are uneven, the results still right)
        self._sizes = (None if self._ivf is None else
                       np.array([self._ivf.invlists.list_size(l) for l in range(self._ivf.nlist)], np.int64))

    @property
    def list_batched(self) -> bool:
        """Whether large batches take the list-by-list path (IVF-Flat, inner product)."""
        return self._scanner is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (nq, k) float32, ids (nq, k) int64), best first, at the index's nprobe."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ivf = self._ivf
        if (ivf is None or queries.ndim != 2 or len(queries) < self.min_batch or k < 1
                or queries.shape[1] != ivf.d or ivf.max_codes):
            return self.index.search(queries, k)  # (which also raises FAISS's errors)
        return self._search_lists(queries, int(k))

    def _search_lists(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out = [self._search_chunk(queries[i:i + MAX_CHUNK], k) for i in range(0, len(queries), MAX_CHUNK)]
        return (out[0] if len(out) == 1 else
                (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])))

    def _search_chunk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ivf = self._ivf
        nq = len(queries)
        nprobe = min(ivf.nprobe, ivf.nlist)  # as FAISS clamps it
        coarse, assign = ivf.quantizer.search(queries, nprobe)  # (nq, nprobe); list -1: none
        # Pass 1: each query's nearest list, the queries sharing a list one after another. Its k-th
        # best similarity is a lower bound on the query's final k-th best.
        near = np.argsort(assign[:, 0], kind="stable")
        sims1 = np.full((nq, k), _PAD, np.float32)  # empty heaps (FAISS's initial values)
        ids1 = np.full((nq, k), -1, np.int64)
        self._scan(queries[near], assign[near, :1], coarse[near, :1], sims1, ids1)
        sims1[near], ids1[near] = sims1.copy(), ids1.copy()  # back to query order
        if nprobe == 1:
            return _best_first(sims1, ids1, k)
        # Pass 2: every other (query, list) pair, grouped by list. Each pair gets a heap of its own
        # that starts full of placeholders at its query's bound: only vectors above it get in.
        rest = assign[:, 1:].ravel()
        order = np.argsort(rest, kind="stable")
        qrows = order // (nprobe - 1)
        sims2 = np.repeat(sims1.min(axis=1)[qrows], k).reshape(len(order), k)
        ids2 = np.full((len(order), k), -1, np.int64)
        self._scan(queries[qrows], rest[order][:, None], coarse[:, 1:].ravel()[order][:, None], sims2, ids2)
        # Each query's candidates: its pass-1 heap and its pass-2 heaps, placeholders left out.
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        sims = np.concatenate([sims1, sims2[rank].reshape(nq, -1)], axis=1)
        ids = np.concatenate([ids1, ids2[rank].reshape(nq, -1)], axis=1)
        return _best_first(np.where(ids >= 0, sims, -np.inf), ids, k)

    def _scan(self, x: np.ndarray, keys: np.ndarray, dis: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
        """Row i: scan list keys[i] for query x[i] into the heap sims[i], ids[i] (k entries, kept
        as a heap, not sorted). The rows are cut into one contiguous part per worker thread, of
        about equal work (vectors scanned); FAISS releases the GIL while it scans."""
        import faiss

        k = sims.shape[1]
        keys = np.ascontiguousarray(keys, np.int64)
        dis = np.ascontiguousarray(dis, np.float32)

        def part(lo: int, hi: int) -> None:
            if hi > lo:
                self._scanner.search_preassigned_c(
                    hi - lo, faiss.swig_ptr(x[lo:hi]), k, faiss.swig_ptr(keys[lo:hi]), faiss.swig_ptr(dis[lo:hi]),
                    faiss.swig_ptr(sims[lo:hi]), faiss.swig_ptr(ids[lo:hi]), False)

        pool = _pool()
        if pool is None or len(x) < 2 * _WORKERS:
            part(0, len(x))
            return
        work = np.cumsum(self._sizes[np.maximum(keys[:, 0], 0)] * (keys[:, 0] >= 0))
        cuts = [0, *np.searchsorted(work, work[-1] * np.arange(1, _WORKERS) / _WORKERS), len(x)]
        jobs = [pool.submit(part, int(lo), int(hi)) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        part(0, int(cuts[1]))  # the calling thread takes the first part
        for job in jobs:
            job.result()


def _best_first(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (similarity -inf: none), best first, padded as FAISS pads."""
    if sims.shape[1] > k:
        keep = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        sims, ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    desc = np.argsort(-sims, axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, desc, axis=1), np.take_along_axis(ids, desc, axis=1)
    missing = ids < 0
    return np.where(missing, _PAD, sims), np.where(missing, -1, ids)


_executor = None
_executor_lock = threading.Lock()


def _pool():
    """The worker threads (None on one CPU); a forked child gets its own."""
    global _executor
    if _WORKERS < 2:
        return None
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _executor = (os.getpid(), ThreadPoolExecutor(_WORKERS - 1, thread_name_prefix="vismem-ivf"))
        return _executor[1]


def ivf_searcher(index) -> IVFSearcher | None:
    """The list-batched searcher for an IVF-Flat inner-product index, else None."""
    if index is None or _ivf_flat_ip(index) is None:
        return None
    return IVFSearcher(index)
