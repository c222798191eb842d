"""Embedding files: parquet per (encoder, image set), written with polars.

Each write is a new part file `embeddings/<encoder>/<set>/part-<n>.parquet` holding
sample_id, vector_id and the vector; the ledger's `embeddings` table says which file holds
which sample, so nothing is embedded twice and a rebuild knows where to read.
"""
from __future__ import annotations

import fcntl
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from .atomic import atomic_path
from .erasure import HOLE_ID
from .encoders.base import EncoderMismatchError
from .home import Layout


class EmbeddingStore:
    def __init__(self, layout: Layout, encoder_slug: str, dim: int):
        self.layout = layout
        self.root = layout.embeddings(encoder_slug)
        self.dim = dim
        self._held = threading.local()

    @contextmanager
    def lock(self):
        """This encoder's embedding lock (flock on embeddings/<encoder>/.embed.lock), held while a
        process finds what is pending and embeds it: a concurrent add waits, then finds nothing
        left, instead of embedding the same images again. Re-entrant within a thread; a killed
        holder releases it with its process. Take it before the ledger lock, never inside a
        ledger connection (its holder takes the ledger lock to record each part). Yields whether
        it had to wait for another holder (who may have embedded what the caller found pending)."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield False
            finally:
                self._held.depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".embed.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                waited = False
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits for the other process's embedding to finish
                waited = True
            self._held.depth = 1
            try:
                yield waited
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)

    def write(self, image_set: str, sample_ids: list[str], vector_ids: np.ndarray, vectors: np.ndarray) -> str:
        """Write one part file atomically; returns its path relative to the memory home."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EncoderMismatchError(f"vectors of shape {vectors.shape} do not fit this encoder's dimension {self.dim}")
        frame = pl.DataFrame(
            {
                "sample_id": pl.Series(sample_ids, dtype=pl.String),
                "vector_id": pl.Series(np.asarray(vector_ids, dtype=np.int64)),
                "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, self.dim)),
            }
        )
        final = self.root / image_set / f"part-{uuid.uuid4().hex[:16]}.parquet"
        with atomic_path(final) as tmp:
            write_part(frame, tmp)
        return self.layout.relative(final)

    def drop_rows(self, path: str, sample_ids: set[str]) -> bool:
        """Rewrite a part file (atomically, in place) without the rows of these samples, or
        remove it when none is left; whether it still exists."""
        final = self.layout.absolute(path)
        frame = pl.read_parquet(final).filter(~pl.col("sample_id").is_in(list(sample_ids)))
        if frame.is_empty():
            final.unlink(missing_ok=True)
            return False
        with atomic_path(final) as tmp:
            write_part(frame, tmp)
        return True

    def read(self, paths: list[str], keep_vector_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vector_ids, vectors) from the given part files, optionally only the listed ids."""
        if not paths:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        frame = pl.concat([pl.read_parquet(self.layout.absolute(p), columns=["vector_id", "vector"]) for p in paths])
        frame = frame.filter(pl.col("vector_id") != HOLE_ID)  # erased rows (a forgotten sample's)
        if keep_vector_ids is not None:
            frame = frame.filter(np.isin(frame["vector_id"].to_numpy(), keep_vector_ids))
        frame = frame.unique("vector_id", keep="first").sort("vector_id")
        vectors = frame["vector"].to_numpy()
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EncoderMismatchError(f"embedding files hold vectors of shape {vectors.shape}, not (n, {self.dim})")
        return frame["vector_id"].to_numpy().astype(np.int64), np.ascontiguousarray(vectors, dtype=np.float32)

    def files(self) -> list[Path]:
        return sorted(self.root.rglob("*.parquet")) if self.root.exists() else []


def write_part(frame: pl.DataFrame, path: Path) -> None:
    """Uncompressed (float32 vectors do not compress: zstd saved 9% of the bytes here and made
    writing 4x and reading 1.5x slower) and without statistics (a page's min or max would be a
    value of one of its rows): so forgetting can erase a row where it is (erasure.py)."""
    frame.write_parquet(path, compression="uncompressed", statistics=False)
