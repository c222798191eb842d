"""The exact flat kind: `IDMap2,Flat`, every vector stored as float32, searched exactly.

The default and the reference every approximate kind is measured against. Inner product on
unit vectors is cosine similarity; the id map keeps vismem's vector ids. A base past the
policy's `shard_mib` is written in shards (forgetting rewrites one, not the memory); exact
deltas of every kind are flat files too. Searched by blocked matrix multiplication over the
index's own storage (search.py), read whole: exact search streams every vector, and over 4 KiB
file pages its GEMM ran 4x slower for single queries at 10^6 vectors than from anonymous memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..patches import Holes
from ..search import FaissSearcher, flat_searcher
from . import id_map
from .report import BuildReport

if TYPE_CHECKING:
    from ..index_types import IndexPolicy

FACTORY = "IDMap2,Flat"


def new_flat_index(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def flat_index(vector_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """An exact index of these vectors under these ids."""
    index = new_flat_index(vectors.shape[1])
    if len(vector_ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(vector_ids, np.int64))
    return index


class FlatKind:
    name = "flat"
    map_for_search = False

    def recognises(self, index: faiss.Index) -> bool:
        top = faiss.downcast_index(index)
        return isinstance(top, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(top.index), faiss.IndexFlat)

    def describes(self, index_type: str) -> bool:
        return index_type == FACTORY

    def describe(self, index: faiss.Index) -> str:
        return FACTORY

    def build(self, vector_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy) -> tuple[faiss.Index, BuildReport]:
        why = (f"exact: {len(vectors):,} vectors, below the IVF threshold of {policy.ivf_from:,}" if policy.kind == "auto"
               else "exact: asked for (index type flat)")
        return flat_index(vector_ids, vectors), BuildReport(self.name, FACTORY, why, self.name)

    def nprobe(self, index: faiss.Index) -> None:
        return None

    def ids(self, index: faiss.Index) -> np.ndarray:
        return id_map.ids(index)

    def exact_vectors(self, index: faiss.Index) -> np.ndarray:
        """A view of the index's own float32 storage, in id-map order (valid while it lives)."""
        if index.ntotal == 0:
            return np.empty((0, index.d), np.float32)
        flat = faiss.downcast_index(faiss.downcast_index(index).index)
        return faiss.rev_swig_ptr(flat.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)

    def shards(self, index: faiss.Index, shard_bytes: int) -> list[faiss.Index]:
        rows = max(1, shard_bytes // (4 * index.d))
        if index.ntotal <= rows:
            return [index]
        ids, vectors = self.ids(index), self.exact_vectors(index)
        return [flat_index(ids[s:s + rows], vectors[s:s + rows]) for s in range(0, index.ntotal, rows)]

    def drop(self, index: faiss.Index, vector_ids: np.ndarray) -> None:
        id_map.drop(index, vector_ids)

    def lazy_from(self, path: Path, index: faiss.Index) -> int:
        return path.stat().st_size   # read whole

    def searcher(self, index: faiss.Index, holes: int):
        return flat_searcher(index) or FaissSearcher(index)

    def holes(self, path: Path, index: faiss.Index, targets: np.ndarray, holes_too: bool) -> Holes:
        return id_map.holes(path, index, targets, holes_too, item_bytes=4)


FLAT = FlatKind()
