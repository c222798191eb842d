"""Erasing vectors in place: forgetting costs what it removes, not the size of the memory.

Forgotten samples are scattered: a few of them sit in every index file and every embedding
part, so rewriting the files that hold them rewrites the whole memory. Here each forgotten
vector's own bytes are overwritten where they are instead, and its id with them, leaving a
hole that readers drop or skip (`index_store`, `ivf_search`, `embeddings`) and the next
compaction writes away:

* an index file: where its kind (index_kinds/) says each vector and id sit; a hole is zero
  bytes with id -1 (FAISS's "no result"). `index_holes` asks the file's kind;
* an embedding part (parquet, as `embeddings.write_part` writes it: uncompressed, no
  statistics) ends each data page with its values, row after row; its offset index says where
  the pages are. A hole is a zero vector, an all-zero sample id and vector id -1.

Every place is found from the file itself and checked before a byte is written: index ids
where FAISS reads them; in a part, each row found holding the sample id the ledger expects
and a unit vector, where the offset index puts its pages. A file laid out any other way raises
`LayoutError` (forgetting then rewrites an embedding part written before erasure in place;
index files are all vismem's). The patches themselves, their digest before they are written,
writing and reading them back: patches.py.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .index_kinds import kind_for
from .patches import (HOLE_ID, HOLE_ID_BYTES, Holes, LayoutError, Patch, apply, applied, is_target, sha256_patched,
                      sorted_unique)

__all__ = ["HOLE_ID", "Holes", "LayoutError", "Patch", "apply", "applied", "index_holes", "part_holes", "sha256_patched"]


def index_holes(path: Path, vector_ids: np.ndarray, holes_too: bool = False) -> Holes:
    """Where these ids sit in a vismem index file (of any registered kind), as the patches that
    erase them. `holes_too`: also the holes already there (id -1), whatever their bytes:
    patching them again completes an erasure a crash interrupted."""
    path = Path(path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    return kind_for(index).holes(path, index, sorted_unique(vector_ids), holes_too)


# ---- embedding parts (parquet) ---------------------------------------------------------------

def part_holes(path: Path, metadata: list[dict], vector_ids: np.ndarray, sample_ids: list[str], dim: int,
               holes_too: bool = False) -> Holes:
    """The patches that erase from an embedding part the rows of these vector ids (sorted,
    unique), whose samples the ledger says are `sample_ids` (in the same order). `metadata`: its rows of DuckDB's `parquet_metadata()`
    (one per row group and column). Ids, sample ids and vectors are read where the offset index
    puts each page, and checked: every row's sample id has its 64-byte length there, the ids are
    unique, each row found holds the sample id the ledger expects (a hole: zeros), and each
    vector is a unit vector (a hole: zeros) where its row's should be."""
    columns = {m["path_in_schema"].split(",")[0]: m for m in metadata if m["row_group_id"] == 0}
    if (any(m["row_group_id"] != 0 for m in metadata) or set(columns) != {"sample_id", "vector_id", "vector"}
            or any(m["compression"] != "UNCOMPRESSED" or m["stats_min_value"] is not None
                   or m["offset_index_offset"] is None for m in columns.values())
            or any(e in columns["vector"]["encodings"] for e in ("DICTIONARY", "SPLIT"))):
        raise LayoutError(f"{path}: not a plain, uncompressed embedding part of one row group without statistics")
    n = int(columns["vector_id"]["row_group_num_rows"])
    if n == 0:
        return Holes(np.empty(0, np.int64), ())
    with open(path, "rb") as f:
        ids_at = _rows(f, columns["vector_id"], 8, n)
        ids = _gather(f, ids_at, 8).view("<i8").ravel()
        live = ids[ids != HOLE_ID]
        ascending = bool(np.all(live[1:] > live[:-1]))   # (as parts are written: unique without sorting them)
        if (live < 0).any() or not (ascending or len(np.unique(live)) == len(live)):
            raise LayoutError(f"{path}: the vector ids are not where their page puts them")
        targets = sorted_unique(vector_ids)
        if len(targets) != len(sample_ids):
            raise ValueError("vector_ids must be sorted and unique, each with its sample id")
        rows = np.flatnonzero(is_target(ids, targets, holes_too))
        if not len(rows):
            return Holes(rows, ())
        names_at = _rows(f, columns["sample_id"], 68, n)
        names = _gather(f, names_at[rows], 68)   # (the rows to erase: each is checked before it is written)
        if not (names[:, :4].copy().view("<u4") == 64).all():
            raise LayoutError(f"{path}: the sample ids are not where their page puts them")
        for i, row in enumerate(rows.tolist()):
            want = sample_ids[int(np.searchsorted(targets, ids[row]))] if ids[row] != HOLE_ID else "0" * 64
            if names[i, 4:].tobytes() != want.encode():
                raise LayoutError(f"{path}: row {row} does not hold the sample the ledger puts there")
        vectors_at = _rows(f, columns["vector"], 4 * dim, n)
        for row in rows.tolist():
            f.seek(vectors_at[row])
            norm = float(np.linalg.norm(np.frombuffer(f.read(4 * dim), np.float32)))
            if norm != 0 and abs(norm - 1) > 1e-3:
                raise LayoutError(f"{path}: the vector of row {row} is not where its page puts it")
    return Holes(ids[rows].copy(), (
        Patch(vectors_at[rows], bytes(4 * dim)), Patch(names_at[rows] + 4, b"0" * 64), Patch(ids_at[rows], HOLE_ID_BYTES)))


def _gather(f, offsets: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes at each offset (sorted), as rows of a uint8 array: one read of the span."""
    f.seek(int(offsets[0]))
    span = np.frombuffer(f.read(int(offsets[-1]) + width - int(offsets[0])), np.uint8)
    if len(span) != int(offsets[-1]) + width - int(offsets[0]):
        raise LayoutError("the pages run past the end of the file")
    return span[(offsets - offsets[0])[:, None] + np.arange(width)]


def _rows(f, column: dict, width: int, n: int) -> np.ndarray:
    """Byte offset of each row's value in a column of fixed-width values (`width` bytes each, no
    nulls). Data pages end with their values, so row r of a page of rows [a, b) ending at e is at
    e - (b - r) * width. A dictionary-encoded column of unique values (ids) is its dictionary,
    in row order: the dictionary page's values, just before the first data page."""
    if column["dictionary_page_offset"] is not None:
        return column["data_page_offset"] - (n - np.arange(n, dtype=np.int64)) * width
    pages = _offset_index(f, column)
    out = []
    for j, (offset, size, first) in enumerate(pages):
        last = pages[j + 1][2] if j + 1 < len(pages) else n
        out.append(offset + size - (last - np.arange(first, last, dtype=np.int64)) * width)
    found = np.concatenate(out) if out else np.empty(0, np.int64)
    if len(found) != n:
        raise LayoutError("the pages do not hold one value a row")
    return found


def _offset_index(f, column: dict) -> list[tuple[int, int, int]]:
    """(offset, size with header, first row) of each data page: parquet's OffsetIndex, a thrift
    compact struct {1: list<PageLocation {1: i64, 2: i32, 3: i64}>}."""
    f.seek(column["offset_index_offset"])
    buf = f.read(column["offset_index_length"])
    if buf[0] != 0x19:
        raise LayoutError("unexpected offset index")
    p = 1
    n, kind = buf[p] >> 4, buf[p] & 0x0F
    p += 1
    if n == 15:
        n, p = _varint(buf, p)
    if kind != 12:
        raise LayoutError("unexpected offset index")
    pages = []
    for _ in range(n):
        fields, last = {}, 0
        while buf[p]:
            delta, kind = buf[p] >> 4, buf[p] & 0x0F
            p += 1
            if not delta or kind not in (5, 6):
                raise LayoutError("unexpected page location")
            last += delta
            value, p = _varint(buf, p)
            fields[last] = (value >> 1) ^ -(value & 1)
        p += 1
        pages.append((fields[1], fields[2], fields[3]))
    return pages


def _varint(buf: bytes, p: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[p]
        p += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, p
        shift += 7
