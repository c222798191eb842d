"""The active samples of a memory, addressable by FAISS vector id."""
from __future__ import annotations

import numpy as np
import polars as pl


class Catalog:
    """Active samples of the memory, addressable by FAISS vector id."""

    def __init__(self, frame: pl.DataFrame):
        frame = frame.sort("vector_id")
        self.vector_ids = frame["vector_id"].to_numpy()
        self.sample_ids = frame["sample_id"].to_list()
        self.image_paths = frame["image_path"].to_list()
        labels = frame["label"].to_list()
        self.label_names = sorted(set(labels))
        code = {name: i for i, name in enumerate(self.label_names)}
        self.label_codes = np.array([code[x] for x in labels], dtype=np.int64)

    def rows(self, vector_ids: np.ndarray) -> np.ndarray:
        """Row positions of the given vector ids (-1 where unknown, e.g. FAISS's -1 padding)."""
        if not len(self.vector_ids):
            return np.full(np.shape(vector_ids), -1)
        pos = np.clip(np.searchsorted(self.vector_ids, vector_ids), 0, len(self.vector_ids) - 1)
        return np.where(self.vector_ids[pos] == vector_ids, pos, -1)

    def codes(self, labels: list[str]) -> np.ndarray:
        code = {name: i for i, name in enumerate(self.label_names)}
        return np.array([code.get(x, -2) for x in labels], dtype=np.int64)  # -2: a label the memory lacks
