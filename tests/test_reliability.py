"""Reliability: the full pass against a brute-force reference, incremental add/remove against
the full pass (bit for bit), the pruning weights, the file format, and on real Fashion-MNIST
embeddings the paper's point that a mislabelled sample is unreliable."""
from __future__ import annotations

import numpy as np
import pytest

from vismem_assets import reliability as rel_mod
from vismem_assets.reliability import Reliability, add, compute, equal, hard_weights, load, remove, save, soft_weights


def clustered(n: int, d: int = 48, n_clusters: int = 8, noise: float = 2.0, seed: int = 0):
    """Unit vectors around a few centres; the noise makes clusters overlap, so labels disagree
    among neighbours and v is not all zeros."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(10**12, n, replace=False).astype(np.int64)


def brute_force(ids, x, labels, k):
    """The definition, written plainly: all pairwise similarities (float64, rounded to the
    stored float32), each row sorted by (similarity desc, vector id asc), counted."""
    order = np.argsort(ids)
    ids, x, labels = ids[order], x[order], labels[order]
    x64 = x.astype(np.float64)
    sims = (x64 @ x64.T).astype(np.float32)
    np.fill_diagonal(sims, -np.inf)
    n = len(ids)
    ranked = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=1)[:, :min(k, n - 1)]
    neighbors = np.full((n, k), -1, np.int64)
    similarities = np.full((n, k), -np.inf, np.float32)
    neighbors[:, :ranked.shape[1]] = ids[ranked]
    similarities[:, :ranked.shape[1]] = np.take_along_axis(sims, ranked, 1)
    v = np.zeros(n, np.int64)
    for s in range(n):
        for j in ranked[s]:
            v[j] += labels[j] != labels[s]
    return ids, neighbors, similarities, v


class Store:
    """What the memory's index/embeddings give the incremental updates: vectors by id."""

    def __init__(self, ids, vectors):
        self.vectors = {int(i): v for i, v in zip(ids, vectors)}

    def add(self, ids, vectors):
        self.vectors.update({int(i): v for i, v in zip(ids, vectors)})

    def __call__(self, ids):
        return np.stack([self.vectors[int(i)] for i in ids]) if len(ids) else np.empty((0, 48), np.float32)


def assert_same(a: Reliability, b: Reliability):
    np.testing.assert_array_equal(a.vector_ids, b.vector_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_allclose(a.similarities, b.similarities, rtol=0, atol=0)
    np.testing.assert_array_equal(a.v, b.v)
    assert equal(a, b)


@pytest.mark.parametrize("n,k", [(2000, 10), (1500, 100)])
def test_full_pass_matches_brute_force(n, k):
    x, labels = clustered(n)
    ids = random_ids(n, 1)
    got = compute(ids, x, labels, k)
    want_ids, neighbors, sims, v = brute_force(ids, x, labels, k)
    np.testing.assert_array_equal(got.vector_ids, want_ids)
    np.testing.assert_array_equal(got.neighbors, neighbors)
    np.testing.assert_array_equal(got.similarities, sims)
    np.testing.assert_array_equal(got.v, v)
    assert got.v.min() < got.v.max()  # labels disagree among neighbours: v is not trivial
    assert (np.diff(got.similarities, axis=1) <= 0).all()
    np.testing.assert_array_equal(got.kth, got.similarities[:, -1])
    assert not (got.neighbors == got.vector_ids[:, None]).any()  # leave-one-out


def test_exact_ties_go_to_the_lower_id():
    """Many bit-identical vectors: more tied candidates than the float32 search keeps, so rows
    must be settled by the exhaustive path, ties ordered by vector id, in full and incremental
    passes alike."""
    base, labels = clustered(30, seed=3)
    pick = np.random.default_rng(4).integers(0, 30, 400)
    pick[:60] = 7  # one vector 60 times: its copies tie with each other beyond k + margin
    x, labels = base[pick], labels[pick] ^ (np.arange(400) % 2)
    ids = random_ids(400, 5)
    got = compute(ids, x, labels, 10)
    _, neighbors, sims, v = brute_force(ids, x, labels, 10)
    np.testing.assert_array_equal(got.neighbors, neighbors)
    np.testing.assert_array_equal(got.similarities, sims)
    np.testing.assert_array_equal(got.v, v)
    store = Store(ids, x)
    part = compute(ids[:300], x[:300], labels[:300], 10)
    grown, _ = add(part, ids[300:], x[300:], labels[300:], store)
    assert_same(grown, got)
    shrunk, _ = remove(got, ids[::3], store)
    keep = np.arange(400) % 3 != 0
    assert_same(shrunk, compute(ids[keep], x[keep], labels[keep], 10))


def test_canonical_similarity_does_not_depend_on_batching():
    x, _ = clustered(300, d=77)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 300, 5000), rng.integers(0, 300, 5000)
    whole = rel_mod.canonical_similarity(x, a, x, b)
    pieces = np.concatenate([rel_mod.canonical_similarity(x, a[s:s + 7], x, b[s:s + 7]) for s in range(0, 5000, 7)])
    shifted = rel_mod.canonical_similarity(np.concatenate([x[:1], x]), a + 1, x, b)
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole, shifted)
    np.testing.assert_array_equal(whole, rel_mod.canonical_similarity(x, b, x, a))  # symmetric
    np.testing.assert_allclose(whole, np.einsum("ij,ij->i", x[a].astype(np.float64), x[b]), atol=1e-6)


def test_memory_smaller_than_k_is_padded():
    x, labels = clustered(6)
    ids = np.arange(6) * 10
    got = compute(ids, x, labels, 10)
    assert (got.neighbors[:, 5:] == -1).all() and np.isneginf(got.similarities[:, 5:]).all()
    assert (got.neighbors[:, :5] >= 0).all()
    _, neighbors, sims, v = brute_force(ids, x, labels, 10)
    np.testing.assert_array_equal(got.neighbors, neighbors)
    np.testing.assert_array_equal(got.v, v)
    # growing from a tiny memory and shrinking back to one sample stay exact
    more, more_labels = clustered(20, seed=9)
    store = Store(ids, x)
    grown, _ = add(got, np.arange(20) * 10 + 5, more, more_labels, store)
    assert_same(grown, compute(np.concatenate([ids, np.arange(20) * 10 + 5]), np.concatenate([x, more]),
                               np.concatenate([labels, more_labels]), 10))
    store.add(np.arange(20) * 10 + 5, more)
    single, _ = remove(grown, grown.vector_ids[1:], store)
    assert len(single) == 1 and (single.neighbors == -1).all() and single.v.tolist() == [0]
    empty, _ = remove(single, single.vector_ids, store)
    assert len(empty) == 0 and empty.neighbors.shape == (0, 10)


@pytest.mark.parametrize("k,sizes", [(10, (50, 120, 1, 30)), (100, (5, 12, 1, 3))])
def test_incremental_add_equals_full_pass(k, sizes):
    x, labels = clustered(3000, seed=11)
    ids = random_ids(3000, 12)  # ids of later batches interleave with earlier ones
    start = 2000
    store = Store(ids[:start], x[:start])
    rel = compute(ids[:start], x[:start], labels[:start], k)
    for size, new_label in zip(sizes, (False, True, False, False)):
        batch = slice(start, start + size)
        new_labels = np.full(size, 99) if new_label else labels[batch]  # 99: a class the memory never had
        labels[batch] = new_labels
        n_before = len(rel)
        rel, stats = add(rel, ids[batch], x[batch], new_labels, store)
        store.add(ids[batch], x[batch])
        start += size
        assert_same(rel, compute(ids[:start], x[:start], labels[:start], k))
        assert stats["n_new"] == size
        assert 0 < stats["n_touched"] <= stats["n_checked"] < n_before
        # Only rows a new vector enters are touched: each enters about k of the N lists.
        expected = n_before * (1 - (1 - k / n_before) ** size)
        assert stats["n_touched"] <= 1.5 * expected + 2 * k
    assert (rel.labels == 99).sum() == sizes[1]


@pytest.mark.parametrize("k", [10, 100])
def test_incremental_remove_equals_full_pass(k):
    x, labels = clustered(2500, seed=21)
    ids = random_ids(2500, 22)
    store = Store(ids, x)
    rel = compute(ids, x, labels, k)
    rng = np.random.default_rng(23)
    victims = rng.choice(ids, 40, replace=False)
    rel, stats = remove(rel, np.concatenate([victims, [-5, 12345]]), store)  # unknown ids are ignored
    alive = ~np.isin(ids, victims)
    assert stats["n_removed"] == 40 and 0 < stats["n_requeried"] < len(rel)
    assert_same(rel, compute(ids[alive], x[alive], labels[alive], k))
    whole_label = ids[labels == 3]  # forget a whole class
    rel, stats = remove(rel, whole_label, store)
    alive &= labels != 3
    assert_same(rel, compute(ids[alive], x[alive], labels[alive], k))
    assert 3 not in rel.labels
    same, stats = remove(rel, whole_label, store)  # nothing left to remove
    assert stats["n_removed"] == 0 and equal(same, rel)


@pytest.mark.parametrize("k", [5, 30])
def test_a_drop_leaves_no_trace_of_the_removed_and_a_refill_then_equals_a_full_pass(k):
    x, labels = clustered(1500, seed=41)
    ids = random_ids(1500, 42)
    rel = compute(ids, x, labels, k)
    victims = np.random.default_rng(43).choice(ids, 60, replace=False)
    asked = []
    dropped, stats = rel_mod.drop(rel, victims)            # no vectors: nothing searched
    alive = ~np.isin(ids, victims)
    held = np.isin(rel.neighbors, victims).any(axis=1)[np.isin(rel.vector_ids, ids[alive])]
    assert stats["n_removed"] == 60 and stats["n_holed"] == held.sum() > 0
    assert not np.isin(dropped.vector_ids, victims).any() and not np.isin(dropped.neighbors, victims).any()
    untouched = ~held                                      # rows that held none: as they were
    before = rel.neighbors[np.isin(rel.vector_ids, dropped.vector_ids)]
    assert np.array_equal(dropped.neighbors[untouched], before[untouched])
    assert np.array_equal(rel_mod.unfilled(dropped), np.flatnonzero(held))
    holes = dropped.neighbors[held]                        # each such row: its others best first, holes at the end
    assert ((holes == -1) == (np.arange(k) >= (holes >= 0).sum(axis=1)[:, None])).all()
    assert np.isneginf(dropped.similarities[held][holes == -1]).all()

    def store(wanted):
        asked.append(len(wanted))
        return Store(ids, x)(wanted)

    filled, stats = rel_mod.refill(dropped, store)
    assert stats["n_requeried"] == held.sum() and asked == [alive.sum()]
    assert_same(filled, compute(ids[alive], x[alive], labels[alive], k))
    again, stats = rel_mod.refill(filled, store)           # nothing left to refill: nothing searched
    assert stats["n_requeried"] == 0 and asked == [alive.sum()] and equal(again, filled)
    both, _ = remove(rel, victims, Store(ids, x))          # remove is the two at once
    assert equal(both, filled)


def test_add_remove_add_sequence_equals_full_pass():
    k = 10
    x, labels = clustered(2600, seed=31)
    ids = random_ids(2600, 32)
    rng = np.random.default_rng(33)
    present = np.zeros(2600, bool)
    present[:1500] = True
    store = Store(ids, x)  # the store may hold more than the memory: only asked for members
    rel = compute(ids[present], x[present], labels[present], k)
    steps = [("add", np.arange(1500, 1800)), ("remove", None), ("add", np.arange(1800, 2200)),
             ("remove", None), ("add", np.arange(2200, 2600))]
    for op, which in steps:
        if op == "add":
            rel, _ = add(rel, ids[which], x[which], labels[which], store)
            present[which] = True
        else:
            which = rng.choice(np.flatnonzero(present), 200, replace=False)
            rel, _ = remove(rel, ids[which], store)
            present[which] = False
        assert_same(rel, compute(ids[present], x[present], labels[present], k))


def test_add_rejects_ids_already_present():
    x, labels = clustered(50)
    ids = np.arange(50)
    rel = compute(ids, x, labels, 5)
    with pytest.raises(ValueError, match="already in the memory"):
        add(rel, ids[:2], x[:2], labels[:2], Store(ids, x))
    with pytest.raises(ValueError, match="unique"):
        compute(np.zeros(50, np.int64), x, labels, 5)


def test_pruning_weights():
    v = np.array([0, 1, 2, 6, 100])
    np.testing.assert_allclose(soft_weights(v), [1.0, 1.75 / 2, 1.75 / 3, 0.25, 1.75 / 101])
    assert soft_weights(v).dtype == np.float64
    np.testing.assert_array_equal(hard_weights(v, 2), [1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(hard_weights(v, 101), np.ones(5))


def test_save_load_roundtrip(tmp_path):
    x, labels = clustered(300)
    rel = compute(random_ids(300, 2), x, labels, 10)
    path = save(rel, tmp_path / "rel" / "v000001.parquet")
    assert equal(load(path), rel)
    tiny = compute(np.array([3, 1, 2]), x[:3], labels[:3], 10)  # padded rows: -1 and -inf survive
    assert equal(load(save(tiny, tmp_path / "tiny.parquet")), tiny)
    empty = compute(np.empty(0, np.int64), np.empty((0, 48), np.float32), np.empty(0, np.int64), 100)
    back = load(save(empty, tmp_path / "empty.parquet"))
    assert equal(back, empty) and back.k == 100
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_flipped_label_is_unreliable_on_real_embeddings(encoder, fm_sets):
    """The paper's point, on real images and the real encoder: a sample given a wrong label
    shows up, with that wrong label, among its true class's neighbours, so its v rises."""
    paths = sorted(fm_sets["train"].glob("*/*.png"))
    names = sorted({p.parent.name for p in paths})
    labels = np.array([names.index(p.parent.name) for p in paths], np.int64)
    vectors = encoder.embed(paths, progress=False)
    ids = np.arange(len(paths), dtype=np.int64)
    clean = compute(ids, vectors, labels, 10)
    rng = np.random.default_rng(0)
    flipped = np.array([rng.choice(np.flatnonzero(labels == c)) for c in range(len(names))])
    noisy_labels = labels.copy()
    noisy_labels[flipped] = (labels[flipped] + 1 + rng.integers(0, len(names) - 1, len(flipped))) % len(names)
    noisy = compute(ids, vectors, noisy_labels, 10)
    others = np.setdiff1d(ids, flipped)
    assert (noisy.v[flipped] >= clean.v[flipped]).all()  # a wrong label only adds disagreement
    assert (noisy.v[flipped] > clean.v[flipped]).mean() >= 0.8
    median = np.median(noisy.v[others])
    assert (noisy.v[flipped] > median).mean() >= 0.7
    assert np.median(noisy.v[flipped]) > median
