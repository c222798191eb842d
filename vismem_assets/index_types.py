"""Index types: which kind of index a build writes for a memory of a given size (the policy).

Exact flat (`IDMap2,Flat`) is the default and the reference. From `ivf_from` vectors (policy
`auto`: IVF-Flat), or when asked for (`ivf-flat`, `ivf-sq8`, `ivf-pq`, or any registered kind),
a build writes that kind, which may train and check itself and fall back to exact (IVF: its
recall on held-out vectors must reach `recall_floor`; index_kinds/ivf.py). The kinds themselves,
and how to add one: index_kinds/.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from . import index_kinds
from .index_kinds import BuildReport

KINDS = ("auto", *index_kinds.names())  # the built-in choices (the CLI's); the policy accepts any registered kind


class IndexTypeError(ValueError):
    """An index policy that cannot be applied as configured."""


@dataclass(frozen=True)
class IndexPolicy:
    """Which index a build writes. From the settings (VISMEM_INDEX_TYPE, VISMEM_IVF_FROM,
    VISMEM_RECALL_FLOOR, VISMEM_PQ_BYTES, VISMEM_DELTA_FRACTION, VISMEM_MAX_DELTAS, VISMEM_SHARD_MIB)."""
    kind: str = "auto"            # auto, or a registered kind: flat | ivf-flat | ivf-sq8 | ivf-pq | ...
    ivf_from: int = 200_000       # auto: IVF-Flat from this many vectors, exact below
    recall_floor: float = 0.95    # recall@10 an approximate index must reach to be used
    pq_bytes: int | None = None   # IVF-PQ code bytes per vector (default: about d / 8)
    delta_fraction: float = 0.10  # an add writes a delta file while deltas stay within this share of the base
    max_deltas: int = 16          # ... and this many files; past either it folds them into a new base
    shard_mib: int = 64           # an exact base is written in shards of about this size (forgetting rewrites one)

    def __post_init__(self):
        if self.kind != "auto" and self.kind not in index_kinds.names():
            raise IndexTypeError(f"unknown index type {self.kind!r}; use one of {', '.join(('auto', *index_kinds.names()))}")
        if not 0.0 < self.recall_floor <= 1.0:
            raise IndexTypeError(f"recall floor must be in (0, 1], not {self.recall_floor}")
        if not 0.0 <= self.delta_fraction <= 1.0:
            raise IndexTypeError(f"delta fraction must be in [0, 1] (0: every add writes a new base), not {self.delta_fraction}")
        if self.shard_mib < 1:
            raise IndexTypeError(f"shard_mib must be at least 1 (MiB per exact shard), not {self.shard_mib}")
        if self.max_deltas < 0:
            raise IndexTypeError(f"max_deltas must be 0 or more, not {self.max_deltas}")
        if self.ivf_from < 1:
            raise IndexTypeError(f"ivf_from must be a positive number of vectors, not {self.ivf_from}")

    @classmethod
    def from_settings(cls, settings, **overrides) -> "IndexPolicy":
        """The policy of `settings` (settings.Settings), non-None overrides (CLI flags, resource fields) winning."""
        values = {"kind": settings.index_type, "ivf_from": settings.ivf_from, "recall_floor": settings.recall_floor,
                  "pq_bytes": settings.pq_bytes, "delta_fraction": settings.delta_fraction,
                  "max_deltas": settings.max_deltas, "shard_mib": settings.shard_mib}
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def wanted(self, n: int) -> str:
        """The kind to build for n vectors (before the recall check)."""
        if self.kind != "auto":
            return self.kind
        return "ivf-flat" if n >= self.ivf_from else "flat"


def build(vector_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy) -> tuple[faiss.Index, BuildReport]:
    """The index the policy asks for over these vectors, with what it measured."""
    wanted = index_kinds.kind_named(policy.wanted(len(vectors)))
    return wanted.build(np.asarray(vector_ids, np.int64), vectors, policy)
