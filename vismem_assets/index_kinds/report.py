"""What a build chose and measured (every kind's `build` returns one with its index)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class BuildReport:
    """What a build chose and measured; stored with the index version in the ledger."""
    kind: str                        # what was written: flat | ivf-flat | ivf-pq | ... (a kind's name)
    factory: str                     # its FAISS description, e.g. "IVF1024,Flat"
    reason: str                      # why this kind, in words
    wanted: str | None = None        # what the policy asked for
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    speedup: float | None = None     # exact seconds / approximate seconds on the held-out queries
    n_held_out: int | None = None
    n_train: int | None = None
    train_seconds: float | None = None
    sweep: list | None = None        # [(nprobe, recall@10)] tried

    def to_dict(self) -> dict:
        return asdict(self)
