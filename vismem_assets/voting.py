"""Voting over retrieved neighbours (Geirhos et al. 2024).

Weights per neighbour, with s the cosine similarity, d = 1 - s and r the 0-based rank:
plurality 1 · distance exp(-d) · softmax exp(s / 0.07) · rank 1 / (2 + r).
Weights sum per label; the highest wins; a tie goes to the label that reached the top score
first. Because the vote at k extends the vote at k-1 by one neighbour, one pass over K
neighbours gives the prediction for every k in 1..K.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = ("rank", "softmax", "distance", "plurality")
DEFAULT_STRATEGY = "rank"
SOFTMAX_TAU = 0.07
RANK_ALPHA = 2.0


def vote_weights(similarities: np.ndarray, strategy: str = DEFAULT_STRATEGY) -> np.ndarray:
    """(n, K) similarities, sorted best first -> (n, K) float64 vote weights."""
    s = np.asarray(similarities, dtype=np.float64)
    if strategy == "plurality":
        return np.ones_like(s)
    if strategy == "distance":
        return np.exp(-(1.0 - s))
    if strategy == "softmax":
        return np.exp(s / SOFTMAX_TAU)
    if strategy == "rank":
        return np.broadcast_to(1.0 / (RANK_ALPHA + np.arange(s.shape[1])), s.shape).copy()
    raise ValueError(f"unknown voting strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def vote_all_k(labels: np.ndarray, weights: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions for every k in one pass.

    labels: (n, K) int label codes of the neighbours (-1 = no neighbour), weights: (n, K).
    Returns (pred, confidence), both (n, K): column k-1 is the vote over the first k neighbours;
    pred is -1 where no neighbour carried weight; confidence is the winner's share of the vote.
    """
    n, K = labels.shape
    scores = np.zeros((n, n_labels + 1), dtype=np.float64)  # last column soaks up missing neighbours
    best = np.full(n, -1, dtype=np.int64)
    best_score = np.zeros(n, dtype=np.float64)
    total = np.zeros(n, dtype=np.float64)
    pred = np.empty((n, K), dtype=np.int64)
    conf = np.empty((n, K), dtype=np.float64)
    rows = np.arange(n)
    for r in range(K):
        lab = np.where(labels[:, r] >= 0, labels[:, r], n_labels)
        w = np.where(labels[:, r] >= 0, weights[:, r], 0.0)
        scores[rows, lab] += w
        total += w
        new = scores[rows, lab]
        # Strictly greater: a label that only ties the leader did not reach that score first.
        take = (new > best_score) & (lab < n_labels)
        best = np.where(take, lab, best)
        best_score = np.where(take, new, best_score)
        pred[:, r] = best
        conf[:, r] = np.divide(best_score, total, out=np.zeros(n), where=total > 0)
    return pred, conf


def accuracy_by_k(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(n, K) predictions, (n,) true codes -> (K,) accuracy at k = 1..K."""
    return (pred == truth[:, None]).mean(axis=0)
