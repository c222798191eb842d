"""Classify: a label for each image by a weighted vote over its nearest stored neighbours, with
the neighbours that decided it, and UNKNOWN for an image unlike anything in the memory.

A neighbour's vote is the strategy's weight (voting.py) x its pruning factor x its user weight
(relabel.py); the pruning weights come in as callables, so this module knows nothing of how
they are computed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .catalog import Catalog
from .encoders import Encoder
from .evaluation import DEFAULT_K
from .home import Layout
from .recall import Recall
from .voting import DEFAULT_STRATEGY, vote_all_k, vote_weights

UNKNOWN = "unknown"           # the answer for an image unlike anything in the memory

# () -> (mode, hard threshold) of the active weight set, or None when pruning is off (pruning.active_mode).
ActivePruning = Callable[[], "tuple[str, int | None] | None"]
# (catalog, mode, hard threshold) -> a weight per catalog row, or None for no pruning (pruning.weights_by_row).
PruningWeights = Callable[[Catalog, "str | None", "int | None"], "np.ndarray | None"]


@dataclass
class Neighbor:
    rank: int
    sample_id: str
    vector_id: int
    label: str
    similarity: float
    weight: float             # its vote: strategy weight x pruning factor x user weight
    image_path: str
    pruning_factor: float = 1.0
    user_weight: float = 1.0  # set by `vismem weight` (relabel.py); 0 excludes the sample


@dataclass
class Prediction:
    path: str
    label: str | None         # the answer: the vote's winner, or UNKNOWN
    confidence: float         # the winner's share of the vote
    scores: dict[str, float]
    neighbors: list[Neighbor]
    voted_label: str | None = None
    unknown: bool = False
    nearest_distance: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    def __init__(self, layout: Layout, encoder: Encoder, recall: Recall, active_pruning: ActivePruning,
                 pruning_weights: PruningWeights):
        self.layout = layout
        self.encoder = encoder
        self.recall = recall
        self.active_pruning = active_pruning
        self.pruning_weights = pruning_weights

    def classify(self, images: list, k: int = DEFAULT_K, strategy: str = DEFAULT_STRATEGY,
                 progress: bool | None = None, unknown: bool = False, pruning: str | None = None) -> list[Prediction]:
        """Predict a label for each image, with the neighbours that decided it. With `unknown`,
        an image farther from its nearest neighbour than the memory's novelty threshold is
        answered UNKNOWN (the vote is kept in `voted_label`). `pruning`: 'none', 'soft', 'hard',
        or None for the memory's active weight set (vismem prune)."""
        vote_weights(np.zeros((1, 1)), strategy)  # fail early on an unknown strategy
        self.recall.ready()  # ... and on a memory with nothing to search, before embedding anything
        threshold = self.recall.novelty_threshold() if unknown else None
        vectors = self.encoder.embed(images, progress=progress)
        sims, ids = self.recall.search(vectors, k)
        catalog = self.recall.catalog()
        rows = catalog.rows(ids)
        labels = np.where(rows >= 0, catalog.label_codes[rows], -1)
        threshold_hard = None
        if pruning is None:
            pruning, threshold_hard = self.active_pruning() or ("none", None)
        row_weight = self.pruning_weights(catalog, pruning, threshold_hard)
        factors = np.where(rows >= 0, row_weight[rows], 0.0) if row_weight is not None else np.ones(ids.shape)
        users = np.where(rows >= 0, catalog.user_weights[rows], 0.0)
        weights = vote_weights(sims, strategy) * factors * users  # the documented rule (README, relabel.py)
        pred, conf = vote_all_k(labels, weights, len(catalog.label_names))
        # Python lists, and each stored image's path joined once: this loop runs k times per query.
        root, names, sample_ids, image_paths = str(self.layout.root), catalog.label_names, catalog.sample_ids, catalog.image_paths
        path_of: dict[int, str] = {}
        rows_l, labels_l, ids_l, sims_l, weights_l, factors_l, users_l = (
            a.tolist() for a in (rows, labels, ids, sims, weights, factors, users))
        out = []
        for i, image in enumerate(images):
            scores: dict[str, float] = {}
            neighbors = []
            for r, j in enumerate(rows_l[i]):
                if j < 0:
                    continue
                name, weight = names[labels_l[i][r]], weights_l[i][r]
                scores[name] = scores.get(name, 0.0) + weight
                path = path_of.get(j)
                if path is None:
                    path = path_of[j] = f"{root}/{image_paths[j]}"
                neighbors.append(Neighbor(r, sample_ids[j], ids_l[i][r], name, sims_l[i][r], weight, path,
                                          factors_l[i][r], users_l[i][r]))
            voted = names[pred[i, -1]] if pred[i, -1] >= 0 else None
            distance = float(1.0 - sims[i, 0])
            novel = threshold is not None and distance > threshold
            out.append(Prediction(str(image) if isinstance(image, (str, Path)) else f"image[{i}]",
                                  UNKNOWN if novel else voted, float(conf[i, -1]), scores, neighbors,
                                  voted_label=voted, unknown=novel, nearest_distance=distance))
        return out
