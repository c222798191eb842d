"""PNG charts people look at before they read a table."""
from __future__ import annotations

from pathlib import Path

import polars as pl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in a Dagster run
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    _pyplot().close(fig)
    return out


PRUNING_ORDER = ("none", "soft", "hard")


def accuracy_figure(accuracy: pl.DataFrame, title: str = "accuracy against k"):
    """One panel per pruning mode (none, soft, hard: whichever the table holds), each with one
    line per voting strategy against k (log scale) and that line's best point marked. Modes are
    never mixed in one line: each has its own curve, and its best k is its own."""
    plt = _pyplot()
    if "pruning" not in accuracy.columns:
        accuracy = accuracy.with_columns(pruning=pl.lit("none"))
    present = accuracy["pruning"].unique().to_list()
    modes = [m for m in PRUNING_ORDER if m in present] + sorted(m for m in present if m not in PRUNING_ORDER)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes) + 1, 4.2), dpi=120, sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = accuracy.filter(pl.col("pruning") == mode).sort("strategy", "k")
        for (name,), frame in rows.group_by("strategy", maintain_order=True):
            k, acc = frame["k"].to_numpy(), frame["accuracy"].to_numpy()
            (line,) = ax.plot(k, acc, label=name, linewidth=2 if name == "rank" else 1.2)
            best = acc.argmax()
            ax.scatter([k[best]], [acc[best]], color=line.get_color(), zorder=3, s=18)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())  # 1, 10, 100 rather than 10^0
        ax.set_xlabel("k (neighbours voting)")
        ax.set_title(f"pruning: {mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy")
    axes[0][-1].legend(title="strategy (dot: best k)", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_accuracy(accuracy: pl.DataFrame, out: str | Path, title: str = "accuracy against k") -> Path:
    """The chart of `accuracy_figure`, written as a PNG."""
    return _save(accuracy_figure(accuracy, title), out)


def contact_sheet(images: list[str | Path], captions: list[str], out: str | Path, columns: int = 6,
                  title: str | None = None) -> Path:
    """A grid of thumbnails with a caption each: what a person looks at to see what arrived."""
    plt = _pyplot()
    from PIL import Image

    n = max(len(images), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6 + (0.3 if title else 0)), dpi=80,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, caption in zip(axes.flat, images, captions):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def plot_reliability_diagram(calibration: pl.DataFrame, out: str | Path, title: str = "reliability diagram") -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration; bar width ~ queries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    frame = calibration.filter(pl.col("n_queries") > 0)
    centres = ((frame["bin_low"] + frame["bin_high"]) / 2).to_numpy()
    ax.bar(centres, frame["accuracy"].to_numpy(), width=0.09, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    for x, y, n in zip(centres, frame["accuracy"].to_numpy(), frame["n_queries"].to_numpy()):
        ax.annotate(str(n), (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (winning label's share of the vote)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out)
