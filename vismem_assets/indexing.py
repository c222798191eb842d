"""Indexing: folding embedded samples into index versions, rebuilding and compacting, and
saying what a crash left pending between ingest and index.

The index store (index_store.py) writes and loads versions; this service decides what goes
into them, from the ledger and the embedding files alone.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np

from .embeddings import EmbeddingStore
from .home import Layout
from .index_store import IndexStore, IndexVersion
from .ledger import LedgerBase, Session
from .store import sweep

T = TypeVar("T")


class Indexing:
    def __init__(self, layout: Layout, ledger: LedgerBase, indexes: IndexStore, embeddings: EmbeddingStore,
                 encoder_id: str, embed_pending: Callable[[], int]):
        """`embed_pending`: embeds (and records) what the encoder has not embedded yet."""
        self.layout = layout
        self.ledger = ledger
        self.indexes = indexes
        self.embeddings = embeddings
        self.encoder_id = encoder_id
        self.embed_pending = embed_pending

    def _after_embedding(self, work: Callable[[Session], T]) -> T:
        """`work` in a ledger session once nothing is left to embed. The check runs in that
        session: only when something is pending is it closed, so that the embedding lock comes
        first (its holder takes the ledger lock to record each part)."""
        with self.ledger.connect() as s:
            if not s.samples.count_not_embedded(self.encoder_id):
                return work(s)
        self.embed_pending()
        with self.ledger.connect() as s:
            return work(s)

    def index_pending(self, embed: bool = True) -> IndexVersion | None:
        """Fold embedded-but-unindexed active samples into a new version; None if nothing to do.
        What no one embedded yet (a crash mid-add left it) is embedded first, unless `embed` is
        False (the caller just did)."""
        if not embed:
            with self.ledger.connect() as s:
                return self._fold(s)
        return self._after_embedding(self._fold)

    def _fold(self, s: Session) -> IndexVersion | None:
        # Ids only, as numpy: an add must cost O(new), not a read of the whole index or ledger.
        present = self.indexes.ids()
        embedded = s.samples.embedded_active_ids(self.encoder_id)
        todo = np.unique(embedded[~np.isin(embedded, present, kind="table")]) if len(present) else np.unique(embedded)
        if not len(todo):
            return None
        ids, vectors = self.embeddings.read(s.samples.embedding_paths(self.encoder_id, todo), todo)
        return self.indexes.add(ids, vectors)

    def rebuild(self, operation: str = "rebuild", n_shards: int | None = None) -> IndexVersion:
        """A fresh version from the ledger and the embedding files alone, after embedding what a
        crash left pending; what dead processes left in the image store goes too (store.sweep).
        `n_shards`: re-shard the memory into that many (default: as it is)."""
        def build(s: Session) -> IndexVersion:
            sweep(self.layout, s)
            embedded = s.samples.embedded_active(self.encoder_id)
            ids, vectors = self.embeddings.read(embedded["path"].unique(maintain_order=True).to_list(),
                                                embedded["vector_id"].to_numpy())
            return self.indexes.rebuild(ids, vectors, operation, n_shards)
        return self._after_embedding(build)

    def compact(self, retain: int = 5) -> tuple[IndexVersion, list[IndexVersion]]:
        """Nightly compaction: a full rebuild into a fresh version (each shard rebuilt), then keep
        only the newest `retain`."""
        version = self.rebuild("compact")
        return version, self.indexes.retain(retain)

    def consistency(self, in_index: np.ndarray) -> dict:
        """Does an index holding `in_index` hold exactly the active embedded samples of this encoder?"""
        with self.ledger.connect() as s:
            expected = s.samples.embedded_active(self.encoder_id)["vector_id"].to_numpy()
        missing = np.setdiff1d(expected, in_index)
        extra = np.setdiff1d(in_index, expected)
        return {"ok": bool(len(missing) == 0 and len(extra) == 0 and len(in_index) == len(np.unique(in_index))),
                "n_index": int(len(in_index)), "n_ledger": int(len(expected)),
                "missing_from_index": missing[:20].tolist(), "not_in_ledger": extra[:20].tolist()}


def pending_work(layout: Layout, ledger: LedgerBase, encoder_id: str | None, exact: bool = False) -> dict:
    """Active samples the encoder has not embedded, and embedded ones its live index lacks: what
    a crash or kill -9 between ingest and index leaves behind, until the next add, rebuild or
    memory_index run finishes them. From the ledger alone, without loading the encoder; `exact`
    reads the live index's ids instead of comparing counts."""
    with ledger.connect() as s:
        not_embedded = s.samples.count_not_embedded(encoder_id)
        live_size = s.indexes.live_index_size(encoder_id)
        if exact:
            embedded = s.samples.embedded_active_ids(encoder_id)
            found = s.encoders.slug_and_dim(encoder_id)
            held = (IndexStore(layout, ledger, encoder_id, *found).ids()
                    if live_size is not None and found else np.empty(0, np.int64))
            not_indexed = len(np.setdiff1d(embedded, held))
        else:
            not_indexed = max(0, s.samples.count_embedded_active(encoder_id) - (live_size or 0))
    return {"encoder_id": encoder_id, "not_embedded": int(not_embedded), "not_indexed": int(not_indexed)}
