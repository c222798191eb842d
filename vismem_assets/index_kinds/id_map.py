"""What kinds that keep their vectors under a FAISS `IndexIDMap2` share: their ids, dropping
ids from a loaded index, and the byte layout of their files for erasure in place.

Such a file ends with the inner index's codes and then the id map, as FAISS writes them:
[codes: u64 count of items][n * code_size bytes][n: u64][n ids: int64]. A hole is a zeroed
code with id -1. The exact flat kind (float32 codes) and any kind storing one code per vector
(the tests' float16 kind) use this layout.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ..patches import HOLE_ID_BYTES, Holes, LayoutError, Patch, is_target


def ids(index: faiss.Index) -> np.ndarray:
    """The id map, in storage order (holes: -1)."""
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def drop(index: faiss.Index, vector_ids: np.ndarray) -> None:
    """Remove these ids (holes, -1, among them) from a loaded (not mapped) index."""
    index.remove_ids(faiss.IDSelectorBatch(np.asarray(vector_ids, np.int64)))


def holes(path: Path, index: faiss.Index, targets: np.ndarray, holes_too: bool, item_bytes: int) -> Holes:
    """The patches that erase `targets` (sorted, unique) from an IDMap2 file laid out as above,
    checked first: the count before the codes (in items of `item_bytes`: 4 for float32
    vectors, 1 for byte codes), n before the ids, and the ids where FAISS reads them."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexIDMap2):
        raise LayoutError(f"{path} is not an IDMap2 index")
    n = index.ntotal
    code = faiss.downcast_index(index.index).sa_code_size()
    size = path.stat().st_size
    ids_at = size - 8 * n
    codes_at = ids_at - 8 - code * n
    found = ids(index)
    if (codes_at < 8 or _u64(path, ids_at - 8) != n or _u64(path, codes_at - 8) != n * code // item_bytes
            or not np.array_equal(np.fromfile(path, np.int64, n, offset=ids_at), found)):
        raise LayoutError(f"{path} is not an IDMap2 index as vismem writes it")
    rows = np.flatnonzero(is_target(found, targets, holes_too))
    return Holes(found[rows], (Patch(codes_at + rows * code, bytes(code)), Patch(ids_at + rows * 8, HOLE_ID_BYTES)))


def _u64(path: Path, offset: int) -> int:
    return int(np.fromfile(path, np.uint64, 1, offset=offset)[0])
