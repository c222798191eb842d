"""Ledger group: the encoders table (which encoder a memory used, when, with which spec)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import to_frame
from .session import Group

if TYPE_CHECKING:
    from ..encoders import Encoder


class Encoders(Group):
    """the encoders table (which encoder a memory used, when)"""

    def last_used_spec(self) -> str | None:
        row = self.con.execute("SELECT spec FROM encoders ORDER BY last_used_at DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def id_for_spec(self, spec: str) -> str | None:
        """The id of the encoder last used under this spec (None: it never ran here)."""
        row = self.con.execute("SELECT encoder_id FROM encoders WHERE spec = ? ORDER BY last_used_at DESC LIMIT 1",
                               [spec]).fetchone()
        return row[0] if row else None

    def slug_and_dim(self, encoder_id: str | None) -> tuple[str, int] | None:
        row = self.con.execute("SELECT slug, dim FROM encoders WHERE encoder_id = ?", [encoder_id]).fetchone()
        return (row[0], row[1]) if row else None

    def record_use(self, encoder: Encoder, spec: str) -> None:
        """Register the encoder (first use) or note that it was used now, under `spec`."""
        self.con.execute(
            "INSERT INTO encoders (encoder_id, slug, name, dim, weights_sha256, preprocessing, spec,"
            " first_used_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, now(), now())"
            " ON CONFLICT (encoder_id) DO UPDATE SET last_used_at = now(),"
            " spec = coalesce(excluded.spec, encoders.spec)",
            [encoder.id, encoder.slug, encoder.name, encoder.dim, encoder.weights_sha256,
             encoder.preprocessing.tag, spec])

    def listing(self) -> list[dict]:
        """(encoder_id, spec, dim, last_used_at) of every encoder, most recently used first."""
        return to_frame(self.con.execute(
            "SELECT encoder_id, spec, dim, last_used_at FROM encoders ORDER BY last_used_at DESC")).to_dicts()
