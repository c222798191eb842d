"""The memory's evaluation history in the ledger: recording an evaluation, the accuracy a query
set last had, and the comparison of an evaluation with the previous index version's, which the
Dagster check `top1_not_dropped` and `vismem evaluate` report."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .evaluation import Evaluation
from .glance import accuracy_on, labels_held

if TYPE_CHECKING:
    from .index_store import IndexStore
    from .ledger import LedgerBase


class EvaluationLog:
    def __init__(self, ledger: LedgerBase, encoder_id: str):
        self.ledger = ledger
        self.encoder_id = encoder_id

    def record(self, result: Evaluation) -> int:
        """Write one evaluation (all its tables) in one transaction; returns its id."""
        with self.ledger.transaction() as session:
            return session.evaluations.record(self.encoder_id, result)

    def last_top1(self, query_set: str, strategy: str, k: int) -> float | None:
        """Accuracy (no pruning) of the last evaluation of this query set at (strategy, k), by
        whichever encoder."""
        with self.ledger.connect() as session:
            return session.evaluations.last_accuracy(query_set, strategy, k)

    def compare_with_previous(self, result: Evaluation, indexes: IndexStore) -> dict | None:
        """Top-1 (default strategy and k) against the previous index version's evaluation on the
        same query set, over the labels the memory still holds and that version held too:
        forgetting a class on purpose is not a regression, losing accuracy on the classes that
        stay is; a class new since then (scored 0 before) would only hide such a loss."""
        with self.ledger.connect() as session:
            previous = session.evaluations.previous(self.encoder_id, result.query_set, result.index_version)
            if previous is None:
                return None
            evaluation_id, version = previous
            before = session.evaluations.per_label(evaluation_id)
            held = set(session.labels.active_labels())
            catalog = session.labels.catalog()
        held_then = labels_held(indexes, catalog, version)
        labels = held & (held if held_then is None else held_then) & set(before["label"]) & set(result.per_label["label"])
        old, new = accuracy_on(before, labels) or 0.0, accuracy_on(result.per_label, labels) or 0.0
        return {"previous_index_version": version, "previous_top1": old, "top1": new,
                "drop": old - new, "labels_compared": sorted(labels)}

