"""Shards: a memory split into S parts by sample id, searched part by part and merged.

A sample's shard is its sha256 (the sample id) read as a number, modulo S: stable across
encoders, runs and machines, and even (a cryptographic hash). Each shard has its own files in
every index version (base, deltas, holes: index_store.py); a search asks every shard for its k
best and keeps the k best of them all (`merge_top_k`), which is what one index over the whole
memory returns: each shard's top k holds every one of its vectors that can be in the overall
top k. S = 1 is a memory in one piece.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

MAX_SHARDS = 256


class ShardError(ValueError):
    """A shard count or shard that does not fit the memory."""


def check_count(n_shards: int) -> int:
    if not isinstance(n_shards, (int, np.integer)) or not 1 <= n_shards <= MAX_SHARDS:
        raise ShardError(f"a memory has 1 to {MAX_SHARDS} shards, not {n_shards!r}")
    return int(n_shards)


def shard_of(sample_ids: Sequence[str], n_shards: int) -> np.ndarray:
    """The shard of each sample: the first 15 hex digits of its sha256 (60 bits, exact in an
    int64), modulo S."""
    if n_shards == 1:
        return np.zeros(len(sample_ids), np.int64)
    keys = np.fromiter((int(s[:15], 16) for s in sample_ids), np.int64, count=len(sample_ids))
    return keys % n_shards


class Searcher(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def merge_top_k(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of every shard's (similarities, ids), each (n, k_j), best first: higher
    similarity first, then (an exact tie between shards) lower vector id. Slots a shard could not
    fill (id -1) never come first."""
    if len(results) == 1:
        sims, ids = results[0]
        return sims[:, :k], ids[:, :k]
    sims = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    empty = ids < 0
    order = np.lexsort((ids, np.where(empty, np.inf, -sims.astype(np.float64))), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


class ShardedIndex:
    """A version's shards as loaded: one FAISS index per shard (what `live_index` gives for a
    memory of several shards; a memory in one piece gives its one index)."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.parts)


def parts_of(index) -> list:
    """The per-shard indexes of what `live_index` gives."""
    return index.parts if isinstance(index, ShardedIndex) else [index]


def search_all(searchers: Sequence[tuple[Searcher, int]], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter-gather in this process: each (searcher, vectors it holds) asked for its k best
    (at most what it holds), merged. Shards holding nothing are skipped."""
    parts = [searcher.search(queries, min(k, held)) for searcher, held in searchers if held > 0]
    if not parts:  # nothing held anywhere: the first shard answers as an empty index does
        return searchers[0][0].search(queries, k)
    return merge_top_k(parts, k)
