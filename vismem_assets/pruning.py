"""Pruning as weights, never as deletion: reliability per index version (brought up to date
incrementally from the previous version), and soft / hard weight sets in the ledger that
classification honours, which can be switched off or rolled back."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import polars as pl

from . import reliability as rel_mod
from .catalog import Catalog
from .ledger.pruning import StoredReliability

if TYPE_CHECKING:
    from .encoders import Encoder
    from .home import Layout
    from .index_store import IndexVersion
    from .ledger import LedgerBase, Session

SOFT_K, HARD_K = rel_mod.SOFT_K, rel_mod.HARD_K
HARD_PERCENTILE = 90         # default hard threshold: drop the least reliable tenth of the memory
INCREMENTAL_UP_TO = 0.5      # beyond this fraction changed, a full pass is cheaper
MODES = ("none", "soft", "hard")

LiveIndex = Callable[[], "tuple[IndexVersion, Any]"]               # (live version, its loaded index)
StoredVectors = Callable[[Any], "tuple[np.ndarray, np.ndarray]"]   # index -> (vector ids, exact vectors)


def label_code(label: str) -> int:
    """A stable integer per label, the same in every version (incremental updates compare them)."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little", signed=True)


@dataclass
class ReliabilityRun:
    version: int
    k: int
    mode: str
    base_version: int | None
    n_samples: int
    n_requeried: int
    seconds: float


class Pruning:
    """Reliability and pruning weight sets of one encoder's live index version. `live_index`
    gives (live version, its index); `stored_vectors(index)` the (vector ids, exact vectors) it holds."""

    def __init__(self, ledger: LedgerBase, layout: Layout, encoder: Encoder, live_index: LiveIndex,
                 stored_vectors: StoredVectors):
        self.ledger, self.layout, self.encoder = ledger, layout, encoder
        self.live_index, self.stored_vectors = live_index, stored_vectors

    def _catalog(self) -> Catalog:
        with self.ledger.connect() as session:
            return session.labels.catalog()

    def reliability(self, k: int) -> tuple[rel_mod.Reliability, ReliabilityRun]:
        """Reliability of the live version at k: stored, or updated from the newest earlier
        version that has it (only what changed is re-queried, and the rows a forget left
        holes in), or a full pass."""
        version, index = self.live_index()
        enc = self.encoder.id
        with self.ledger.connect() as session:
            stored = session.pruning.latest_reliability(enc, k, version.version)
        if stored is not None and stored.index_version == version.version:
            kept = rel_mod.load(self.layout.absolute(stored.path))
            if not len(rel_mod.unfilled(kept)):
                return kept, ReliabilityRun(version.version, k, stored.mode, stored.base_version, stored.n_samples,
                                            stored.n_requeried, stored.seconds)
        ids, vectors = self.stored_vectors(index)
        order = np.argsort(ids)
        sorted_ids = ids[order]

        def vectors_of(wanted: np.ndarray) -> np.ndarray:
            return vectors[order[np.searchsorted(sorted_ids, wanted)]]

        catalog = self._catalog()
        codes = {name: label_code(name) for name in catalog.label_names}
        label_of = dict(zip(catalog.vector_ids.tolist(), (codes[catalog.label_names[c]] for c in catalog.label_codes)))
        current = catalog_codes(catalog)
        t0 = time.perf_counter()
        base = None
        if stored is not None:
            # A relabel updates only the live version's statistics: an older base may hold old labels.
            base = with_labels(rel_mod.load(self.layout.absolute(stored.path)), *current)
            added = np.setdiff1d(ids, base.vector_ids)
            removed = np.setdiff1d(base.vector_ids, ids)
            if len(added) + len(removed) > INCREMENTAL_UP_TO * max(len(ids), 1):
                base = None
        if base is None:
            result = rel_mod.compute(ids, vectors, [label_of[i] for i in ids.tolist()], k)
            mode, base_version, n_requeried = "full", None, len(ids)
        else:
            result, n_requeried = base, 0
            if len(removed) or len(rel_mod.unfilled(base)):
                result, stats = rel_mod.remove(result, removed, vectors_of)
                n_requeried += stats.get("n_requeried", 0)
            if len(added):
                result, stats = rel_mod.add(result, added, vectors_of(added), [label_of[i] for i in added.tolist()],
                                            vectors_of)
                n_requeried += stats.get("n_touched", 0) + stats.get("n_new", 0)
            mode, base_version = "incremental", stored.index_version
        seconds = time.perf_counter() - t0
        run = ReliabilityRun(version.version, k, mode, base_version, len(result.vector_ids), n_requeried, seconds)
        if self.ledger.read_only:  # a cache: a reader without write access computes it and keeps nothing
            return result, run
        path = self.layout.root / "reliability" / self.encoder.slug / f"v{version.version:06d}-k{k}.parquet"
        with self.ledger.transaction() as session:
            # Saved under the ledger's lock, with the labels as they are now: a relabel that committed
            # while this pass ran would otherwise be stored as if it had not happened.
            result = with_labels(result, *catalog_codes(session.labels.catalog()))
            rel_mod.save(result, path)
            session.pruning.store_reliability(
                StoredReliability(enc, version.version, k, mode, base_version, len(result.vector_ids), n_requeried,
                                  seconds, self.layout.relative(path)),
                result.vector_ids, result.v)
        return result, run

    def weights(self, mode: str, hard_threshold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vector_ids, weight) of the live version for 'soft' or 'hard' pruning."""
        if mode == "soft":
            rel, _ = self.reliability(SOFT_K)
            return rel.vector_ids, rel_mod.soft_weights(rel.v)
        if mode == "hard":
            rel, _ = self.reliability(HARD_K)
            threshold = hard_threshold if hard_threshold is not None else default_hard_threshold(rel.v)
            return rel.vector_ids, rel_mod.hard_weights(rel.v, threshold)
        raise ValueError(f"unknown pruning {mode!r}; choose one of {', '.join(MODES)}")

    def weights_by_row(self, catalog: Catalog, mode: str | None, hard_threshold: int | None = None) -> np.ndarray | None:
        """Per-catalog-row weights for `mode` ('none'/None: no weights)."""
        if mode in (None, "none"):
            return None
        ids, w = self.weights(mode, hard_threshold)
        out = np.ones(len(catalog.vector_ids))
        pos = np.searchsorted(ids, catalog.vector_ids)
        pos = np.clip(pos, 0, len(ids) - 1)
        found = ids[pos] == catalog.vector_ids
        out[found] = w[pos[found]]
        return out

    def plan(self, mode: str, hard_threshold: int | None = None) -> pl.DataFrame:
        """What a weight set would change: per label, samples down-weighted (soft) or excluded (hard)."""
        ids, w = self.weights(mode, hard_threshold)
        catalog = self._catalog()
        rows = catalog.rows(ids)
        labels = [catalog.label_names[catalog.label_codes[r]] for r in rows]
        frame = pl.DataFrame({"label": labels, "weight": w})
        return (frame.group_by("label").agg(pl.len().alias("samples"), (pl.col("weight") < 1).sum().alias("changed"),
                                            pl.col("weight").mean().alias("mean_weight"))
                .sort("label"))

    def activate(self, mode: str, hard_threshold: int | None = None) -> dict:
        """Store the weight set for the live version and make it the one classification uses."""
        version, _ = self.live_index()
        if mode == "hard" and hard_threshold is None:
            hard_threshold = default_hard_threshold(self.reliability(HARD_K)[0].v)
        ids, w = self.weights(mode, hard_threshold)
        params = {"k": SOFT_K if mode == "soft" else HARD_K,
                  **({"threshold": hard_threshold} if mode == "hard" else {"gamma": rel_mod.SOFT_GAMMA})}
        with self.ledger.transaction() as session:
            session.pruning.activate_weight_set(self.encoder.id, version.version, mode, params, ids, w)
        return {"index_version": version.version, "pruning": mode, "params": params,
                "changed": int((w < 1).sum()), "samples": len(w)}

    def deactivate(self) -> None:
        with self.ledger.transaction() as session:
            session.pruning.deactivate_weight_sets(self.encoder.id)

    def rollback(self) -> dict | None:
        """Make the weight set activated before the current one active again (None: pruning off)."""
        with self.ledger.transaction() as session:
            sets = session.pruning.weight_sets(self.encoder.id)
            current = sets.filter(pl.col("active"))
            earlier = sets.filter(~pl.col("active")) if len(current) else sets.slice(1)
            if earlier.is_empty():
                session.pruning.deactivate_weight_sets(self.encoder.id)
                return None
            row = earlier.row(0, named=True)
            session.pruning.reactivate_weight_set(self.encoder.id, row["index_version"], row["name"])
        return row

    def active_mode(self) -> tuple[str, int | None] | None:
        """(mode, hard threshold) of the active weight set, if pruning is switched on."""
        with self.ledger.connect() as session:
            active = session.pruning.active_weight_set(self.encoder.id)
        return None if active is None else (active[0], active[1].get("threshold"))


def forget_in_statistics(session: "Session", layout: "Layout", vector_ids: np.ndarray) -> None:
    """Forgotten samples leave the pruning statistics without a search: the newest stored run
    of each encoder at each k drops them (reliability.drop: their rows, their contributions,
    their places in other rows' top-k), and the rows that held one are searched again when the
    statistics are next used (`Pruning.reliability`). Older runs, bases no longer needed, go.
    The ledger's rows change before the file: run again after a crash, it does the same."""
    runs = session.pruning.reliability_runs()
    newest = {}
    for run in runs:   # (oldest first)
        newest[(run.encoder_id, run.k)] = run
    for run in runs:
        path = layout.absolute(run.path)
        before = _readable(path) if newest[(run.encoder_id, run.k)] is run else None
        if before is None:   # an older run, or one whose file is gone or damaged: a cache, computed again when needed
            path.unlink(missing_ok=True)
            session.pruning.drop_reliability_run(run.encoder_id, run.index_version, run.k)
            continue
        after, stats = rel_mod.drop(before, vector_ids)
        if not stats["n_removed"]:
            continue
        kept = np.isin(before.vector_ids, after.vector_ids)
        changed = after.v != before.v[kept]
        with session.ledger.transaction():
            session.pruning.forget_in_run(run, before.vector_ids[~kept], after.vector_ids[changed], after.v[changed],
                                          len(after), stats["seconds"])
        rel_mod.save(after, path)


def _readable(path) -> rel_mod.Reliability | None:
    try:
        return rel_mod.load(path)
    except (OSError, KeyError, ValueError, pl.exceptions.PolarsError):
        return None


def catalog_codes(catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """(vector ids, label_code of each) of the catalog's samples."""
    per_name = np.array([label_code(name) for name in catalog.label_names], np.int64)
    return catalog.vector_ids, per_name[catalog.label_codes] if len(per_name) else np.empty(0, np.int64)


def with_labels(rel: rel_mod.Reliability, vector_ids: np.ndarray, codes: np.ndarray) -> rel_mod.Reliability:
    """`rel` with the label codes given for these vector ids (the ledger's labels now), v updated
    to match (rel_mod.relabel); samples not given keep theirs."""
    at = rel_mod._positions(rel.vector_ids, vector_ids)
    given = at >= 0
    if np.array_equal(rel.labels[at[given]], codes[given]):
        return rel
    return rel_mod.relabel(rel, vector_ids[given], codes[given])[0]


def default_hard_threshold(v: np.ndarray) -> int:
    """v grows with k and with how crowded the memory is, so a fixed default would drop nothing
    in one memory and everything in another: by default the least reliable tenth goes."""
    return max(1, int(np.ceil(np.percentile(v, HARD_PERCENTILE)))) if len(v) else 1


@dataclass
class StoredRelabel:
    runs: list[dict]            # encoder_id, index_version, k, rows_recounted, v_changed
    written: list              # new reliability files (to remove if the transaction fails)
    replaced: list             # the files they replace (to remove once it committed)


def relabel_stored(layout: Layout, session: Session, vector_ids: list[int], label: str, tag: str) -> StoredRelabel:
    """In the caller's transaction: bring the stored reliability of every live index version
    (each k it was computed for) to these samples' new label, incrementally (rel_mod.relabel),
    and the weight sets stored for that version with it. Each update goes to a new file named
    in the ledger as the transaction commits; older versions are brought up to date when they
    next serve as the base of an incremental pass (`Pruning.reliability`)."""
    ids = np.asarray(vector_ids, np.int64)
    codes = np.full(len(ids), label_code(label), np.int64)
    out = StoredRelabel([], [], [])
    for stored in session.pruning.live_reliability():
        enc, version, k = stored.encoder_id, stored.index_version, stored.k
        old_path = layout.absolute(stored.path)
        before = rel_mod.load(old_path)
        after, stats = rel_mod.relabel(before, ids, codes)
        moved = after.v != before.v
        path = old_path.with_name(f"v{version:06d}-k{k}-relabel-{tag}.parquet")
        rel_mod.save(after, path)
        out.written.append(path)
        if path != old_path:
            out.replaced.append(old_path)
        changed_ids = after.vector_ids[moved]
        session.pruning.update_reliability(enc, version, k, layout.relative(path), changed_ids, after.v[moved])
        _reweigh(session, enc, version, k, changed_ids, after.v[moved])
        out.runs.append({"encoder_id": enc, "index_version": version, "k": k,
                         "rows_recounted": stats["n_rows"], "v_changed": int(moved.sum())})
    return out


def _reweigh(session: Session, enc: str, version: int, k: int, ids: np.ndarray, v: np.ndarray) -> None:
    """Stored weight sets of this version computed at k: the samples whose v moved get their new weight."""
    for name, params in session.pruning.weight_sets_of(enc, version):
        if params.get("k") != k or not len(ids):
            continue
        w = rel_mod.soft_weights(v) if name == "soft" else rel_mod.hard_weights(v, params["threshold"])
        session.pruning.update_weights(enc, version, name, ids, w)
