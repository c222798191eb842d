"""Index file digests as hash lists, so that integrity costs what changed.

A file's digest is the sha256 of its hash list: the sha256 of each block of `block_size` bytes
(the last one may be shorter), in hex, one per line. With standard tools (4 MiB blocks):

    split -b 4194304 --filter='sha256sum | cut -c1-64' FILE | sha256sum

The ledger records the digest (index_versions.files) and the list (index_file_blocks). An
erasure in place re-hashes only the blocks its patches touch, taking the others from the
recorded list; a reader that already checked a file checks only the blocks that changed; `vismem
audit verify` checks every block of every file. A file recorded before hash lists (block_size 0)
keeps the plain sha256 of its bytes until an erasure gives it a list.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .patches import Holes, LayoutError, sha256_patched

BLOCK_SIZE = 4 << 20   # a few MiB: a list of ~400 digests for a 1.5 GB file, a block hashed in ~3 ms
_THREADS = max(1, min(8, os.cpu_count() or 1))  # hashlib lets go of the GIL: blocks hash in parallel


@dataclass(frozen=True)
class HashList:
    block_size: int
    blocks: tuple[str, ...]   # each block's sha256, hex

    @property
    def sha256(self) -> str:
        return hashlib.sha256("".join(b + "\n" for b in self.blocks).encode()).hexdigest()

    def text(self) -> str:
        """As the ledger stores it: the digests concatenated."""
        return "".join(self.blocks)

    @classmethod
    def from_text(cls, block_size: int, text: str) -> "HashList":
        return cls(int(block_size), tuple(text[i:i + 64] for i in range(0, len(text), 64)))

    def differing(self, other: "HashList") -> list[int]:
        """The blocks whose digests differ from `other`'s (all of them if the lists don't align)."""
        if other.block_size != self.block_size or len(other.blocks) != len(self.blocks):
            return list(range(len(self.blocks)))
        return [j for j, (a, b) in enumerate(zip(self.blocks, other.blocks)) if a != b]


def hash_list(path: Path, holes: Holes | None = None, known: HashList | None = None,
              block_size: int | None = None) -> HashList:
    """The file's hash list as it is once `holes`' patches are in (the same whether they are all,
    some or none of them). With `known`, the list recorded for the file before these patches,
    only the blocks a patch touches are read and hashed."""
    block_size = known.block_size if known is not None else block_size or BLOCK_SIZE
    size = os.stat(path).st_size
    n_blocks = -(-size // block_size)
    edits = _edits_by_block(path, holes, size, block_size)
    if known is not None and len(known.blocks) == n_blocks:
        fresh = hash_blocks(path, sorted(edits), holes, block_size, edits)
        return HashList(block_size, tuple(fresh.get(j, d) for j, d in enumerate(known.blocks)))
    fresh = hash_blocks(path, range(n_blocks), holes, block_size, edits)
    return HashList(block_size, tuple(fresh[j] for j in range(n_blocks)))


def hash_blocks(path: Path, which, holes: Holes | None, block_size: int,
                edits: dict | None = None) -> dict[int, str]:
    """{block: its sha256 once patched} for the blocks `which`, hashed from a read-only mapping
    (no copy of the bytes between patches), several blocks at once."""
    which = list(which)
    size = os.stat(path).st_size
    if edits is None:
        edits = _edits_by_block(path, holes, size, block_size)
    if not which:
        return {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            def one(j: int) -> str:
                start, end = j * block_size, min(size, (j + 1) * block_size)
                h, pos = hashlib.sha256(), start
                for at, data in edits.get(j, ()):
                    lo, hi = max(at, pos), min(at + len(data), end)
                    if hi <= lo:   # the same bytes patched twice (a retry's holes): once is enough
                        continue
                    h.update(view[pos:lo])
                    h.update(data[lo - at:hi - at])
                    pos = hi
                h.update(view[pos:end])
                return h.hexdigest()

            with ThreadPoolExecutor(min(_THREADS, len(which))) as pool:
                return dict(zip(which, pool.map(one, which)))
        finally:
            view.release()


def _edits_by_block(path: Path, holes: Holes | None, size: int, block_size: int) -> dict[int, list]:
    """Each block's patches as (offset, bytes), sorted; a patch across a boundary goes to both."""
    found = defaultdict(list)
    for patch in holes.patches if holes else ():
        width = len(patch.data)
        for at in patch.offsets.tolist():
            if at + width > size:
                raise LayoutError(f"{path}: a patch runs past the end of the file at byte {at}")
            for j in range(at // block_size, (at + width - 1) // block_size + 1):
                found[j].append((at, patch.data))
    for edits in found.values():
        edits.sort(key=lambda e: e[0])
    return found


def file_digest(path: Path, block_size: int) -> str:
    """The digest the ledger records for a file hashed with `block_size` (0: the plain sha256)."""
    return hash_list(path, block_size=block_size).sha256 if block_size else sha256_patched(path)
