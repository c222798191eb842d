"""Evaluating the memory: accuracy for every k and voting strategy on a labelled query set or by
leave-one-out, recorded in the ledger and compared with the previous index version's.

Scoring itself is evaluation.py's; this service gathers its inputs (query vectors, neighbours,
pruning weights, the novelty threshold) and records the result.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .atomic import atomic_path
from .classify import PruningWeights
from .catalog import Catalog
from .embeddings import EmbeddingStore, write_part
from .encoders import Encoder
from .evaluation import DEFAULT_K, Evaluation, score
from .evaluation_log import EvaluationLog
from .imagesets import CheckedImage, ImageSetError, check_source, read_image_set
from .index_store import IndexStore
from .ledger import LedgerBase
from .recall import NOVELTY_PERCENTILE, Recall
from .voting import DEFAULT_STRATEGY, STRATEGIES


class Evaluating:
    def __init__(self, ledger: LedgerBase, encoder: Encoder, embeddings: EmbeddingStore, indexes: IndexStore,
                 recall: Recall, pruning_weights: PruningWeights):
        self.ledger = ledger
        self.encoder = encoder
        self.embeddings = embeddings
        self.indexes = indexes
        self.recall = recall
        self.pruning_weights = pruning_weights
        self.log = EvaluationLog(ledger, encoder.id)

    def _weight_sets(self, catalog: Catalog, pruning: bool) -> dict:
        """'none' always; with `pruning`, also the soft and hard weight sets of the live version."""
        if not pruning:
            return {"none": None}
        return {"none": None, **{m: self.pruning_weights(catalog, m, None) for m in ("soft", "hard")}}

    def evaluate(self, source: str | Path, k_max: int = 100, strategies=STRATEGIES,
                 progress: bool | None = None, record: bool = True, pruning: bool = False) -> Evaluation:
        """Accuracy of each strategy for every k in 1..k_max on a labelled query set (not stored)."""
        checked = [check_source(f) for f in read_image_set(Path(source))]
        usable = [c for c in checked if c.ok]
        if not usable:
            raise ImageSetError(f"{source} holds no usable labelled image to evaluate with")
        version, _ = self.recall.live_index()
        vectors = self._query_vectors(usable, progress)
        sims, ids = self.recall.search(vectors, k_max)
        with self.ledger.connect() as s:
            in_memory = s.samples.count_active_among([c.sample_id for c in usable])
        catalog = self.recall.catalog()
        result = score(str(source), version.version, sims, ids, [c.source.label for c in usable], catalog,
                       strategies, self._weight_sets(catalog, pruning),
                       novelty=(self.recall.novelty_threshold(), NOVELTY_PERCENTILE))
        result.n_skipped, result.n_in_memory = len(checked) - len(usable), int(in_memory)
        result.query_paths = [str(c.source.path) for c in usable]
        return self.record(result) if record else result

    def _query_vectors(self, images: list[CheckedImage], progress: bool | None) -> np.ndarray:
        """Query embeddings, cached by content hash: a query set is re-evaluated after every change."""
        cache = self.embeddings.root / "_queries.parquet"
        known = pl.read_parquet(cache) if cache.exists() else None
        have = dict(zip(known["sample_id"], known["vector"].to_numpy())) if known is not None else {}
        todo = list({c.sample_id: c for c in images if c.sample_id not in have}.values())
        if todo:
            new = self.encoder.embed([c.source.path for c in todo], progress=progress, desc="embedding queries")
            have.update(zip((c.sample_id for c in todo), new))
            frame = pl.DataFrame({"sample_id": list(have),
                                  "vector": pl.Series(np.stack(list(have.values())),
                                                      dtype=pl.Array(pl.Float32, self.encoder.dim))})
            with atomic_path(cache) as tmp:
                write_part(frame, tmp)
        return np.stack([have[c.sample_id] for c in images]).astype(np.float32)

    def evaluate_leave_one_out(self, k_max: int = 100, strategies=STRATEGIES, record: bool = True,
                               batch: int = 4096, pruning: bool = False) -> Evaluation:
        """Each stored sample classified by all the others (for memories without a query split)."""
        version, index = self.recall.live_index()
        ids_all, vectors = self.recall.stored_vectors(index)
        if len(ids_all) < 2:
            raise ValueError("leave-one-out needs at least two samples in the memory")
        k = min(k_max, len(ids_all) - 1)
        sims = np.empty((len(ids_all), k), np.float32)
        ids = np.empty((len(ids_all), k), np.int64)
        for start in range(0, len(ids_all), batch):
            s, i = self.recall.search(vectors[start:start + batch], k + 1)
            own = i == ids_all[start:start + batch, None]
            own[:, -1] |= ~own.any(axis=1)  # self not retrieved (exact duplicates): drop the last instead
            keep = ~own
            sims[start:start + batch] = s[keep].reshape(len(s), k)
            ids[start:start + batch] = i[keep].reshape(len(i), k)
        catalog = self.recall.catalog()
        truth = [catalog.label_names[c] for c in catalog.label_codes[catalog.rows(ids_all)]]
        result = score("leave-one-out", version.version, sims, ids, truth, catalog, strategies,
                       self._weight_sets(catalog, pruning),
                       novelty=(self.recall.novelty_threshold(), NOVELTY_PERCENTILE))
        return self.record(result) if record else result

    def record(self, result: Evaluation) -> Evaluation:
        """Store an evaluation in the ledger; it comes back with its evaluation_id."""
        result.evaluation_id = self.log.record(result)
        return result

    def again(self, query_set: Path) -> dict:
        """Evaluate the live index on the query set again (recorded, so `evaluation_history` shows
        it) and say how top-1 of the default vote moved from the last evaluation of that set: what
        a relabel or weight change reports."""
        before = self.log.last_top1(str(query_set), DEFAULT_STRATEGY, DEFAULT_K)
        result = self.evaluate(query_set, progress=False)
        return {"query_set": str(query_set), "index_version": result.index_version,
                "vote": f"{DEFAULT_STRATEGY}, k={DEFAULT_K}", "top1_before": before, "top1": result.top1(),
                "evaluation_id": result.evaluation_id}

    def compare_with_previous(self, result: Evaluation) -> dict | None:
        """Top-1 against the previous index version's evaluation on the same query set (evaluation_log.py)."""
        return self.log.compare_with_previous(result, self.indexes)
