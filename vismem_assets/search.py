"""Exact top-k inner-product search over a flat memory, bounded by matrix multiplication.

The stored vectors stay one contiguous float32 (N, d) array (for a flat FAISS index: a view of
the index's own storage, no copy). Queries are scored against it block by block,
S = X[j:j+w] @ Q.T, in blocks sized so that one block of scores stays small (`block_bytes`),
and the k best of each query are kept while the blocks go by:

* the scores come out as (w stored vectors x m queries): numpy's matmul runs faster with the
  large operand on the left (about 15% at m = 1,000 here), and the column-wise reductions
  below are vectorised along the queries;
* each block is cut into chunks of `CHUNK` rows; the maximum of each chunk per query costs
  about one read of the block, shared between the CPUs (numpy releases the GIL);
* only chunks whose maximum beats the query's current k-th best score are looked into (their
  columns gathered), so after the first blocks almost nothing but the GEMM and that maximum
  remains; while many chunks still qualify (the first blocks), one contiguous pass comparing
  the whole block with the thresholds is cheaper than gathering and is used instead;
* the first block's threshold comes from its chunk maxima: if k chunks reach t, at least k
  scores reach t, so the k-th largest chunk maximum is a safe starting threshold;
* candidates are merged with the current top k by `np.partition` on one int64 key per
  (score, position): the score's order-preserving bits in the high half, the inverted
  position in the low half. So the order is total and deterministic: higher similarity
  first, then lower position (the order the stored vectors were added).

FAISS flat selects the same set (on exact ties it keeps the lowest positions too) but lists
exactly tied neighbours highest position first; here they come lowest position first, the
order of a stable sort (tests/test_classify.py's brute-force reference). Scores are the same
float32 inner products up to summation order (GEMM blocking), about 1e-7 on unit vectors.

Single queries and small batches take the same path (the block then holds most or all of the
memory): one memory-bound pass over X for the whole batch, where FAISS scans X once per query
on one thread per query (its SIMD path below queries x d = distance_compute_blas_threshold) or
calls sgemm per 1,024 vectors (its BLAS path). benchmarks/search.py measures both.
"""
from __future__ import annotations

import numpy as np

from .workers import WORKERS, worker_pool

CHUNK = 32                   # rows per chunk whose maximum is checked against the threshold
BLOCK_BYTES = 32 << 20       # bytes of scores per block (w x m float32): bounded working set
MAX_QUERY_BLOCK = 2048       # queries scored together

_MINKEY = np.iinfo(np.int64).min
_LOW = np.int64(0xFFFFFFFF)
_MAX_ROWS = 1 << 32          # positions must fit the low half of a key


def _keys(vals: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(score, position) -> int64 whose order is: higher score, then lower position."""
    bits = (vals.astype(np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0: -0.0 ties +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.astype(np.int64) << 32) | (_LOW - pos.astype(np.int64))


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ordered = (keys >> 32).astype(np.int32)
    vals = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)
    pos = _LOW - (keys & _LOW)
    missing = keys == _MINKEY
    if missing.any():  # only when a query had fewer than k comparable scores (NaN)
        vals = np.where(missing, np.float32(-np.finfo(np.float32).max), vals)
        pos = np.where(missing, -1, pos)
    return vals, pos


def _merge(state: np.ndarray, thr: np.ndarray, rows: np.ndarray, vals: np.ndarray, pos: np.ndarray) -> None:
    """Fold candidates (rows nondecreasing) into the per-query top-k keys; update thresholds."""
    m, k = state.shape
    counts = np.bincount(rows, minlength=m)
    hit_rows = np.flatnonzero(counts)
    widest = int(counts.max())
    slot = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    compact = (np.cumsum(counts > 0) - 1)[rows]
    cand = np.full((len(hit_rows), k + widest), _MINKEY, np.int64)
    cand[:, :k] = state[hit_rows]
    cand[compact, k + slot] = _keys(vals, pos)
    best = np.partition(cand, widest, axis=1)[:, widest:]
    state[hit_rows] = best
    lowest = best.min(axis=1)
    thr[hit_rows] = np.where(lowest == _MINKEY, -np.inf, _decode(np.maximum(lowest, _MINKEY + 1))[0])


def _chunk_max(scores_t: np.ndarray, chunk: int) -> np.ndarray:
    """(ceil(w / chunk), m): each chunk's maximum per query (the last chunk may be shorter).
    The one pass over every score the selection makes, split over the CPUs (numpy releases
    the GIL in reductions)."""
    w, m = scores_t.shape
    n_full, tail = divmod(w, chunk)
    cmax = np.empty((n_full + (tail > 0), m), np.float32)

    fold = m < FOLD_BELOW_QUERIES and chunk >= 4 and chunk & (chunk - 1) == 0

    def part(lo: int, hi: int) -> None:
        block = scores_t[lo * chunk: hi * chunk].reshape(hi - lo, chunk, m)
        if not fold:  # numpy's reduction loops run along the m queries: long enough from ~50
            block.max(axis=1, out=cmax[lo:hi])
            return
        half = chunk // 2  # few queries: halve the chunks pairwise, in long loops
        tmp = np.maximum(block[:, :half], block[:, half:])
        while half > 2:
            half //= 2
            np.maximum(tmp[:, :half], tmp[:, half:2 * half], out=tmp[:, :half])
        np.maximum(tmp[:, 0], tmp[:, 1], out=cmax[lo:hi])

    pool = worker_pool() if n_full * chunk * m >= PARALLEL_MIN_SCORES else None
    if pool is not None and n_full >= 2 * WORKERS:
        cuts = np.linspace(0, n_full, WORKERS + 1).astype(int)
        jobs = [pool.submit(part, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        part(cuts[0], cuts[1])
        for job in jobs:
            job.result()
    elif n_full:
        part(0, n_full)
    if tail:
        scores_t[n_full * chunk:].max(axis=0, out=cmax[n_full])
    return cmax


PARALLEL_MIN_SCORES = 1 << 20   # blocks smaller than this are reduced by one thread
FOLD_BELOW_QUERIES = 48        # fewer queries per block: chunk maxima by pairwise halving
GATHER_COST = 16                # a gathered score costs a cache line: 16 x a score read in order


def _select(scores_t: np.ndarray, start: int, state: np.ndarray, thr: np.ndarray, chunk: int) -> None:
    """Fold one block of scores (w rows of the memory x m queries) into the running top-k."""
    w, m = scores_t.shape
    k = state.shape[1]
    empty = np.isneginf(thr)  # queries with no threshold yet (their first block)
    if empty.any() and -(-w // chunk) < k:
        chunk = max(1, w // k)  # finer chunks, so that k of them give a bound
    cmax = _chunk_max(scores_t, chunk)
    if empty.any() and len(cmax) >= k:
        # k chunks reach their k-th largest maximum t, so >= k scores of this block reach t.
        kth = np.partition(cmax[:, empty], len(cmax) - k, axis=0)[len(cmax) - k]
        thr[empty] = np.nextafter(kth, np.float32(-np.inf))
    # (fewer than k chunks: the block holds fewer than k scores, all of them candidates)
    hit = cmax > thr
    n_hit = int(np.count_nonzero(hit))
    if not n_hit:
        return
    flat_scores = scores_t.ravel()
    if n_hit * chunk * GATHER_COST > w * m:
        # Many chunks to look into (early blocks): one contiguous pass over the block is cheaper
        # than gathering chunk columns (each score of a gathered column is a cache line of its own).
        idx = np.flatnonzero(scores_t > thr)
        row, query = np.divmod(idx, m)
        order = np.argsort(query, kind="stable")  # grouped by query, rows ascending
        _merge(state, thr, query[order], flat_scores[idx[order]], row[order] + start)
        return
    q_hit, c_hit = np.nonzero(hit.T)  # grouped by query
    idx = (c_hit * (chunk * m) + q_hit)[:, None] + np.arange(0, chunk * m, m)
    if w % chunk:  # the last chunk is short: what lies past the block is no score
        seg = flat_scores[np.minimum(idx, w * m - 1)]
        seg[idx >= w * m] = -np.inf
    else:
        seg = flat_scores[idx]
    flat = np.flatnonzero(seg > thr[q_hit, None])
    if len(flat):
        pair, offset = np.divmod(flat, chunk)
        _merge(state, thr, q_hit[pair], seg.ravel()[flat], c_hit[pair] * chunk + offset + start)


def topk_inner_product(vectors: np.ndarray, queries: np.ndarray, k: int, *,
                       block_bytes: int = BLOCK_BYTES, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores, positions), each (nq, min(k, N)), best first;
    ties: lower position first. `vectors` (N, d) float32 C-contiguous (not copied)."""
    vectors = _as_matrix(vectors, "vectors")
    queries = _as_matrix(queries, "queries")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("exact search over an empty memory: there is nothing to search")
    if queries.shape[1] != d:
        raise ValueError(f"queries of dimension {queries.shape[1]} cannot search vectors of dimension {d}")
    if n >= _MAX_ROWS:
        raise ValueError(f"{n} vectors: exact search keys hold positions below 2**32")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    k = min(int(k), n)
    nq = len(queries)
    out_s = np.empty((nq, k), np.float32)
    out_p = np.empty((nq, k), np.int64)
    if nq == 0:
        return out_s, out_p
    qb = min(nq, MAX_QUERY_BLOCK)
    rows_per_block = block_rows(n, qb, block_bytes, chunk)
    buf = np.empty(rows_per_block * qb, np.float32)  # reused: no fresh pages per block
    for q0 in range(0, nq, qb):
        q = queries[q0:q0 + qb]
        m = len(q)
        state = np.full((m, k), _MINKEY, np.int64)
        thr = np.full(m, -np.inf, np.float32)
        for start in range(0, n, rows_per_block):
            w = min(rows_per_block, n - start)
            scores_t = buf[: w * m].reshape(w, m)
            np.matmul(vectors[start:start + w], q.T, out=scores_t)
            _select(scores_t, start, state, thr, chunk)
        out_s[q0:q0 + m], out_p[q0:q0 + m] = _decode(np.sort(state, axis=1)[:, ::-1])
    return out_s, out_p


def block_rows(n: int, n_queries: int, block_bytes: int = BLOCK_BYTES, chunk: int = CHUNK) -> int:
    """Stored vectors per GEMM block for a query block of `n_queries`: a multiple of `chunk`
    whose scores fill about `block_bytes`, no more than the memory holds."""
    rows = max(chunk, block_bytes // (4 * max(1, n_queries)) // chunk * chunk)
    return min(rows, -(-n // chunk) * chunk)


def _as_matrix(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array, not shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


class FlatSearcher:
    """Exact search over a fixed memory: `vectors` (N, d) in position order, `ids` (N,) the
    vector id of each position. `keepalive`: an object owning the memory `vectors` views
    (a FAISS index), held as long as this searcher is."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, keepalive=None):
        self.vectors = _as_matrix(vectors, "vectors")
        self.ids = None if ids is None else np.asarray(ids, np.int64)
        if self.ids is not None and len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} ids for {len(self.vectors)} vectors")
        # Holes (id -1: a forgotten vector erased in a copy held in memory) are searched past.
        self.holes = 0 if self.ids is None else int(np.count_nonzero(self.ids == -1))
        self._keepalive = keepalive

    @classmethod
    def from_faiss(cls, index) -> "FlatSearcher":
        """A searcher reading a flat FAISS index's own storage (IndexFlatIP, optionally under
        IndexIDMap/IndexIDMap2): positions map to the index's ids."""
        import faiss

        index = faiss.downcast_index(index)
        ids = None
        inner = index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            inner = faiss.downcast_index(index.index)
        if not is_flat_ip(inner):
            raise TypeError(f"{type(inner).__name__} is not a flat inner-product index")
        n, d = inner.ntotal, inner.d
        vectors = (faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n
                   else np.empty((0, d), np.float32))
        return cls(vectors, ids, keepalive=index)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def d(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (nq, min(k, N)), best first."""
        if self.holes:
            return self._past_holes(queries, k)
        sims, pos = topk_inner_product(self.vectors, queries, k)
        if self.ids is None:
            return sims, pos
        return sims, np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)

    def _past_holes(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best that are not holes: k + holes searched, the holes dropped (each row keeps
        its order)."""
        k = min(k, len(self.vectors) - self.holes)
        sims, pos = topk_inner_product(self.vectors, queries, min(k + self.holes, len(self.vectors)))
        ids = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        keep = ids != -1
        first = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept slots, in order
        return np.take_along_axis(sims, first, 1), np.take_along_axis(ids, first, 1)


def is_flat_ip(index) -> bool:
    """A FAISS IndexFlat scoring by inner product (IndexFlatIP), not wrapped."""
    import faiss

    index = faiss.downcast_index(index)
    return isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT


def flat_searcher(index) -> FlatSearcher | None:
    """The fast exact searcher for a flat inner-product index (bare or under an id map), else None."""
    import faiss

    top = faiss.downcast_index(index)
    inner = faiss.downcast_index(top.index) if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)) else top
    return FlatSearcher.from_faiss(top) if is_flat_ip(inner) and top.ntotal > 0 else None


class FaissSearcher:
    """FAISS's own search of an index: for kinds with no faster searcher of their own."""

    def __init__(self, index):
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)
