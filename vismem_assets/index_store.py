"""Versioned FAISS indexes: immutable files `indexes/<encoder>/v<version>.faiss`, each
readable with plain `faiss.read_index`, ids = samples.vector_id. Which index type a version
is (exact flat, IVF-Flat, IVF-PQ) and what its build measured is in index_types.py.

A version is written whole to a temp file, fsynced and renamed, and only then recorded in
the ledger (which marks it live and its parent retained). A crash at any point leaves the
previous version live and loadable; the ledger never names a file that was not completed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .atomic import atomic_path, write_bytes_atomic
from .encoders.base import EncoderMismatchError
from .home import Layout
from .index_types import BuildReport, IndexPolicy, build, describe, index_ids, kind_of, new_flat_index, remove_ids
from .ledger import Ledger

__all__ = ["IndexStore", "IndexVersion", "IndexIntegrityError", "index_ids", "index_vectors", "new_flat_index"]
GENESIS = "0" * 64  # prev_hash of the first deletion


class IndexIntegrityError(RuntimeError):
    """An index file does not match the sha256 the ledger recorded for it."""


@dataclass(frozen=True)
class IndexVersion:
    encoder_id: str
    version: int
    path: str
    sha256: str
    parent_version: int | None
    operation: str
    n_vectors: int
    n_added: int
    n_removed: int
    status: str
    index_type: str = "IDMap2,Flat"
    nprobe: int | None = None
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    recall_measured_at: int | None = None   # the version whose build measured that recall
    build_reason: str | None = None


def manifest_path(index_path: Path) -> Path:
    return Path(index_path).with_suffix(".json")


def chain_head(con) -> tuple[str, int]:
    """(row_hash of the last deletion, number of deletions): what every manifest records."""
    row = con.execute("SELECT row_hash, seq FROM deletions ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], int(row[1])) if row else (GENESIS, 0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def index_vectors(index: faiss.Index) -> np.ndarray:
    """The stored vectors of a flat index, in id-map order (a copy, safe after the index goes).
    An approximate index holds no exact vectors: read them from the embedding files instead."""
    if kind_of(index) != "flat":
        raise TypeError(f"a {describe(index)} index holds no exact vectors; read them from the embedding files")
    flat = faiss.downcast_index(faiss.downcast_index(index).index)
    return faiss.rev_swig_ptr(flat.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


_COLUMNS = ("encoder_id, version, path, sha256, parent_version, operation, n_vectors, n_added, n_removed, status,"
            " index_type, nprobe, recall_at_10, recall_at_100, recall_measured_at, build_reason")


class IndexStore:
    def __init__(self, layout: Layout, ledger: Ledger, encoder_id: str, encoder_slug: str, dim: int,
                 policy: IndexPolicy | None = None):
        self.layout, self.ledger = layout, ledger
        self.encoder_id, self.dim = encoder_id, dim
        self.root = layout.indexes(encoder_slug)
        self.policy = policy or IndexPolicy.from_env()
        self.last_build: BuildReport | None = None  # what the latest build here chose and measured

    def live(self) -> IndexVersion | None:
        rows = self.ledger.query(
            f"SELECT {_COLUMNS} FROM index_versions WHERE encoder_id = ? AND status = 'live'", [self.encoder_id]
        )
        return IndexVersion(**rows.row(0, named=True)) if len(rows) else None

    def versions(self) -> list[IndexVersion]:
        rows = self.ledger.query(
            f"SELECT {_COLUMNS} FROM index_versions WHERE encoder_id = ? ORDER BY version", [self.encoder_id]
        )
        return [IndexVersion(**r) for r in rows.iter_rows(named=True)]

    def load(self, version: IndexVersion | None = None, mmap: bool = False) -> tuple[IndexVersion, faiss.Index]:
        """Read a version (the live one by default), refusing bytes that don't match the ledger.
        `mmap`: map the vectors or inverted lists instead of reading them into memory (for
        searching: the pages are the file's, shared and reclaimable); such an index must not
        be changed (FAISS would write into a read-only mapping), so writers load without it."""
        version = version or self.live()
        if version is None:
            raise FileNotFoundError(f"no index yet for encoder {self.encoder_id}: add an image set first (vismem add)")
        path = self.layout.absolute(version.path)
        if not path.exists():
            raise IndexIntegrityError(
                f"index version {version.version} is missing its file {path}; run `vismem rebuild` to write a fresh version"
            )
        actual = sha256_file(path)
        if actual != version.sha256:
            raise IndexIntegrityError(
                f"index file {path} has sha256 {actual[:12]}… but the ledger recorded {version.sha256[:12]}… "
                f"for version {version.version}: it was changed or damaged. Run `vismem rebuild` to write a "
                "fresh version from the ledger and embeddings"
            )
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        if index.d != self.dim:
            raise EncoderMismatchError(f"index {path} has dimension {index.d}, encoder {self.encoder_id} has {self.dim}")
        return version, index

    def add(self, vector_ids: np.ndarray, vectors: np.ndarray,
            base: tuple[IndexVersion, faiss.Index] | None = None) -> IndexVersion:
        """A new version = the live one (or `base`, already loaded) plus these vectors: O(new) FAISS
        work, in the parent's index type (an IVF index assigns them to its trained lists). The
        first version of a memory is built by the policy, like a rebuild."""
        self._check(vectors)
        vector_ids = np.asarray(vector_ids, np.int64)
        with self.ledger.connect():  # hold the ledger lock from reading the parent to recording the child
            parent, index = base or (self.load() if self.live() else (None, None))
            if parent is None:
                index, self.last_build = build(vector_ids, vectors, self.policy)
                return self._commit(index, None, "add", added=vector_ids, report=self.last_build)
            self.last_build = None  # an add builds nothing: no build report of its own
            present = np.isin(vector_ids, index_ids(index))
            if present.any():
                raise ValueError(f"{int(present.sum())} vector ids are already in index version {parent.version}")
            index.add_with_ids(np.ascontiguousarray(vectors, np.float32), vector_ids)
            return self._commit(index, parent, "add", added=vector_ids)

    def rebuild(self, vector_ids: np.ndarray, vectors: np.ndarray, operation: str = "rebuild") -> IndexVersion:
        """A new version built from scratch from the given vectors (the ledger + embeddings), of the
        index type the policy chooses for its size (trained and recall-checked if approximate)."""
        self._check(vectors)
        index, self.last_build = build(np.asarray(vector_ids, np.int64), vectors, self.policy)
        with self.ledger.connect():
            return self._commit(index, self.live(), operation, report=self.last_build)

    def remove(self, vector_ids: np.ndarray) -> IndexVersion | None:
        """A new live version without these vectors (really removed, not filtered at search time)."""
        with self.ledger.connect():
            parent = self.live()
            if parent is None:
                return None
            _, index = self.load(parent)
            present = np.intersect1d(index_ids(index), vector_ids)
            if not len(present):
                return None
            remove_ids(index, present)
            return self._commit(index, parent, "forget", removed=present)

    def rewrite_without(self, version: IndexVersion, vector_ids: np.ndarray, request_id: str) -> bool:
        """Rewrite a retained version without these vectors under a new file name; the ledger
        switches to it (old and new sha256 recorded) before the old file is deleted."""
        with self.ledger.connect() as con:
            _, index = self.load(version)
            present = np.intersect1d(index_ids(index), vector_ids)
            if not len(present):
                return False
            remove_ids(index, present)
            final = self.root / f"v{version.version:06d}.r{request_id[:12]}.faiss"
            with atomic_path(final) as tmp:
                faiss.write_index(index, str(tmp))
            digest = sha256_file(final)
            head, n_deletions = chain_head(con)
            self.write_manifest(final, version=version.version, sha256=digest, parent_version=version.parent_version,
                                operation=version.operation, n_vectors=index.ntotal, chain_head=head,
                                n_deletions=n_deletions, index_type=describe(index), rewritten_for=request_id)
            with self.ledger.transaction():
                con.execute("INSERT INTO index_rewrites VALUES (?, ?, ?, ?, ?, ?, now())",
                            [self.encoder_id, version.version, request_id, version.sha256, digest, len(present)])
                con.execute("UPDATE index_versions SET path = ?, sha256 = ?, n_vectors = ?, chain_head = ?"
                            " WHERE encoder_id = ? AND version = ?",
                            [self.layout.relative(final), digest, index.ntotal, head, self.encoder_id, version.version])
            old = self.layout.absolute(version.path)
            old.unlink(missing_ok=True)
            manifest_path(old).unlink(missing_ok=True)
            return True

    def remove_unreferenced_files(self) -> list[Path]:
        """Index files the ledger does not name (left by a crash between write and record)."""
        with self.ledger.connect():
            named = {self.layout.absolute(v.path) for v in self.versions() if v.status != "purged"}
            stray = [p for p in self.root.glob("v*.faiss") if p not in named] if self.root.exists() else []
            for p in stray:
                p.unlink(missing_ok=True)
                manifest_path(p).unlink(missing_ok=True)
            return stray

    def write_manifest(self, index_path: Path, **fields) -> None:
        """A JSON sidecar a person (or an auditor) can read without the ledger."""
        body = {"encoder_id": self.encoder_id, "index_file": index_path.name, **fields}
        write_bytes_atomic(manifest_path(index_path), json.dumps(body, indent=2, default=str).encode())

    def retain(self, keep: int) -> list[IndexVersion]:
        """Keep the live version and the `keep - 1` newest before it; purge (delete) older files."""
        retained = [v for v in self.versions() if v.status == "retained"]  # oldest first
        old = retained[: max(len(retained) - (keep - 1), 0)]
        self._purge(old, note=f"retention: newest {keep} kept")
        return old

    def purge(self, version: int | None, note: str) -> None:
        self._purge([v for v in self.versions() if v.version == version and v.status == "retained"], note)

    def _purge(self, versions: list[IndexVersion], note: str) -> None:
        with self.ledger.transaction() as con:
            for v in versions:
                con.execute("UPDATE index_versions SET status = 'purged', note = ? WHERE encoder_id = ? AND version = ?",
                            [note, self.encoder_id, v.version])
        for v in versions:  # files go after the ledger says so: a crash here leaves only an orphan file
            self.layout.absolute(v.path).unlink(missing_ok=True)
            manifest_path(self.layout.absolute(v.path)).unlink(missing_ok=True)

    def _check(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"vectors of shape {vectors.shape} cannot go into an index of encoder {self.encoder_id} (dimension {self.dim})"
            )

    def _commit(self, index: faiss.Index, parent: IndexVersion | None, operation: str,
                added: np.ndarray | None = None, removed: np.ndarray | None = None,
                report: BuildReport | None = None) -> IndexVersion:
        """Write and record a version. A build's `report` gives its measured recall; a version
        derived from its parent (add, forget) keeps the parent's, with the version that measured it."""
        with self.ledger.connect() as con:
            last = con.execute(
                "SELECT coalesce(max(version), 0) FROM index_versions WHERE encoder_id = ?", [self.encoder_id]
            ).fetchone()[0]
            version = last + 1
            final = self.root / f"v{version:06d}.faiss"
            # We hold the ledger lock, so no other write is under way: temp files here are
            # what a killed writer left behind.
            for stale in self.root.glob(".v*.faiss.*.tmp"):
                stale.unlink(missing_ok=True)
            with atomic_path(final) as tmp:
                faiss.write_index(index, str(tmp))
            digest = sha256_file(final)
            n_added = len(added) if added is not None else 0
            n_removed = len(removed) if removed is not None else 0
            kind = describe(index)
            nprobe = faiss.extract_index_ivf(index).nprobe if kind_of(index) != "flat" else None
            if report is not None:
                recall = (report.recall_at_10 if report.kind != "flat" else None,
                          report.recall_at_100 if report.kind != "flat" else None,
                          version if report.kind != "flat" else None, report.reason)
            elif parent is not None and parent.index_type == kind:
                recall = (parent.recall_at_10, parent.recall_at_100, parent.recall_measured_at, parent.build_reason)
            else:
                recall = (None, None, None, None)
            head, n_deletions = chain_head(con)
            self.write_manifest(final, version=version, sha256=digest, parent_version=parent.version if parent else None,
                                operation=operation, n_vectors=index.ntotal, chain_head=head, n_deletions=n_deletions,
                                index_type=kind, nprobe=nprobe, recall_at_10=recall[0], recall_at_100=recall[1],
                                recall_measured_at=recall[2], build=report.to_dict() if report else None)
            with self.ledger.transaction():
                con.execute(
                    "UPDATE index_versions SET status = 'retained' WHERE encoder_id = ? AND status = 'live'",
                    [self.encoder_id],
                )
                con.execute(
                    "INSERT INTO index_versions (encoder_id, version, path, sha256, parent_version, operation,"
                    " n_vectors, created_at, status, index_type, n_added, n_removed, chain_head, nprobe,"
                    " recall_at_10, recall_at_100, recall_measured_at, build_reason, build_report)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, now(), 'live', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [self.encoder_id, version, self.layout.relative(final), digest,
                     parent.version if parent else None, operation, index.ntotal, kind, n_added, n_removed, head,
                     nprobe, *recall, json.dumps(report.to_dict()) if report else None],
                )
                for change, ids in (("add", added), ("remove", removed)):
                    if ids is not None and len(ids):
                        con.execute(
                            "INSERT INTO index_deltas SELECT ?, ?, ?, unnest(?::BIGINT[])",
                            [self.encoder_id, version, change, ids.tolist()],
                        )
        return IndexVersion(self.encoder_id, version, self.layout.relative(final), digest,
                            parent.version if parent else None, operation, index.ntotal, n_added, n_removed, "live",
                            kind, nprobe, *recall)
