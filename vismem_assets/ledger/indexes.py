"""Ledger group: index versions, their files, digests, lineage and erasures.

A version's row holds its first file (path, sha256), its files as JSON ([{path, sha256,
n_vectors, role, holes}]), its lineage (parent, operation, what was added and removed, in
index_deltas) and what its build measured. Erasures in place are recorded here before a byte
changes (index_erasures; index_rewrites for retained versions). Rows come back as dicts of
those columns; index_store.py makes its IndexVersions of them.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from .base import to_frame
from .session import Group

# Erased entries (forgotten vectors' holes) a version's files hold until a compaction, from its `files` JSON.
_HOLES = {
    "duckdb": "coalesce(list_sum(list_transform(json_transform(files, '[{\"holes\": \"BIGINT\"}]'),"
              " lambda f: coalesce(f.holes, 0))), 0) AS holes",
    "postgres": "(SELECT coalesce(sum(coalesce((f ->> 'holes')::BIGINT, 0)), 0)::BIGINT"
                " FROM json_array_elements(CAST(files AS JSON)) f) AS holes",
}

VERSION_COLUMNS = ("encoder_id, version, path, sha256, parent_version, operation, n_vectors, n_added, n_removed, status,"
                   " index_type, nprobe, recall_at_10, recall_at_100, recall_measured_at, build_reason, build_report,"
                   " files, n_shards")


class IndexVersions(Group):
    """index versions, their files, digests, lineage and erasures"""

    def live(self, encoder_id: str) -> dict | None:
        """The live version's row (VERSION_COLUMNS), or None."""
        rows = to_frame(self.con.execute(f"SELECT {VERSION_COLUMNS} FROM index_versions WHERE encoder_id = ?"
                                         " AND status = 'live'", [encoder_id]))
        return rows.row(0, named=True) if len(rows) else None

    def versions(self, encoder_id: str) -> list[dict]:
        """Every version's row (VERSION_COLUMNS), oldest first."""
        rows = to_frame(self.con.execute(f"SELECT {VERSION_COLUMNS} FROM index_versions WHERE encoder_id = ?"
                                         " ORDER BY version", [encoder_id]))
        return list(rows.iter_rows(named=True))

    def kept_versions(self) -> list[dict]:
        """Every encoder's versions that are not purged (live and retained): their files are on disk."""
        rows = to_frame(self.con.execute(f"SELECT {VERSION_COLUMNS} FROM index_versions WHERE status <> 'purged'"
                                         " ORDER BY encoder_id, version"))
        return list(rows.iter_rows(named=True))

    def live_encoders(self) -> list[str]:
        """Encoders that have a live index."""
        return [e for (e,) in self.con.execute(
            "SELECT DISTINCT encoder_id FROM index_versions WHERE status = 'live' ORDER BY 1").fetchall()]

    def next_version(self, encoder_id: str) -> int:
        return self.con.execute("SELECT coalesce(max(version), 0) + 1 FROM index_versions WHERE encoder_id = ?",
                                [encoder_id]).fetchone()[0]

    def record_version(self, encoder_id: str, version: int, path: str, sha256: str, parent_version: int | None,
                       operation: str, n_vectors: int, index_type: str, n_added: int, n_removed: int,
                       chain_head: str, nprobe: int | None, recall_at_10: float | None, recall_at_100: float | None,
                       recall_measured_at: int | None, build_reason: str | None, build_report: str | None,
                       files: str, n_shards: int = 1) -> None:
        """Insert a version as the live one, the live one before it becoming retained."""
        self.con.execute("UPDATE index_versions SET status = 'retained' WHERE encoder_id = ? AND status = 'live'",
                         [encoder_id])
        self.con.execute(
            "INSERT INTO index_versions (encoder_id, version, path, sha256, parent_version, operation,"
            " n_vectors, created_at, status, index_type, n_added, n_removed, chain_head, nprobe,"
            " recall_at_10, recall_at_100, recall_measured_at, build_reason, build_report, files, n_shards)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, now(), 'live', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [encoder_id, version, path, sha256, parent_version, operation, n_vectors, index_type, n_added, n_removed,
             chain_head, nprobe, recall_at_10, recall_at_100, recall_measured_at, build_reason, build_report, files,
             n_shards])

    def record_delta(self, encoder_id: str, version: int, change: str, vector_ids: np.ndarray) -> None:
        """The ids a version added or removed (`change`: add | remove)."""
        self.con.execute("INSERT INTO index_deltas SELECT ?, ?, ?, unnest(?::BIGINT[])",
                         [encoder_id, version, change, np.asarray(vector_ids).tolist()])

    def set_files(self, encoder_id: str, version: int, path: str, sha256: str, n_vectors: int, files: str) -> None:
        """A version's files as they are after an erasure in place."""
        self.con.execute("UPDATE index_versions SET path = ?, sha256 = ?, n_vectors = ?, files = ? WHERE encoder_id = ?"
                         " AND version = ?", [path, sha256, n_vectors, files, encoder_id, version])

    def purge(self, encoder_id: str, version: int, note: str) -> None:
        self.con.execute("UPDATE index_versions SET status = 'purged', note = ? WHERE encoder_id = ? AND version = ?",
                         [note, encoder_id, version])

    def set_chain_head(self, encoder_id: str, version: int, chain_head: str) -> None:
        self.con.execute("UPDATE index_versions SET chain_head = ? WHERE encoder_id = ? AND version = ?",
                         [chain_head, encoder_id, version])

    def erased_paths(self, encoder_id: str, request_id: str) -> set[str]:
        """The files whose erasure for this forget request was recorded (a retry finishes them)."""
        return {p for (p,) in self.con.execute("SELECT path FROM index_erasures WHERE encoder_id = ? AND request_id = ?",
                                               [encoder_id, request_id]).fetchall()}

    def shard_reported(self, request_id: str, encoder_id: str, n_shards: int, shard: int) -> bool:
        """Whether a shard has reported its erasure for a forget request."""
        return self.con.execute("SELECT count(*) FROM forget_shard_reports WHERE request_id = ? AND encoder_id = ?"
                                " AND n_shards = ? AND shard = ?", [request_id, encoder_id, n_shards, shard]
                                ).fetchone()[0] > 0

    def shard_reports(self, request_id: str) -> pl.DataFrame:
        """Each shard's report of a forget request: encoder, sharding, shard, entries erased, when."""
        return to_frame(self.con.execute("SELECT encoder_id, n_shards, shard, n_erased, reported_at FROM"
                                         " forget_shard_reports WHERE request_id = ? ORDER BY encoder_id, n_shards,"
                                         " shard", [request_id]))

    def report_shard(self, request_id: str, encoder_id: str, n_shards: int, shard: int, n_erased: int) -> None:
        """A shard has erased a forget request's vectors from every one of its files."""
        self.con.execute("INSERT INTO forget_shard_reports VALUES (?, ?, ?, ?, ?, now()) ON CONFLICT DO NOTHING",
                         [request_id, encoder_id, n_shards, shard, n_erased])

    def record_erasure(self, encoder_id: str, path: str, request_id: str, n_erased: int, old_sha256: str,
                       new_sha256: str) -> None:
        """A file's erasure in place, with its digest before and after."""
        self.con.execute("INSERT INTO index_erasures VALUES (?, ?, ?, ?, ?, ?, now())",
                         [encoder_id, path, request_id, n_erased, old_sha256, new_sha256])

    def record_blocks(self, encoder_id: str, path: str, sha256: str, listed) -> None:
        """A file's hash list (digests.HashList), under the digest it gives."""
        self.con.execute("INSERT INTO index_file_blocks (encoder_id, path, sha256, block_size, blocks, leaf_size)"
                         " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                         [encoder_id, path, sha256, listed.block_size, listed.text(), listed.leaf_size])

    def hash_lists(self, paths: list[str]) -> dict[tuple[str, str], tuple[int, str, int]]:
        """{(path, sha256): (block_size, blocks, leaf_size)} of these files' recorded hash lists."""
        if not paths:
            return {}
        rows = self.con.execute("SELECT path, sha256, block_size, blocks, coalesce(leaf_size, 0) FROM index_file_blocks"
                                " WHERE path IN (SELECT unnest(?::VARCHAR[]))", [list(paths)]).fetchall()
        return {(p, d): (int(b), text, int(leaf)) for p, d, b, text, leaf in rows}

    def drop_blocks(self, path: str, sha256: str | None = None) -> None:
        """A hash list no file has any more (the file was erased in place since), or every list of
        a deleted file (`sha256` None)."""
        self.con.execute("DELETE FROM index_file_blocks WHERE path = ? AND (? IS NULL OR sha256 = ?)",
                         [path, sha256, sha256])

    def record_rewrite(self, encoder_id: str, version: int, request_id: str, old_sha256: str, new_sha256: str,
                       n_removed: int, path: str) -> None:
        """A retained version's file erased in place (it keeps its path)."""
        self.con.execute("INSERT INTO index_rewrites (encoder_id, version, request_id, old_sha256, new_sha256,"
                         " n_removed, rewritten_at, old_path, new_path) VALUES (?, ?, ?, ?, ?, ?, now(), ?, ?)",
                         [encoder_id, version, request_id, old_sha256, new_sha256, n_removed, path, path])

    def last_deletion(self) -> tuple[str, int] | None:
        """(row_hash, seq) of the newest deletions row, the chain head manifests record; None: none yet."""
        row = self.con.execute("SELECT row_hash, seq FROM deletions ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], int(row[1])) if row else None

    def unfinished_forget_ids(self) -> np.ndarray:
        """Vector ids of forget requests accepted but not yet applied (a crash mid-way)."""
        ids = self.con.execute("SELECT t.vector_id FROM forget_targets t JOIN forget_requests r USING (request_id)"
                               " WHERE r.state = 'pending' AND t.vector_id IS NOT NULL").fetchnumpy()["vector_id"]
        return np.asarray(ids, np.int64)

    def live_index_size(self, encoder_id: str | None) -> int | None:
        """Vectors in the encoder's live index version (None: it has none)."""
        row = self.con.execute("SELECT n_vectors FROM index_versions WHERE encoder_id = ? AND status = 'live'",
                               [encoder_id]).fetchone()
        return row[0] if row else None

    def live_indexes(self) -> pl.DataFrame:
        """Every encoder's live version as status shows it (holes: erased entries until a compaction)."""
        return to_frame(self.con.execute(
            "SELECT encoder_id, version, n_vectors, index_type, nprobe, recall_at_10, recall_at_100,"
            " recall_measured_at, build_reason, sha256, path, coalesce(json_array_length(CAST(files AS JSON)), 1) AS files,"
            f" {_HOLES[self.session.ledger.dialect]}, created_at FROM index_versions WHERE status = 'live' ORDER BY encoder_id"))
