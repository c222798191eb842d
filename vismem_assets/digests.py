"""Index file digests as hash lists of page hashes, so that integrity costs what changed.

A file is cut into blocks of `block_size` bytes (4 MiB) and each block into leaves of `leaf_size`
bytes (4 KiB, a page); the last of each may be shorter. A leaf's digest is the sha256 of its
bytes; a block's, the sha256 of its leaves' digests (hex, one per line); the file's, the sha256
of its blocks' digests (hex, one per line). With standard tools, in a scratch folder:

    split -a 8 -d -b 4096 FILE leaf. && ls leaf.* | xargs -r sha256sum | cut -c1-64 \\
      | split -l 1024 --filter='sha256sum | cut -c1-64' | sha256sum

The ledger records the digest (index_versions.files) and the block list (index_file_blocks).
The leaves' digests are kept beside the file, in `<file>.leaves`: the lines each block's digest
is the sha256 of, so a block's slice of it is trusted only once it hashes to the block's recorded
digest (a missing, stale or damaged slice is hashed again from the file). An erasure in place
hashes only the pages its patches touch: 10^4 vectors forgotten across a 1.5 GB file are about
10^4 pages, not the ~400 blocks they fall in. A reader that already checked a file checks only
the blocks that changed; `vismem audit verify` checks every block of every file.

Older files keep the digest they were recorded with until an erasure gives them leaves: a list
whose blocks are hashed from their bytes (leaf_size 0), or the plain sha256 of the bytes
(block_size 0).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .patches import Holes, LayoutError, sha256_patched

BLOCK_SIZE = 4 << 20   # a list of ~400 digests for a 1.5 GB file: what the ledger holds and a reader compares
LEAF_SIZE = 4 << 10    # a page: what an erasure writes, and all it hashes again
LINE = 65              # a leaf's digest in the leaves file: 64 hex digits and a newline
_THREADS = max(1, min(8, os.cpu_count() or 1))  # hashlib lets go of the GIL: blocks hash in parallel


@dataclass(frozen=True)
class HashList:
    block_size: int
    blocks: tuple[str, ...]   # each block's digest, hex
    leaf_size: int = 0        # each block's digest is of its leaves' digests; 0: of its bytes
    # The leaves' lines of the blocks just hashed (block -> its slice of the leaves file), for keep_leaves.
    leaves: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("".join(b + "\n" for b in self.blocks).encode()).hexdigest()

    def text(self) -> str:
        """As the ledger stores it: the digests concatenated."""
        return "".join(self.blocks)

    @classmethod
    def from_text(cls, block_size: int, text: str, leaf_size: int = 0) -> "HashList":
        return cls(int(block_size), tuple(text[i:i + 64] for i in range(0, len(text), 64)), int(leaf_size or 0))

    def differing(self, other: "HashList") -> list[int]:
        """The blocks whose digests differ from `other`'s (all of them if the lists don't align)."""
        if (other.block_size, other.leaf_size, len(other.blocks)) != (self.block_size, self.leaf_size, len(self.blocks)):
            return list(range(len(self.blocks)))
        return [j for j, (a, b) in enumerate(zip(self.blocks, other.blocks)) if a != b]


def leaves_path(path: Path) -> Path:
    """Where a file's leaf digests are kept: beside it, `v000012.faiss` -> `v000012.leaves`."""
    return Path(path).with_suffix(".leaves")


def hash_list(path: Path, holes: Holes | None = None, known: HashList | None = None,
              block_size: int | None = None, leaf_size: int | None = None) -> HashList:
    """The file's hash list as it is once `holes`' patches are in (the same whether they are all,
    some or none of them). With `known`, the list recorded for the file before these patches,
    only the blocks a patch touches are hashed again, and in them (where `known` has leaves and
    the leaves file agrees with it) only the leaves a patch touches. The result carries the
    leaves' lines it computed: `keep_leaves` writes them."""
    if known is not None and known.leaf_size:
        block_size, leaf_size = known.block_size, known.leaf_size
    else:
        block_size, leaf_size = block_size or BLOCK_SIZE, LEAF_SIZE if leaf_size is None else leaf_size
    if leaf_size and block_size % leaf_size:
        raise ValueError(f"a block ({block_size:,} bytes) must hold whole leaves ({leaf_size:,} bytes)")
    n_blocks = -(-os.stat(path).st_size // block_size)
    if known is not None and (known.block_size, known.leaf_size, len(known.blocks)) == (block_size, leaf_size, n_blocks):
        touched = _touched_blocks(holes, block_size)
        recorded = {j: known.blocks[j] for j in touched} if leaf_size else None
        fresh = _hash_blocks(path, touched, holes, block_size, leaf_size, recorded)
        blocks = tuple(fresh[j][0] if j in fresh else d for j, d in enumerate(known.blocks))
    else:
        fresh = _hash_blocks(path, range(n_blocks), holes, block_size, leaf_size)
        blocks = tuple(fresh[j][0] for j in range(n_blocks))
    return HashList(block_size, blocks, leaf_size, {j: lines for j, (_, lines) in fresh.items() if lines is not None})


def hash_blocks(path: Path, which, holes: Holes | None, block_size: int, leaf_size: int = 0) -> dict[int, str]:
    """{block: its digest once patched} for the blocks `which`, every leaf read from the file."""
    return {j: digest for j, (digest, _) in _hash_blocks(path, which, holes, block_size, leaf_size).items()}


def keep_leaves(path: Path, listed: HashList) -> None:
    """Write the leaves' lines `listed` computed into the file's leaves file (made the right
    size first, a new one all zeros: slices no hash list vouches for are hashed again when
    used). Not synced: a slice a crash left stale is only hashed again."""
    if not listed.leaf_size or not listed.leaves:
        return
    size = os.stat(path).st_size
    per_block = listed.block_size // listed.leaf_size
    where = leaves_path(path)
    try:
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:   # a link (or anything but a file) where the leaves go: replaced, never followed
        where.unlink(missing_ok=True)
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        want = -(-size // listed.leaf_size) * LINE
        if os.fstat(fd).st_size != want:
            os.ftruncate(fd, want)
        for j, lines in sorted(listed.leaves.items()):
            os.pwrite(fd, lines, j * per_block * LINE)
    finally:
        os.close(fd)


def file_digest(path: Path, block_size: int, leaf_size: int = 0) -> str:
    """The digest the ledger records for a file hashed with `block_size` and `leaf_size` (block
    size 0: the plain sha256 of its bytes)."""
    if not block_size:
        return sha256_patched(path)
    return hash_list(path, block_size=block_size, leaf_size=leaf_size).sha256


# ---- hashing ------------------------------------------------------------------------------------

def _hash_blocks(path: Path, which, holes: Holes | None, block_size: int, leaf_size: int,
                 recorded: dict[int, str] | None = None) -> dict[int, tuple[str, bytes | None]]:
    """{block: (its digest once patched, its leaves' lines or None)} for the blocks `which`,
    hashed from a read-only mapping, several at once. `recorded`: blocks whose recorded digest
    the leaves file's slice is checked against: where it matches, only the patched leaves are
    hashed again."""
    which = list(which)
    if not which:
        return {}
    size = os.stat(path).st_size
    if not leaf_size:
        return _hash_whole_blocks(path, which, holes, block_size, size)
    per_block = block_size // leaf_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            data = np.frombuffer(mapped, np.uint8)
            patched = _patched_leaves(data, holes, size, leaf_size)
            del data   # (no export of the mapping may outlive it)
            kept = _kept_leaves(path, recorded, block_size, leaf_size) if recorded else {}
            in_block = defaultdict(list)
            for leaf in patched:
                in_block[leaf // per_block].append(leaf)

            def one(j: int) -> tuple[str, bytes]:
                first, end = j * per_block, min(size, (j + 1) * block_size)
                if j in kept:   # the recorded leaves, the patched ones hashed again
                    lines = bytearray(kept[j])
                    for leaf in in_block[j]:
                        lines[(leaf - first) * LINE:(leaf - first) * LINE + 64] = patched[leaf]
                    lines = bytes(lines)
                else:
                    lines = b"".join((patched[leaf] if leaf in patched else
                                      hashlib.sha256(view[leaf * leaf_size:min(end, (leaf + 1) * leaf_size)]).hexdigest().encode())
                                     + b"\n" for leaf in range(first, -(-end // leaf_size)))
                return hashlib.sha256(lines).hexdigest(), lines

            cheap = [j for j in which if j in kept]   # (a few slices to edit: threads would cost more)
            costly = [j for j in which if j not in kept]
            found = {j: one(j) for j in cheap}
            if len(costly) > 1:
                with ThreadPoolExecutor(min(_THREADS, len(costly))) as pool:
                    found |= dict(zip(costly, pool.map(one, costly)))
            elif costly:
                found[costly[0]] = one(costly[0])
            return found
        finally:
            view.release()


def _patched_leaves(data: np.ndarray, holes: Holes | None, size: int, leaf_size: int) -> dict[int, bytes]:
    """{leaf: its digest (hex, as bytes) once patched} for every leaf a patch touches: the leaves
    copied out side by side (a patch across a boundary touches both, which sit next to each
    other), patched there and hashed, all at once."""
    patches = [p for p in (holes.patches if holes else ()) if len(p)]
    if not patches:
        return {}
    for p in patches:
        if int(p.offsets[-1]) + len(p.data) > size or int(p.offsets[0]) < 0:
            raise LayoutError(f"a patch runs past the end of the file ({size:,} bytes)")
    spans = []
    for p in patches:
        first, last = p.offsets // leaf_size, (p.offsets + len(p.data) - 1) // leaf_size
        spans += [(first + k)[first + k <= last] for k in range(int((last - first).max()) + 1)]
    leaves = np.unique(np.concatenate(spans))
    buf = np.empty((len(leaves), leaf_size), np.uint8)
    flat = buf.reshape(-1)
    starts = np.flatnonzero(np.diff(leaves, prepend=-2) != 1)   # runs of neighbouring leaves: one copy each
    ends = np.append(starts[1:], len(leaves))
    for first, stop in zip(starts.tolist(), ends.tolist()):
        a, b = int(leaves[first]) * leaf_size, min(size, int(leaves[stop - 1] + 1) * leaf_size)
        flat[first * leaf_size:first * leaf_size + b - a] = data[a:b]
    for p in patches:
        at = np.searchsorted(leaves, p.offsets // leaf_size) * leaf_size + p.offsets % leaf_size
        value = np.frombuffer(p.data, np.uint8)
        if len(value) <= 64:
            flat[at[:, None] + np.arange(len(value))] = value
        else:
            for o in at.tolist():
                flat[o:o + len(value)] = value
    lengths = np.minimum(size - leaves * leaf_size, leaf_size).tolist()

    def digests(rows: range) -> list[bytes]:
        return [hashlib.sha256(buf[i, :lengths[i]]).hexdigest().encode() for i in rows]

    if len(leaves) < 4096:
        found = digests(range(len(leaves)))
    else:
        halves = [range(0, len(leaves) // 2), range(len(leaves) // 2, len(leaves))]
        with ThreadPoolExecutor(2) as pool:
            found = [d for part in pool.map(digests, halves) for d in part]
    return dict(zip(leaves.tolist(), found))


def _hash_whole_blocks(path: Path, which: list[int], holes: Holes | None, block_size: int,
                       size: int) -> dict[int, tuple[str, None]]:
    """A list recorded before leaves: each block's digest is the sha256 of its bytes once patched."""
    edits = _edits_by_block(path, holes, size, block_size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            def one(j: int) -> tuple[str, None]:
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
                return h.hexdigest(), None

            with ThreadPoolExecutor(min(_THREADS, len(which))) as pool:
                return dict(zip(which, pool.map(one, which)))
        finally:
            view.release()


def _touched_blocks(holes: Holes | None, block_size: int) -> list[int]:
    """The blocks some patch writes to."""
    found = [np.unique(np.concatenate([p.offsets // block_size, (p.offsets + len(p.data) - 1) // block_size]))
             for p in (holes.patches if holes else ()) if len(p)]
    return np.unique(np.concatenate(found)).tolist() if found else []


def _kept_leaves(path: Path, recorded: dict[int, str], block_size: int, leaf_size: int) -> dict[int, bytes]:
    """{block: its slice of the leaves file} for the blocks whose slice hashes to the recorded
    digest; the others (no leaves file, a stale or damaged slice) are left out."""
    per_block = block_size // leaf_size
    try:
        fd = os.open(leaves_path(path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:   # none (or a link, never followed): every block is hashed from the file
        return {}
    kept = {}
    try:
        n_leaves = -(-os.stat(path).st_size // leaf_size)
        for j, digest in recorded.items():
            want = (min(n_leaves, (j + 1) * per_block) - j * per_block) * LINE
            lines = os.pread(fd, want, j * per_block * LINE)
            if len(lines) == want and hashlib.sha256(lines).hexdigest() == digest:
                kept[j] = lines
    finally:
        os.close(fd)
    return kept


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
