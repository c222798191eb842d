"""The visual memory: a facade that wires the services (ingest, embedding, indexing, recall,
classify, evaluating, status; forgetting and pruning) with what each uses, and delegates to them.
The CLI and the Dagster code location are both thin layers over this class.
"""
from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from .audit import Audit
from .catalog import Catalog
from .classify import Classifier, Prediction
from .embedding import Embedding
from .embeddings import EmbeddingStore
from .encoder_choice import EncoderChoice
from .encoders import Encoder
from .evaluating import Evaluating
from .evaluation import DEFAULT_K, Evaluation
from .forgetting import Applied, Forgetting, ForgetReport, ForgetRequest
from .home import Layout, resolve_home
from .index_store import IndexStore, IndexVersion
from .index_types import IndexPolicy
from .indexing import Indexing, pending_work
from .ingest import AddReport, Ingest, IngestReport
from .ledger import open_ledger
from .pruning import Pruning
from .recall import NOVELTY_PERCENTILE, Recall
from .relabel import Edits
from .settings import Settings
from .settings import current as current_settings
from .status import memory_status
from .voting import DEFAULT_STRATEGY, STRATEGIES


class Memory:
    def __init__(self, home: str | Path | None = None, encoder: str | Encoder | None = None,
                 index_policy: IndexPolicy | None = None, settings: Settings | None = None):
        """`settings`: what the entry point read (default: those `settings.setup` installed, else
        the defaults); `home` and `index_policy` override its home and index policy (index_types.py:
        exact below 200,000 vectors, IVF-Flat above if its recall passes)."""
        self.settings = settings = settings if settings is not None else current_settings()
        layout = Layout(resolve_home(home if home is not None else settings.home))
        # A memory this user may only read (classify, status, audit) is opened read-only and
        # nothing is created in it; a change is then refused by the ledger with a clear reason.
        self.read_only = layout.read_only()
        self.layout = layout if self.read_only else layout.create()
        self.ledger = open_ledger(self.layout.ledger, settings.ledger_url, lock_timeout=settings.lock_timeout,
                                  read_only=self.read_only)
        self.encoder_choice = EncoderChoice(self.ledger, encoder, self.read_only)
        self.index_policy = index_policy or IndexPolicy.from_settings(settings)
        self.ingestion = Ingest(self.layout, self.ledger)

    # ---- the encoder and the stores it keys (loaded on first use) ------------------------------

    def encoder_spec(self) -> str:
        """The spec asked for, else the one this memory used last, else the default."""
        return self.encoder_choice.spec()

    @cached_property
    def encoder(self) -> Encoder:
        return self.encoder_choice.load()

    @cached_property
    def indexes(self) -> IndexStore:
        e = self.encoder
        return IndexStore(self.layout, self.ledger, e.id, e.slug, e.dim, policy=self.index_policy,
                          n_shards=self.settings.shards)

    @cached_property
    def embeddings(self) -> EmbeddingStore:
        return EmbeddingStore(self.layout, self.encoder.slug, self.encoder.dim)

    # ---- services ------------------------------------------------------------------------------

    @cached_property
    def embedding(self) -> Embedding:
        return Embedding(self.layout, self.ledger, self.encoder, self.embeddings)

    @cached_property
    def indexing(self) -> Indexing:
        return Indexing(self.layout, self.ledger, self.indexes, self.embeddings, self.encoder.id, self.embed_pending)

    @cached_property
    def recall(self) -> Recall:
        return Recall(self.ledger, self.indexes, self.embeddings, self.encoder, read_only=self.read_only,
                      shard_workers=self.shard_workers)

    @cached_property
    def pruning(self) -> Pruning:
        return Pruning(self.ledger, self.layout, self.encoder, self.live_index, self.stored_vectors)

    @cached_property
    def classifier(self) -> Classifier:
        return Classifier(self.layout, self.encoder, self.recall, self.pruning.active_mode, self.pruning.weights_by_row)

    @cached_property
    def evaluating(self) -> Evaluating:
        return Evaluating(self.ledger, self.encoder, self.embeddings, self.indexes, self.recall,
                          self.classifier.pruning_weights)

    @cached_property
    def forgetting(self) -> Forgetting:
        return Forgetting(self.layout, self.ledger, self.index_policy, shard_workers=self.shard_workers)

    @cached_property
    def shard_workers(self):
        """The client of the shard workers when the settings say they serve this memory, else None."""
        if not self.settings.shard_workers:
            return None
        from .shard_workers import ShardClient  # (Celery loads only for a memory served by shard workers)
        return ShardClient(self.settings)

    @cached_property
    def audit(self) -> Audit:
        return Audit(self.layout, self.ledger, pending=lambda: self.pending(exact=True))

    @cached_property
    def edits(self) -> Edits:
        return Edits(self.ledger, self.layout)

    # ---- ingest, embed, index ------------------------------------------------------------------

    def ingest(self, source: str | Path, name: str | None = None, root: str | Path | None = None) -> IngestReport:
        return self.ingestion.ingest(source, name, root)

    def pending_embeddings(self, image_set: str | None = None) -> pl.DataFrame:
        return self.embedding.pending(image_set)

    def embed_pending(self, image_set: str | None = None, progress: bool | None = None, on_chunk=None) -> int:
        return self.embedding.embed_pending(image_set, progress, on_chunk)

    def index_pending(self, embed: bool = True) -> IndexVersion | None:
        return self.indexing.index_pending(embed)

    def rebuild(self, operation: str = "rebuild", n_shards: int | None = None) -> IndexVersion:
        return self.indexing.rebuild(operation, n_shards)

    def compact(self, retain: int = 5) -> tuple[IndexVersion, list[IndexVersion]]:
        return self.indexing.compact(retain)

    def add(self, source: str | Path, name: str | None = None, progress: bool | None = None,
            root: str | Path | None = None) -> AddReport:
        """Ingest + embed + index: the whole path for one image set (`root`: see ingest)."""
        t0 = time.perf_counter()
        report = self.ingest(source, name, root=root)
        t1 = time.perf_counter()
        # Every set's pending samples, not only this one's: a crash mid-add is finished here.
        embedded = self.embed_pending(progress=progress)
        t2 = time.perf_counter()
        version = self.index_pending(embed=False)
        live = version or self.indexes.live()
        return AddReport(report, embedded, t2 - t1, live.version if live else None,
                         live.n_vectors if live else 0, time.perf_counter() - t0)

    def pending(self, exact: bool = False) -> dict:
        """What a crash left between ingest and index (indexing.pending_work), without loading the encoder."""
        return pending_work(self.layout, self.ledger, self.encoder_choice.known_id(), exact)

    def index_consistency(self) -> dict:
        """Does the live index hold exactly the active embedded samples of this encoder?"""
        return self.indexing.consistency(self.recall.held_ids())

    def embedding_files(self, image_set: str | None = None) -> list[str]:
        with self.ledger.connect() as s:
            return s.samples.embedding_files(self.encoder.id, image_set)

    # ---- search, classify, evaluate ------------------------------------------------------------

    def live_index(self):
        return self.recall.live_index()

    def index_changed(self) -> None:
        """The live index changed in place (a forget's erasure): the next search loads it again."""
        if "recall" in self.__dict__:
            self.recall.invalidate()

    def stored_vectors(self, index=None) -> tuple[np.ndarray, np.ndarray]:
        return self.recall.stored_vectors(index)

    def catalog(self) -> Catalog:
        return self.recall.catalog()

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.recall.search(vectors, k)

    def novelty_threshold(self, percentile: float = NOVELTY_PERCENTILE) -> float:
        return self.recall.novelty_threshold(percentile)

    def classify(self, images: list, k: int = DEFAULT_K, strategy: str = DEFAULT_STRATEGY,
                 progress: bool | None = None, unknown: bool = False, pruning: str | None = None) -> list[Prediction]:
        return self.classifier.classify(images, k, strategy, progress, unknown, pruning)

    def evaluate(self, source: str | Path, k_max: int = 100, strategies=STRATEGIES,
                 progress: bool | None = None, record: bool = True, pruning: bool = False) -> Evaluation:
        return self.evaluating.evaluate(source, k_max, strategies, progress, record, pruning)

    def evaluate_leave_one_out(self, k_max: int = 100, strategies=STRATEGIES, record: bool = True,
                               batch: int = 4096, pruning: bool = False) -> Evaluation:
        return self.evaluating.evaluate_leave_one_out(k_max, strategies, record, batch, pruning)

    def record_evaluation(self, result: Evaluation) -> Evaluation:
        return self.evaluating.record(result)

    def compare_with_previous(self, result: Evaluation) -> dict | None:
        return self.evaluating.compare_with_previous(result)

    # ---- forget, status ------------------------------------------------------------------------

    def forget(self, request: ForgetRequest, dry_run: bool = False) -> ForgetReport:
        """Forget samples for good (see forgetting.py)."""
        report = self.forgetting.forget(request, dry_run=dry_run)
        self._after_forgetting([report])
        return report

    def resume_forgetting(self, only: str | None = None, in_process: bool = True) -> list[str]:
        """Finish forget requests a crash left pending (or just `only`); returns their ids. Every
        shard is erased in this process (a dead shard worker's too), unless `in_process` is False:
        then by its shard worker, where shard workers serve the memory."""
        applied = self.forgetting.apply_pending(only, in_process=in_process)
        self._after_forgetting(list(applied.values()))
        return list(applied)

    def _after_forgetting(self, results: list[ForgetReport | Applied]) -> None:
        if any(r.live_index_changed for r in results):
            self.index_changed()

    def status(self) -> dict:
        """What a person asks first: which encoder, how many of what, which index, how much disk."""
        return memory_status(self.layout, self.ledger, self.encoder_spec(), self.pending(), self.index_policy,
                             self.encoder_choice.known_id(), self.settings.shards)
