"""Versioned FAISS indexes. A version is a list of files under `indexes/<encoder>/`: its base
(one file, or pieces) and zero or more delta files, each immutable, each readable with plain
`faiss.read_index`, ids = samples.vector_id; the ledger records every file's sha256. Which kind
of index a base is (exact flat, IVF-Flat, ...) is the policy's choice (index_types.py); what
differs between kinds (building, ids, searching, byte layout) each kind says (index_kinds/):
nothing here depends on which it is.

* A memory may be split into S shards by sample id (shards.py): then each shard has its own
  base and deltas, in `shard-<j>-of-<S>/`, and a version names every shard's files (each file
  says its shard); what follows holds shard by shard, and a change writes only the shards it
  touches. S = 1 is a memory in one piece, its files in the encoder's folder.
* A build (first add, rebuild, compaction) writes the base: `v<version>.faiss`, and, where its
  kind splits it (an exact index past `shard_mib`), more pieces `v<version>.s<j>.faiss`, so that
  forgetting one vector rewrites one piece, not the whole memory. An IVF base is one file.
* An add of a few vectors writes only them, as an exact delta file `v<version>.delta.faiss`;
  the new version is the parent's files plus that one. Once the deltas would pass the policy's
  share of the base (`delta_fraction`, 10%) or number (`max_deltas`), an add folds them and the
  new vectors into a new base of the base's type instead. Loading a version adds its deltas'
  vectors to its base, so every reader sees one index.
* Forgetting erases in place (erasure.py): in each file that holds a forgotten vector,
  whichever versions share it, the vector's bytes and id are overwritten, leaving a hole that
  `load` drops. The file's new sha256 is recorded, in every version naming it, before a byte
  changes; the new live version names the same files. A file is deleted once no version names it.

Files are written whole to a temp file, fsynced and renamed, and only then recorded in the
ledger (which marks the new version live and its parent retained). A crash at any point leaves
the previous version live and loadable (a file a crash left half erased is checked as it will be
once erased, and its forgotten vectors are dropped); the ledger never names a file that was not
completed.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import faiss
import numpy as np

from . import digests, erasure, shards
from .atomic import atomic_path, write_bytes_atomic
from .encoders.base import EncoderMismatchError
from .home import Layout
from .index_kinds import BuildReport, Searcher, kind_described, kind_for
from .index_kinds.flat import FACTORY as FLAT_FACTORY
from .index_kinds.flat import flat_index
from .index_types import IndexPolicy, build
from .ledger import LedgerBase, Session

__all__ = ["IndexStore", "IndexVersion", "IndexFile", "IndexIntegrityError", "held_ids", "index_ids", "index_vectors",
           "searcher_of"]
GENESIS = "0" * 64  # prev_hash of the first deletion


class IndexIntegrityError(RuntimeError):
    """An index file does not match the sha256 the ledger recorded for it."""


@dataclass(frozen=True)
class IndexFile:
    path: str        # relative to the memory home
    sha256: str
    n_vectors: int
    role: str = "base"   # base (the index type's own file, or a piece of it) | delta (exact, from an add)
    holes: int = 0       # erased entries (id -1) it still holds beside its n_vectors, until a compaction
    shard: int = 0       # the memory's shard it belongs to (shards.py)
    block_size: int = 0  # sha256 is of its hash list of blocks this size (digests.py); 0: of its bytes
    leaf_size: int = 0   # each block's digest is of its leaves' digests, leaves this size; 0: of its bytes
    hash_list: digests.HashList | None = field(default=None, compare=False, repr=False)  # when just computed

    def to_dict(self) -> dict:
        """As the ledger's `files` JSON and the manifests hold it (the hash list has its own table)."""
        return {k: v for k, v in asdict(self).items() if k != "hash_list"}


@dataclass(frozen=True)
class IndexVersion:
    encoder_id: str
    version: int
    path: str                # the first file of the base
    sha256: str
    parent_version: int | None
    operation: str
    n_vectors: int           # all its files together
    n_added: int
    n_removed: int
    status: str
    index_type: str = "IDMap2,Flat"
    nprobe: int | None = None
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    recall_measured_at: int | None = None   # the version whose build measured that recall
    build_reason: str | None = None
    n_shards: int = 1
    files: tuple[IndexFile, ...] = ()   # shard by shard: its base first, then its deltas
    build: BuildReport | None = field(default=None, compare=False)  # of the build that wrote it (an add or forget: none)

    def __post_init__(self):
        if not self.files:  # a version from before delta files: its one file
            object.__setattr__(self, "files", (IndexFile(self.path, self.sha256, self.n_vectors),))

    @classmethod
    def from_row(cls, row: dict) -> "IndexVersion":
        """From its ledger row (ledger/indexes.py)."""
        files = tuple(IndexFile(**f) for f in json.loads(row.pop("files") or "[]"))
        report = row.pop("build_report")
        return cls(**row, files=files, build=BuildReport(**json.loads(report)) if report else None)

    @property
    def base(self) -> tuple[IndexFile, ...]:
        return tuple(f for f in self.files if f.role == "base")

    @property
    def deltas(self) -> tuple[IndexFile, ...]:
        return tuple(f for f in self.files if f.role == "delta")

    def shard_files(self, shard: int) -> tuple[IndexFile, ...]:
        """One shard's files: its base first, then its deltas."""
        return tuple(f for f in self.files if f.shard == shard)

    def shards(self) -> list[dict]:
        """Each shard as status shows it: the version that wrote its newest file, its files,
        vectors, holes and deltas."""
        return [{"shard": j, "version": max(int(Path(f.path).name[1:7]) for f in own), "files": len(own),
                 "n_vectors": sum(f.n_vectors for f in own), "holes": sum(f.holes for f in own),
                 "deltas": sum(f.role == "delta" for f in own)}
                for j in range(self.n_shards) for own in [self.shard_files(j)]]


@dataclass
class Erasure:
    """An erasure recorded in the ledger, its bytes not yet written (IndexStore.prepare_erasure)."""
    store: "IndexStore"
    request_id: str
    holes: dict[str, erasure.Holes]                 # by file (relative path): what to patch there
    lists: dict[str, digests.HashList | None]      # the new hash lists of the files this attempt recorded
    live: "IndexVersion | None"                    # the new live version, if the live one held any
    n_erased: int

    def write(self) -> None:
        """Patch the files and make them durable, then keep their new leaf digests. Files only."""
        layout = self.store.layout
        erasure.apply({layout.absolute(path): found for path, found in self.holes.items()})
        for path, listed in self.lists.items():
            digests.keep_leaves(layout.absolute(path), listed)

    def finish(self, s: Session) -> None:
        """Once written: each erased file's manifest says so (and carries the chain head)."""
        store, head = self.store, chain_head(s)
        newest = {f.path: (v, f) for v in store.versions() if v.status != "purged" for f in v.files}

        def manifest(path: str) -> None:
            version, file = newest[path]
            store._manifest(s, file, version, head=head, index_type=version.index_type, erased_for=self.request_id)

        with ThreadPoolExecutor(8) as pool:   # (each written and synced: a few ms, mostly waiting on the disk)
            list(pool.map(manifest, [path for path in self.holes if path in newest]))


def manifest_path(index_path: Path) -> Path:
    return Path(index_path).with_suffix(".json")


def chain_head(session: Session) -> tuple[str, int]:
    """(row_hash of the last deletion, number of deletions): what every manifest records."""
    return session.indexes.last_deletion() or (GENESIS, 0)


def file_digest(path: Path, file: IndexFile) -> str:
    """The file's digest now, of the kind the ledger records for it."""
    return digests.file_digest(path, file.block_size, file.leaf_size)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The vector ids an index holds, in storage order, holes (id -1) included."""
    return kind_for(index).ids(index)


def verify_file(path: Path, file: IndexFile, recorded: digests.HashList | None,
                unfinished: np.ndarray = np.empty(0, np.int64),
                checked: digests.HashList | None = None, lazy_from: int | None = None) -> tuple[str | None, bool]:
    """(what is wrong with an index file's bytes, or None; whether they are right only once the
    erasure of `unfinished` forgets, or of its holes, a crash left half done, is done), against
    the digest the ledger recorded and its hash list (`recorded`). Every block is read unless
    `checked` (a list the caller checked the file against before) says which have not changed;
    then, with `lazy_from` (a memory-mapped reader's file), only those before it: the blocks the
    reader reads on opening. The rest it reads as searches probe them, and `audit verify` checks
    every block."""
    retry = file.holes > 0 or len(unfinished) > 0
    if not file.block_size:
        actual = file_digest(path, file)
        if actual == file.sha256:
            return None, False
        if retry and erasure.sha256_patched(path, erasure.index_holes(path, unfinished, holes_too=True)) == file.sha256:
            return None, True
        return f"has sha256 {actual[:12]}… but the ledger recorded {file.sha256[:12]}…", False
    if recorded is None or recorded.sha256 != file.sha256:
        return f"has no hash list in the ledger for its digest {file.sha256[:12]}…", False
    size, bs = path.stat().st_size, recorded.block_size
    if -(-size // bs) != len(recorded.blocks):
        return (f"has {size:,} bytes, but the ledger's hash list has {len(recorded.blocks)} blocks of {bs:,}: it was "
                "truncated or extended"), False
    which = recorded.differing(checked) if checked is not None else range(len(recorded.blocks))
    if checked is not None and lazy_from is not None:
        which = [j for j in which if j * bs < lazy_from]
    actual = digests.hash_blocks(path, which, None, bs, recorded.leaf_size)
    bad = [j for j, d in sorted(actual.items()) if d != recorded.blocks[j]]
    if not bad:
        return None, False
    if retry:
        patched = digests.hash_blocks(path, bad, erasure.index_holes(path, unfinished, holes_too=True), bs,
                                      recorded.leaf_size)
        if all(patched[j] == recorded.blocks[j] for j in bad):
            return None, True
    return (f"differs from the ledger's hash list in {len(bad)} of its {len(recorded.blocks)} blocks "
            f"(the first at byte {bad[0] * bs:,})"), False


def recorded_hash_lists(session: Session, files) -> dict[str, digests.HashList]:
    """The hash lists the ledger holds for these files' digests, by path."""
    rows = session.indexes.hash_lists([f.path for f in files if f.block_size])
    return {f.path: digests.HashList.from_text(*rows[f.path, f.sha256]) for f in files if (f.path, f.sha256) in rows}


def index_vectors(index: faiss.Index, copy: bool = True) -> np.ndarray:
    """The stored vectors of an exact index, in the order of its ids: a copy, safe after the
    index goes, or (`copy=False`) a view valid while it lives. An approximate index holds no
    exact vectors: read them from the embedding files instead."""
    kind = kind_for(index)
    vectors = kind.exact_vectors(index)
    if vectors is None:
        raise TypeError(f"a {kind.describe(index)} index holds no exact vectors; read them from the embedding files")
    return vectors.copy() if copy else vectors


def held_ids(index: faiss.Index) -> np.ndarray:
    """The vector ids an index holds, its holes (id -1, where a forget erased one) aside."""
    ids = index_ids(index)
    return ids[ids != erasure.HOLE_ID]


def searcher_of(index: faiss.Index) -> tuple[Searcher, int]:
    """What searches a loaded index (its kind's searcher: exact over a flat index's own
    vectors, list by list for IVF-Flat, ...), and how many holes it holds (a mapped index keeps
    them; its searcher skips them)."""
    holes = index.ntotal - len(held_ids(index))
    return kind_for(index).searcher(index, holes), holes


def _without(index: faiss.Index, unfinished: np.ndarray) -> faiss.Index:
    """The index (read whole) without its holes and without these ids, where it has any."""
    ids = index_ids(index)
    gone = (ids == erasure.HOLE_ID) | np.isin(ids, unfinished)
    if gone.any():
        kind_for(index).drop(index, np.unique(ids[gone]))
    return index


def _unlink_with_sidecars(path: Path) -> None:
    """An index file goes with its manifest and its leaves' digests."""
    for p in (path, manifest_path(path), digests.leaves_path(path)):
        p.unlink(missing_ok=True)


def file_name(version: int, position: int, role: str) -> str:
    """`v<version>.faiss` for the first file a version writes (in a shard), then `.s<j>` for the
    pieces of an exact base and `.delta` for an add's delta."""
    if role == "delta":
        return f"v{version:06d}.delta.faiss"
    return f"v{version:06d}.faiss" if position == 0 else f"v{version:06d}.s{position:03d}.faiss"


class IndexStore:
    def __init__(self, layout: Layout, ledger: LedgerBase, encoder_id: str, encoder_slug: str, dim: int,
                 policy: IndexPolicy | None = None, n_shards: int = 1):
        """`n_shards`: how many shards a new memory gets (shards.py); an existing one keeps its own
        (its live version's) until `rebuild(n_shards=...)` re-shards it."""
        self.layout, self.ledger = layout, ledger
        self.encoder_id, self.dim = encoder_id, dim
        self.root = layout.indexes(encoder_slug)
        self.policy = policy or IndexPolicy()
        self.n_shards = shards.check_count(n_shards)

    def shard_dir(self, shard: int, n_shards: int) -> Path:
        """Where a shard's files live: the encoder's folder for a memory in one piece, else a
        folder per shard (which a shard worker may keep on its own disk)."""
        return self.root if n_shards == 1 else self.root / f"shard-{shard}-of-{n_shards}"

    def _folders(self) -> list[Path]:
        return [self.root, *sorted(self.root.glob("shard-*-of-*"))] if self.root.exists() else []

    def shard_groups(self) -> list[tuple[int, int]]:
        """(n_shards, shard) of every shard holding files of a version that is not purged: the
        live sharding's, and an older sharding's while a version of it is retained."""
        return sorted({(v.n_shards, f.shard) for v in self.versions() if v.status != "purged" for f in v.files})

    def live(self) -> IndexVersion | None:
        with self.ledger.connect() as s:
            row = s.indexes.live(self.encoder_id)
        return IndexVersion.from_row(row) if row else None

    def versions(self) -> list[IndexVersion]:
        with self.ledger.connect() as s:
            return [IndexVersion.from_row(row) for row in s.indexes.versions(self.encoder_id)]

    # ---- reading -----------------------------------------------------------------------------

    def load(self, version: IndexVersion | None = None, mmap: bool = False,
             shard: int | None = None) -> tuple[IndexVersion, faiss.Index]:
        """Read a version (the live one by default), or one shard of it, as one index, refusing
        bytes that don't match the ledger: its base, with its pieces' and deltas' vectors added, without holes (erased
        entries) or the vectors of a forget request a crash left unfinished. `mmap`: map the
        vectors or inverted lists instead of reading them into memory (for searching: the pages
        are the file's, shared and reclaimable); such an index must not be changed (FAISS would
        write into a read-only mapping), so writers load without it, and so does a version of
        several files (until the next fold or compaction). A mapped index keeps its holes (id -1):
        its searchers skip them (ivf_search.py)."""
        version = version or self.live()
        if version is None:
            raise FileNotFoundError(f"no index for encoder {self.encoder_id} yet: add an image set first (vismem add)")
        files = self._files_of(version, shard)
        unfinished = self._unfinished_forgets()
        recorded = self.hash_lists_of(files)
        first, mapped, _ = self._read(files[0], version, unfinished, mmap=mmap and len(files) == 1, recorded=recorded)
        index = first if mapped else _without(first, unfinished)
        # The other files (an exact base's pieces, the deltas: exact files) have their vectors
        # added to the first: an exact index grows, an IVF one assigns them to its lists.
        for file in files[1:]:
            part = self._read(file, version, unfinished, recorded=recorded)[0]
            if part.ntotal:
                ids = index_ids(part)
                keep = (ids != erasure.HOLE_ID) & ~np.isin(ids, unfinished)
                index.add_with_ids(index_vectors(part, copy=False)[keep], ids[keep])
        return version, index

    def load_for_search(self, version: IndexVersion | None = None,
                        shard: int | None = None) -> tuple[IndexVersion, faiss.Index]:
        """`load`, memory-mapped where the version's kind is searched from the file's pages (IVF:
        a search touches a few lists, and processes share the pages), read whole otherwise."""
        version = version or self.live()
        return self.load(version, mmap=version is not None and kind_described(version.index_type).map_for_search,
                         shard=shard)

    @staticmethod
    def _files_of(version: IndexVersion, shard: int | None) -> tuple[IndexFile, ...]:
        if shard is None:
            if version.n_shards > 1:
                raise shards.ShardError(f"index version {version.version} is in {version.n_shards} shards: "
                                        "load them one by one")
            return version.files
        if not 0 <= shard < version.n_shards:
            raise shards.ShardError(f"index version {version.version} has shards 0..{version.n_shards - 1}, not {shard}")
        return version.shard_files(shard)

    def ids(self, version: IndexVersion | None = None) -> np.ndarray:
        """The vector ids a version holds (holes aside), without reading its vectors: each file
        memory-mapped, only the pages of its ids touched. Integrity is `load`'s check, made before
        anything is searched or changed; this only decides what is already in."""
        version = version or self.live()
        if version is None:
            return np.empty(0, np.int64)
        return np.concatenate([held_ids(faiss.read_index(str(self._existing(f.path)),
                                                         faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY))
                               for f in version.files])

    def load_file(self, file: IndexFile, version: IndexVersion, unfinished: np.ndarray, mmap: bool = False,
                  recorded: dict[str, digests.HashList] | None = None) -> tuple[faiss.Index, bool, digests.HashList | None]:
        """One file of a version as its own index, checked against its digest, without holes or
        `unfinished` forgets' vectors unless memory-mapped: (index, whether mapped, the hash list
        it was checked against). `recorded`: the hash lists `hash_lists_of` gave for the
        version's files, if at hand."""
        index, mapped, listed = self._read(file, version, unfinished, mmap=mmap, recorded=recorded)
        return (index if mapped else _without(index, unfinished)), mapped, listed

    def file_ids(self, file: IndexFile) -> np.ndarray:
        """The vector ids a file holds now in storage order, holes (-1) included, reading only the
        pages of its ids."""
        return index_ids(faiss.read_index(str(self._existing(file.path)), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY))

    def _existing(self, relative: str, version: IndexVersion | None = None) -> Path:
        path = self.layout.absolute(relative)
        if not path.exists():
            raise IndexIntegrityError(f"index {f'version {version.version} is missing its file' if version else 'file'} "
                                      f"{path}{'' if version else ' is missing'}; run `vismem rebuild` to write a fresh version")
        return path

    def _read(self, file: IndexFile, version: IndexVersion, unfinished: np.ndarray, mmap: bool = False,
              recorded: dict[str, digests.HashList] | None = None) -> tuple[faiss.Index, bool, digests.HashList | None]:
        """(the file's index, whether it is memory-mapped, its recorded hash list), once its bytes
        are checked (`verify`); a file that is right only once a crash's unfinished erasure is
        done is read whole, for `load` to drop what it erases."""
        path = self._existing(file.path, version)
        recorded = (self.hash_lists_of([file]) if recorded is None else recorded).get(file.path)
        problem, unerased = self.verify(file, recorded, unfinished)
        if problem:
            raise IndexIntegrityError(f"index file {path} {problem} for version {version.version}: it was changed or "
                                      "damaged. Run `vismem rebuild` to write a fresh version from the ledger and embeddings")
        mmap = mmap and not unerased
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        if index.d != self.dim:
            raise EncoderMismatchError(f"index {path} has dimension {index.d}, encoder {self.encoder_id} has {self.dim}")
        return index, mmap, recorded

    def hash_lists_of(self, files) -> dict[str, digests.HashList]:
        """The hash lists the ledger recorded for these files, by path (a file whose digest is of
        its bytes, or whose list is missing, has none), in one query."""
        found = {f.path: f.hash_list for f in files if f.hash_list is not None}
        wanted = [f for f in files if f.block_size and f.hash_list is None]
        if wanted:
            with self.ledger.connect() as s:
                found |= recorded_hash_lists(s, wanted)
        return found

    def verify(self, file: IndexFile, recorded: digests.HashList | None, unfinished: np.ndarray = np.empty(0, np.int64),
               checked: digests.HashList | None = None, lazy_from: int | None = None) -> tuple[str | None, bool]:
        """`verify_file` on a file of this store (missing: IndexIntegrityError)."""
        return verify_file(self._existing(file.path), file, recorded, unfinished, checked, lazy_from)

    def _unfinished_forgets(self) -> np.ndarray:
        """Vector ids of forget requests accepted but not yet applied (a crash mid-way)."""
        with self.ledger.connect() as s:
            return s.indexes.unfinished_forget_ids()

    # ---- writing versions --------------------------------------------------------------------

    def add(self, vector_ids: np.ndarray, vectors: np.ndarray) -> IndexVersion:
        """A new version = the live one plus these vectors: O(new) work. Each goes to its sample's
        shard (shards.py); in a shard, few of them (see the
        module docstring) go into a delta file of their own, otherwise the shard's files and these
        are folded into a new base of its type (an IVF index assigns them to its trained lists);
        shards that get none keep their files. The first version of a memory is built by the
        policy, like a rebuild (then the version carries its build report)."""
        self._check(vectors)
        vector_ids = np.asarray(vector_ids, np.int64)
        with self.ledger.connect() as s:  # hold the ledger lock from reading the parent to recording the child
            parent = self.live()
            n_shards = parent.n_shards if parent else self.n_shards
            route = self._route(s, vector_ids, n_shards)
            if parent is None:
                built = self._build_shards(vector_ids, vectors, route, n_shards)
                version = self._next_version(s)
                files = self._write_shards(built, version, n_shards)
                return self._record(s, version, None, "add", files, built[0][0], files, added=vector_ids,
                                    report=built[0][1], n_shards=n_shards)
            present = np.isin(vector_ids, self.ids(parent))
            if present.any():
                raise ValueError(f"{int(present.sum())} vector ids are already in index version {parent.version}")
            version = self._next_version(s)
            files, written, first_base = [], [], None
            for j in range(n_shards):
                own, mine = parent.shard_files(j), route == j
                if not mine.any():
                    files += own
                    continue
                ids, vecs = (vector_ids, vectors) if n_shards == 1 else (vector_ids[mine], vectors[mine])
                deltas = [f for f in own if f.role == "delta"]
                in_deltas = sum(d.n_vectors for d in deltas) + len(ids)
                if (len(deltas) < self.policy.max_deltas
                        and in_deltas <= self.policy.delta_fraction * sum(f.n_vectors for f in own if f.role == "base")):
                    new = (self._write(flat_index(ids, vecs), version, j, n_shards, 0, "delta"),)
                    files += (*own, *new)
                else:
                    _, index = self.load(parent, shard=j)  # fold: base, deltas and the new vectors into a new base
                    index.add_with_ids(np.ascontiguousarray(vecs, np.float32), ids)
                    new = self._write_base(index, version, j, n_shards)
                    files += new
                    first_base = index if j == 0 else first_base
                written += new
            return self._record(s, version, parent, "add", tuple(files), first_base, written, added=vector_ids)

    def rebuild(self, vector_ids: np.ndarray, vectors: np.ndarray, operation: str = "rebuild",
                n_shards: int | None = None) -> IndexVersion:
        """A new version built from scratch from the given vectors (the ledger + embeddings), each
        shard of the index type the policy chooses for its size (trained and recall-checked if
        approximate), carrying what its (first shard's) build chose and measured (`version.build`).
        `n_shards`: re-shard into that many (default: as the live version is)."""
        self._check(vectors)
        vector_ids = np.asarray(vector_ids, np.int64)
        live = self.live()
        n_shards = shards.check_count(n_shards if n_shards is not None else live.n_shards if live else self.n_shards)
        with self.ledger.connect() as s:
            route = self._route(s, vector_ids, n_shards)
        built = self._build_shards(vector_ids, vectors, route, n_shards)
        with self.ledger.connect() as s:
            version = self._next_version(s)
            files = self._write_shards(built, version, n_shards)
            return self._record(s, version, self.live(), operation, files, built[0][0], files, report=built[0][1],
                                n_shards=n_shards)

    @staticmethod
    def _route(s: Session, vector_ids: np.ndarray, n_shards: int) -> np.ndarray:
        """Each vector's shard, by its sample id (read from the ledger only if there are several)."""
        if n_shards == 1:
            return np.zeros(len(vector_ids), np.int64)
        return shards.shard_of(s.samples.sample_ids_of(vector_ids), n_shards)

    def _build_shards(self, vector_ids: np.ndarray, vectors: np.ndarray, route: np.ndarray,
                      n_shards: int) -> list[tuple[faiss.Index, BuildReport]]:
        """Each shard's index, as the policy chooses for its size (an empty shard: exact, empty)."""
        if n_shards == 1:
            return [build(vector_ids, vectors, self.policy)]
        built = []
        for j in range(n_shards):
            mine = route == j
            if not mine.any():
                empty = flat_index(np.empty(0, np.int64), np.empty((0, self.dim), np.float32))
                built.append((empty, BuildReport("flat", FLAT_FACTORY, "exact: an empty shard", "flat")))
            else:
                built.append(build(vector_ids[mine], vectors[mine], self.policy))
        return built

    def _write_shards(self, built: list[tuple[faiss.Index, BuildReport]], version: int,
                      n_shards: int) -> tuple[IndexFile, ...]:
        return tuple(f for j, (index, _) in enumerate(built) for f in self._write_base(index, version, j, n_shards))

    def erase(self, vector_ids: np.ndarray, request_id: str,
              shard: tuple[int, int] | None = None) -> tuple[IndexVersion | None, int]:
        """Forget these vectors in every version, live and retained, or only in one shard's files
        (`shard`: (n_shards, shard), as `shard_groups` lists them): each file holding some,
        whichever versions share it, has them erased in place (erasure.py), its new digest
        recorded first. Returns (the new live version: the live one's files, erased; its parent
        purged, being the same bytes; or None if the live version held none of them, the number
        of entries erased). Running it again after a crash finishes the erasure the first attempt
        recorded (file by file)."""
        with self.ledger.connect() as s:  # one writer from finding the vectors to recording them
            found = self.prepare_erasure(vector_ids, request_id, shard)
            if found is None:
                return None, 0
            found.write()
            found.finish(s)
            return found.live, found.n_erased

    def prepare_erasure(self, vector_ids: np.ndarray, request_id: str,
                        shard: tuple[int, int] | None = None) -> "Erasure | None":
        """`erase` up to the ledger: the vectors found in each file and the file's new digest
        recorded (and the new live version), no byte changed yet; None where no file holds any.
        The caller writes the bytes (`Erasure.write`, files only: it may run beside ledger work)
        and then, under the writer's lock, finishes (`Erasure.finish`)."""
        vector_ids = np.unique(np.asarray(vector_ids, np.int64))
        with self.ledger.connect() as s:  # one writer from finding the vectors to recording them
            recorded = s.indexes.erased_paths(self.encoder_id, request_id)
            versions = [v for v in self.versions() if v.status != "purged"]
            files = {f.path: f for v in versions for f in v.files if shard is None or (v.n_shards, f.shard) == shard}
            lists = self.hash_lists_of(list(files.values()))

            def locate(file: IndexFile) -> tuple[erasure.Holes, digests.HashList | None]:
                # A retry also patches the holes already there (some may be half written); its
                # digests were recorded by the first attempt. Only the pages a patch touches are
                # hashed again (a file recorded without leaves is hashed whole, and gets them now).
                retry = file.path in recorded
                path = self._existing(file.path)
                found = erasure.index_holes(path, vector_ids, holes_too=retry and file.holes > 0)
                touched = any(len(p) for p in found.patches)
                return found, digests.hash_list(path, found, known=lists.get(file.path)) if touched and not retry else None

            with ThreadPoolExecutor(2) as pool:  # FAISS reading and hashing let go of the GIL: two files at once
                located = dict(zip(files, pool.map(locate, files.values())))
            holes = {path: found for path, (found, _) in located.items() if any(len(p) for p in found.patches)}
            if not holes:  # none of them in these files
                return None
            fresh = {path: found for path, found in holes.items() if path not in recorded}
            live = None
            if fresh:
                live = self._record_erasure(s, versions, files, fresh, {path: located[path][1] for path in fresh},
                                            request_id)
            return Erasure(self, request_id, holes, {path: located[path][1] for path in fresh}, live,
                           sum(len(found) for found in fresh.values()))

    def _record_erasure(self, s: Session, versions: list[IndexVersion], files: dict[str, IndexFile],
                        holes: dict[str, erasure.Holes], lists: dict[str, digests.HashList],
                        request_id: str) -> IndexVersion | None:
        """Record, before a byte changes, what erasing `holes` makes of each file and version."""
        changed = {path: replace(files[path], sha256=lists[path].sha256, block_size=lists[path].block_size,
                                 leaf_size=lists[path].leaf_size, n_vectors=files[path].n_vectors - len(found), holes=files[path].holes + len(found),
                                 hash_list=None)
                   for path, found in holes.items()}
        live = next((v for v in versions if v.status == "live"), None)
        with self.ledger.transaction():
            for path, found in holes.items():
                new = changed[path]
                s.indexes.record_erasure(self.encoder_id, path, request_id, len(found), files[path].sha256, new.sha256)
                s.indexes.record_blocks(self.encoder_id, path, new.sha256, lists[path])
                s.indexes.drop_blocks(path, files[path].sha256)
            for v in versions:  # (the live one is superseded below, as it was written)
                touched = [f for f in v.files if f.path in changed]
                if v.status != "retained" or not touched:
                    continue
                now = tuple(changed.get(f.path, f) for f in v.files)
                s.indexes.set_files(self.encoder_id, v.version, now[0].path, now[0].sha256,
                                    sum(f.n_vectors for f in now), _json(now))
                for f in touched:
                    s.indexes.record_rewrite(self.encoder_id, v.version, request_id, f.sha256, changed[f.path].sha256,
                                             len(holes[f.path]), f.path)
            if live is None or not any(f.path in changed for f in live.files):
                return None
            # A piece or delta left with only holes drops out of the new version (each shard's first
            # base file stays).
            now = tuple(f for j, f in enumerate(changed.get(f.path, f) for f in live.files)
                        if f.n_vectors or j == 0 or live.files[j - 1].shard != f.shard)
            removed = np.concatenate([holes[f.path].vector_ids for f in live.files if f.path in holes])
            version = self._next_version(s)
            new = self._record(s, version, live, "forget", now, None, [], removed=removed)
            s.indexes.purge(self.encoder_id, live.version,
                            f"superseded by forget version {version}: the same files, erased in place")
            return new

    # ---- files no version names --------------------------------------------------------------

    def named_files(self) -> dict[str, IndexFile]:
        """Every file a version that is not purged names (live and retained), by path."""
        return {f.path: f for v in self.versions() if v.status != "purged" for f in v.files}

    def remove_unreferenced_files(self) -> list[Path]:
        """Index files the ledger does not name (left by a crash between write and record)."""
        with self.ledger.connect():
            named = {self.layout.absolute(p) for p in self.named_files()}
            stray = [p for folder in self._folders() for p in folder.glob("v*.faiss") if p not in named]
            for p in stray:
                _unlink_with_sidecars(p)
            for leaves in (p for folder in self._folders() for p in folder.glob("v*.leaves")):
                if leaves.with_suffix(".faiss") not in named:   # (a crash between a file and its leaves)
                    leaves.unlink(missing_ok=True)
            for folder in self._folders()[1:]:  # a shard folder of a sharding no version names any more
                if not any(folder.iterdir()):
                    folder.rmdir()
            return stray

    def _delete_unnamed(self, paths: list[str]) -> None:
        named = self.named_files()
        gone = [rel for rel in dict.fromkeys(paths) if rel not in named]
        for rel in gone:
            _unlink_with_sidecars(self.layout.absolute(rel))
        if gone:
            with self.ledger.transaction() as s:
                for rel in gone:
                    s.indexes.drop_blocks(rel)

    def retain(self, keep: int) -> list[IndexVersion]:
        """Keep the live version and the `keep - 1` newest before it; purge the older ones (and
        delete each of their files no kept version shares)."""
        retained = [v for v in self.versions() if v.status == "retained"]  # oldest first
        old = retained[: max(len(retained) - (keep - 1), 0)]
        self._purge(old, note=f"retention: newest {keep} kept")
        return old

    def _purge(self, versions: list[IndexVersion], note: str) -> None:
        with self.ledger.transaction() as s:
            for v in versions:
                s.indexes.purge(self.encoder_id, v.version, note)
        # Files go after the ledger says so: a crash here leaves only an orphan file.
        self._delete_unnamed([f.path for v in versions for f in v.files])

    # ---- manifests ---------------------------------------------------------------------------

    def write_manifest(self, index_path: Path, **fields) -> None:
        """A JSON sidecar a person (or an auditor) can read without the ledger."""
        body = {"encoder_id": self.encoder_id, "index_file": index_path.name, **fields}
        write_bytes_atomic(manifest_path(index_path), json.dumps(body, indent=2, default=str).encode())

    def refresh_manifest(self, version: IndexVersion, session: Session) -> None:
        """Bring the newest file's manifest of a version (and its ledger row) to the chain head."""
        self._manifest(session, version.files[-1], version, index_type=version.index_type)
        session.indexes.set_chain_head(self.encoder_id, version.version, chain_head(session)[0])

    def _manifest(self, s: Session, file: IndexFile, version: IndexVersion, head: tuple[str, int] | None = None,
                  **fields) -> None:
        head, n_deletions = head or chain_head(s)
        self.write_manifest(self.layout.absolute(file.path), version=version.version, sha256=file.sha256,
                            block_size=file.block_size, leaf_size=file.leaf_size,
                            n_vectors=file.n_vectors, role=file.role, parent_version=version.parent_version,
                            operation=version.operation, chain_head=head, n_deletions=n_deletions,
                            version_files=[f.to_dict() for f in version.files], **fields)

    # ---- internals ---------------------------------------------------------------------------

    def _check(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"vectors of shape {vectors.shape} cannot go into an index of encoder {self.encoder_id} (dimension {self.dim})"
            )

    def _next_version(self, s: Session) -> int:
        # Called with the ledger lock held, so no other write is under way: temp files here are
        # what a killed writer left behind.
        for stale in (p for folder in self._folders() for p in folder.glob(".v*.faiss.*.tmp")):
            stale.unlink(missing_ok=True)
        return s.indexes.next_version(self.encoder_id)

    def _write(self, index: faiss.Index, version: int, shard: int, n_shards: int, position: int,
               role: str) -> IndexFile:
        final = self.shard_dir(shard, n_shards) / file_name(version, position, role)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as tmp:
            faiss.write_index(index, str(tmp))
        hashed = digests.hash_list(final)
        digests.keep_leaves(final, hashed)
        return IndexFile(self.layout.relative(final), hashed.sha256, int(index.ntotal), role, shard=shard,
                         block_size=hashed.block_size, leaf_size=hashed.leaf_size, hash_list=hashed)

    def _write_base(self, index: faiss.Index, version: int, shard: int = 0, n_shards: int = 1) -> tuple[IndexFile, ...]:
        """A shard's base in the files its kind splits it into: an exact one in pieces of about
        `shard_mib` (forgetting a vector rewrites its piece only), an IVF one whole."""
        parts = kind_for(index).shards(index, self.policy.shard_mib << 20)
        return tuple(self._write(part, version, shard, n_shards, j, "base") for j, part in enumerate(parts))

    def _record(self, s: Session, version: int, parent: IndexVersion | None, operation: str, files: tuple[IndexFile, ...],
                base_index: faiss.Index | None, written,
                added: np.ndarray | None = None, removed: np.ndarray | None = None,
                report: BuildReport | None = None, n_shards: int | None = None) -> IndexVersion:
        """Record a version whose files are written (`written`: those it wrote itself; the others it
        shares with its parent), mark it live, and its parent retained. `base_index`: the base
        (or its first file) as written, if this version wrote it (else the parent's type and
        nprobe stand). A build's
        `report` gives its measured recall; a version derived from its parent (add, forget) keeps
        the parent's, with the version that measured it. `n_shards`: a build's (else the parent's)."""
        n_shards = n_shards or (parent.n_shards if parent else 1)
        if base_index is not None:
            base_kind = kind_for(base_index)
            kind, nprobe = base_kind.describe(base_index), base_kind.nprobe(base_index)
        else:
            kind, nprobe = parent.index_type, parent.nprobe
        if report is not None:
            approximate = report.kind != "flat"
            recall = (report.recall_at_10 if approximate else None, report.recall_at_100 if approximate else None,
                      version if approximate else None, report.reason)
        elif parent is not None and parent.index_type == kind:
            recall = (parent.recall_at_10, parent.recall_at_100, parent.recall_measured_at, parent.build_reason)
        else:
            recall = (None, None, None, None)
        n_added = len(added) if added is not None else 0
        n_removed = len(removed) if removed is not None else 0
        first = files[0]
        new = IndexVersion(self.encoder_id, version, first.path, first.sha256, parent.version if parent else None,
                           operation, sum(f.n_vectors for f in files), n_added, n_removed, "live",
                           kind, nprobe, *recall, n_shards=n_shards, files=tuple(files), build=report)
        chain = chain_head(s)
        head = chain[0]
        for file in written:
            self._manifest(s, file, new, head=chain, index_type=kind, nprobe=nprobe,
                           recall_at_10=recall[0], recall_at_100=recall[1], recall_measured_at=recall[2],
                           build=report.to_dict() if report and file == first else None)
        with self.ledger.transaction():
            for file in written:
                if file.hash_list is not None:
                    s.indexes.record_blocks(self.encoder_id, file.path, file.sha256, file.hash_list)
            s.indexes.record_version(
                encoder_id=self.encoder_id, version=version, path=first.path, sha256=first.sha256,
                parent_version=new.parent_version, operation=operation, n_vectors=new.n_vectors, index_type=kind,
                n_added=n_added, n_removed=n_removed, chain_head=head, nprobe=nprobe, recall_at_10=recall[0],
                recall_at_100=recall[1], recall_measured_at=recall[2], build_reason=recall[3],
                build_report=json.dumps(report.to_dict()) if report else None, files=_json(files),
                n_shards=n_shards)
            for change, ids in (("add", added), ("remove", removed)):
                if ids is not None and len(ids):
                    s.indexes.record_delta(self.encoder_id, version, change, ids)
        return new


def _json(files) -> str:
    return json.dumps([f.to_dict() for f in files])
