"""IVF-Flat inner-product search for batches, list by list instead of query by query.

FAISS's IVF search scans each query's `nprobe` lists one query at a time, so a batch of m
queries reads the probed lists from memory m times over, and large batches run at about the
single-query rate. Here a large batch is searched list by list, so that each probed list comes
from memory once and from cache for the other queries probing it:

1. the whole batch is coarse-assigned (the quantizer, `nprobe` lists a query, as FAISS does);
2. each query's nearest list is scanned, the queries sharing a list one after the other, each
   into a heap of its k best. That heap's smallest similarity is a lower bound on the query's
   final k-th best: its threshold;
3. every other (query, list) pair, grouped by list, is scanned the same way into a heap of its
   own that starts full of placeholders at the query's threshold, so that only vectors above it
   get in: nearly every vector costs one inner product and one comparison;
4. each query takes its k best from its heaps, best first.

The scans are FAISS's own: a private `IndexIVFFlat` over the index's quantizer and inverted
lists (no copy; it owns neither and writes neither, so a read-only memory-mapped index,
`faiss.IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY`, is fine) runs `search_preassigned` over rows of
(query, one list) pairs, continuing the heaps it is handed (`PARALLEL_MODE_NO_HEAP_INIT`). Each
step is one such call per thread (FAISS releases the GIL): no Python per list. Scores are
therefore FAISS's bit for bit, padding too (similarity -FLT_MAX, id -1 where a query has fewer
than k candidates); only the order in which a query's lists are visited differs, so of
exactly tied neighbours at the k-th place another may be kept, and exact ties may be listed in
another order.

Why no matrix product per list (its vectors x the queries probing it): measured on the 2-core
machine this was written on (N = 10^6, d = 384, 2,048 lists, nprobe 16), a list is probed by
1-2 queries of a batch of 100 and by ~9 (at most ~20) of a batch of 1,000. Products that narrow
were no faster than the scan: at 1,000 queries a call, products for the lists probed by 6 or
more (in row blocks under OpenBLAS's threading threshold, candidates taken above the same
thresholds) ran at 1,360 qps, from 10 at 1,500, this scan alone at 1,740 (850 against 975 us
of CPU a query); with OpenBLAS's own threads they ran 2-10x slower whenever another process
held a CPU. FAISS's scan of a cached list costs ~45 ns a vector, ~155 ns from memory.

Small batches and small indexes go to `index.search`. Measured on that machine (nprobe 16, k 100,
queries a call where the list-by-list path starts to win): N = 10^6 x 384 (1.5 GB) ~100,
200,000 x 384 ~200, 100,000 x 384 ~256, 50,000 x 384 (77 MB) not up to 512 (FAISS's scans
of an index that size run largely from the 32 MiB L3 cache); hence `MIN_BATCH` 256 and
`MIN_BYTES` 128 MiB. The searcher reads the index's lists as they are at each search; like
FAISS it must not search while the index is being modified.
"""
from __future__ import annotations

import os
import threading

import numpy as np

MIN_BATCH = 256     # queries a call from which the list-by-list path is used (below: index.search)
MIN_BYTES = 128 << 20  # ... and stored vectors (bytes) from which: below, FAISS's scans run largely from cache
MAX_CHUNK = 1024    # queries searched together: bounds the scratch (~85 KiB a query at d 384, nprobe 16, k 100)
_PAD = np.float32(-np.finfo(np.float32).max)  # FAISS's similarity for "no neighbour" (inner product)
_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _ivf_flat_ip(index):
    """The IndexIVFFlat (inner product, array inverted lists) this index is, else None."""
    import faiss

    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None  # IVF-SQ8, IVF-PQ, IVFFlatDedup, wrapped or L2 indexes: FAISS searches them
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return None  # (a memory-mapped index has array lists too, over the mapped file)
    return ivf


def _scanner(ivf):
    """An IndexIVFFlat over ivf's quantizer and inverted lists (owning neither) that scans one
    list a row (nprobe 1) and continues the result heaps it is handed."""
    import faiss

    view = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ivf.metric_type)
    view.replace_invlists(ivf.invlists, False)
    view.ntotal = ivf.ntotal
    view.nprobe = 1
    view.parallel_mode = view.PARALLEL_MODE_NO_HEAP_INIT  # (mode 0 otherwise: no threads of its own)
    return view


class IVFSearcher:
    """`search(queries, k)` with `index.search`'s results, list by list for large batches.

    Only an IVF-Flat inner-product index (a bare IndexIVFFlat, with or without a direct map,
    possibly memory-mapped read-only) gets the list-by-list path; for any other index (IVF-SQ8,
    IVF-PQ, wrapped or L2 indexes) this searcher just delegates to `index.search`. It keeps the
    index alive (its scanner reads the index's quantizer and lists)."""

    def __init__(self, index, min_batch: int = MIN_BATCH, min_bytes: int = MIN_BYTES):
        self.index = index
        self.min_batch, self.min_bytes = min_batch, min_bytes
        self._ivf = _ivf_flat_ip(index)
        self._scan_index = None if self._ivf is None else _scanner(self._ivf)
        self._sizes = None  # list sizes, to share the scans evenly among the threads

    @property
    def list_batched(self) -> bool:
        """Whether large batches take the list-by-list path (IVF-Flat, inner product)."""
        return self._ivf is not None

    def lists_for(self, nq: int) -> bool:
        """Whether a call of nq queries takes the list-by-list path (else `index.search`)."""
        ivf = self._ivf
        return (ivf is not None and nq >= self.min_batch and 4 * ivf.d * ivf.ntotal >= self.min_bytes
                and not ivf.max_codes)  # (FAISS stops each query after max_codes vectors: not this path's)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (nq, k) float32, ids (nq, k) int64), best first, at the index's nprobe."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ivf = self._ivf
        if queries.ndim != 2 or k < 1 or not self.lists_for(len(queries)) or queries.shape[1] != ivf.d:
            return self.index.search(queries, k)  # (which also raises FAISS's errors)
        if self._sizes is None or self._sizes.sum() != ivf.ntotal:  # (stale sizes: uneven shares only)
            self._sizes = np.array([ivf.invlists.list_size(l) for l in range(ivf.nlist)], np.int64)
        out = [self._search(queries[i:i + MAX_CHUNK], int(k)) for i in range(0, len(queries), MAX_CHUNK)]
        return out[0] if len(out) == 1 else (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ivf = self._ivf
        nq = len(queries)
        nprobe = min(ivf.nprobe, ivf.nlist)  # as FAISS clamps it
        coarse, assign = ivf.quantizer.search(queries, nprobe)  # (nq, nprobe); list -1: none

        # 2. Each query's nearest list, the queries sharing one consecutive.
        near = np.argsort(assign[:, 0], kind="stable")
        heap_s = np.full((nq, k), _PAD, np.float32)  # empty heaps: FAISS's own initial values
        heap_i = np.full((nq, k), -1, np.int64)
        self._scan(queries[near], assign[near, :1], coarse[near, :1], heap_s, heap_i)
        heap_s[near], heap_i[near] = heap_s.copy(), heap_i.copy()  # back to query order
        if nprobe == 1:
            return _best_first(heap_s, heap_i, k)
        threshold = heap_s.min(axis=1)  # the top of each min-heap: its k-th best so far

        # 3. The other pairs, grouped by list, each into a heap full of placeholders (id -1) at its
        # query's threshold.
        rest = assign[:, 1:].ravel()
        order = np.argsort(rest, kind="stable")
        qrow = order // (nprobe - 1)
        cand_s = np.repeat(threshold[qrow], k).reshape(len(order), k)
        cand_i = np.full((len(order), k), -1, np.int64)
        self._scan(queries[qrow], rest[order][:, None], coarse[:, 1:].ravel()[order][:, None], cand_s, cand_i)

        # 4. Each query's candidates: its first heap and its pairs' heaps, placeholders left out.
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        sims = np.concatenate([heap_s, cand_s[rank].reshape(nq, -1)], axis=1)
        ids = np.concatenate([heap_i, cand_i[rank].reshape(nq, -1)], axis=1)
        return _best_first(np.where(ids >= 0, sims, -np.inf), ids, k)

    def _scan(self, x: np.ndarray, keys: np.ndarray, dis: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
        """Row i: FAISS scans list keys[i] (-1: none) for query x[i] into the heap sims[i], ids[i]
        (left a heap, not sorted); dis[i]: the query's similarity to that list's centroid. The rows
        are cut into one contiguous part per thread, of about equal work (vectors scanned)."""
        import faiss

        k = sims.shape[1]
        keys = np.ascontiguousarray(keys, np.int64)
        dis = np.ascontiguousarray(dis, np.float32)

        def part(lo: int, hi: int) -> None:
            if hi > lo:
                self._scan_index.search_preassigned_c(
                    hi - lo, faiss.swig_ptr(x[lo:hi]), k, faiss.swig_ptr(keys[lo:hi]), faiss.swig_ptr(dis[lo:hi]),
                    faiss.swig_ptr(sims[lo:hi]), faiss.swig_ptr(ids[lo:hi]), False)

        pool = _pool()
        if pool is None or len(x) < 2 * _WORKERS:
            part(0, len(x))
            return
        work = np.cumsum(np.where(keys[:, 0] >= 0, self._sizes[keys[:, 0]], 0))
        cuts = [0, *np.searchsorted(work, work[-1] * np.arange(1, _WORKERS) / _WORKERS).tolist(), len(x)]
        jobs = [pool.submit(part, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        part(0, cuts[1])  # the calling thread takes the first part
        for job in jobs:
            job.result()


def _best_first(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (similarity -inf: no candidate), best first, padded as FAISS pads."""
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
    """The worker threads beside the calling one (None on one CPU); a forked child gets its own."""
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
