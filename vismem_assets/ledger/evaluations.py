"""Ledger group: evaluations, the memory's history of accuracy (`evaluations` per strategy and
k, `evaluation_labels`, `evaluation_calibration`, `evaluation_novelty`), and the novelty
thresholds measured per index version."""
from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from .base import insert_rows, to_frame
from .session import Group

if TYPE_CHECKING:
    from ..evaluation import Evaluation


class Evaluations(Group):
    """evaluation results and history"""

    def record(self, encoder_id: str, result: Evaluation) -> int:
        """Write one evaluation (all its tables); returns its new id."""
        acc, per, cal = result.accuracy, result.per_label, result.calibration
        eval_id = self.con.execute("SELECT nextval('evaluation_id_seq')").fetchone()[0]
        insert_rows(self.con, "evaluations", {
            "evaluation_id": ("BIGINT", [eval_id] * len(acc)),
            "encoder_id": ("VARCHAR", [encoder_id] * len(acc)),
            "index_version": ("INTEGER", [result.index_version] * len(acc)),
            "query_set": ("VARCHAR", [result.query_set] * len(acc)),
            "strategy": ("VARCHAR", acc["strategy"].to_list()),
            "k": ("INTEGER", acc["k"].to_list()),
            "accuracy": ("DOUBLE", acc["accuracy"].to_list()),
            "n_queries": ("INTEGER", [result.n_queries] * len(acc)),
            "pruning": ("VARCHAR", acc["pruning"].to_list()),
        }, created_at="now()")
        insert_rows(self.con, "evaluation_labels", {
            "evaluation_id": ("BIGINT", [eval_id] * len(per)),
            "label": ("VARCHAR", per["label"].to_list()),
            "strategy": ("VARCHAR", per["strategy"].to_list()),
            "k": ("INTEGER", per["k"].to_list()),
            "n_queries": ("INTEGER", per["n_queries"].to_list()),
            "accuracy": ("DOUBLE", per["accuracy"].to_list()),
            "pruning": ("VARCHAR", per["pruning"].to_list()),
        })
        insert_rows(self.con, "evaluation_calibration", {
            "evaluation_id": ("BIGINT", [eval_id] * len(cal)),
            **{c: ("INTEGER" if c == "n_queries" else "DOUBLE", cal[c].to_list()) for c in cal.columns}})
        if result.novelty:
            n = result.novelty
            self.con.execute("INSERT INTO evaluation_novelty VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [eval_id, n["distance"], n["percentile"], n["n_known"], n["flagged_known"],
                              n["n_unseen"], n["flagged_unseen"]])
        return eval_id

    def last_accuracy(self, query_set: str, strategy: str, k: int) -> float | None:
        """Accuracy (no pruning) of the newest evaluation of this query set at (strategy, k), any encoder."""
        row = self.con.execute(
            "SELECT accuracy FROM evaluations WHERE query_set = ? AND strategy = ? AND k = ? AND pruning = 'none'"
            " ORDER BY evaluation_id DESC LIMIT 1", [query_set, strategy, k]).fetchone()
        return float(row[0]) if row else None

    def previous(self, encoder_id: str, query_set: str, before_version: int) -> tuple[int, int] | None:
        """(evaluation_id, index_version) of the newest evaluation of this query set on an
        earlier index version."""
        row = self.con.execute(
            "SELECT evaluation_id, index_version FROM evaluations WHERE encoder_id = ? AND query_set = ?"
            " AND index_version < ? ORDER BY evaluation_id DESC LIMIT 1",
            [encoder_id, query_set, before_version]).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def per_label(self, evaluation_id: int) -> pl.DataFrame:
        """label, n_queries, accuracy of an evaluation (no pruning)."""
        return to_frame(self.con.execute("SELECT label, n_queries, accuracy FROM evaluation_labels"
                                         " WHERE evaluation_id = ? AND pruning = 'none'", [evaluation_id]))

    def novelty_threshold(self, encoder_id: str, index_version: int, percentile: float) -> float | None:
        row = self.con.execute("SELECT distance FROM novelty_thresholds WHERE encoder_id = ? AND index_version = ?"
                               " AND percentile = ?", [encoder_id, index_version, percentile]).fetchone()
        return float(row[0]) if row else None

    def record_novelty_threshold(self, encoder_id: str, index_version: int, percentile: float, distance: float,
                                 n_sampled: int) -> None:
        self.con.execute("INSERT INTO novelty_thresholds VALUES (?, ?, ?, ?, ?, now())",
                         [encoder_id, index_version, percentile, distance, n_sampled])
