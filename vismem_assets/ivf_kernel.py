"""The compiled inner loop of list-batched IVF-Flat search (ivf_search.py).

For each inverted list, every stored vector is read once and scored against all the queries of
the call that probe that list, four at a time, each score going into its (query, list) pair's
heap of the k best. FAISS's scan and a narrow matrix product both read a list once per query
(or pack it first); here a list costs one pass from memory however many queries probe it.

Compiled by numba on first use (a few seconds) and cached on disk beside this file
(`__pycache__`, or numba's user cache where that is read-only); `scripts/setup.sh` compiles it
once so that the first search does not wait. Sums may be reordered and fused into SIMD
multiply-adds (fastmath "reassoc", "contract": no assumptions about infinities or NaN), so a
score can differ from FAISS's in the last bits (~1e-7), never by more.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FAST = {"reassoc", "contract"}
CHUNK = 64  # vectors scored before their heaps are updated


@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a pointer: FAISS's lists are handed over as the addresses of their
    codes and ids (no copy; a read-only mapping is fine, nothing is written there)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@numba.njit(inline="always", fastmath=_FAST)
def _push(heap_s, heap_i, score, vid):
    """Replace the root of a min-heap (its k-th best) by (score, vid) and sift it down."""
    k = len(heap_s)
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and heap_s[child + 1] < heap_s[child]:
            child += 1
        if heap_s[child] >= score:
            break
        heap_s[pos], heap_i[pos] = heap_s[child], heap_i[child]
        pos = child
    heap_s[pos], heap_i[pos] = score, vid


@numba.njit(inline="always", fastmath=_FAST)
def _dots(xv, q, out):
    """out[j] = <xv, q[j]> for every row of q, four rows at a time (one pass over xv for four)."""
    m, d = q.shape
    j = 0
    while j + 4 <= m:
        q0, q1, q2, q3 = q[j], q[j + 1], q[j + 2], q[j + 3]  # (rows, not q[j, t]: that does not vectorise)
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for t in range(d):
            xt = xv[t]
            s0 += xt * q0[t]
            s1 += xt * q1[t]
            s2 += xt * q2[t]
            s3 += xt * q3[t]
        out[j], out[j + 1], out[j + 2], out[j + 3] = s0, s1, s2, s3
        j += 4
    while j < m:
        qj = q[j]
        s = np.float32(0.0)
        for t in range(d):
            s += xv[t] * qj[t]
        out[j] = s
        j += 1


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def scan_lists(lists, code_addresses, id_addresses, sizes, queries, list_start, pair_query, thresholds, out_s, out_i):
    """For each list l in `lists`: rows list_start[l]:list_start[l + 1] of out_s / out_i are the
    heaps (min-heaps, root first) of the pairs (query pair_query[row], list l); every vector of
    the list is offered to each of them. The heaps come in initialised (FAISS's padding).

    thresholds[query]: the best k-th similarity of the query's pairs done so far (a lower bound
    on its final k-th best: k vectors at least that good are held). A pair's heap starts full of
    placeholders (id -1) at it, so only vectors that can still matter are pushed. Threads update
    it without a lock: a lost update only leaves a lower, still valid, bound."""
    d = queries.shape[1]
    for l in lists:
        first, end, n = list_start[l], list_start[l + 1], sizes[l]
        if end == first or n == 0:
            continue
        x = numba.carray(_pointer(code_addresses[l]), (n, d), np.float32)
        ids = numba.carray(_pointer(id_addresses[l]), (n,), np.int64)
        m = end - first
        q = np.empty((m, d), np.float32)  # this list's queries, side by side (they stay in L1/L2)
        for j in range(m):
            q[j] = queries[pair_query[first + j]]
        roots = np.empty(m, np.float32)  # each heap's k-th best: a vector must beat it to get in
        for j in range(m):
            bound = thresholds[pair_query[first + j]]
            if bound > out_s[first + j, 0]:
                out_s[first + j, :] = bound
            roots[j] = out_s[first + j, 0]
        scores = np.empty((CHUNK, m), np.float32)
        for start in range(0, n, CHUNK):
            # Scores of a chunk of vectors first, heaps after: the branches and stores of the heaps
            # kept out of the SIMD loop (inline, they halve its speed).
            rows = min(CHUNK, n - start)
            for v in range(rows):
                _dots(x[start + v], q, scores[v])
            for j in range(m):
                row, root = first + j, roots[j]
                for v in range(rows):
                    if scores[v, j] > root and ids[start + v] >= 0:  # (-1: a hole a forget left)
                        _push(out_s[row], out_i[row], scores[v, j], ids[start + v])
                        root = out_s[row, 0]
                roots[j] = root
        for j in range(m):
            query = pair_query[first + j]
            thresholds[query] = max(thresholds[query], roots[j])


def compile_now() -> None:
    """Compile (or load from the disk cache) the kernel for the types ivf_search passes."""
    one = np.zeros(1, np.int64)
    scan_lists(one[:0], one, one, one, np.zeros((1, 4), np.float32), np.zeros(2, np.int64), one,
               np.zeros(1, np.float32), np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64))
