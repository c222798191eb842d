"""Embedding in two steps: *encode* and *record*.

`encode` turns images into vectors with the encoder and writes them as one embedding part
file: no ledger, no lock, so it can run on any machine that sees the home (later, workers).
`Recorder.record` is the single writer: it inserts the `embeddings` rows of a part that encode
wrote, in a ledger transaction. `Embedding.embed_pending` chains them, one chunk at a time:
pending rows (a read) -> encode a chunk -> record it, so a crash loses at most one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .embeddings import EmbeddingStore
from .encoders import Encoder
from .home import Layout
from .ledger import LedgerBase
from .slices import even_slices

EMBED_CHUNK = 2048  # images per embedding part file: a crash loses at most one chunk of work


@dataclass(frozen=True)
class EncodedPart:
    """A part file encode wrote (relative to the home) and the samples of its rows."""
    path: str
    sample_ids: list[str]


@dataclass(frozen=True)
class EncodeTask:
    """One slice of pending samples for one `encode` call: all a worker needs, no ledger.
    `image_paths` are relative to the home (a shared mount seen by every worker)."""
    folder: str
    image_paths: list[str]
    sample_ids: list[str]
    vector_ids: list[int]

    def __len__(self) -> int:
        return len(self.sample_ids)


def split_pending(pending: pl.DataFrame, image_set: str | None = None, parts: int = 1,
                  chunk: int = EMBED_CHUNK) -> list[EncodeTask]:
    """Pending rows (Embedding.pending) cut into encode tasks in their order: at most `chunk`
    images each, and at least `parts` tasks (as even as possible) when there are that many images,
    so that `parts` workers share even a small set. A task's folder is `image_set`, else the set of
    its first row (as embed_pending names its parts)."""
    tasks = []
    for start, stop in even_slices(len(pending), parts, chunk):
        rows = pending.slice(start, stop - start)
        tasks.append(EncodeTask(image_set or rows["image_set"][0], rows["image_path"].to_list(),
                                rows["sample_id"].to_list(), [int(v) for v in rows["vector_id"]]))
    return tasks


def encode_task(encoder: Encoder, store: EmbeddingStore, task: EncodeTask, progress: bool | None = False) -> EncodedPart:
    """`encode` one task; the images are read from the store's home. No ledger, no lock."""
    layout = store.layout
    return encode(encoder, store, task.folder, [layout.absolute(p) for p in task.image_paths], task.sample_ids,
                  np.asarray(task.vector_ids, dtype=np.int64), progress=progress,
                  desc=f"embedding {len(task)} images")


def encode(encoder: Encoder, store: EmbeddingStore, folder: str, images: Sequence, sample_ids: list[str],
           vector_ids: np.ndarray, progress: bool | None = None, desc: str = "embedding") -> EncodedPart:
    """Embed `images` (paths, bytes or PIL images) and write their vectors as one part file under
    the store's `folder`, atomically; what it wrote. Touches neither the ledger nor a lock."""
    vectors = encoder.embed(images, progress=progress, desc=desc)
    return EncodedPart(store.write(folder, sample_ids, vector_ids, vectors), list(sample_ids))


class Recorder:
    """The single writer of embedding rows for one encoder."""

    def __init__(self, ledger: LedgerBase, store: EmbeddingStore, encoder_id: str):
        self.ledger = ledger
        self.store = store
        self.encoder_id = encoder_id

    def record(self, part: EncodedPart) -> int:
        """Insert the rows of a part; the number recorded. A sample forgotten while it was encoded
        must not come back through its vector, and one another run recorded meanwhile is not
        recorded twice: the part is rewritten without them (removed if none is left), so every
        row of a part is recorded and no part holds vectors the ledger does not know of."""
        with self.ledger.transaction() as s:
            drop = s.samples.not_to_record(self.encoder_id, part.sample_ids)
            if drop:
                if not self.store.drop_rows(part.path, drop):
                    return 0
                part = EncodedPart(part.path, [sid for sid in part.sample_ids if sid not in drop])
            try:
                s.samples.record_embeddings(self.encoder_id, part.sample_ids, part.path)
            except BaseException:
                self.store.layout.absolute(part.path).unlink(missing_ok=True)  # no part without its rows
                raise
        return len(part.sample_ids)


class Embedding:
    """What this memory's encoder has not embedded yet, embedded and recorded."""

    def __init__(self, layout: Layout, ledger: LedgerBase, encoder: Encoder, store: EmbeddingStore):
        self.layout = layout
        self.ledger = ledger
        self.encoder = encoder
        self.store = store
        self.recorder = Recorder(ledger, store, encoder.id)

    def pending(self, image_set: str | None = None) -> pl.DataFrame:
        """Active samples this encoder has not embedded yet (optionally only those of one set)."""
        with self.ledger.connect() as s:
            return s.samples.pending_embeddings(self.encoder.id, image_set)

    def embed_pending(self, image_set: str | None = None, progress: bool | None = None,
                      on_chunk: Callable[[int, int], None] | None = None) -> int:
        """Embed only what this encoder has not embedded; parts are recorded chunk by chunk.
        `on_chunk(done, total)` is called after each recorded chunk (for logs without a bar)."""
        pending = self.pending(image_set)
        if pending.is_empty():
            return 0  # the embedding lock is taken only when something is pending
        # One embedding run per encoder at a time (store-wide lock, not the ledger's: embedding is
        # slow): three concurrent adds of the same images embedded them three times. In a cluster
        # encoding runs anywhere and only recording is serialised (issue 18): there the recorder's
        # drop of already-embedded samples is what keeps parts whole.
        with self.store.lock() as waited:
            if waited:  # the run we waited for may have embedded them
                pending = self.pending(image_set)
            done = 0
            for start in range(0, len(pending), EMBED_CHUNK):
                chunk = pending.slice(start, EMBED_CHUNK)
                part = encode(self.encoder, self.store, image_set or chunk["image_set"][0],
                              [self.layout.absolute(p) for p in chunk["image_path"]], chunk["sample_id"].to_list(),
                              chunk["vector_id"].to_numpy(), progress=progress,
                              desc=f"embedding {start + len(chunk)}/{len(pending)}")
                recorded = self.recorder.record(part)
                if recorded:
                    done += recorded
                    if on_chunk:
                        on_chunk(start + len(chunk), len(pending))
            return done
