"""Recall: the k nearest stored vectors of query vectors, from the live index version, and the
novelty threshold beyond which a query is unlike anything stored.

It keeps the live index loaded (and its searcher) while that version stays live; whoever
changes the live index in place (a forget's erasure) calls `invalidate`.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from .catalog import Catalog
from .embeddings import EmbeddingStore
from .encoders import Encoder, EncoderMismatchError
from .index_kinds import Searcher, kind_for
from .index_store import IndexStore, IndexVersion, held_ids, recorded_hash_lists, searcher_of
from .ledger import LedgerBase
from .live_files import LiveFiles
from .shards import ShardedIndex, parts_of, search_all

NOVELTY_PERCENTILE = 99.0
NOVELTY_SAMPLE = 5000         # vectors whose nearest-neighbour distance estimates the threshold


class Recall:
    def __init__(self, ledger: LedgerBase, indexes: IndexStore, embeddings: EmbeddingStore, encoder: Encoder,
                 read_only: bool = False, shard_workers=None):
        """`read_only`: a novelty threshold is computed but not cached in the ledger; `shard_workers`:
        the client of the shard workers (shard_workers.py) that search, else None: this process does."""
        self.ledger = ledger
        self.indexes = indexes
        self.embeddings = embeddings
        self.encoder = encoder
        self.read_only = read_only
        self.shard_workers = shard_workers
        self._index_cache: tuple[tuple, IndexVersion, object] | None = None
        self._searcher_cache: tuple[object, list[tuple[Searcher, int]]] | None = None  # (index, per shard: searcher, held)
        self._index_checked: bytes | None = None                # the ledger's change token when the index was checked
        self._catalog_cache: tuple[bytes, Catalog] | None = None
        self._files = LiveFiles(indexes)   # what searches: the live version's files, each held (live_files.py)
        self._files_checked: bytes | None = None

    def invalidate(self) -> None:
        """The live index changed in place: look at it again on the next search."""
        self._index_cache = self._searcher_cache = self._index_checked = self._catalog_cache = None
        self._files_checked = None

    def live_version(self) -> IndexVersion:
        """The live version's row (nothing loaded), or an error that says what to do."""
        live = self.indexes.live()
        if live is None:
            with self.ledger.connect() as s:
                others = s.indexes.live_encoders()
            hint = (f" This memory has indexes for: {', '.join(others)}; pass the encoder that built them"
                    if others else " Add an image set first: vismem add SET_PATH")
            raise FileNotFoundError(f"no index for encoder {self.encoder.id}.{hint}")
        return live

    def ready(self) -> None:
        """Fail now on a memory with nothing to search; load its index now, unless shard workers hold it."""
        if self.shard_workers is None:
            self.live_files()
        else:
            self.live_version()

    def live_index(self):
        """(version, index) of the live version, cached while it stays live: its one FAISS index,
        or, for a memory of several shards, a ShardedIndex of one per shard. Whether it is still
        live is asked of the ledger only when a transaction has committed since the last time
        (the ledger's change token: microseconds, where a ledger session costs milliseconds)."""
        token = self.ledger.change_token()  # read first: a commit after it makes the next call look again
        if self._index_cache is not None and token is not None and token == self._index_checked:
            return self._index_cache[1], self._index_cache[2]
        with self.ledger.connect() as s:  # one session for both
            live = self.live_version()
            pending = s.indexes.unfinished_forget_ids()
        # A forget accepted elsewhere changes the key before it erases anything: loading leaves its
        # vectors out, so a long-lived reader (vismem serve) never returns them meanwhile.
        key = (live.version, tuple(f.sha256 for f in live.files), hash(np.sort(pending).tobytes()))
        if self._index_cache is None or self._index_cache[0] != key:
            # Memory-mapped or read whole, as its kind is best searched (index_kinds/).
            parts = [self.indexes.load_for_search(live, shard=j)[1] for j in range(live.n_shards)]
            self._index_cache = (key, live, parts[0] if len(parts) == 1 else ShardedIndex(parts))
        self._index_checked = token
        return self._index_cache[1], self._index_cache[2]

    def live_files(self) -> LiveFiles:
        """The live version's files as this reader holds them for searching, switched to a new
        version at the cost of what changed (live_files.py); looked up in the ledger only when a
        transaction has committed since (the change token)."""
        token = self.ledger.change_token()
        if token is not None and token == self._files_checked and self._files.key is not None:
            return self._files
        with self.ledger.connect() as s:
            live = self.live_version()
            pending = s.indexes.unfinished_forget_ids()
            # the hash lists of a new version's files in the same session (opening one costs more)
            recorded = None if self._files.holds(live, pending) else recorded_hash_lists(s, live.files)
        self._files.switch(live, pending, recorded)
        self._files_checked = token
        return self._files

    def held_ids(self) -> np.ndarray:
        """The vector ids the live version holds, every shard's, holes aside."""
        return np.concatenate([held_ids(p) for p in parts_of(self.live_index()[1])])

    def stored_vectors(self, index=None) -> tuple[np.ndarray, np.ndarray]:
        """(vector ids, exact vectors) of the live index (or `index`): a flat index's own storage,
        else (an approximate index keeps no exact vectors) read from the embedding files."""
        if index is None:
            _, index = self.live_index()
        parts = parts_of(index)
        ids = np.concatenate([held_ids(p) for p in parts])
        exact = [kind_for(p).exact_vectors(p) for p in parts]
        if all(e is not None for e in exact):
            return ids, np.concatenate(exact) if len(exact) > 1 else exact[0].copy()
        with self.ledger.connect() as s:
            embedded = s.samples.embedded_active(self.encoder.id)
        paths = embedded.filter(pl.col("vector_id").is_in(ids.tolist()))["path"].unique().to_list()
        got_ids, vectors = self.embeddings.read(paths, ids)
        if len(got_ids) != len(ids):
            raise RuntimeError(f"the live index holds {len(ids)} vectors but the embedding files only {len(got_ids)}: "
                               "run `vismem rebuild` to write a version from the ledger and embeddings")
        return got_ids, vectors

    def catalog(self) -> Catalog:
        """Labels, sample ids, image paths and user weights of the active samples, by vector id;
        read again only when a transaction has committed since (the ledger's change token)."""
        token = self.ledger.change_token()
        if token is not None and self._catalog_cache is not None and self._catalog_cache[0] == token:
            return self._catalog_cache[1]
        with self.ledger.connect() as s:
            catalog = Catalog.query(s)
        if token is not None:
            self._catalog_cache = (token, catalog)
        return catalog

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, vector_ids), each (n, min(k, N)), best first: each file of the live version
        (every shard's base and deltas, live_files.py) searched by its kind's searcher and their top
        k merged (shards.py): a flat index exactly by blocked matrix multiplication over its own stored
        vectors (search.py; exact ties: lower position first); an IVF-Flat one list by list for
        large batches (ivf_search.py); others by FAISS. With shard workers, each worker searches its
        shard so, and the answers are merged here."""
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dim:
            raise EncoderMismatchError(f"query vectors of shape {vectors.shape} do not match encoder {self.encoder.id}")
        if self.shard_workers is not None:  # each shard's worker searches its own; merged the same way
            return self.shard_workers.search(self.encoder.id, self.live_version().n_shards, vectors, k)
        searchers = self.live_files().searchers()
        k = max(1, min(k, sum(held for _, held in searchers)))
        return search_all(searchers, vectors, k)

    def _searchers(self, index) -> list[tuple[Searcher, int]]:
        """Each shard's searcher (its kind's) and how many vectors it holds, cached with the live
        index: a searcher reads its index's own vectors or lists (no copy) and keeps it alive."""
        if self._searcher_cache is None or self._searcher_cache[0] is not index:
            found = [(part, *searcher_of(part)) for part in parts_of(index)]
            self._searcher_cache = (index, [(searcher, part.ntotal - holes) for part, searcher, holes in found])
        return self._searcher_cache[1]

    def novelty_threshold(self, percentile: float = NOVELTY_PERCENTILE) -> float:
        """Nearest-neighbour distance (1 - cosine) beyond which a query is 'unknown': that
        percentile of the memory's own leave-one-out nearest-neighbour distances (estimated on
        a sample of its vectors, cached per index version)."""
        version, index = self.live_index()
        with self.ledger.connect() as s:
            cached = s.evaluations.novelty_threshold(self.encoder.id, version.version, percentile)
        if cached is not None:
            return cached
        ids, vectors = self.stored_vectors(index)
        if len(ids) < 2:
            raise ValueError("a novelty threshold needs at least two samples in the memory")
        pick = np.random.default_rng(version.version).choice(len(ids), min(len(ids), NOVELTY_SAMPLE), replace=False)
        sims, nn = self.search(vectors[pick], 2)
        nearest_other = np.where(nn[:, 0] == ids[pick], sims[:, 1], sims[:, 0])
        distance = float(np.percentile(1.0 - nearest_other, percentile))
        if self.read_only:  # a cache: computed again next time rather than written
            return distance
        with self.ledger.transaction() as s:
            s.evaluations.record_novelty_threshold(self.encoder.id, version.version, percentile, distance, len(pick))
        return distance
