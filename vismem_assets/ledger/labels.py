"""Ledger group: labels and user vote weights as people edit them (`label_history`,
`user_weights`, `weight_history`), and the catalog of active samples a vote reads them from."""
from __future__ import annotations

import polars as pl

from ..catalog import Catalog
from .base import insert_rows, to_frame
from .session import Group

_EDITABLE = "SELECT sample_id, vector_id, label, status FROM samples"
_ACTIVE = "FROM samples WHERE status = 'active' AND vector_id IS NOT NULL"


class Labels(Group):
    """Label history and user weights (relabel, weight), and the catalog."""

    def catalog(self) -> Catalog:
        """The active samples as numpy columns (a million samples: ~0.4 s; through Python rows, 2 s)."""
        names = [name for (name,) in self.con.execute(f"SELECT DISTINCT label {_ACTIVE} ORDER BY label").fetchall()]
        # Read with the labels, every time: a relabel or weight change counts from the next vote on.
        cols = self.con.execute(
            "SELECT vector_id, sample_id, image_path, dense_rank() OVER (ORDER BY label) - 1 AS code,"
            " coalesce((SELECT w.weight FROM user_weights w WHERE w.sample_id = samples.sample_id), 1.0)"
            f" AS user_weight {_ACTIVE} ORDER BY vector_id").fetchnumpy()
        return Catalog(cols["vector_id"], cols["sample_id"], cols["image_path"], cols["code"], names,
                       cols["user_weight"])

    # --- what an edit names -----------------------------------------------------------------------

    def active_of_label(self, label: str) -> pl.DataFrame:
        """sample_id, vector_id, label, status of the active samples with this label."""
        return to_frame(self.con.execute(f"{_EDITABLE} WHERE label = ? AND status = 'active' ORDER BY sample_id",
                                         [label]))

    def samples_by_id(self, sample_ids: list[str]) -> pl.DataFrame:
        """sample_id, vector_id, label, status of the samples with these ids, whatever their status."""
        return to_frame(self.con.execute(
            f"{_EDITABLE} WHERE sample_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY sample_id", [sample_ids]))

    def n_forgotten_of_label(self, label: str) -> int:
        return self.con.execute("SELECT count(*) FROM samples WHERE label = ? AND status = 'forgotten'",
                                [label]).fetchone()[0]

    def n_active_of_label(self, label: str) -> int:
        return self.con.execute("SELECT count(*) FROM samples WHERE status = 'active' AND label = ?",
                                [label]).fetchone()[0]

    def active_labels(self) -> list[str]:
        """The labels of the active samples, sorted."""
        return [x for (x,) in self.con.execute("SELECT DISTINCT label FROM samples WHERE status = 'active'"
                                               " ORDER BY 1").fetchall()]

    # --- edits --------------------------------------------------------------------------------------

    def relabel(self, change_id: str, sample_ids: list[str], old_labels: list[str], label: str,
                requested_by: str, reason: str) -> None:
        """Give these active samples `label`, with a label_history row each."""
        self.con.execute("UPDATE samples SET label = ? WHERE status = 'active' AND sample_id IN"
                         " (SELECT unnest(?::VARCHAR[]))", [label, sample_ids])
        n = len(sample_ids)
        insert_rows(self.con, "label_history", {
            "sample_id": ("VARCHAR", sample_ids),
            "label": ("VARCHAR", [label] * n),
            "old_label": ("VARCHAR", old_labels),
            "reason": ("VARCHAR", [reason] * n),
            "requested_by": ("VARCHAR", [requested_by] * n),
            "change_id": ("VARCHAR", [change_id] * n),
        }, changed_at="now()", kind="'relabel'")

    def user_weights_of(self, sample_ids: list[str]) -> dict[str, float]:
        """The user weights set on these samples (a sample without one is left out: its weight is 1)."""
        return dict(self.con.execute("SELECT sample_id, weight FROM user_weights WHERE sample_id IN"
                                     " (SELECT unnest(?::VARCHAR[]))", [sample_ids]).fetchall())

    def set_user_weights(self, change_id: str, sample_ids: list[str], old_weights: list[float], weight: float,
                         requested_by: str, reason: str) -> None:
        """Give these samples the user weight `weight`, with a weight_history row each."""
        n = len(sample_ids)
        insert_rows(self.con, "weight_history", {
            "change_id": ("VARCHAR", [change_id] * n),
            "sample_id": ("VARCHAR", sample_ids),
            "old_weight": ("DOUBLE", old_weights),
            "new_weight": ("DOUBLE", [weight] * n),
            "requested_by": ("VARCHAR", [requested_by] * n),
            "reason": ("VARCHAR", [reason] * n),
        }, changed_at="now()")
        insert_rows(self.con, "user_weights", {
            "sample_id": ("VARCHAR", sample_ids),
            "weight": ("DOUBLE", [weight] * n),
            "change_id": ("VARCHAR", [change_id] * n),
        }, on_conflict="ON CONFLICT (sample_id) DO UPDATE SET weight = excluded.weight,"
                       " change_id = excluded.change_id, set_at = excluded.set_at", set_at="now()")
