"""Index types: exact flat, IVF-Flat, IVF-SQ8 and IVF-PQ, and which one a memory of a given size gets.

Exact flat (`IDMap2,Flat`) is the default and the reference. From `ivf_from` vectors (policy
`auto`: IVF-Flat), or when asked for (`ivf-flat`, `ivf-sq8`, `ivf-pq`), a build trains an
inverted-file index on a sample of the memory's own vectors and keeps it only if it is good
enough *on those vectors*:

* a held-out sample (vectors not used for training) is searched exactly and approximately,
  each query's own id left out, and recall@10 / recall@100 are measured;
* `nprobe` (lists visited per query) doubles from 1 until recall@10 reaches `recall_floor`,
  then is bisected back to the smallest that does, which is stored in the index file (FAISS
  serialises it);
* if no nprobe up to a quarter of the lists reaches the floor, or the approximate index is
  not faster than exact search, the memory stays exact and the build report says why.

Recall depends entirely on the data: on weakly clustered vectors IVF recall@10 stays low even
at high nprobe, which is why it is measured and never assumed.

IVF indexes carry a hash-table direct map, so forgetting removes ids without scanning every
list, and searching processes read them memory-mapped (`Memory.live_index`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from .search import topk_inner_product

KINDS = ("auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq")
HELD_OUT = 1000          # queries that measure recall at build time (fewer in small memories)
TRAIN_PER_LIST = 48      # training vectors per inverted list (FAISS warns below 39)
PQ_TRAIN = 256 * 40      # PQ's 256 centroids per sub-quantizer want about as many again
KMEANS_ITERATIONS = 12


class IndexTypeError(ValueError):
    """An index policy that cannot be applied as configured."""


@dataclass(frozen=True)
class IndexPolicy:
    """Which index a build writes. From the settings (VISMEM_INDEX_TYPE, VISMEM_IVF_FROM,
    VISMEM_RECALL_FLOOR, VISMEM_PQ_BYTES, VISMEM_DELTA_FRACTION, VISMEM_MAX_DELTAS, VISMEM_SHARD_MIB)."""
    kind: str = "auto"            # auto | flat | ivf-flat | ivf-sq8 | ivf-pq
    ivf_from: int = 200_000       # auto: IVF-Flat from this many vectors, exact below
    recall_floor: float = 0.95    # recall@10 an approximate index must reach to be used
    pq_bytes: int | None = None   # IVF-PQ code bytes per vector (default: about d / 8)
    delta_fraction: float = 0.10  # an add writes a delta file while deltas stay within this share of the base
    max_deltas: int = 16          # ... and this many files; past either it folds them into a new base
    shard_mib: int = 64           # an exact base is written in shards of about this size (forgetting rewrites one)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise IndexTypeError(f"unknown index type {self.kind!r}; use one of {', '.join(KINDS)}")
        if not 0.0 < self.recall_floor <= 1.0:
            raise IndexTypeError(f"recall floor must be in (0, 1], not {self.recall_floor}")
        if not 0.0 <= self.delta_fraction <= 1.0:
            raise IndexTypeError(f"delta fraction must be in [0, 1] (0: every add writes a new base), not {self.delta_fraction}")
        if self.shard_mib < 1:
            raise IndexTypeError(f"shard_mib must be at least 1 (MiB per exact shard), not {self.shard_mib}")
        if self.max_deltas < 0:
            raise IndexTypeError(f"max_deltas must be 0 or more, not {self.max_deltas}")
        if self.ivf_from < 1:
            raise IndexTypeError(f"ivf_from must be a positive number of vectors, not {self.ivf_from}")

    @classmethod
    def from_settings(cls, settings, **overrides) -> "IndexPolicy":
        """The policy of `settings` (settings.Settings), non-None overrides (CLI flags, resource fields) winning."""
        values = {"kind": settings.index_type, "ivf_from": settings.ivf_from, "recall_floor": settings.recall_floor,
                  "pq_bytes": settings.pq_bytes, "delta_fraction": settings.delta_fraction,
                  "max_deltas": settings.max_deltas, "shard_mib": settings.shard_mib}
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def wanted(self, n: int) -> str:
        """The kind to build for n vectors (before the recall check)."""
        if self.kind != "auto":
            return self.kind
        return "ivf-flat" if n >= self.ivf_from else "flat"


@dataclass
class BuildReport:
    """What a build chose and measured; stored with the index version in the ledger."""
    kind: str                        # what was written: flat | ivf-flat | ivf-pq
    factory: str                     # its FAISS description, e.g. "IVF1024,Flat"
    reason: str                      # why this kind, in words
    wanted: str | None = None        # what the policy asked for
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    speedup: float | None = None     # exact seconds / approximate seconds on the held-out queries
    n_held_out: int | None = None
    n_train: int | None = None
    train_seconds: float | None = None
    sweep: list | None = None        # [(nprobe, recall@10)] tried

    def to_dict(self) -> dict:
        return asdict(self)


def new_flat_index(dim: int) -> faiss.Index:
    # Inner product on unit vectors = cosine similarity; IDMap2 keeps our vector ids.
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def ivf_of(index) -> faiss.IndexIVF | None:
    """The inverted-file index inside `index`, or None for a flat one."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def describe(index) -> str:
    """A FAISS factory-style name: IDMap2,Flat / IVF1024,Flat / IVF1024,PQ48."""
    ivf = ivf_of(index)
    if ivf is None:
        return "IDMap2,Flat"
    ivf = faiss.downcast_index(ivf)
    codes = {"ivf-pq": lambda: f"PQ{ivf.pq.M}", "ivf-sq8": lambda: "SQ8"}.get(kind_of(ivf), lambda: "Flat")()
    return f"IVF{ivf.nlist},{codes}"


def kind_of(index) -> str:
    ivf = ivf_of(index)
    if ivf is None:
        return "flat"
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "ivf-pq"
    return "ivf-sq8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else "ivf-flat"


def index_ids(index) -> np.ndarray:
    """The vector ids an index holds: id-map order for flat, list by list for IVF."""
    ivf = ivf_of(index)
    if ivf is None:
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    lists = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = lists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(lst), size).astype(np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def remove_ids(index, ids: np.ndarray) -> int:
    """Remove these ids; returns how many went. IVF's hash-table direct map only accepts an
    explicit id array (and then finds each id without scanning the lists)."""
    ids = np.ascontiguousarray(ids, np.int64)
    if ivf_of(index) is not None:
        selector = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
    else:
        selector = faiss.IDSelectorBatch(ids)
    return int(index.remove_ids(selector))


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


def build(vector_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy,
          seed: int = 0) -> tuple[faiss.Index, BuildReport]:
    """The index the policy asks for over these vectors, with what it measured."""
    n, d = vectors.shape
    vector_ids = np.asarray(vector_ids, np.int64)
    wanted = policy.wanted(n)
    if wanted == "flat":
        why = (f"exact: {n:,} vectors, below the IVF threshold of {policy.ivf_from:,}" if policy.kind == "auto"
               else "exact: asked for (index type flat)")
        return flat_index(vector_ids, vectors), BuildReport("flat", "IDMap2,Flat", why, wanted)
    nlist = nlist_for(n)
    queries_at, train_at = held_out_and_training(n, wanted, nlist, seed)
    if nlist < 4 or len(queries_at) < 20:
        return flat_index(vector_ids, vectors), BuildReport(
            "flat", "IDMap2,Flat", f"exact: {n:,} vectors are too few to train and check {wanted}", wanted)
    held_out = len(queries_at)
    t0 = time.perf_counter()
    index = train_ivf(wanted, vectors[np.sort(train_at)], nlist, policy.pq_bytes)
    fill(index, vector_ids, vectors)
    train_seconds = time.perf_counter() - t0
    report = BuildReport(wanted, describe(index), "", wanted, nlist=nlist, n_held_out=held_out,
                         n_train=len(train_at), train_seconds=round(train_seconds, 3))
    choose_nprobe(index, vector_ids, vectors, queries_at, policy.recall_floor, report)
    if report.nprobe is None:
        return flat_index(vector_ids, vectors), report
    return index, report


def held_out_and_training(n: int, kind: str, nlist: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the held-out vectors that measure recall (up to HELD_OUT, a tenth of a small
    memory) and of the training sample, disjoint, drawn at random."""
    order = np.random.default_rng(seed).permutation(n)
    held_out = min(HELD_OUT, n // 10)
    return order[:held_out], order[held_out:held_out + training_size(kind, nlist)]


def flat_index(vector_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    index = new_flat_index(vectors.shape[1])
    if len(vector_ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), vector_ids)
    return index


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
    index.train(np.ascontiguousarray(train, np.float32))
    index.own_fields = True
    quantizer.this.disown()  # the index owns its quantizer now (kept alive past this frame)
    return index


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
        report.kind, report.factory, report.recall_at_10 = "flat", "IDMap2,Flat", best
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
        report.kind, report.factory, report.nprobe = "flat", "IDMap2,Flat", None
        report.reason = (f"exact: {report.wanted} reached recall@10 {best:.3f} at nprobe {best_probe} but was "
                         f"not faster than exact search ({speedup:.2f}x)")
        return
    report.reason = (f"{report.wanted}: recall@10 {best:.3f} >= floor {floor} at nprobe {best_probe} of {ivf.nlist} "
                     f"lists, {speedup:.1f}x exact search, on {len(queries)} held-out vectors")
