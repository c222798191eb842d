"""The active samples of a memory, addressable by FAISS vector id (read from the ledger by
`Session.labels.catalog()`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .ledger import Session


class Catalog:
    """Active samples of the memory, addressable by FAISS vector id: columns in vector-id order
    (`label_codes` index `label_names`, which are sorted; `user_weights`: what `vismem weight`
    set, 1 where nothing was)."""

    def __init__(self, vector_ids: np.ndarray, sample_ids: np.ndarray, image_paths: np.ndarray,
                 label_codes: np.ndarray, label_names: list[str], user_weights: np.ndarray | None = None):
        self.vector_ids = np.asarray(vector_ids, np.int64)
        self.sample_ids, self.image_paths = sample_ids, image_paths
        self.label_codes = np.asarray(label_codes, np.int64)
        self.label_names = list(label_names)
        self.user_weights = (np.ones(len(self.vector_ids)) if user_weights is None
                             else np.asarray(user_weights, np.float64))

    @classmethod
    def query(cls, session: Session) -> Catalog:  # FACADE-WIRING: Memory.catalog() calls session.labels.catalog()
        """From the ledger (the Labels group reads it)."""
        return session.labels.catalog()

    @property
    def has_user_weights(self) -> bool:
        return bool(len(self.user_weights)) and not bool((self.user_weights == 1.0).all())

    def rows(self, vector_ids: np.ndarray) -> np.ndarray:
        """Row positions of the given vector ids (-1 where unknown, e.g. FAISS's -1 padding)."""
        if not len(self.vector_ids):
            return np.full(np.shape(vector_ids), -1)
        pos = np.clip(np.searchsorted(self.vector_ids, vector_ids), 0, len(self.vector_ids) - 1)
        return np.where(self.vector_ids[pos] == vector_ids, pos, -1)

    def codes(self, labels: list[str]) -> np.ndarray:
        code = {name: i for i, name in enumerate(self.label_names)}
        return np.array([code.get(x, -2) for x in labels], dtype=np.int64)  # -2: a label the memory lacks
