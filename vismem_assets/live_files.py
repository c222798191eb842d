"""The live version's index files as a long-lived reader holds them, so that a version switch
costs what changed (issue 20).

Each file (every shard's base pieces and deltas) is held as its own index with its own searcher;
a search asks each for its k best and merges them (shards.search_all), exactly what one index
over all of them answers. When the live version changes:

* a file the new version shares with the old, unchanged (same path, same sha256), is kept as
  it is: after an add only the new delta is read (and checked against its sha256);
* a file erased in place since (same path, new sha256), or holding vectors of a forget that is
  pending, is patched in the held copy when it is read whole and exact: the gone vectors become
  holes (id -1, zero vector) that its searcher skips, instead of reading the file again. Its ids
  are read from the file (memory-mapped: only their pages) to know which;
* a memory-mapped file erased in place since (the same file: device and inode) stays held as it
  is: its mapping shows the erased bytes already, and its searcher skips the holes. Of the
  blocks the erasure changed, the ones it read on opening (the header, the coarse centroids,
  the id map) are checked against the ledger's hash list (digests.py); the changed lists are
  read by the searches that probe them, and `vismem audit verify` checks every block;
* anything else (a new base) is loaded as `IndexStore.load` would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import faiss
import numpy as np

from .digests import HashList
from .index_kinds import Searcher, kind_described, kind_for
from .index_kinds.flat import FLAT
from .index_store import IndexFile, IndexIntegrityError, IndexStore, IndexVersion, held_ids, searcher_of
from .erasure import HOLE_ID


@dataclass
class HeldFile:
    sha256: str
    index: faiss.Index
    mapped: bool            # memory-mapped (the file's pages), else read whole (this process's copy)
    searcher: Searcher
    held: int               # vectors it holds, holes aside
    hash_list: HashList | None = None   # what its bytes were checked against (digests.py)
    inode: tuple[int, int] | None = None  # (device, inode) of the file a mapped index maps


@dataclass
class Switch:
    """What a version switch did, file by file."""
    kept: int = 0
    patched: int = 0
    loaded: int = 0


class LiveFiles:
    def __init__(self, indexes: IndexStore):
        self.indexes = indexes
        self.files: dict[str, HeldFile] = {}
        self.key: tuple | None = None
        self.last = Switch()   # what the last switch did

    def searchers(self) -> list[tuple[Searcher, int]]:
        return [(f.searcher, f.held) for f in self.files.values()]

    def holds(self, live: IndexVersion, pending: np.ndarray) -> bool:
        """Whether it holds `live` already, without the vectors of these pending forgets."""
        return _key(live, pending) == self.key

    def switch(self, live: IndexVersion, pending: np.ndarray,
               recorded: dict[str, HashList] | None = None) -> Switch:
        """Hold the files of `live`, without the vectors of the pending forgets. `recorded`: the
        hash lists the ledger holds for its files, when the caller read them already."""
        key = _key(live, pending)
        pending = np.unique(np.asarray(pending, np.int64))
        done = Switch()
        if key == self.key:
            return done
        # Mapped files cannot drop a pending forget's vectors: while one is pending, read whole.
        mappable = not len(pending) and kind_described(live.index_type).map_for_search
        held = {}
        for file in live.files:
            old = self.files.get(file.path)
            unchanged = old is not None and old.sha256 == file.sha256
            if unchanged and not len(pending):
                held[file.path], done.kept = old, done.kept + 1
            elif old is not None and not old.mapped and FLAT.recognises(old.index):
                held[file.path], done.patched = self._patched(old, file, pending, unchanged), done.patched + 1
            elif old is not None and old.mapped and mappable and old.inode == _inode(self.indexes.layout.absolute(file.path)):
                if recorded is None:
                    recorded = self.indexes.hash_lists_of(live.files)
                held[file.path], done.patched = self._remapped(old, file, recorded.get(file.path)), done.patched + 1
            else:
                if recorded is None:  # the hash lists of the files to read, in one query
                    recorded = self.indexes.hash_lists_of(live.files)
                index, mapped, listed = self.indexes.load_file(file, live, pending, recorded=recorded,
                                                               mmap=mappable and file.role == "base")
                held[file.path], done.loaded = _held(file.sha256, index, mapped, listed), done.loaded + 1
                if mapped:
                    held[file.path].inode = _inode(self.indexes.layout.absolute(file.path))
        self.files, self.key, self.last = held, key, done
        return done

    def _remapped(self, old: HeldFile, file: IndexFile, recorded: HashList | None) -> HeldFile:
        """A mapped file erased in place since: its mapping shows the erased bytes already (the
        same file, changed where it lies), so the held index stays, with a searcher that skips
        its holes. Of the blocks the erasure changed, the ones it read on opening are checked."""
        path = self.indexes.layout.absolute(file.path)
        kind = kind_for(old.index)
        problem, _ = self.indexes.verify(file, recorded, checked=old.hash_list, lazy_from=kind.lazy_from(path, old.index))
        if problem:
            raise IndexIntegrityError(f"index file {path} {problem}: it was changed or damaged. Run `vismem rebuild` "
                                      "to write a fresh version from the ledger and embeddings")
        return HeldFile(file.sha256, old.index, True, kind.searcher(old.index, file.holes),
                        int(old.index.ntotal) - file.holes, recorded, old.inode)

    def _patched(self, old: HeldFile, file: IndexFile, pending: np.ndarray, unchanged: bool) -> HeldFile:
        """The held copy with the vectors the file no longer holds (`unchanged`: it holds the same),
        or a pending forget names, turned into holes in place."""
        ids = faiss.rev_swig_ptr(old.index.id_map.data(), old.index.ntotal)  # a writable view
        gone = np.zeros(len(ids), bool)
        if not unchanged:
            now = self.indexes.file_ids(file)
            erased = now == HOLE_ID if len(now) == len(ids) else None
            if erased is not None and not np.any((ids != now) & ~erased):
                gone = erased & (ids != HOLE_ID)   # erased in place: the same positions, now holes
            else:                                  # (a copy loaded without the file's holes: by id)
                gone = (ids != HOLE_ID) & ~np.isin(ids, now[now != HOLE_ID])
        if len(pending):
            gone |= (ids != HOLE_ID) & np.isin(ids, pending)
        at = np.flatnonzero(gone)
        if len(at):
            inner = faiss.downcast_index(old.index.index)
            vectors = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
            ids[at] = HOLE_ID
            vectors[at] = 0.0
        return _held(file.sha256, old.index, False)


def _inode(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _key(live: IndexVersion, pending: np.ndarray) -> tuple:
    return live.version, tuple((f.path, f.sha256) for f in live.files), np.unique(np.asarray(pending, np.int64)).tobytes()


def _held(sha256: str, index: faiss.Index, mapped: bool, hash_list: HashList | None = None) -> HeldFile:
    searcher, holes = searcher_of(index)
    return HeldFile(sha256, index, mapped, searcher, int(len(held_ids(index))) if holes else int(index.ntotal),
                    hash_list)
