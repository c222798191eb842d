"""Ledger group: forget requests, the hash-chained deletions, the blocklist and near-copy hashes.

Also what a forget removes from other families' tables (embedding rows, pruning statistics and
weights, the references to file names in names.bin) and where the names in names.bin end:
forgetting is why names live in a file of their own (names.py).
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import polars as pl

from .base import insert_rows, to_frame
from .session import Group

if TYPE_CHECKING:
    from ..forgetting import ForgetRequest
    from ..names import NameFile

# The tables whose rows name a file (names.bin); a row's span is NULL once its sample is forgotten.
NAMED_TABLES = ("samples", "sample_sources", "quarantine")
_SPANS = " UNION ALL ".join(f"SELECT name_pos, name_len FROM {t}" for t in NAMED_TABLES)
_TARGETS = "SELECT sample_id FROM forget_targets WHERE request_id = ?"
# `picture`: its stored image, else its quarantine copy (None where neither is left), to hash.
_SAMPLE_COLUMNS = ("SELECT sample_id, vector_id, label, image_set, status, coalesce(image_path, (SELECT min(q.stored_path)"
                   " FROM quarantine q WHERE q.sample_id = samples.sample_id)) AS picture FROM samples")
# The quarantine rows of the image set an image_set request forgets, as the set was when the
# request was accepted (none for other requests; a later add of the set brings new files), those
# without a sample id too: a file whose bytes could not be read still left its name.
SET_QUARANTINE = ("EXISTS (SELECT 1 FROM forget_requests r WHERE r.request_id = ? AND r.target_kind = 'image_set'"
                  " AND quarantine.image_set = (CAST(r.target AS JSON) ->> 0)"
                  " AND quarantine.quarantined_at <= r.requested_at)")
# Quarantine rows that still name a file or hold a stored copy.
QUARANTINE_NAMED = "(name_pos IS NOT NULL OR stored_path IS NOT NULL)"
_DELETIONS_COLUMNS = {
    "seq": "BIGINT", "request_id": "VARCHAR", "sample_id": "VARCHAR", "label": "VARCHAR",
    "requested_by": "VARCHAR", "reason": "VARCHAR", "category": "VARCHAR", "external_ref": "VARCHAR",
    "requested_at": "TIMESTAMP", "applied_at": "TIMESTAMP", "versions_rewritten": "VARCHAR",
    "prev_hash": "VARCHAR", "row_hash": "VARCHAR"}


class ForgetRecords(Group):
    """forget requests, the hash-chained deletions, the blocklist and near-copy hashes"""

    # ---- what a request names ------------------------------------------------------------------

    def samples_by_id(self, sample_ids: list[str]) -> pl.DataFrame:
        """sample_id, vector_id, label, image_set, status, picture of these samples (those the ledger has)."""
        return to_frame(self.con.execute(f"{_SAMPLE_COLUMNS} WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                         [sample_ids]))

    def samples_by_label(self, label: str) -> pl.DataFrame:
        return to_frame(self.con.execute(f"{_SAMPLE_COLUMNS} WHERE label = ?", [label]))

    def samples_of_set(self, image_set: str) -> pl.DataFrame:
        """The set's samples, those it brought that another set holds, and its quarantined files."""
        return to_frame(self.con.execute(
            f"{_SAMPLE_COLUMNS} WHERE image_set = ? OR sample_id IN (SELECT sample_id FROM sample_sources"
            " WHERE image_set = ? UNION SELECT sample_id FROM quarantine WHERE image_set = ?)", [image_set] * 3))

    def active_labels(self) -> list[str]:
        return [label for (label,) in self.con.execute(
            "SELECT DISTINCT label FROM samples WHERE status = 'active' AND label IS NOT NULL ORDER BY 1").fetchall()]

    # ---- requests ------------------------------------------------------------------------------

    def request_state(self, request_id: str) -> str | None:
        """'pending' or 'applied'; None for a request never accepted."""
        row = self.con.execute("SELECT state FROM forget_requests WHERE request_id = ?", [request_id]).fetchone()
        return row[0] if row else None

    def target_ids(self, request_id: str) -> list[str]:
        return [sid for (sid,) in self.con.execute(_TARGETS, [request_id]).fetchall()]

    def accept(self, request: ForgetRequest, target: list[str], todo: pl.DataFrame,
               phashes: list[str | None], notes: list[str], algorithm: str) -> None:
        """Record a request and its targets, mark them forgotten (blocked from here on) and keep
        their perceptual hashes. Call inside a transaction."""
        self.con.execute(
            "INSERT INTO forget_requests VALUES (?, ?, ?, ?, ?, ?, ?, now(), NULL, 'pending', ?)",
            [request.request_id, request.requested_by, request.reason, request.category, request.external_ref,
             request.target_kind, json.dumps(target), len(todo)])
        self.con.execute("INSERT INTO forget_targets SELECT ?, unnest(?::VARCHAR[]), unnest(?::BIGINT[])",
                         [request.request_id, todo["sample_id"].to_list(), todo["vector_id"].to_list()])
        self.con.execute("UPDATE samples SET status = 'forgotten' WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                         [todo["sample_id"].to_list()])
        insert_rows(self.con, "blocklist_phashes", {
            "sample_id": ("VARCHAR", todo["sample_id"].to_list()),
            "request_id": ("VARCHAR", [request.request_id] * len(todo)),
            "algorithm": ("VARCHAR", [algorithm] * len(todo)),
            "phash": ("VARCHAR", phashes),
            "note": ("VARCHAR", notes),
        }, on_conflict="ON CONFLICT DO NOTHING", created_at="now()")

    def pending_requests(self, only: str | None = None) -> list[str]:
        """Accepted requests not yet applied (or just `only`, if it is one), oldest first."""
        return [r for (r,) in self.con.execute(
            "SELECT request_id FROM forget_requests WHERE state = 'pending'" + (" AND request_id = ?" if only else "")
            + " ORDER BY requested_at", [only] if only else []).fetchall()]

    def targets(self, request_id: str) -> pl.DataFrame:
        """sample_id, vector_id, image_path, label of every sample the request forgets."""
        return to_frame(self.con.execute(
            "SELECT t.sample_id, t.vector_id, s.image_path, s.label FROM forget_targets t JOIN samples s"
            " USING (sample_id) WHERE t.request_id = ?", [request_id]))

    def mark_applied(self, request_id: str) -> None:
        self.con.execute("UPDATE forget_requests SET state = 'applied', applied_at = (SELECT max(applied_at)"
                         " FROM deletions WHERE request_id = ?) WHERE request_id = ?", [request_id, request_id])

    def applied_set_requests_with_names(self) -> list[str]:
        """Applied image_set requests whose set's quarantine rows still name a file or a copy."""
        return [r for (r,) in self.con.execute("SELECT request_id FROM forget_requests WHERE state = 'applied'"
                                               " AND target_kind = 'image_set' ORDER BY requested_at").fetchall()
                if self.con.execute(f"SELECT count(*) FROM quarantine WHERE {QUARANTINE_NAMED} AND {SET_QUARANTINE}",
                                    [r]).fetchone()[0]]

    def clear_set_quarantine_names(self, request_id: str) -> None:
        self.con.execute("UPDATE quarantine SET name_pos = NULL, name_len = NULL, stored_path = NULL"
                         f" WHERE {SET_QUARANTINE}", [request_id])

    # ---- what a forget removes elsewhere -------------------------------------------------------

    def encoders(self) -> list[tuple[str, str, int]]:
        """(encoder_id, slug, dim) of every encoder the memory used: each has its own indexes."""
        return [tuple(r) for r in self.con.execute(
            "SELECT encoder_id, slug, dim FROM encoders ORDER BY encoder_id").fetchall()]

    def rewritten_versions(self, request_id: str) -> list[str]:
        """The "slug:version" of every retained version this request rewrote (in any attempt)."""
        return [f"{slug}:{version}" for slug, version in self.con.execute(
            "SELECT e.slug, r.version FROM index_rewrites r JOIN encoders e USING (encoder_id)"
            " WHERE r.request_id = ? ORDER BY e.slug, r.version", [request_id]).fetchall()]

    def embedding_paths(self) -> set[str]:
        """Every embedding part a ledger row names."""
        return {p for (p,) in self.con.execute("SELECT DISTINCT path FROM embeddings").fetchall()}

    def embedding_parts_of(self, sample_ids: list[str]) -> dict[str, int]:
        """{part path: its encoder's dim} of every part holding one of these samples."""
        return dict(self.con.execute(
            "SELECT DISTINCT e.path, c.dim FROM embeddings e JOIN encoders c USING (encoder_id)"
            " WHERE e.sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids]).fetchall())

    def drop_embeddings(self, sample_ids: list[str], moved: dict[str, str | None]) -> None:
        """These samples' embedding rows go; rows of a rewritten part point at its new file."""
        self.con.execute("DELETE FROM embeddings WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids])
        for old, new in moved.items():
            if new:
                self.con.execute("UPDATE embeddings SET path = ? WHERE path = ?", [new, old])

    def drop_weights(self, vector_ids: np.ndarray) -> None:
        """Pruning weights of the forgotten vectors."""
        self.con.execute("DELETE FROM sample_weights WHERE vector_id IN (SELECT unnest(?::BIGINT[]))",
                         [vector_ids.tolist()])

    # ---- file names (names.bin) ----------------------------------------------------------------

    def names_end(self) -> int:
        """Where the names the ledger holds (committed or in this transaction) end in names.bin."""
        return int(self.con.execute(f"SELECT coalesce(max(name_pos + name_len), 0) FROM ({_SPANS}) AS spans")
                   .fetchone()[0])

    def target_name_spans(self, request_id: str) -> tuple[list[int], list[int]]:
        """(positions, lengths) of every name the request's samples have, in every table."""
        rows = self.con.execute(" UNION ALL ".join(
            f"SELECT name_pos, name_len FROM {t} WHERE name_pos IS NOT NULL AND sample_id IN ({_TARGETS})"
            for t in NAMED_TABLES), [request_id] * len(NAMED_TABLES)).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def set_quarantine_names(self, request_id: str) -> list[tuple[int | None, int | None, str | None]]:
        """(name_pos, name_len, stored_path) of the quarantine rows of the set an image_set request forgets."""
        return self.con.execute(f"SELECT name_pos, name_len, stored_path FROM quarantine WHERE {SET_QUARANTINE}",
                                [request_id]).fetchall()

    def move_names_out(self, names: NameFile) -> int:
        """Migration 007's second half: names held in `original_name` columns go to the name file
        and the columns go; returns the names moved (rows a forget redacted keep none). Runs inside
        the migration's transaction: nothing in the file is referenced until it commits, so a
        failed try's bytes are dropped by the next."""
        moved = 0
        for table in NAMED_TABLES:
            rows = self.con.execute(f"SELECT rowid, original_name FROM {table}"
                                    " WHERE original_name IS NOT NULL AND original_name <> '[redacted]'").fetchall()
            if rows:
                positions, lengths = names.append(self.session, [name for _, name in rows])
                self.con.execute(
                    f"UPDATE {table} SET name_pos = m.pos, name_len = m.len FROM (SELECT unnest(?::BIGINT[]) AS id,"
                    f" unnest(?::BIGINT[]) AS pos, unnest(?::INTEGER[]) AS len) m WHERE {table}.rowid = m.id",
                    [[r for r, _ in rows], positions, lengths])
                moved += len(rows)
            self.con.execute(f"ALTER TABLE {table} DROP COLUMN original_name")
        return moved

    # ---- the proof -----------------------------------------------------------------------------

    def has_deletions(self, request_id: str) -> bool:
        return self.con.execute("SELECT count(*) FROM deletions WHERE request_id = ?", [request_id]).fetchone()[0] > 0

    def request_fields(self, request_id: str) -> dict:
        """What every deletions row of the request records of the request itself."""
        cursor = self.con.execute("SELECT requested_by, reason, category, external_ref, requested_at"
                                  " FROM forget_requests WHERE request_id = ?", [request_id])
        return dict(zip([c[0] for c in cursor.description], cursor.fetchone()))

    def chain_tail(self) -> tuple[str, int] | None:
        """(row_hash, seq) of the newest deletions row; None for an empty chain."""
        row = self.con.execute("SELECT row_hash, seq FROM deletions ORDER BY seq DESC LIMIT 1").fetchone()
        return tuple(row) if row else None

    def now(self) -> datetime.datetime:
        """The ledger's clock (the time the proof records)."""
        return self.con.execute("SELECT now()::TIMESTAMP").fetchone()[0]

    def append_deletions(self, rows: list[dict]) -> None:
        """Append hash-chained deletions rows (each a dict of every deletions column)."""
        insert_rows(self.con, "deletions",
                    {name: (sqltype, [r[name] for r in rows]) for name, sqltype in _DELETIONS_COLUMNS.items()})

    def redact(self, request_id: str) -> None:
        """Only the hash and the label stay: no reference to a name, no stored path."""
        self.con.execute("UPDATE samples SET name_pos = NULL, name_len = NULL, image_path = NULL"
                         f" WHERE sample_id IN ({_TARGETS})", [request_id])
        self.con.execute(f"UPDATE sample_sources SET name_pos = NULL, name_len = NULL WHERE sample_id IN ({_TARGETS})",
                         [request_id])
        self.con.execute("UPDATE quarantine SET name_pos = NULL, name_len = NULL, stored_path = NULL"
                         f" WHERE sample_id IN ({_TARGETS})", [request_id])
        self.clear_set_quarantine_names(request_id)

    # ---- near copies ---------------------------------------------------------------------------

    def near_copy_hashes(self, algorithm: str) -> tuple[list[str], list[str]]:
        """(sample ids, perceptual hashes) of the forgotten images hashed with `algorithm`."""
        rows = self.con.execute("SELECT sample_id, phash FROM blocklist_phashes WHERE phash IS NOT NULL"
                                " AND algorithm = ? ORDER BY sample_id", [algorithm]).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]


def parquet_footers(paths: list[Path]) -> dict[Path, list[dict]]:
    """Each parquet file's rows of `parquet_metadata()` (one per row group and column), read in
    one query by an in-memory DuckDB, whichever database the ledger is: no session needed (a
    forget reads the embedding parts' footers beside its index purge)."""
    out: dict[Path, list[dict]] = {p: [] for p in paths}
    if paths:
        by_name = {str(p): p for p in paths}
        with duckdb.connect() as footers:
            for row in to_frame(footers.execute("SELECT * FROM parquet_metadata(?::VARCHAR[])",
                                                [list(by_name)])).to_dicts():
                out[by_name[row["file_name"]]].append(row)
    return out
