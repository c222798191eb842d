"""PNG charts people look at before they read a table."""
from __future__ import annotations

from pathlib import Path

import polars as pl


def plot_accuracy(accuracy: pl.DataFrame, out: str | Path, title: str = "accuracy against k") -> Path:
    """Accuracy of each voting strategy against k (log scale), best point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for strategy, frame in accuracy.sort("k").group_by("strategy", maintain_order=True):
        name = strategy[0]
        k, acc = frame["k"].to_numpy(), frame["accuracy"].to_numpy()
        (line,) = ax.plot(k, acc, label=name, linewidth=2 if name == "rank" else 1.2)
        best = acc.argmax()
        ax.scatter([k[best]], [acc[best]], color=line.get_color(), zorder=3, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("k (neighbours voting)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="strategy")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
