"""Voting rules, against a slow reference written independently of the vectorised code."""
import math

import numpy as np
import pytest

from vismem_assets.voting import STRATEGIES, accuracy_by_k, vote_all_k, vote_weights


def reference_vote(labels, weights, k):
    """Plain Python: sum per label over the first k; ties go to the label that got there first."""
    scores, best, best_score = {}, None, 0.0
    for lab, w in zip(labels[:k], weights[:k]):
        if lab < 0:
            continue
        scores[lab] = scores.get(lab, 0.0) + w
        if scores[lab] > best_score:
            best, best_score = lab, scores[lab]
    return best


def test_weight_formulas():
    s = np.array([[0.9, 0.5, -0.2]])
    assert np.allclose(vote_weights(s, "plurality"), 1.0)
    assert np.allclose(vote_weights(s, "distance"), [[math.exp(-0.1), math.exp(-0.5), math.exp(-1.2)]])
    assert np.allclose(vote_weights(s, "softmax"), [[math.exp(0.9 / 0.07), math.exp(0.5 / 0.07), math.exp(-0.2 / 0.07)]])
    assert np.allclose(vote_weights(s, "rank"), [[1 / 2, 1 / 3, 1 / 4]])
    with pytest.raises(ValueError, match="plurality"):
        vote_weights(s, "median")


def test_tie_goes_to_the_label_that_reached_the_top_score_first():
    # plurality, k=4: A B B A -> A:2, B:2; A reached 2 at rank 3, B at rank 2 -> B wins.
    labels = np.array([[0, 1, 1, 0]])
    pred, conf = vote_all_k(labels, np.ones((1, 4)), 2)
    assert pred[0].tolist() == [0, 0, 1, 1]  # k=2: A:1, B:1 -> A got there first
    assert conf[0, 3] == pytest.approx(0.5)
    # With rank weights the first neighbour dominates a later pair of equal count.
    rank = vote_weights(np.zeros((1, 4)), "rank")
    assert vote_all_k(labels, rank, 2)[0][0, 3] == 0


def test_one_pass_equals_separate_votes_for_every_k():
    rng = np.random.default_rng(0)
    n, K, L = 200, 30, 7
    labels = rng.integers(0, L, size=(n, K))
    labels[rng.random((n, K)) < 0.05] = -1  # missing neighbours
    sims = np.sort(rng.uniform(-0.2, 1.0, size=(n, K)), axis=1)[:, ::-1]
    for strategy in STRATEGIES:
        w = vote_weights(sims, strategy)
        w[:, 5] *= 0.0  # a hard-pruned sample carries no weight
        pred, _ = vote_all_k(labels, w, L)
        for i in range(0, n, 7):
            for k in (1, 2, 3, 10, 30):
                expected = reference_vote(labels[i], w[i], k)
                assert pred[i, k - 1] == (-1 if expected is None else expected), (strategy, i, k)


def test_accuracy_by_k():
    pred = np.array([[0, 1], [1, 1], [2, 0]])
    assert accuracy_by_k(pred, np.array([0, 1, 0])).tolist() == pytest.approx([2 / 3, 2 / 3])
