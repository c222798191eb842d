"""Ledger group: the reads behind audit verify and proofs of forgetting.

It owns no table: it reads the forgetting family's tables against `samples`, `quarantine` and
the rest, so that a hand edit of one of them (un-forgetting a sample) shows.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from .base import to_frame
from .forgetting import QUARANTINE_NAMED, SET_QUARANTINE
from .session import Group


class AuditRecords(Group):
    """the reads behind audit verify and proofs of forgetting"""

    def deletions(self, fields: tuple[str, ...]) -> pl.DataFrame:
        """The deletions chain in order: these hashed fields, prev_hash and row_hash."""
        return to_frame(self.con.execute(f"SELECT {', '.join(fields)}, prev_hash, row_hash FROM deletions ORDER BY seq"))

    def forgotten_samples(self) -> pl.DataFrame:
        """sample_id, vector_id, image_path of every forgotten sample, and `named`: whether a
        row of samples, sample_sources or quarantine still refers to one of its file names."""
        return to_frame(self.con.execute(
            "SELECT sample_id, vector_id, image_path, name_pos IS NOT NULL OR EXISTS (SELECT 1 FROM sample_sources src"
            " WHERE src.sample_id = s.sample_id AND src.name_pos IS NOT NULL) OR EXISTS (SELECT 1 FROM quarantine q"
            " WHERE q.sample_id = s.sample_id AND q.name_pos IS NOT NULL) AS named FROM samples s"
            " WHERE status = 'forgotten'"))

    def forgotten_ids(self) -> set[str]:
        return {s for (s,) in self.con.execute("SELECT sample_id FROM samples WHERE status = 'forgotten'").fetchall()}

    def pending_requests(self) -> list[str]:
        return [r for (r,) in self.con.execute(
            "SELECT request_id FROM forget_requests WHERE state = 'pending'").fetchall()]

    def embedded_twice(self) -> list[tuple[str, str, list[str]]]:
        """(encoder_id, sample_id, paths) of every sample an encoder has more than one embeddings
        row for (the table has no key to refuse it: migration 015)."""
        return [(e, sid, paths.split("\n")) for e, sid, paths in self.con.execute(
            "SELECT encoder_id, sample_id, string_agg(path, chr(10) ORDER BY path) FROM embeddings"
            " GROUP BY encoder_id, sample_id HAVING count(*) > 1 ORDER BY 1, 2").fetchall()]

    # ---- the blocklist's tables checked against each other --------------------------------------

    def deletions_not_forgotten(self) -> list[tuple[int, str, str | None]]:
        """(seq, sample_id, status or None without a samples row) of deletions rows whose sample
        is not marked forgotten."""
        return self.con.execute(
            "SELECT d.seq, d.sample_id, s.status FROM deletions d LEFT JOIN samples s USING (sample_id)"
            " WHERE s.status IS DISTINCT FROM 'forgotten' ORDER BY d.seq").fetchall()

    def applied_targets_without_proof(self) -> list[tuple[str, str]]:
        """(request_id, sample_id) of applied requests' targets no deletions row proves."""
        return self.con.execute(
            "SELECT t.request_id, t.sample_id FROM forget_targets t JOIN forget_requests r USING (request_id)"
            " WHERE r.state = 'applied' AND NOT EXISTS (SELECT 1 FROM deletions d"
            "  WHERE d.request_id = t.request_id AND d.sample_id = t.sample_id) ORDER BY 1, 2").fetchall()

    def forgotten_without_request(self) -> list[str]:
        """Samples marked forgotten that no forget request names."""
        return [sid for (sid,) in self.con.execute(
            "SELECT sample_id FROM samples s WHERE status = 'forgotten'"
            " AND NOT EXISTS (SELECT 1 FROM forget_targets t WHERE t.sample_id = s.sample_id) ORDER BY 1").fetchall()]

    def said_forgotten(self) -> list[str]:
        """Every sample id that deletions, forget_targets or samples says was forgotten, sorted."""
        return [sid for (sid,) in self.con.execute(
            "SELECT sample_id FROM deletions UNION SELECT sample_id FROM forget_targets"
            " UNION SELECT sample_id FROM samples WHERE status = 'forgotten' ORDER BY 1").fetchall()]

    def vector_ids_of(self, sample_ids: list[str]) -> np.ndarray:
        """Every vector id these samples had (in forget_targets) or have now, sorted."""
        return np.array(sorted({v for (v,) in self.con.execute(
            "SELECT vector_id FROM forget_targets WHERE vector_id IS NOT NULL UNION SELECT vector_id FROM samples"
            " WHERE vector_id IS NOT NULL AND sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids]).fetchall()}),
            np.int64)

    def perceptual_hashes(self) -> dict[str, str | None]:
        """{sample_id: phash} of every blocklist_phashes row."""
        return dict(self.con.execute("SELECT sample_id, phash FROM blocklist_phashes").fetchall())

    def set_quarantine_left_named(self) -> list[tuple[str, str, int]]:
        """(request_id, image set, n) per applied image_set request: n of the set's quarantine
        rows still name a file or a stored copy."""
        return [(r, name, self.con.execute(f"SELECT count(*) FROM quarantine WHERE {QUARANTINE_NAMED}"
                                           f" AND {SET_QUARANTINE}", [r]).fetchone()[0])
                for r, name in self.con.execute(
                    "SELECT request_id, CAST(target AS JSON) ->> 0 FROM forget_requests"
                    " WHERE state = 'applied' AND target_kind = 'image_set' ORDER BY 1").fetchall()]

    # ---- one sample ------------------------------------------------------------------------------

    def vector_id_of(self, sample_id: str) -> int | None:
        row = self.con.execute("SELECT vector_id FROM samples WHERE sample_id = ?", [sample_id]).fetchone()
        return row[0] if row else None

    def blocklist_entry(self, sample_id: str) -> dict | None:
        """What is kept of a forgotten sample on purpose: its perceptual hash, algorithm and note."""
        rows = to_frame(self.con.execute("SELECT phash AS perceptual_hash, algorithm, note FROM blocklist_phashes"
                                         " WHERE sample_id = ?", [sample_id])).to_dicts()
        return rows[0] if rows else None

    # ---- the image store -----------------------------------------------------------------------

    def stored_paths_among(self, relative: list[str]) -> set[str]:
        """Those of these store paths that a samples or quarantine row names."""
        return {p for (p,) in self.con.execute(
            "SELECT image_path FROM samples WHERE image_path IN (SELECT unnest(?::VARCHAR[]))"
            " UNION SELECT stored_path FROM quarantine WHERE stored_path IN (SELECT unnest(?::VARCHAR[]))",
            [relative, relative]).fetchall()}
