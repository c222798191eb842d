"""The inverted-file kinds: IVF-Flat, IVF-SQ8 and IVF-PQ (inner product), trained on the
memory's own vectors and kept only if they are good enough *on those vectors*.

From `ivf_from` vectors (policy `auto`: IVF-Flat), or when asked for (`ivf-flat`, `ivf-sq8`,
`ivf-pq`), a build trains an inverted-file index on a sample of the memory's vectors:

* a held-out sample (vectors not used for training) is searched exactly and approximately,
  each query's own id left out, and recall@10 / recall@100 are measured;
* `nprobe` (lists visited per query) doubles from 1 until recall@10 reaches `recall_floor`,
  then is bisected back to the smallest that does, which is stored in the index file (FAISS
  serialises it);
* if no nprobe up to a quarter of the lists reaches the floor, or the approximate index is
  not faster than exact search, the memory stays exact (the flat kind) and the build report
  says why.

Recall depends entirely on the data: on weakly clustered vectors IVF recall@10 stays low even
at high nprobe, which is why it is measured and never assumed.

IVF indexes carry a hash-table direct map, so forgetting removes ids without scanning every
list; searching processes read them memory-mapped, searched list by list for large batches
(ivf_search.py), holes skipped. A base is one file (its inverted lists are one structure): it
ends with its lists, list by list [codes][ids], and its header holds the direct map as
(id, list << 32 | offset) pairs; a hole is a zero code with id -1 (its list stays: the cell its
vector fell in), and its pair becomes (-1, -1).
"""
from __future__ import annotations

import math
import re
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..ivf_search import ivf_searcher
from ..patches import HOLE_ID, HOLE_ID_BYTES, Holes, LayoutError, Patch, is_target
from ..search import FaissSearcher, topk_inner_product
from .flat import FACTORY as FLAT_FACTORY, flat_index
from .report import BuildReport

if TYPE_CHECKING:
    from ..index_types import IndexPolicy

HELD_OUT = 1000          # queries that measure recall at build time (fewer in small memories)
TRAIN_PER_LIST = 48      # training vectors per inverted list (FAISS warns below 39)
PQ_TRAIN = 256 * 40      # PQ's 256 centroids per sub-quantizer want about as many again
KMEANS_ITERATIONS = 12
_HOLE_PAIR = np.array([HOLE_ID, HOLE_ID], np.int64).tobytes()


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted-file index inside `index` (downcast), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


class IVFKind:
    """One inverted-file kind; `codes` says how its lists store a vector: Flat (float32), SQ8
    (a byte a dimension) or PQ (`pq_bytes` sub-quantizer codes)."""
    map_for_search = True

    def __init__(self, name: str, index_class: type, codes: str):
        self.name, self._class, self._codes = name, index_class, codes

    def recognises(self, index: faiss.Index) -> bool:
        ivf = ivf_of(index)
        return ivf is not None and isinstance(ivf, self._class)

    def describes(self, index_type: str) -> bool:
        return re.fullmatch(rf"IVF\d+,{self._codes}", index_type) is not None

    def describe(self, index: faiss.Index) -> str:
        """A FAISS factory-style name: IVF1024,Flat / IVF1024,SQ8 / IVF1024,PQ48."""
        ivf = ivf_of(index)
        return f"IVF{ivf.nlist},{f'PQ{ivf.pq.M}' if self._codes.startswith('PQ') else self._codes}"

    def build(self, vector_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy) -> tuple[faiss.Index, BuildReport]:
        """This kind trained, filled and recall-checked on these vectors; or, where there are
        too few to train and check it, or it does not pass (choose_nprobe), the exact index."""
        n = len(vectors)
        nlist = nlist_for(n)
        queries_at, train_at = held_out_and_training(n, self.name, nlist)
        if nlist < 4 or len(queries_at) < 20:
            return flat_index(vector_ids, vectors), BuildReport(
                "flat", FLAT_FACTORY, f"exact: {n:,} vectors are too few to train and check {self.name}", self.name)
        t0 = time.perf_counter()
        index = train_ivf(self.name, vectors[np.sort(train_at)], nlist, policy.pq_bytes)
        fill(index, vector_ids, vectors)
        report = BuildReport(self.name, self.describe(index), "", self.name, nlist=nlist, n_held_out=len(queries_at),
                             n_train=len(train_at), train_seconds=round(time.perf_counter() - t0, 3))
        choose_nprobe(index, vector_ids, vectors, queries_at, policy.recall_floor, report)
        if report.nprobe is None:
            return flat_index(vector_ids, vectors), report
        return index, report

    def nprobe(self, index: faiss.Index) -> int:
        return ivf_of(index).nprobe

    def ids(self, index: faiss.Index) -> np.ndarray:
        return _list_ids(ivf_of(index))

    def exact_vectors(self, index: faiss.Index) -> None:
        return None  # (quantised, or in lists: the embedding files hold the exact vectors)

    def shards(self, index: faiss.Index, shard_bytes: int) -> list[faiss.Index]:
        return [index]

    def drop(self, index: faiss.Index, vector_ids: np.ndarray) -> None:
        """Remove these ids (holes among them). The hash-table direct map only removes listed
        ids, and holes share one: it goes for that, and comes back rebuilt from the lists."""
        ivf = ivf_of(index)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        index.remove_ids(faiss.IDSelectorBatch(np.asarray(vector_ids, np.int64)))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def lazy_from(self, path: Path, index: faiss.Index) -> int:
        ivf = ivf_of(index)   # the file ends with its lists
        entries = sum(ivf.invlists.list_size(l) for l in range(ivf.nlist))
        return path.stat().st_size - entries * (ivf.code_size + 8)

    def searcher(self, index: faiss.Index, holes: int):
        return ivf_searcher(index, holes=holes > 0) or FaissSearcher(index)

    def holes(self, path: Path, index: faiss.Index, targets: np.ndarray, holes_too: bool) -> Holes:
        return _ivf_holes(path, ivf_of(index), targets, holes_too)


IVF_FLAT = IVFKind("ivf-flat", faiss.IndexIVFFlat, "Flat")
IVF_SQ8 = IVFKind("ivf-sq8", faiss.IndexIVFScalarQuantizer, "SQ8")
IVF_PQ = IVFKind("ivf-pq", faiss.IndexIVFPQ, r"PQ\d+")


def _list_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    """The ids of an IVF index, list by list (holes: -1)."""
    lists = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = lists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(lst), size).astype(np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def nlist_for(n: int) -> int:
    """About 2 sqrt(n) lists (a power of two), fewer where n cannot train that many."""
    target = 2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 1)))
    trainable = 2 ** int(math.log2(max(n // TRAIN_PER_LIST, 1)))
    return int(max(1, min(target, trainable, 1 << 16)))


def training_size(kind: str, nlist: int) -> int:
    """Vectors to train on: enough for the coarse lists, and for PQ's codebooks too."""
    return max(TRAIN_PER_LIST * nlist, PQ_TRAIN if kind == "ivf-pq" else 0)


def pq_bytes_for(d: int, wanted: int | None) -> int:
    """Sub-quantizers of the PQ code: a divisor of d (FAISS needs one), about d / 8 by default."""
    target = wanted or max(1, d // 8)
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), m))


def held_out_and_training(n: int, kind: str, nlist: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the held-out vectors that measure recall (up to HELD_OUT, a tenth of a small
    memory) and of the training sample, disjoint, drawn at random."""
    order = np.random.default_rng(seed).permutation(n)
    held_out = min(HELD_OUT, n // 10)
    return order[:held_out], order[held_out:held_out + training_size(kind, nlist)]


def fill(index: faiss.IndexIVF, vector_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add the vectors to a trained IVF index and give it the hash-table direct map that makes
    removing ids cheap."""
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(vector_ids, np.int64))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)


def train_ivf(kind: str, train: np.ndarray, nlist: int, pq_bytes: int | None = None) -> faiss.IndexIVF:
    """An empty IVF-Flat, IVF-SQ8 or IVF-PQ index (inner product) trained on these vectors."""
    d = train.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf-pq":
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_bytes_for(d, pq_bytes), 8, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf-sq8":  # one byte per dimension, a quarter of IVF-Flat's bytes to scan
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    train = np.ascontiguousarray(train, np.float32)
    # The coarse centroids first, as IVF's own training makes them, then no centroid left a copy
    # of one vector; the codec (SQ8's ranges, PQ's codebooks) trains on the quantizer as it is.
    faiss.Clustering(d, nlist, index.cp).train(train, quantizer)
    centroids = no_copies(quantizer.reconstruct_n(0, nlist), train)
    quantizer.reset()
    quantizer.add(centroids)
    index.train(train)
    index.own_fields = True
    quantizer.this.disown()  # the index owns its quantizer now (kept alive past this frame)
    return index


def no_copies(centroids: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The centroids with none equal to a training vector. k-means leaves a centroid that is a
    copy of a vector wherever a cluster holds that vector alone, and the index file would keep
    the vector's bytes after the vector is forgotten; such a centroid becomes the mean of its
    vector and the nearest other distinct one (the lists it stands for barely move)."""
    flat = faiss.IndexFlatL2(train.shape[1])
    flat.add(train)
    _, nearest = flat.search(centroids, 1)
    copies = np.flatnonzero((nearest[:, 0] >= 0) & np.all(train[np.maximum(nearest[:, 0], 0)] == centroids, axis=1))
    if not len(copies):
        return centroids
    centroids = centroids.copy()
    _, around = flat.search(centroids[copies], min(16, len(train)))
    for c, row in zip(copies, around):
        other = next((j for j in row[1:] if j >= 0 and not np.array_equal(train[j], centroids[c])), None)
        if other is not None:   # else only duplicates of this vector were trained on: they stay stored anyway
            centroids[c] = (centroids[c] + train[other]) / 2
    return centroids


def _without_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The k best ids of each row other than the query's own id (held-out queries are stored
    vectors: finding themselves says nothing about recall)."""
    keep = ids != own[:, None]
    keep[:, -1] &= ~keep.all(axis=1)  # own id not found: drop the last instead
    return ids[keep].reshape(len(ids), -1)[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true neighbours that were found (ids, -1 = none)."""
    k = truth.shape[1]
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if len(hits) else 0.0


def choose_nprobe(index, vector_ids, vectors, queries_at, floor: float, report: BuildReport) -> None:
    """The smallest nprobe whose recall@10 on the held-out vectors (stored ones, each query's own
    id left out) reaches the floor, set on the index and written into the report with what was
    measured; or, where none does or the index is not faster than exact, report.kind "flat"."""
    queries, own = vectors[queries_at], vector_ids[queries_at]
    k_big = min(101, len(vectors))
    t0 = time.perf_counter()
    _, pos = topk_inner_product(vectors, queries, k_big)
    exact_seconds = time.perf_counter() - t0
    truth = _without_own(vector_ids[pos], own, k_big - 1)
    ivf = faiss.extract_index_ivf(index)
    sweep, nprobe = [], 1
    while nprobe <= max(1, ivf.nlist // 4):
        ivf.nprobe = nprobe
        _, got = index.search(queries, 11)
        r10 = recall(_without_own(got, own, 10), truth[:, :10])
        sweep.append((nprobe, round(r10, 4)))
        if r10 >= floor:
            break
        nprobe *= 2
    if sweep[-1][1] >= floor and len(sweep) > 1:
        # Doubling overshoots: bisect between the last nprobe below the floor and the first above.
        low, high = sweep[-2][0], sweep[-1][0]
        while high - low > 1:
            mid = (low + high) // 2
            ivf.nprobe = mid
            _, got = index.search(queries, 11)
            r10 = round(recall(_without_own(got, own, 10), truth[:, :10]), 4)
            sweep.append((mid, r10))
            low, high = (low, mid) if r10 >= floor else (mid, high)
        sweep.sort()
    report.sweep = sweep
    passing = [s for s in sweep if s[1] >= floor]
    best_probe, best = passing[0] if passing else max(sweep, key=lambda s: s[1])
    if best < floor:
        report.kind, report.factory, report.recall_at_10 = "flat", FLAT_FACTORY, best
        report.reason = (f"exact: {report.wanted} reached recall@10 {best:.3f} at best (nprobe {best_probe} of "
                         f"{ivf.nlist} lists) on {len(queries)} held-out vectors, below the floor {floor}")
        return
    ivf.nprobe = best_probe
    t0 = time.perf_counter()
    _, got = index.search(queries, k_big)
    approx_seconds = time.perf_counter() - t0
    speedup = exact_seconds / max(approx_seconds, 1e-9)
    r100 = recall(_without_own(got, own, k_big - 1), truth)
    report.nprobe, report.recall_at_10, report.recall_at_100 = best_probe, best, round(r100, 4)
    report.speedup = round(speedup, 2)
    if speedup <= 1.0:
        report.kind, report.factory, report.nprobe = "flat", FLAT_FACTORY, None
        report.reason = (f"exact: {report.wanted} reached recall@10 {best:.3f} at nprobe {best_probe} but was "
                         f"not faster than exact search ({speedup:.2f}x)")
        return
    report.reason = (f"{report.wanted}: recall@10 {best:.3f} >= floor {floor} at nprobe {best_probe} of {ivf.nlist} "
                     f"lists, {speedup:.1f}x exact search, on {len(queries)} held-out vectors")


# ---- the file's layout, for erasure in place ----------------------------------------

def _ivf_holes(path: Path, ivf, targets: np.ndarray, holes_too: bool) -> Holes:
    code = ivf.code_size
    lists = ivf.invlists
    sizes = np.array([lists.list_size(l) for l in range(ivf.nlist)], np.int64)
    used = np.flatnonzero(sizes)
    size = path.stat().st_size
    list_at = size - int(sizes.sum()) * (code + 8) + np.concatenate([[0], np.cumsum(sizes * (code + 8))[:-1]])
    # Entry j of list l: its code at list_at[l] + j * code, its id at list_at[l] + sizes[l] * code + 8 j.
    lst = np.repeat(used, sizes[used])
    row = np.arange(len(lst)) - np.repeat(np.cumsum(sizes[used]) - sizes[used], sizes[used])
    id_at = list_at[lst] + sizes[lst] * code + 8 * row
    raw = np.memmap(path, np.uint8, mode="r")
    ids = np.concatenate([raw[list_at[l] + sizes[l] * code: list_at[l] + sizes[l] * (code + 8)] for l in used.tolist()]
                         ).view(np.int64) if len(used) else np.empty(0, np.int64)
    del raw
    if not np.array_equal(ids, _list_ids(ivf)):
        raise LayoutError(f"{path}: the inverted lists are not where vismem's IVF files keep them")
    hit = np.flatnonzero(is_target(ids, targets, holes_too))
    patches = [Patch(list_at[lst[hit]] + row[hit] * code, bytes(code)), Patch(id_at[hit], HOLE_ID_BYTES)]
    pairs_at, keys = _direct_map(path, ivf)
    if pairs_at is not None:
        patches.append(Patch(pairs_at + np.flatnonzero(is_target(keys, targets, holes_too)) * 16, _HOLE_PAIR))
    return Holes(ids[hit], tuple(patches))


def _direct_map(path: Path, ivf) -> tuple[int | None, np.ndarray]:
    """(offset of the hash-table pairs, their keys), or (None, []) without a hash table. The IVF
    header: fourcc, index header, nlist, nprobe, the quantizer (a flat index), then the map."""
    if ivf.direct_map.type != faiss.DirectMap.Hashtable:
        return None, np.empty(0, np.int64)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        p = _index_header(head, 0)
        p += 16                                            # nlist, nprobe
        if head[p:p + 4] not in (b"IxFI", b"IxF2"):
            raise LayoutError(f"{path}: the IVF quantizer is not a flat index")
        p = _index_header(head, p)
        f.seek(p)
        (floats,) = struct.unpack("<Q", f.read(8))
        p += 8 + 4 * floats
        f.seek(p)
        kind, n_array = struct.unpack("<BQ", f.read(9))
        p += 9 + 8 * n_array
        f.seek(p)
        (n_pairs,) = struct.unpack("<Q", f.read(8))
    if kind != faiss.DirectMap.Hashtable or n_array or n_pairs != ivf.ntotal:
        raise LayoutError(f"{path}: the IVF direct map is not where vismem's IVF files keep it")
    keys = np.fromfile(path, np.int64, 2 * n_pairs, offset=p + 8)[0::2]
    return p + 8, keys


def _index_header(buf: bytes, p: int) -> int:
    """Skip FAISS's fourcc and index header (d, ntotal, two dummies, is_trained, metric[, arg])."""
    p += 4 + 4 + 8 + 8 + 8 + 1
    (metric,) = struct.unpack_from("<i", buf, p)
    return p + 4 + (4 if metric > 1 else 0)
