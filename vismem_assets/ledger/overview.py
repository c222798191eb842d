"""Ledger group: the figures a person reads after each change of the memory (glance.py and the
Dagster metadata): its size, what an ingest brought, the lineage of index versions. It only reads,
across the families of tables."""
from __future__ import annotations

import numpy as np
import polars as pl

from .base import to_frame
from .session import Group


class Overview(Group):
    """Read-only figures across the tables, for people."""

    def database_bytes(self) -> int | None:
        """What the database takes on its server; None for the DuckDB file (its size is on disk here)."""
        if self.session.ledger.dialect != "postgres":
            return None
        return int(self.con.execute("SELECT pg_database_size(current_database())").fetchone()[0])

    def sizes(self) -> dict[str, int]:
        """Active samples, their labels, and forget requests accepted but not yet applied."""
        samples, labels = self.con.execute(
            "SELECT count(*), count(DISTINCT label) FROM samples WHERE status = 'active'").fetchone()
        pending = self.con.execute("SELECT count(*) FROM forget_requests WHERE state = 'pending'").fetchone()[0]
        return {"samples": int(samples), "labels": int(labels), "pending_forgets": int(pending)}

    def arrived(self, ingest_id: str) -> pl.DataFrame:
        """label, image_path of the active samples an ingest brought, by label."""
        return to_frame(self.con.execute(
            "SELECT s.label, s.image_path FROM sample_sources src JOIN samples s USING (sample_id)"
            " WHERE src.ingest_id = ? AND s.status = 'active' ORDER BY s.label", [ingest_id]))

    def lineage(self, encoder_id: str, limit: int = 20) -> pl.DataFrame:
        """The newest index versions of an encoder: how each came from its parent, and its size."""
        return to_frame(self.con.execute(
            "SELECT version, parent_version, operation, status, index_type, n_vectors, n_added, n_removed,"
            " recall_at_10, coalesce(json_array_length(CAST(files AS JSON)), 1) AS files, created_at FROM index_versions"
            " WHERE encoder_id = ? ORDER BY version DESC LIMIT ?", [encoder_id, limit]))

    def builds(self, encoder_id: str) -> dict[int, tuple[int | None, bool]]:
        """Per index version: (parent version, whether a build chose its type, i.e. it has a build report)."""
        rows = self.con.execute("SELECT version, parent_version, build_report IS NOT NULL FROM index_versions"
                                " WHERE encoder_id = ?", [encoder_id]).fetchall()
        return {version: (parent, built) for version, parent, built in rows}

    def added_in(self, encoder_id: str, version: int) -> np.ndarray:
        """The vector ids a version added (its index deltas)."""
        rows = self.con.execute("SELECT vector_id FROM index_deltas WHERE encoder_id = ? AND version = ?"
                                " AND change = 'add'", [encoder_id, version]).fetchall()
        return np.array([v for (v,) in rows], np.int64)
