"""What the charts draw, not only that a PNG exists."""
from __future__ import annotations

import numpy as np
import polars as pl

from vismem_assets.plots import accuracy_figure, plot_accuracy


def _table() -> pl.DataFrame:
    """Three pruning modes whose curves differ, as `Evaluation.accuracy` holds them."""
    rng = np.random.default_rng(0)
    frames = []
    for mode, shift in (("none", 0.0), ("soft", 0.05), ("hard", -0.08)):
        for strategy in ("rank", "plurality"):
            k = np.arange(1, 31)
            acc = np.clip(0.6 + shift + 0.1 * np.log(k) / np.log(30) + rng.normal(0, 0.01, len(k)), 0, 1)
            frames.append(pl.DataFrame({"pruning": mode, "strategy": strategy, "k": k, "accuracy": acc}))
    return pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=1)  # row order must not matter


def test_one_panel_per_pruning_mode_each_line_is_the_table():
    table = _table()
    fig = accuracy_figure(table, "t")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["pruning: none", "pruning: soft", "pruning: hard"]
    for ax, mode in zip(axes, ("none", "soft", "hard")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["plurality", "rank"]
        for strategy, line in lines.items():
            want = table.filter((pl.col("pruning") == mode) & (pl.col("strategy") == strategy)).sort("k")
            x, y = line.get_data()
            np.testing.assert_array_equal(x, want["k"].to_numpy())  # one point per k, in order: no sawtooth
            np.testing.assert_allclose(y, want["accuracy"].to_numpy())
        # The best-point markers are this panel's own maxima, never another mode's.
        best = {tuple(np.round(off, 12)) for c in ax.collections for off in c.get_offsets()}
        for strategy in lines:
            want = table.filter((pl.col("pruning") == mode) & (pl.col("strategy") == strategy))
            top = want.sort("accuracy", "k", descending=[True, False]).row(0, named=True)
            assert (float(top["k"]), round(float(top["accuracy"]), 12)) in best


def test_a_table_of_one_mode_draws_one_panel(tmp_path):
    table = _table().filter(pl.col("pruning") == "none").drop("pruning")
    fig = accuracy_figure(table)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "pruning: none"
    out = plot_accuracy(_table(), tmp_path / "acc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
