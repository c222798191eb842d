"""The paper's lifelong experiments (Geirhos et al. 2024), run on in-RAM copies of vectors and
labels, never on the user's live memory:

- `label-noise`: flip a fraction of the memory's labels (to a different class) and compare
  best-over-k accuracy with and without soft pruning (reliability from the noisy labels);
- `new-classes`: a memory without some classes, then with them added: accuracy on old and new
  classes before and after, with no training;
- `memory-scaling`: accuracy against memory size (samples per class, log scale) and the paper's
  fit of the error against log(log N).

Each returns an `ExperimentResult` (a tidy table, a PNG chart, the headline numbers). The data
are Fashion-MNIST embeddings by default (`fashion_mnist_vectors`, cached on disk if asked) or
any (vectors, label codes) the caller passes, e.g. a copy of a memory's vectors.

Search is exact inner product on unit vectors (numpy); votes use `voting.vote_weights` and
`voting.vote_all_k`, so a prediction here is the one classification would make.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from . import fashion_mnist
from .atomic import atomic_path
from .plots import _pyplot, _save
from .reliability import SOFT_K, compute, soft_weights
from .search import topk_inner_product
from .voting import DEFAULT_STRATEGY, accuracy_by_k, vote_all_k, vote_weights

DEFAULT_K = 20
DEFAULT_K_MAX = 100
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
NEW_CLASSES = (1, 8)  # Trouser and Bag on Fashion-MNIST: visually distinct from the rest


@dataclass
class ExperimentResult:
    name: str
    table: pl.DataFrame  # tidy rows
    chart: Path | None  # PNG written (None when no out_dir was given)
    summary: dict = field(default_factory=dict)  # the headline numbers


# --- data -------------------------------------------------------------------------------------

def fashion_mnist_vectors(encoder, n_memory: int, n_queries: int, seed: int = 0, cache_dir: Path | None = None):
    """A balanced sample of Fashion-MNIST train (the memory) and test (the queries), embedded.

    Returns (memory vectors, memory label codes, query vectors, query label codes, label names).
    With cache_dir the vectors are kept in an .npz keyed by (encoder id, sizes, seed), so repeated
    experiments do not embed again."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"fashion-mnist-{encoder.slug}-m{n_memory}-q{n_queries}-s{seed}.npz"
        if cache.exists():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["encoder_id"]) == encoder.id:
                    return (z["memory_vectors"], z["memory_labels"], z["query_vectors"], z["query_labels"],
                            tuple(str(c) for c in z["label_names"]))
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")
    mem_idx = fashion_mnist.sample_indices(train_labels, n_memory, seed)
    q_idx = fashion_mnist.sample_indices(test_labels, n_queries, seed)
    mem_v = encoder.embed([train_images[i] for i in mem_idx], progress=False)
    q_v = encoder.embed([test_images[i] for i in q_idx], progress=False) if len(q_idx) else \
        np.empty((0, encoder.dim), np.float32)
    mem_l = train_labels[mem_idx].astype(np.int64)
    q_l = test_labels[q_idx].astype(np.int64)
    names = tuple(fashion_mnist.CLASSES)
    if cache is not None:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, memory_vectors=mem_v, memory_labels=mem_l, query_vectors=q_v, query_labels=q_l,
                     memory_indices=mem_idx, query_indices=q_idx, label_names=np.array(names),
                     encoder_id=np.array(encoder.id))
    return mem_v, mem_l, q_v, q_l, names


# --- search and votes -------------------------------------------------------------------------

def search(mem_v: np.ndarray, q_v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (n_q, k) similarities (best first) and memory positions.
    Ties go to the lower memory position."""
    return topk_inner_product(mem_v, q_v, k)


def accuracy_curve(sims: np.ndarray, pos: np.ndarray, mem_labels: np.ndarray, query_labels: np.ndarray,
                   n_labels: int, sample_weights: np.ndarray | None = None,
                   strategy: str = DEFAULT_STRATEGY) -> np.ndarray:
    """(K,) accuracy at k = 1..K of the vote over retrieved neighbours, each neighbour's vote
    weight multiplied by its sample weight (pruning) when given."""
    weights = vote_weights(sims, strategy)
    if sample_weights is not None:
        weights = weights * np.asarray(sample_weights, np.float64)[pos]
    pred, _ = vote_all_k(np.asarray(mem_labels, np.int64)[pos], weights, n_labels)
    return accuracy_by_k(pred, np.asarray(query_labels, np.int64))


def _best(acc: np.ndarray) -> tuple[int, float]:
    """(best k, its accuracy); the smallest k among equals."""
    i = int(np.argmax(acc))
    return i + 1, float(acc[i])


def _n_labels(*label_arrays, label_names=None) -> int:
    n = max((int(np.max(a)) + 1 for a in label_arrays if len(a)), default=0)
    return max(n, len(label_names) if label_names is not None else 0)


def _outputs(name: str, table: pl.DataFrame, fig, out_dir) -> Path | None:
    """Write <out_dir>/<name>.png and <name>.csv; without out_dir, just close the figure."""
    if out_dir is None:
        _pyplot().close(fig)
        return None
    out_dir = Path(out_dir)
    chart = _save(fig, out_dir / f"{name}.png")
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        table.write_csv(tmp)
    return chart


# --- label noise ------------------------------------------------------------------------------

def flip_labels(labels: np.ndarray, fraction: float, n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A copy of labels with exactly round(fraction * N) of them changed, each to a different
    class chosen uniformly. Returns (noisy labels, mask of the flipped). With one seed the
    flipped sets are nested: the samples flipped at 20% include those flipped at 10%."""
    labels = np.asarray(labels, np.int64)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
    if n_labels < 2 and fraction > 0:
        raise ValueError("flipping labels needs at least two classes")
    n = len(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shift = rng.integers(1, max(n_labels, 2), n)  # a non-zero shift mod n_labels: always another class
    m = int(round(fraction * n))
    flipped = np.zeros(n, bool)
    flipped[order[:m]] = True
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + shift[flipped]) % n_labels
    return noisy, flipped


def label_noise(mem_v, mem_l, q_v, q_l, noise_levels=NOISE_LEVELS, k_max: int = DEFAULT_K_MAX,
                soft_k: int = SOFT_K, seed: int = 0, out_dir=None, label_names=None) -> ExperimentResult:
    """Flip a fraction of the memory's labels (in a copy) and score the queries, rank voting,
    without pruning and with soft pruning (reliability computed on the noisy labels, K = soft_k).
    Table: noise, pruning, best_k, best_accuracy, accuracy_at_20, n_flipped."""
    mem_l = np.asarray(mem_l, np.int64)
    q_l = np.asarray(q_l, np.int64)
    n_labels = _n_labels(mem_l, q_l, label_names=label_names)
    n = len(mem_l)
    sims, pos = search(mem_v, q_v, k_max)  # neighbours do not depend on labels: one search
    k_at = min(DEFAULT_K, sims.shape[1])
    ids = np.arange(n, dtype=np.int64)
    rows = []
    for p in noise_levels:
        noisy, flipped = flip_labels(mem_l, float(p), n_labels, seed)
        rel = compute(ids, mem_v, noisy, k=soft_k)
        v = np.empty(n, np.int64)
        v[rel.vector_ids] = rel.v
        for pruning, weights in (("none", None), ("soft", soft_weights(v))):
            acc = accuracy_curve(sims, pos, noisy, q_l, n_labels, weights)
            best_k, best_acc = _best(acc)
            rows.append({"noise": float(p), "pruning": pruning, "best_k": best_k, "best_accuracy": best_acc,
                         "accuracy_at_20": float(acc[k_at - 1]), "n_flipped": int(flipped.sum()),
                         "mean_v_flipped": float(v[flipped].mean()) if flipped.any() else None,
                         "mean_v_clean": float(v[~flipped].mean()) if (~flipped).any() else None})
    table = pl.DataFrame(rows)

    def pick(pruning, column):
        t = table.filter(pl.col("pruning") == pruning)
        return {f"{p:g}": a for p, a in zip(t["noise"], t[column])}

    none, soft = pick("none", "best_accuracy"), pick("soft", "best_accuracy")
    summary = {"n_memory": n, "n_queries": len(q_l), "k_max": int(sims.shape[1]), "soft_k": soft_k,
               "best_accuracy": {"none": none, "soft": soft},
               "soft_minus_none": {p: soft[p] - none[p] for p in none},
               "accuracy_at_20": {"none": pick("none", "accuracy_at_20"), "soft": pick("soft", "accuracy_at_20")}}

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for pruning, style in (("none", dict(marker="o", color="tab:gray")),
                           ("soft", dict(marker="s", color="tab:blue"))):
        t = table.filter(pl.col("pruning") == pruning).sort("noise")
        label = "no pruning" if pruning == "none" else f"soft pruning (K={soft_k})"
        ax.plot(t["noise"].to_numpy() * 100, t["best_accuracy"].to_numpy(), label=label, linewidth=2, **style)
    ax.set_xlabel("memory labels flipped (%)")
    ax.set_ylabel(f"top-1 accuracy (best k ≤ {sims.shape[1]}, rank voting)")
    ax.set_title(f"label noise: memory {n}, queries {len(q_l)}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ExperimentResult("label-noise", table, _outputs("label-noise", table, fig, out_dir), summary)


# --- new classes ------------------------------------------------------------------------------

def new_classes(mem_v, mem_l, q_v, q_l, new=NEW_CLASSES, k: int = DEFAULT_K, out_dir=None,
                label_names=None) -> ExperimentResult:
    """A memory without the `new` classes, then with them added (no training, just more
    vectors): rank-vote accuracy at k on old-class and on new-class queries, before and after.
    Table: phase, group, accuracy, n_queries, n_memory."""
    mem_v = np.asarray(mem_v, np.float32)
    mem_l = np.asarray(mem_l, np.int64)
    q_l = np.asarray(q_l, np.int64)
    new = tuple(int(c) for c in new)
    n_labels = _n_labels(mem_l, q_l, label_names=label_names)
    is_new_mem = np.isin(mem_l, new)
    is_new_q = np.isin(q_l, new)
    if not is_new_mem.any() or is_new_mem.all():
        raise ValueError(f"the memory must hold both old classes and the new ones {new}")
    rows = []
    for phase, keep in (("before", ~is_new_mem), ("after", np.ones(len(mem_l), bool))):
        sims, pos = search(mem_v[keep], q_v, k)
        acc_k = min(k, sims.shape[1])
        pred, _ = vote_all_k(mem_l[keep][pos], vote_weights(sims), n_labels)
        correct = pred[:, acc_k - 1] == q_l
        for group, m in (("old", ~is_new_q), ("new", is_new_q)):
            rows.append({"phase": phase, "group": group,
                         "accuracy": float(correct[m].mean()) if m.any() else float("nan"),
                         "n_queries": int(m.sum()), "n_memory": int(keep.sum()), "k": acc_k})
    table = pl.DataFrame(rows)
    acc = {(r["phase"], r["group"]): r["accuracy"] for r in rows}
    names = [label_names[c] if label_names is not None else str(c) for c in new]
    summary = {"new_classes": names, "k": k,
               "old_before": acc["before", "old"], "old_after": acc["after", "old"],
               "new_before": acc["before", "new"], "new_after": acc["after", "new"],
               "old_change": acc["after", "old"] - acc["before", "old"]}

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    x = np.arange(2)
    width = 0.36
    for i, (phase, color) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        values = [acc[phase, "old"], acc[phase, "new"]]
        bars = ax.bar(x + (i - 0.5) * width, values, width, label=f"{phase} adding", color=color)
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, [f"old classes\n({int((~is_new_q).sum())} queries)",
                      f"new: {', '.join(names)}\n({int(is_new_q.sum())} queries)"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"top-1 accuracy (rank voting, k={k})")
    ax.set_title("adding new classes to the memory, no training")
    ax.legend(loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    return ExperimentResult("new-classes", table, _outputs("new-classes", table, fig, out_dir), summary)


# --- memory scaling ---------------------------------------------------------------------------

def default_per_class(available: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... below `available`, then `available` itself."""
    sizes, decade = [], 1
    while True:
        for m in (1, 2, 5):
            if m * decade >= available:
                return tuple(sizes) + (available,)
            sizes.append(m * decade)
        decade *= 10


def loglog_fit(n: np.ndarray, error: np.ndarray) -> dict:
    """The paper's fit error = a + b * log(log N), least squares, over points with N >= 3."""
    n = np.asarray(n, np.float64)
    error = np.asarray(error, np.float64)
    use = n >= 3
    if use.sum() < 2:
        return {"a": float("nan"), "b": float("nan"), "r2": float("nan"), "n_points": int(use.sum())}
    x = np.log(np.log(n[use]))
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, error[use], rcond=None)
    fitted = a + b * x
    ss_res = float(((error[use] - fitted) ** 2).sum())
    ss_tot = float(((error[use] - error[use].mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"a": float(a), "b": float(b), "r2": r2, "n_points": int(use.sum())}


def memory_scaling(mem_v, mem_l, q_v, q_l, per_class=None, k: int = DEFAULT_K, k_max: int = DEFAULT_K_MAX,
                   seed: int = 0, out_dir=None, label_names=None) -> ExperimentResult:
    """Accuracy against memory size: nested random subsets with n samples of each class (default
    1, 2, 5, 10, ... up to what every class has), rank voting, best over k <= min(k_max, N) and
    at k = min(k, N). Fits error (best over k) = a + b log(log N). Table: per_class, n_memory,
    best_k, best_accuracy, best_error, k, accuracy_at_k, error_at_k, fitted_error."""
    mem_v = np.asarray(mem_v, np.float32)
    mem_l = np.asarray(mem_l, np.int64)
    q_l = np.asarray(q_l, np.int64)
    n_labels = _n_labels(mem_l, q_l, label_names=label_names)
    classes = np.unique(mem_l)
    available = int(min((mem_l == c).sum() for c in classes))
    per_class = default_per_class(available) if per_class is None else tuple(sorted(set(int(m) for m in per_class)))
    if per_class[-1] > available or per_class[0] < 1:
        raise ValueError(f"per_class must be within 1..{available} (the smallest class in the memory)")
    rng = np.random.default_rng(seed)
    shuffled = {c: rng.permutation(np.flatnonzero(mem_l == c)) for c in classes}  # nested subsets
    rows = []
    for m in per_class:
        keep = np.sort(np.concatenate([shuffled[c][:m] for c in classes]))
        sims, pos = search(mem_v[keep], q_v, k_max)
        acc = accuracy_curve(sims, pos, mem_l[keep], q_l, n_labels)
        best_k, best_acc = _best(acc)
        at = min(k, len(acc))
        rows.append({"per_class": m, "n_memory": len(keep), "best_k": best_k, "best_accuracy": best_acc,
                     "best_error": 1.0 - best_acc, "k": at, "accuracy_at_k": float(acc[at - 1]),
                     "error_at_k": 1.0 - float(acc[at - 1])})
    table = pl.DataFrame(rows)
    fit = loglog_fit(table["n_memory"].to_numpy(), table["best_error"].to_numpy())
    n_arr = table["n_memory"].to_numpy().astype(np.float64)
    fitted = np.where(n_arr >= 3, fit["a"] + fit["b"] * np.log(np.log(np.maximum(n_arr, 3))), np.nan)
    table = table.with_columns(fitted_error=pl.Series(fitted))
    summary = {"fit": "error = a + b*log(log N), error = 1 - best-over-k accuracy", **fit,
               "sizes": table["n_memory"].to_list(), "best_error": table["best_error"].to_list(),
               "error_at_k": table["error_at_k"].to_list(), "k": k}

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(n_arr, table["best_error"].to_numpy(), "o", color="tab:blue", label="error, best k")
    ax.plot(n_arr, table["error_at_k"].to_numpy(), "x", color="tab:gray", label=f"error at k = min({k}, N)")
    if math.isfinite(fit["a"]):
        grid = np.geomspace(max(3.0, n_arr.min()), n_arr.max(), 200)
        ax.plot(grid, fit["a"] + fit["b"] * np.log(np.log(grid)), "-", color="tab:blue", alpha=0.7,
                label=f"fit {fit['a']:.3f} {'+' if fit['b'] >= 0 else '−'} {abs(fit['b']):.3f}·log(log N), "
                      f"R²={fit['r2']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel(f"memory size N (samples, {len(classes)} classes)")
    ax.set_ylabel("top-1 error (rank voting)")
    ax.set_title(f"memory scaling: {len(q_l)} queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ExperimentResult("memory-scaling", table, _outputs("memory-scaling", table, fig, out_dir), summary)


# --- registry ---------------------------------------------------------------------------------

# --- novelty -----------------------------------------------------------------------------------

def novelty(mem_v, mem_l, q_v, q_l, percentile: float = 99.0, out_dir=None, label_names=None) -> ExperimentResult:
    """Each class in turn held out of the memory: the 'unknown' threshold is the percentile of the
    memory's own leave-one-out nearest-neighbour distances (as `Memory.novelty_threshold`); how many
    queries of the held-out class are flagged unknown, and how many of the classes it holds.
    Table: held_out, threshold, flagged_unseen, n_unseen, flagged_known, n_known."""
    mem_v = np.asarray(mem_v, np.float32)
    mem_l = np.asarray(mem_l, np.int64)
    q_l = np.asarray(q_l, np.int64)
    rows = []
    for c in np.unique(mem_l):
        keep = mem_l != c
        own, _ = search(mem_v[keep], mem_v[keep], 2)
        threshold = float(np.percentile(1.0 - own[:, 1], percentile))  # column 0 is the sample itself
        nearest, _ = search(mem_v[keep], q_v, 1)
        flagged = (1.0 - nearest[:, 0]) > threshold
        unseen = q_l == c
        rows.append({"held_out": label_names[c] if label_names is not None else str(c), "threshold": threshold,
                     "flagged_unseen": float(flagged[unseen].mean()), "n_unseen": int(unseen.sum()),
                     "flagged_known": float(flagged[~unseen].mean()), "n_known": int((~unseen).sum())})
    table = pl.DataFrame(rows)
    summary = {"percentile": percentile, "mean_flagged_unseen": float(table["flagged_unseen"].mean()),
               "mean_flagged_known": float(table["flagged_known"].mean())}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["flagged_unseen"], 0.4, label="queries of the held-out class", color="tab:red")
    ax.bar(x + 0.2, table["flagged_known"], 0.4, label="queries of classes in memory", color="tab:gray")
    ax.set_xticks(x, table["held_out"].to_list(), rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("flagged 'unknown'")
    ax.set_title(f"novelty: nearest neighbour beyond the {percentile:g}th percentile of the memory's own")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return ExperimentResult("novelty", table, _outputs("novelty", table, fig, out_dir), summary)


EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "label-noise": label_noise,
    "new-classes": new_classes,
    "memory-scaling": memory_scaling,
    "novelty": novelty,
}


def run(name: str, encoder, out_dir, n_memory: int = 2000, n_queries: int = 500, cache_dir=None,
        seed: int = 0) -> ExperimentResult:
    """Fashion-MNIST vectors (balanced, train as memory, test as queries) + the named experiment;
    writes <out_dir>/<name>.png and <out_dir>/<name>.csv."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    mem_v, mem_l, q_v, q_l, names = fashion_mnist_vectors(encoder, n_memory, n_queries, seed=seed,
                                                          cache_dir=cache_dir)
    result = EXPERIMENTS[name](mem_v, mem_l, q_v, q_l, out_dir=out_dir, label_names=names)
    result.summary = {"data": "fashion-mnist", "encoder": encoder.id, "n_memory": n_memory,
                      "n_queries": n_queries, "seed": seed, **result.summary}
    return result
