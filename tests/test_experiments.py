"""The lifelong experiments on real Fashion-MNIST embeddings (small: memory 300, queries 100,
embedded once for the module) and, where an effect needs a clear-cut case, on synthetic
clustered vectors: label noise hurts and soft pruning recovers part of it, new classes are
learnt by adding vectors without disturbing the old ones, error falls with memory size."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from benchmarks.synthetic import clustered_vectors
from vismem_assets import experiments as ex

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_MEMORY, N_QUERIES = 300, 100


@pytest.fixture(scope="module")
def fm(encoder, tmp_path_factory):
    """(mem_v, mem_l, q_v, q_l, names) from real Fashion-MNIST, embedded once (cached on disk
    for run() in this module)."""
    cache = tmp_path_factory.mktemp("experiment-cache")
    data = ex.fashion_mnist_vectors(encoder, N_MEMORY, N_QUERIES, seed=0, cache_dir=cache)
    return data, cache


def is_png(path) -> bool:
    return path is not None and path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def acc(table: pl.DataFrame, noise: float, pruning: str, column: str = "best_accuracy") -> float:
    return table.filter((pl.col("noise") == noise) & (pl.col("pruning") == pruning))[column][0]


# --- data -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fashion_mnist_vectors_balanced_unit_and_cached(fm, encoder):
    (mem_v, mem_l, q_v, q_l, names), cache = fm
    assert mem_v.shape == (N_MEMORY, encoder.dim) and q_v.shape == (N_QUERIES, encoder.dim)
    assert np.allclose(np.linalg.norm(mem_v, axis=1), 1, atol=1e-4)
    assert np.bincount(mem_l, minlength=10).tolist() == [30] * 10
    assert np.bincount(q_l, minlength=10).tolist() == [10] * 10
    assert names[1] == "Trouser" and names[8] == "Bag"

    class Counting:  # the real encoder, counting the images it is asked to embed
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.id, self.slug, self.dim = inner.id, inner.slug, inner.dim

        def embed(self, images, progress=None):
            self.calls += 1
            return self.inner.embed(images, progress=progress)

    counting = Counting(encoder)
    again = ex.fashion_mnist_vectors(counting, N_MEMORY, N_QUERIES, seed=0, cache_dir=cache)
    assert counting.calls == 0  # served from the .npz
    assert np.array_equal(again[0], mem_v) and np.array_equal(again[3], q_l)


def test_search_is_exact_and_best_first():
    x, _ = clustered_vectors(200, 16, 5, 1.0, seed=3)
    sims, pos = ex.search(x[:150], x[150:], 10)
    full = x[150:] @ x[:150].T
    assert np.array_equal(pos[:, 0], full.argmax(axis=1))
    assert np.allclose(sims, -np.sort(-full, axis=1)[:, :10], atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()
    assert ex.search(x[:5], x[150:], 10)[1].shape == (50, 5)  # k capped at the memory size


def test_search_breaks_ties_at_the_kth_neighbour_by_lower_position():
    x, _ = clustered_vectors(300, 16, 5, 1.0, seed=4)
    memory = np.repeat(x[:100], 3, axis=0)  # each vector three times: every neighbour is a tie
    sims, pos = ex.search(memory, x[100:], 4)
    best = (x[100:] @ x[:100].T).argmax(axis=1)
    assert pos[:, :3].tolist() == [[3 * b, 3 * b + 1, 3 * b + 2] for b in best]
    assert (pos[:, 3] % 3 == 0).all()  # the next vector's first copy, not any of the three
    assert (sims[:, :3] == sims[:, :1]).all()


# --- label noise ------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.6, 1.0])
def test_flip_labels_flips_exactly_round_p_n_to_another_class(fraction):
    labels = np.random.default_rng(0).integers(0, 10, 333)
    noisy, flipped = ex.flip_labels(labels, fraction, 10, seed=4)
    assert flipped.sum() == round(fraction * 333)
    assert ((noisy != labels) == flipped).all()  # every flipped label changed, no other did
    assert noisy.min() >= 0 and noisy.max() < 10
    assert np.array_equal(labels, np.random.default_rng(0).integers(0, 10, 333))  # input untouched


def test_flip_labels_nested_across_levels():
    labels = np.arange(200) % 10
    _, low = ex.flip_labels(labels, 0.1, 10, seed=1)
    _, high = ex.flip_labels(labels, 0.4, 10, seed=1)
    assert (high[low]).all()


def test_label_noise_on_fashion_mnist(fm, tmp_path):
    (mem_v, mem_l, q_v, q_l, names), _ = fm
    before = mem_l.copy()
    result = ex.label_noise(mem_v, mem_l, q_v, q_l, noise_levels=(0, .3, .6), out_dir=tmp_path, label_names=names)
    table = result.table
    assert np.array_equal(mem_l, before)  # a copy was flipped, not the caller's labels
    assert sorted(zip(table["noise"], table["pruning"])) == sorted(
        (p, pr) for p in (0.0, 0.3, 0.6) for pr in ("none", "soft"))
    assert {"noise", "pruning", "best_k", "best_accuracy", "accuracy_at_20"} <= set(table.columns)
    assert table.filter(pl.col("noise") == 0.6)["n_flipped"].to_list() == [180, 180]
    assert acc(table, 0.0, "none") > acc(table, 0.6, "none")
    assert acc(table, 0.0, "none") > 0.6  # the memory works at all
    assert (table["best_k"] <= 100).all() and (table["best_k"] >= 1).all()
    assert result.chart == tmp_path / "label-noise.png" and is_png(result.chart)
    assert pl.read_csv(tmp_path / "label-noise.csv").shape == table.shape
    assert result.summary["best_accuracy"]["none"]["0"] == acc(table, 0.0, "none")


def test_soft_pruning_recovers_accuracy_under_label_noise_on_clustered_data():
    """100 tight clusters, 10 per cluster in memory: at 40% noise the vote of a handful of
    neighbours is fragile and down-weighting the unreliable (mostly the flipped) helps."""
    x, labels = clustered_vectors(2000, 32, 100, 0.8, seed=0)
    result = ex.label_noise(x[:1000], labels[:1000], x[1000:], labels[1000:], noise_levels=(0, .4), seed=0)
    table = result.table
    assert acc(table, 0.4, "soft") > acc(table, 0.4, "none") + 0.005
    assert acc(table, 0.4, "soft", "accuracy_at_20") > acc(table, 0.4, "none", "accuracy_at_20")
    flipped_v, clean_v = table.filter(pl.col("noise") == 0.4).select("mean_v_flipped", "mean_v_clean").row(0)
    assert flipped_v > 1.5 * clean_v  # reliability singles out the flipped samples
    assert result.chart is None


# --- new classes ------------------------------------------------------------------------------

def test_new_classes_on_fashion_mnist(fm, tmp_path):
    (mem_v, mem_l, q_v, q_l, names), _ = fm
    result = ex.new_classes(mem_v, mem_l, q_v, q_l, out_dir=tmp_path, label_names=names)
    rows = {(r["phase"], r["group"]): r for r in result.table.to_dicts()}
    assert set(rows) == {(p, g) for p in ("before", "after") for g in ("old", "new")}
    assert rows["before", "new"]["accuracy"] == 0.0  # a class the memory has never seen
    assert rows["after", "new"]["accuracy"] > 0.5
    assert abs(rows["after", "old"]["accuracy"] - rows["before", "old"]["accuracy"]) <= 0.05
    assert rows["before", "new"]["n_queries"] == 20 and rows["before", "old"]["n_queries"] == 80
    assert rows["before", "old"]["n_memory"] == 240 and rows["after", "old"]["n_memory"] == 300
    assert result.summary["new_classes"] == ["Trouser", "Bag"]
    assert is_png(result.chart)


def test_new_classes_needs_old_and_new():
    x, labels = clustered_vectors(100, 8, 3, 0.5, seed=0)
    with pytest.raises(ValueError):
        ex.new_classes(x, labels, x, labels, new=(7,))


# --- memory scaling ---------------------------------------------------------------------------

def test_default_sizes():
    assert ex.default_per_class(30) == (1, 2, 5, 10, 20, 30)
    assert ex.default_per_class(200) == (1, 2, 5, 10, 20, 50, 100, 200)
    assert ex.default_per_class(1) == (1,)


def test_loglog_fit_recovers_known_coefficients():
    n = np.array([10, 30, 100, 1000, 10000])
    fit = ex.loglog_fit(n, 0.5 - 0.1 * np.log(np.log(n)))
    assert fit["a"] == pytest.approx(0.5) and fit["b"] == pytest.approx(-0.1) and fit["r2"] == pytest.approx(1.0)
    assert fit["n_points"] == 5


def test_memory_scaling_on_fashion_mnist(fm, tmp_path):
    (mem_v, mem_l, q_v, q_l, names), _ = fm
    result = ex.memory_scaling(mem_v, mem_l, q_v, q_l, out_dir=tmp_path, label_names=names)
    table = result.table
    assert table["per_class"].to_list() == [1, 2, 5, 10, 20, 30]
    assert table["n_memory"].to_list() == [10, 20, 50, 100, 200, 300]
    err = table["best_error"].to_numpy()
    assert err[-1] < err[0] - 0.1
    assert (np.diff(err) <= 0.03).all()  # non-increasing, up to query noise
    assert (table["best_k"] <= table["n_memory"]).all()
    s = result.summary
    assert math.isfinite(s["a"]) and math.isfinite(s["b"]) and s["b"] < 0
    assert 0.0 <= s["r2"] <= 1.0
    assert is_png(result.chart)


# --- run --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ex.EXPERIMENTS))
def test_run_writes_png_and_csv(name, fm, encoder, tmp_path):
    _, cache = fm  # same sizes and seed: served from the module's cache, no embedding
    result = ex.run(name, encoder, tmp_path, n_memory=N_MEMORY, n_queries=N_QUERIES, cache_dir=cache)
    assert result.name == name
    assert is_png(tmp_path / f"{name}.png")
    assert pl.read_csv(tmp_path / f"{name}.csv").height == result.table.height
    assert result.summary["encoder"] == encoder.id and result.summary["n_memory"] == N_MEMORY


def test_run_unknown_name(encoder, tmp_path):
    with pytest.raises(ValueError, match="label-noise"):
        ex.run("nope", encoder, tmp_path)
