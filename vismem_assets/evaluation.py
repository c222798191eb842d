"""Scoring retrieved neighbours against true labels: accuracy of every strategy for every k
(with and without pruning weights), per-label accuracy, a reliability diagram and novelty
rates. The ledger keeps them as the memory's history (evaluation_log.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from .catalog import Catalog
from .voting import DEFAULT_STRATEGY, accuracy_by_k, vote_all_k, vote_weights

if TYPE_CHECKING:
    from .home import Layout
    from .settings import Settings

DEFAULT_K = 20          # neighbours voting, unless asked otherwise
CALIBRATION_BINS = 10


@dataclass
class Evaluation:
    query_set: str
    index_version: int
    n_queries: int
    accuracy: pl.DataFrame        # pruning, strategy, k, accuracy
    per_label: pl.DataFrame       # label, n_queries, accuracy, strategy, k, pruning (defaults)
    calibration: pl.DataFrame     # bin_low, bin_high, n_queries, mean_confidence, accuracy
    novelty: dict | None = None   # distance, percentile, n_known, flagged_known, n_unseen, flagged_unseen
    n_skipped: int = 0
    n_in_memory: int = 0          # queries whose exact bytes are also stored in the memory
    misclassified: list[int] = field(default_factory=list)  # query positions wrong at the defaults
    query_paths: list[str] = field(default_factory=list)
    query_labels: list[str] = field(default_factory=list)   # each query's true label
    predicted: list[str | None] = field(default_factory=list)  # each query's answer at the defaults
    confidence: list[float] = field(default_factory=list)   # ... and the winner's share of that vote
    evaluation_id: int | None = None

    def top1(self, strategy: str = DEFAULT_STRATEGY, k: int | None = None, pruning: str = "none") -> float:
        """Accuracy of one strategy at k (default: DEFAULT_K, or the largest k evaluated)."""
        frame = self.accuracy.filter((pl.col("strategy") == strategy) & (pl.col("pruning") == pruning))
        k = min(k or DEFAULT_K, frame["k"].max())
        return float(frame.filter(pl.col("k") == k)["accuracy"][0])

    def best(self, pruning: str = "none") -> pl.DataFrame:
        """Best k and accuracy per strategy."""
        return (self.accuracy.filter(pl.col("pruning") == pruning).drop("pruning")
                .sort("accuracy", "k", descending=[True, False])
                .group_by("strategy", maintain_order=True).first().sort("strategy"))

    def to_dict(self) -> dict:
        return {"evaluation_id": self.evaluation_id, "query_set": self.query_set,
                "index_version": self.index_version, "n_queries": self.n_queries, "n_skipped": self.n_skipped,
                "n_in_memory": self.n_in_memory, "accuracy": self.accuracy.to_dicts(),
                "per_label": self.per_label.to_dicts(), "calibration": self.calibration.to_dicts(),
                "novelty": self.novelty}


def score(query_set: str, version: int, sims: np.ndarray, ids: np.ndarray, truth_labels: list[str],
          catalog: Catalog, strategies, pruning: dict[str, np.ndarray | None] | None = None,
          novelty: tuple[float, float] | None = None) -> Evaluation:
    """sims/ids: (n, K) retrieved neighbours, best first. pruning: name -> per-catalog-row weight
    (None = no pruning). novelty: (distance threshold, percentile) it came from."""
    rows = catalog.rows(ids)
    labels = np.where(rows >= 0, catalog.label_codes[rows], -1)
    truth = catalog.codes(truth_labels)
    k_default = min(DEFAULT_K, ids.shape[1])
    frames, per_label, calibration, misclassified, predicted, confidence = [], None, None, [], [], []
    # User weights (vismem weight) count in every pruning mode, as they do in classify.
    users = np.where(rows >= 0, catalog.user_weights[rows], 0.0) if catalog.has_user_weights else 1.0
    for name, sample_weight in (pruning or {"none": None}).items():
        factor = (np.where(rows >= 0, sample_weight[rows], 0.0) if sample_weight is not None else 1.0) * users
        for strategy in strategies:
            pred, conf = vote_all_k(labels, vote_weights(sims, strategy) * factor, len(catalog.label_names))
            acc = accuracy_by_k(pred, truth)
            frames.append(pl.DataFrame({"pruning": name, "strategy": strategy,
                                        "k": np.arange(1, len(acc) + 1), "accuracy": acc}))
            if name == "none" and strategy == DEFAULT_STRATEGY:
                correct = pred[:, k_default - 1] == truth
                per_label = (pl.DataFrame({"label": truth_labels, "correct": correct})
                             .group_by("label").agg(pl.len().alias("n_queries"), pl.col("correct").mean().alias("accuracy"))
                             .sort("label").with_columns(strategy=pl.lit(strategy), k=pl.lit(k_default),
                                                         pruning=pl.lit(name)))
                calibration = reliability_diagram(conf[:, k_default - 1], correct)
                misclassified = np.flatnonzero(~correct).tolist()
                chosen = pred[:, k_default - 1]
                predicted = [catalog.label_names[c] if c >= 0 else None for c in chosen.tolist()]
                confidence = conf[:, k_default - 1].tolist()
    novelty_stats = None
    if novelty is not None:
        flagged = (1.0 - sims[:, 0]) > novelty[0]
        known = truth >= 0
        novelty_stats = {"distance": novelty[0], "percentile": novelty[1],
                         "n_known": int(known.sum()), "flagged_known": int((flagged & known).sum()),
                         "n_unseen": int((~known).sum()), "flagged_unseen": int((flagged & ~known).sum())}
    return Evaluation(query_set, version, len(truth_labels), pl.concat(frames), per_label, calibration, novelty_stats,
                      misclassified=misclassified, query_labels=list(truth_labels), predicted=predicted,
                      confidence=confidence)


CONFIDENTLY_WRONG, BORDERLINE = "confidently wrong", "borderline"


def gallery_picks(result: Evaluation, n: int = 4) -> list[tuple[int, str]]:
    """Misclassified queries worth looking at, as (query position, why): the most confidently
    wrong first (half of n, rounded up), then the borderline ones (the wrong winner barely ahead).
    Within each, one query per true label not shown yet comes first, so that a few examples cover
    several labels; ties go to the earlier query."""
    wrong = [i for i in result.misclassified if i < len(result.confidence)]
    picks: list[tuple[int, str]] = []
    for why, sign, count in ((CONFIDENTLY_WRONG, -1, (n + 1) // 2), (BORDERLINE, 1, n)):
        chosen = {i for i, _ in picks}
        labels = {result.query_labels[i] for i in chosen}
        first, later = [], []
        for i in sorted((i for i in wrong if i not in chosen), key=lambda i: (sign * result.confidence[i], i)):
            (later if result.query_labels[i] in labels else first).append(i)
            labels.add(result.query_labels[i])
        picks += [(i, why) for i in (first + later)[:min(count, n - len(picks))]]
    return picks


def reliability_diagram(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> pl.DataFrame:
    """Accuracy per confidence bin: a calibrated memory sits on the diagonal."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        out.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "n_queries": int(m.sum()),
                    "mean_confidence": float(confidence[m].mean()) if m.any() else None,
                    "accuracy": float(correct[m].mean()) if m.any() else None})
    return pl.DataFrame(out, schema={"bin_low": pl.Float64, "bin_high": pl.Float64, "n_queries": pl.Int64,
                                     "mean_confidence": pl.Float64, "accuracy": pl.Float64})


def query_set_path(settings: Settings, layout: Layout) -> Path | None:
    """The settings' query set (absolute, or relative to the memory home), or None: leave-one-out."""
    return layout.root / settings.query_set if settings.query_set else None
