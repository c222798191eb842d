"""IVF-Flat inner-product search for batches, list by list instead of query by query.

FAISS's IVF search scans each query's `nprobe` lists one query at a time, so a batch of m
queries reads the probed lists from memory about m * nprobe / nlist times over, and large
batches run at about the single-query rate. Here a large batch is searched list by list:

1. the whole batch is coarse-assigned (the quantizer, `nprobe` lists a query, as FAISS does),
   and its (query, list) pairs are grouped by list;
2. a compiled kernel (ivf_kernel.py) reads each probed list once and scores every vector
   against all the queries probing it, four at a time, into one heap of the k best per pair,
   which only takes vectors above the best k-th similarity the query has reached in its other
   lists so far; the lists are shared among threads by work (vectors x queries);
3. each query takes its k best from its pairs' heaps, best first.

The result is the exact top k of the probed lists, as FAISS's: the same ids (exact ties at the
k-th place aside), similarities equal to FAISS's within float rounding (~1e-7: the kernel sums
in another order), FAISS's padding (similarity -FLT_MAX, id -1) where a query has fewer than k
candidates. The kernel reads the index's own lists through their addresses (no copy, nothing
written: a read-only memory-mapped index, `faiss.IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY`, is
fine).

Measured on the 2-core machine this was written on (N = 10^6, d = 384, 2,048 lists, nprobe 11,
k 100, clustered vectors; benchmarks/index_types.py): at 1,000 queries a call 2,200-4,000 qps
(it varies with the machine's load; 25x exact search in a quiet run), against FAISS's ~1,000
and ~2,000 for the previous list-batched path (FAISS's own scans of (query, list) pairs grouped
by list). Of a call of 1,000, ~0.18 s is the kernel, ~0.02 s the coarse assignment, ~0.03 s the
final selection. At 100 queries a call a list is probed by about one query, so nothing is
shared and the scan is bound by memory bandwidth like FAISS's (both ~1,000 qps). Why a kernel
and not a matrix product per list: a list is probed by ~5-10 queries of a batch of 1,000, and
OpenBLAS products that narrow (it packs the list first) ran no faster than FAISS's scan. A
process's first list-batched call also imports numba and loads the kernel (~1.3 s).

Small batches and small indexes go to `index.search`. Measured on that machine (nprobe 16,
k 100; list-batched qps / FAISS's, by queries a call): N = 10^6 x 384 (1.5 GB) 0.9-1.1 at 64-128,
1.2 at 192, 1.8 at 256, 2.8 at 512; 100,000 x 384 (150 MB) 0.8 at 64, 1.2 at 128-192, 1.9 at
256; 50,000 x 384 (77 MB) 0.6 at 64, 1.0 at 192, 1.1 at 256-512 (FAISS's scans of an index that
size run largely from the 32 MiB L3 cache). Hence `MIN_BATCH` 256 and `MIN_BYTES` 64 MiB. The
searcher reads the index's lists as they are at each search; like FAISS it must not search
while the index is being modified.
"""
from __future__ import annotations

import numpy as np

from .workers import WORKERS, worker_pool

MIN_BATCH = 256     # queries a call from which the list-by-list path is used (below: index.search)
MIN_BYTES = 64 << 20  # ... and stored vectors (bytes) from which: below, FAISS's scans run largely from cache
MAX_CHUNK = 1024    # queries searched together: bounds the heaps (~19 KiB a query at nprobe 16, k 100)
_PAD = np.float32(-np.finfo(np.float32).max)  # FAISS's similarity for "no neighbour" (inner product)


def _ivf_flat_ip(index):
    """The IndexIVFFlat (inner product, array inverted lists) this index is, else None."""
    import faiss

    ivf = faiss.downcast_index(index)
    if type(ivf) is not faiss.IndexIVFFlat or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None  # IVF-SQ8, IVF-PQ, IVFFlatDedup, wrapped or L2 indexes: FAISS searches them
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return None  # (a memory-mapped index has array lists too, over the mapped file)
    return ivf


class IVFSearcher:
    """`search(queries, k)` with `index.search`'s results, list by list for large batches.

    Only an IVF-Flat inner-product index (a bare IndexIVFFlat, with or without a direct map,
    possibly memory-mapped read-only) gets the list-by-list path; for any other index (IVF-SQ8,
    IVF-PQ, wrapped or L2 indexes) this searcher just delegates to `index.search`. It keeps the
    index alive (the kernel reads the index's lists where FAISS keeps them). Holes (id -1, what
    a forget leaves in a memory-mapped index until the next compaction) are never returned: the
    kernel skips them, and with `holes` FAISS's search is given a selector that does."""

    def __init__(self, index, min_batch: int = MIN_BATCH, min_bytes: int = MIN_BYTES, holes: bool = False):
        import faiss

        self.index = index
        self.min_batch, self.min_bytes = min_batch, min_bytes
        self._ivf = _ivf_flat_ip(index)
        self._skip_holes = faiss.IDSelectorRange(0, np.iinfo(np.int64).max) if holes else None  # ids from 0 up

    def _params(self):
        """FAISS's search parameters that skip holes, at the index's nprobe as it is now; or None."""
        import faiss

        if self._skip_holes is None:
            return None
        ivf = faiss.extract_index_ivf(self.index)
        return faiss.SearchParametersIVF(sel=self._skip_holes, nprobe=ivf.nprobe, max_codes=ivf.max_codes)

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
            return self.index.search(queries, k, params=self._params())  # (which also raises FAISS's errors)
        out = [self._search(queries[i:i + MAX_CHUNK], int(k)) for i in range(0, len(queries), MAX_CHUNK)]
        return out[0] if len(out) == 1 else (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from .ivf_kernel import scan_lists

        ivf = self._ivf
        nq, nlist = len(queries), ivf.nlist
        nprobe = min(ivf.nprobe, nlist)  # as FAISS clamps it
        _, assign = ivf.quantizer.search(queries, nprobe)  # (nq, nprobe); list -1: none

        # 1. The (query, list) pairs grouped by list: list l's are rows list_start[l]:list_start[l + 1]
        # (pairs with no list, -1, sort first and keep empty heaps).
        probes = assign.ravel()
        order = np.argsort(probes, kind="stable")
        pair_query = (order // nprobe).astype(np.int64)
        counts = np.bincount(probes[probes >= 0], minlength=nlist)
        list_start = np.empty(nlist + 1, np.int64)
        list_start[0] = len(probes) - counts.sum()
        np.cumsum(counts, out=list_start[1:])
        list_start[1:] += list_start[0]

        # 2. The kernel over the probed lists, read where FAISS keeps them, shared among threads.
        used = np.flatnonzero(counts)
        invlists = ivf.invlists
        sizes, codes, ids = (np.zeros(nlist, np.int64) for _ in range(3))
        for l in used.tolist():
            sizes[l] = invlists.list_size(l)
            if sizes[l]:
                codes[l], ids[l] = int(invlists.get_codes(l)), int(invlists.get_ids(l))
        heap_s = np.full((len(probes), k), _PAD, np.float32)  # FAISS's initial heaps
        heap_i = np.full((len(probes), k), -1, np.int64)
        thresholds = np.full(nq, _PAD, np.float32)  # (see scan_lists)
        args = (codes, ids, sizes, queries, list_start, pair_query, thresholds, heap_s, heap_i)
        pool = worker_pool()
        if pool is None or len(used) < 2 * WORKERS:
            scan_lists(used, *args)
        else:
            work = np.cumsum(sizes[used] * (counts[used] + 4))  # (+4: a list's pass from memory)
            cuts = [0, *np.searchsorted(work, work[-1] * np.arange(1, WORKERS) / WORKERS).tolist(), len(used)]
            jobs = [pool.submit(scan_lists, used[lo:hi], *args) for lo, hi in zip(cuts[1:-1], cuts[2:])]
            scan_lists(used[:cuts[1]], *args)  # the calling thread takes the first share
            for job in jobs:
                job.result()

        # 3. Each query's k best of its pairs' heaps.
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        sims, found = heap_s[rank].reshape(nq, -1), heap_i[rank].reshape(nq, -1)
        return _best_first(np.where(found >= 0, sims, -np.inf), found, k)


def _best_first(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (similarity -inf: no candidate), best first, padded as FAISS pads."""
    if sims.shape[1] > k:
        keep = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        sims, ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    desc = np.argsort(-sims, axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, desc, axis=1), np.take_along_axis(ids, desc, axis=1)
    missing = ids < 0
    return np.where(missing, _PAD, sims), np.where(missing, -1, ids)


def settings() -> dict:
    """When the list-batched path is taken and by what (for `vismem status`)."""
    from importlib.metadata import version

    return {"min_batch": MIN_BATCH, "min_mib": MIN_BYTES >> 20, "threads": WORKERS,
            "kernel": f"numba {version('numba')}"}


def ivf_searcher(index, holes: bool = False) -> IVFSearcher | None:
    """The list-batched searcher for an IVF-Flat inner-product index, or, for an IVF index with
    holes, the searcher that skips them; else None."""
    if index is None or (_ivf_flat_ip(index) is None and not holes):
        return None
    return IVFSearcher(index, holes=holes)
