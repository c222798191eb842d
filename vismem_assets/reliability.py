"""Reliability of memory samples, the statistic behind pruning (Geirhos et al. 2024).

v[j] = how many other memory samples s hold j among their k nearest neighbours
(leave-one-out) while label[s] != label[j]. A sample that keeps turning up as a wrong-label
neighbour is probably mislabelled or ambiguous: soft pruning scales its vote by
1.75 / (1 + v), hard pruning drops it when v >= threshold (the paper: k = 10 soft, 100 hard).

Incremental by default (DESIGN invariant 5). Each sample keeps its top-k and so its k-th
similarity `kth`. Adding a vector x changes the top-k of s only if sim(s, x) beats kth[s], so
only those rows are merged (old top-k with the new vectors: exact, no re-query); forgetting
re-queries only the rows whose top-k held a forgotten sample. v moves by the contributions of
the rows that changed.

Exactness: incremental must equal a full pass bit for bit, but float32 BLAS dot products
differ in their last bits with the batch shape and code path (faiss even switches kernels
below 20 queries), which would flip near-ties. So the similarity that ranks is canonical: the
float64 products of the float32 inputs (exact) summed by a fixed tree and rounded to float32,
a function of the two vectors alone. The fast float32 search only proposes candidates; a row
is accepted when its k-th canonical similarity beats everything the search could have left
out by more than the float32 error bound, else it is redone against the whole memory.
Order: higher similarity first; equal similarity, lower vector id first. Rows of a memory
smaller than k + 1 are padded with neighbour -1 and similarity -inf.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from .atomic import atomic_path
from .search import topk_inner_product

SOFT_K = 10
HARD_K = 100
SOFT_GAMMA = 1.75
BLOCK_BYTES = 256 << 20  # the largest similarity block materialised at once
PAIR_BYTES = 32 << 20  # working memory of the canonical re-scoring
K_METADATA = "vismem.reliability.k"
EXHAUSTIVE_BELOW = 256  # fewer queries than this: one numpy block, no candidate search first

VectorsOf = Callable[[np.ndarray], np.ndarray]


@dataclass
class Reliability:
    k: int
    vector_ids: np.ndarray  # (N,) int64, sorted ascending
    labels: np.ndarray  # (N,) int64 label codes
    neighbors: np.ndarray  # (N, k) int64 vector ids, best first; -1 = none
    similarities: np.ndarray  # (N, k) float32 canonical similarities, descending; -inf = none
    v: np.ndarray  # (N,) int64

    @property
    def kth(self) -> np.ndarray:
        """Per-sample threshold: a new vector x enters the top-k of s only if sim(s, x) > kth[s]
        (or equals it and x has the lower vector id)."""
        return self.similarities[:, -1]

    def __len__(self) -> int:
        return len(self.vector_ids)


def soft_weights(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    return np.where(v > 0, SOFT_GAMMA / (1.0 + v.astype(np.float64)), 1.0)


def hard_weights(v: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(np.asarray(v) >= threshold, 0.0, 1.0)


def equal(a: Reliability, b: Reliability) -> bool:
    """Bit-for-bit the same statistics (what incremental updates promise against a full pass)."""
    return (a.k == b.k and np.array_equal(a.vector_ids, b.vector_ids) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.neighbors, b.neighbors) and np.array_equal(a.similarities, b.similarities)
            and np.array_equal(a.v, b.v))


# --- similarity -------------------------------------------------------------------------------

def canonical_similarity(a: np.ndarray, a_rows: np.ndarray, b: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
    """float32 <a[a_rows[p]], b[b_rows[p]]> for each pair p, independent of how pairs are batched:
    float64 products of float32 values are exact, the halving tree adds them in an order fixed
    by d alone, and the float32 rounding is deterministic."""
    n, d = len(a_rows), a.shape[1]
    out = np.empty(n, np.float32)
    step = max(1, PAIR_BYTES // (8 * max(d, 1)))
    for s in range(0, n, step):
        prod = a[a_rows[s:s + step]].astype(np.float64)
        prod *= b[b_rows[s:s + step]]
        w = d
        while w > 1:
            h = w // 2
            prod[:, :h] += prod[:, w - h:w]
            w -= h
        out[s:s + step] = prod[:, 0] if d else 0.0
    return out


def _tolerance(vectors: np.ndarray) -> float:
    """Twice the worst-case gap between a float32 dot product (any summation order) and the
    canonical similarity: d * 2^-24 * |a| |b| for the sum, half an ulp for the rounding."""
    if not len(vectors):
        return 0.0
    norm2 = float(np.max(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)))
    return (vectors.shape[1] + 2) * 2.0 ** -23 * max(norm2, 1.0)


def _margin(k: int) -> int:
    """Extra candidates per row, so the float32 search rarely has to be redone."""
    return 4 + k // 8


def _select(n: int, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k (row, col, sim) entries per row in the canonical order; cols are positions in an
    array sorted by vector id, so the lower position is the lower id. Padded with (-1, -inf)."""
    order = np.lexsort((cols, -sims, rows))
    rows, cols, sims = rows[order], cols[order], sims[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(n))[rows]
    keep = rank < k
    pos = np.full((n, k), -1, np.int64)
    sim = np.full((n, k), -np.inf, np.float32)
    pos[rows[keep], rank[keep]] = cols[keep]
    sim[rows[keep], rank[keep]] = sims[keep]
    return pos, sim


def _exhaustive(q_pos: np.ndarray, db: np.ndarray, k: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the db rows q_pos among all other db rows: everything within 2 tol of the
    float32 k-th best is re-scored canonically. For few queries, tiny memories, and the rows
    the candidate search could not settle."""
    n_db = len(db)
    pos = np.empty((len(q_pos), k), np.int64)
    sim = np.empty((len(q_pos), k), np.float32)
    step = max(1, BLOCK_BYTES // (4 * n_db))
    for s in range(0, len(q_pos), step):
        qp = q_pos[s:s + step]
        scores = db[qp] @ db.T
        scores[np.arange(len(qp)), qp] = -np.inf
        kth = np.partition(scores, max(n_db - k, 0), axis=1)[:, max(n_db - k, 0)]  # -inf if n_db <= k
        keep = scores >= (kth - 2 * tol)[:, None]
        keep[np.arange(len(qp)), qp] = False
        rows, cols = np.nonzero(keep)
        pos[s:s + step], sim[s:s + step] = _select(len(qp), rows, cols, canonical_similarity(db, qp[rows], db, cols), k)
    return pos, sim


def _topk(q_pos: np.ndarray, db: np.ndarray, k: int, batch: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact canonical top-k of the db rows q_pos among the other db rows, as db positions.
    db must be sorted by vector id (ties go to the lower position)."""
    n_db, n = len(db), len(q_pos)
    kk = k + _margin(k) + 1
    if n == 0 or n_db < 2:
        return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
    if n < EXHAUSTIVE_BELOW or n_db <= kk:
        return _exhaustive(q_pos, db, k, tol)
    pos = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float32)
    redo = []
    for s in range(0, n, batch):
        qp = q_pos[s:s + batch]
        scores, found = topk_inner_product(db, db[qp], kk)
        rows = np.repeat(np.arange(len(qp)), kk)
        cols = found.ravel().astype(np.int64)
        ok = (cols >= 0) & (cols != np.repeat(qp, kk))
        rows, cols = rows[ok], cols[ok]
        p, m = _select(len(qp), rows, cols, canonical_similarity(db, qp[rows], db, cols), k)
        pos[s:s + batch], sim[s:s + batch] = p, m
        # Whatever the search left out scored <= its last result in float32, so at most
        # tol above it canonically: the row is settled if its k-th beats that.
        redo.append(s + np.flatnonzero(~(m[:, -1] > scores[:, -1] + tol)))
    redo = np.concatenate(redo)
    if len(redo):
        pos[redo], sim[redo] = _exhaustive(q_pos[redo], db, k, tol)
    return pos, sim


def _contributions(labels: np.ndarray, owners: np.ndarray, neighbor_pos: np.ndarray, n: int) -> np.ndarray:
    """How often each position appears, with a label other than its owner row's, in these lists."""
    valid = neighbor_pos >= 0
    targets = neighbor_pos[valid]
    owner = np.broadcast_to(owners[:, None], neighbor_pos.shape)[valid]
    wrong = labels[targets] != labels[owner]
    return np.bincount(targets[wrong], minlength=n).astype(np.int64)


def _ids(vector_ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.where(pos >= 0, vector_ids[np.maximum(pos, 0)], -1) if len(vector_ids) else pos.copy()


def _positions(vector_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ids in the sorted vector_ids; -1 for -1 and for ids not there."""
    at = np.searchsorted(vector_ids, ids)
    found = (ids >= 0) & (at < len(vector_ids))
    found[found] = vector_ids[at[found]] == ids[found]
    return np.where(found, at, -1)


def _as_vectors(vectors, n: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != n:
        raise ValueError(f"expected {n} vectors as an (n, d) array, got shape {vectors.shape}")
    return vectors


# --- full and incremental passes --------------------------------------------------------------

def compute(vector_ids, vectors, labels, k: int, batch: int = 4096) -> Reliability:
    """Full leave-one-out pass: every sample searched against all others (exact inner product
    on unit vectors), the top k kept, v counted."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    vector_ids = np.asarray(vector_ids, np.int64)
    vectors = _as_vectors(vectors, len(vector_ids))
    labels = np.asarray(labels, np.int64)
    order = np.argsort(vector_ids, kind="stable")
    ids, vecs, labs = vector_ids[order], vectors[order], labels[order]
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        raise ValueError("vector ids must be unique")
    n = len(ids)
    pos, sim = _topk(np.arange(n), vecs, k, batch, _tolerance(vecs))
    v = _contributions(labs, np.arange(n), pos, n)
    return Reliability(k, ids, labs, _ids(ids, pos), sim, v)


def add(rel: Reliability, new_ids, new_vectors, new_labels, vectors_of: VectorsOf,
        batch: int = 4096) -> tuple[Reliability, dict]:
    """Update after adding samples. Existing rows are merged only where a new vector beats their
    k-th similarity (found with one N x m similarity pass in blocks); new rows get a real search
    against everything. `vectors_of(ids)` returns the stored vectors of existing samples."""
    t0 = time.perf_counter()
    k, n_old = rel.k, len(rel)
    new_ids = np.asarray(new_ids, np.int64)
    m = len(new_ids)
    new_vectors = _as_vectors(new_vectors, m)
    new_labels = np.asarray(new_labels, np.int64)
    if len(np.unique(new_ids)) != m:
        raise ValueError("new vector ids must be unique")
    if np.isin(new_ids, rel.vector_ids).any():
        raise ValueError(f"{int(np.isin(new_ids, rel.vector_ids).sum())} new vector ids are already in the memory")
    if m == 0:
        return _copy(rel), {"n_touched": 0, "n_checked": 0, "n_new": 0, "seconds": time.perf_counter() - t0}
    old_vecs = _as_vectors(vectors_of(rel.vector_ids), n_old) if n_old else np.empty((0, new_vectors.shape[1]), np.float32)
    if n_old and old_vecs.shape[1] != new_vectors.shape[1]:
        raise ValueError(f"new vectors have dimension {new_vectors.shape[1]}, the memory {old_vecs.shape[1]}")

    ids = np.concatenate([rel.vector_ids, new_ids])
    order = np.argsort(ids, kind="stable")
    at = np.empty_like(order)
    at[order] = np.arange(len(order))  # union position of each old, then new, sample
    old_at, new_at = at[:n_old], at[n_old:]
    all_ids = ids[order]
    all_vecs = np.concatenate([old_vecs, new_vectors])[order]
    all_labels = np.concatenate([rel.labels, new_labels])[order]
    n = len(all_ids)
    tol = _tolerance(all_vecs)

    # Existing rows a new vector may enter: float32 score within tol of the row's k-th.
    kth = rel.kth
    rows, cols = [], []
    step = max(1, BLOCK_BYTES // (4 * m))
    for s in range(0, n_old, step):
        block = old_vecs[s:s + step] @ new_vectors.T
        r, c = np.nonzero(block >= (kth[s:s + step] - tol)[:, None])
        rows.append(r + s)
        cols.append(c)
    rows = np.concatenate(rows) if rows else np.empty(0, np.int64)
    cols = np.concatenate(cols) if cols else np.empty(0, np.int64)
    checked = np.unique(rows)

    old_pos = np.where(rel.neighbors >= 0, at[np.maximum(_positions(rel.vector_ids, rel.neighbors), 0)], -1)
    neighbor_pos = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    neighbor_pos[old_at], sims[old_at] = old_pos, rel.similarities
    v = np.zeros(n, np.int64)
    v[old_at] = rel.v

    # Merge: best k of (old top-k, entering new vectors), in the same canonical order.
    before = old_pos[checked]
    have = before >= 0
    local = np.broadcast_to(np.arange(len(checked))[:, None], before.shape)
    merged_pos, merged_sim = _select(
        len(checked),
        np.concatenate([local[have], np.searchsorted(checked, rows)]),
        np.concatenate([before[have], new_at[cols]]),
        np.concatenate([rel.similarities[checked][have], canonical_similarity(old_vecs, rows, new_vectors, cols)]),
        k)
    changed = (merged_pos != before).any(axis=1)
    touched = checked[changed]
    v -= _contributions(all_labels, old_at[touched], before[changed], n)
    neighbor_pos[old_at[touched]], sims[old_at[touched]] = merged_pos[changed], merged_sim[changed]
    v += _contributions(all_labels, old_at[touched], merged_pos[changed], n)

    # New rows: a real search against the whole (grown) memory.
    new_pos, new_sim = _topk(new_at, all_vecs, k, batch, tol)
    neighbor_pos[new_at], sims[new_at] = new_pos, new_sim
    v += _contributions(all_labels, new_at, new_pos, n)

    out = Reliability(k, all_ids, all_labels, _ids(all_ids, neighbor_pos), sims, v)
    return out, {"n_touched": int(len(touched)), "n_checked": int(len(checked)), "n_new": int(m),
                 "seconds": time.perf_counter() - t0}


def remove(rel: Reliability, removed_ids, vectors_of: VectorsOf, batch: int = 4096) -> tuple[Reliability, dict]:
    """Update after forgetting: `drop`, then `refill` (the rows whose top-k held a removed
    sample, and any a drop left before, searched again). Ids not in the memory are ignored."""
    t0 = time.perf_counter()
    dropped, stats = drop(rel, removed_ids)
    out, refilled = refill(dropped, vectors_of, batch)
    return out, {"n_removed": stats["n_removed"], "n_requeried": refilled["n_requeried"],
                 "seconds": time.perf_counter() - t0}


def drop(rel: Reliability, removed_ids) -> tuple[Reliability, dict]:
    """The removed rows and their contributions go, and so do the removed samples from the other
    rows' top-k: each such row keeps its other neighbours, best first, and a hole at the end
    (neighbour -1, similarity -inf) until `refill` searches it again. No vector and no search:
    what a forget does at once (the statistics keep no trace of a forgotten sample)."""
    t0 = time.perf_counter()
    gone = np.isin(rel.vector_ids, np.asarray(removed_ids, np.int64))
    if not gone.any():
        return _copy(rel), {"n_removed": 0, "n_holed": 0, "seconds": time.perf_counter() - t0}
    keep = ~gone
    gone_rows = np.flatnonzero(gone)
    # A kept row's contributions stay (its kept neighbours are still among its best), a removed row's go.
    lost = _contributions(rel.labels, gone_rows, _positions(rel.vector_ids, rel.neighbors[gone_rows]), len(rel))
    # In id space: positions of every neighbour (a binary search each: seconds at 10^7) are not needed.
    neighbors = rel.neighbors[keep]
    holed = np.isin(neighbors, rel.vector_ids[gone])
    # the holes to the end of each row, the rest in their order (a stable sort on "is a hole")
    order = np.argsort(holed, axis=1, kind="stable")
    neighbors = np.take_along_axis(np.where(holed, -1, neighbors), order, axis=1)
    sims = np.take_along_axis(np.where(holed, np.float32(-np.inf), rel.similarities[keep]), order, axis=1)
    out = Reliability(rel.k, rel.vector_ids[keep], rel.labels[keep], neighbors, sims, (rel.v - lost)[keep])
    return out, {"n_removed": int(gone.sum()), "n_holed": int(holed.any(axis=1).sum()),
                 "seconds": time.perf_counter() - t0}


def unfilled(rel: Reliability) -> np.ndarray:
    """Rows with fewer neighbours than the memory has for them (holes a `drop` left)."""
    want = min(rel.k, max(len(rel) - 1, 0))
    return np.flatnonzero((rel.neighbors >= 0).sum(axis=1) < want)


def refill(rel: Reliability, vectors_of: VectorsOf, batch: int = 4096) -> tuple[Reliability, dict]:
    """The rows with holes searched again against the memory (`vectors_of` its vectors), their
    old contributions replaced by the new ones: what a full pass would give them."""
    t0 = time.perf_counter()
    rows = unfilled(rel)
    if not len(rows):
        return _copy(rel), {"n_requeried": 0, "seconds": time.perf_counter() - t0}
    ids, n = rel.vector_ids, len(rel)
    v = rel.v - _contributions(rel.labels, rows, _positions(ids, rel.neighbors[rows]), n)
    vecs = _as_vectors(vectors_of(ids), n)
    pos, sim = _topk(rows, vecs, rel.k, batch, _tolerance(vecs))
    neighbors, sims = rel.neighbors.copy(), rel.similarities.copy()
    neighbors[rows], sims[rows] = _ids(ids, pos), sim
    v += _contributions(rel.labels, rows, pos, n)
    return (Reliability(rel.k, ids, rel.labels.copy(), neighbors, sims, v),
            {"n_requeried": int(len(rows)), "seconds": time.perf_counter() - t0})


def relabel(rel: Reliability, ids, new_labels) -> tuple[Reliability, dict]:
    """Update after a label change (vectors unchanged, so no neighbour list moves): only the
    rows whose own label changed or whose top-k holds a relabelled sample count differently,
    so v moves by their contributions under the new labels minus those under the old. Needs
    no vectors and no search. Ids not in the memory are ignored."""
    t0 = time.perf_counter()
    pos = _positions(rel.vector_ids, np.asarray(ids, np.int64))
    new_labels = np.asarray(new_labels, np.int64)[pos >= 0]
    pos = pos[pos >= 0]
    changed = pos[rel.labels[pos] != new_labels]
    new_labels = new_labels[rel.labels[pos] != new_labels]
    out = _copy(rel)
    if not len(changed):
        return out, {"n_relabelled": 0, "n_rows": 0, "seconds": time.perf_counter() - t0}
    n = len(rel)
    is_changed = np.zeros(n, bool)
    is_changed[changed] = True
    neighbor_pos = _positions(rel.vector_ids, rel.neighbors)
    holds = ((neighbor_pos >= 0) & is_changed[np.maximum(neighbor_pos, 0)]).any(axis=1)
    rows = np.flatnonzero(holds | is_changed)  # the relabelled rows and the rows whose neighbourhood holds one
    out.v -= _contributions(rel.labels, rows, neighbor_pos[rows], n)
    out.labels[changed] = new_labels
    out.v += _contributions(out.labels, rows, neighbor_pos[rows], n)
    return out, {"n_relabelled": int(len(changed)), "n_rows": int(len(rows)), "seconds": time.perf_counter() - t0}


def _copy(rel: Reliability) -> Reliability:
    return Reliability(rel.k, rel.vector_ids.copy(), rel.labels.copy(), rel.neighbors.copy(),
                       rel.similarities.copy(), rel.v.copy())


# --- files ------------------------------------------------------------------------------------

def save(rel: Reliability, path: Path) -> Path:
    """One parquet file (k in the file metadata and in the array width), written atomically."""
    k = rel.k
    frame = pl.DataFrame({
        "vector_id": pl.Series(rel.vector_ids, dtype=pl.Int64),
        "label": pl.Series(rel.labels, dtype=pl.Int64),
        "neighbors": pl.Series(rel.neighbors.reshape(-1, k), dtype=pl.Array(pl.Int64, k)),
        "similarities": pl.Series(rel.similarities.reshape(-1, k), dtype=pl.Array(pl.Float32, k)),
        "v": pl.Series(rel.v, dtype=pl.Int64),
    })
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, metadata={K_METADATA: str(k)})
    return path


def load(path: Path) -> Reliability:
    k = int(pl.read_parquet_metadata(path)[K_METADATA])
    frame = pl.read_parquet(path)
    n = len(frame)

    def matrix(column: str, dtype) -> np.ndarray:
        return np.ascontiguousarray(frame[column].to_numpy(), dtype=dtype).reshape(n, k) if n else np.empty((0, k), dtype)

    return Reliability(k, frame["vector_id"].to_numpy().astype(np.int64), frame["label"].to_numpy().astype(np.int64),
                       matrix("neighbors", np.int64), matrix("similarities", np.float32),
                       frame["v"].to_numpy().astype(np.int64))
