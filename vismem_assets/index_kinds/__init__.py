"""Index kinds: what vismem needs of each kind of FAISS index, and the registry of kinds.

A kind (exact flat, IVF-Flat, ...) is one object meeting `IndexKind`: it builds its index from
a memory's vectors (training and checking it as it must), says what a loaded index is (its name
for the ledger, its ids, its exact vectors if it keeps them), splits a base into files, searches
it, and knows its file layout: where each vector's bytes and id sit, so that forgetting erases
them in place (erasure.py) and `audit verify` checks that they are gone. The index store, the
memory's search and erasure ask the kind; none of them branches on one.

To add a kind: write one module (a class with the attributes and methods of `IndexKind`; a kind
under an `IndexIDMap2` gets its ids, drop and byte layout from `id_map.py`) and register it:
one `register(MyKind())` line (below for the built-in ones, or at the caller's start, as
tests/test_index_kinds.py does). The index policy then accepts its name: IndexPolicy(kind=...).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import faiss
import numpy as np

from ..patches import Holes, LayoutError
from . import flat, ivf
from .report import BuildReport

if TYPE_CHECKING:
    from ..index_types import IndexPolicy

__all__ = ["BuildReport", "IndexKind", "Searcher", "UnknownIndexKind", "kind_described", "kind_for", "kind_named",
           "names", "register"]


class Searcher(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k), best first; holes (id -1) never returned as neighbours."""


class IndexKind(Protocol):
    name: str              # as the policy names it: flat, ivf-flat, ...
    map_for_search: bool   # searched memory-mapped (the file's pages, shared), else read whole

    def recognises(self, index: faiss.Index) -> bool:
        """Whether a loaded FAISS index is of this kind."""

    def describes(self, index_type: str) -> bool:
        """Whether a version's recorded index type (what `describe` wrote) is of this kind."""

    def describe(self, index: faiss.Index) -> str:
        """Its FAISS factory-style name, recorded as the version's index type: IDMap2,Flat, IVF1024,PQ48."""

    def build(self, vector_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy) -> tuple[faiss.Index, BuildReport]:
        """An index of these vectors (possibly of another kind, if this one does not pass its
        checks: the report says which and why)."""

    def nprobe(self, index: faiss.Index) -> int | None:
        """Lists an approximate search visits, or None."""

    def ids(self, index: faiss.Index) -> np.ndarray:
        """Its vector ids in storage order, holes (-1) included."""

    def exact_vectors(self, index: faiss.Index) -> np.ndarray | None:
        """Its float32 vectors in the order of `ids` (a view valid while it lives), or None if
        it keeps none exactly (they are read from the embedding files then)."""

    def shards(self, index: faiss.Index, shard_bytes: int) -> list[faiss.Index]:
        """The files a base is written as (forgetting rewrites only the ones it touches)."""

    def drop(self, index: faiss.Index, vector_ids: np.ndarray) -> None:
        """Remove these ids (holes, -1, among them) from a loaded, not mapped, index."""

    def lazy_from(self, path: Path, index: faiss.Index) -> int:
        """Where the bytes a memory-mapped search reads only as it needs them begin (those before
        are read on opening); the file's size for a kind read whole."""

    def searcher(self, index: faiss.Index, holes: int) -> Searcher:
        """What searches it; `holes`: how many erased entries it holds (a mapped index keeps them)."""

    def holes(self, path: Path, index: faiss.Index, targets: np.ndarray, holes_too: bool) -> Holes:
        """The patches that erase `targets` (sorted, unique ids) from its file, `index` read from
        `path`; `holes_too`: the holes already there as well. The file is checked to be laid
        out as this kind writes it first (LayoutError otherwise)."""


class UnknownIndexKind(LayoutError):
    """An index no registered kind recognises (nor, then, can erase in place)."""


REGISTRY: dict[str, IndexKind] = {}


def register(kind: IndexKind) -> IndexKind:
    """Add a kind (or replace the one of its name)."""
    REGISTRY[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    """The registered kinds' names, in registration order."""
    return tuple(REGISTRY)


def kind_named(name: str) -> IndexKind:
    return REGISTRY[name]


def kind_for(index: faiss.Index) -> IndexKind:
    """The kind of a loaded FAISS index."""
    found = next((kind for kind in REGISTRY.values() if kind.recognises(index)), None)
    if found is None:
        raise UnknownIndexKind(f"no index kind recognises a {type(faiss.downcast_index(index)).__name__}; "
                               f"registered: {', '.join(REGISTRY)}")
    return found


def kind_described(index_type: str) -> IndexKind:
    """The kind of a version, from the index type the ledger recorded for it."""
    found = next((kind for kind in REGISTRY.values() if kind.describes(index_type)), None)
    if found is None:
        raise UnknownIndexKind(f"no index kind writes {index_type!r}; registered: {', '.join(REGISTRY)}")
    return found


# The built-in kinds, in the order `kind_for` asks them (and the CLI lists them).
register(flat.FLAT)
register(ivf.IVF_FLAT)
register(ivf.IVF_SQ8)
register(ivf.IVF_PQ)
