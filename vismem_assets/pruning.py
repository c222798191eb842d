"""Pruning as weights, never as deletion: reliability per index version (brought up to date
incrementally from the previous version), and soft / hard weight sets in the ledger that
classification honours, which can be switched off or rolled back."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from . import reliability as rel_mod
from .catalog import Catalog
from .index_store import held_ids
from .ledger import insert_rows, to_frame

SOFT_K, HARD_K = rel_mod.SOFT_K, rel_mod.HARD_K
HARD_PERCENTILE = 90         # default hard threshold: drop the least reliable tenth of the memory
INCREMENTAL_UP_TO = 0.5      # beyond this fraction changed, a full pass is cheaper
MODES = ("none", "soft", "hard")


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


def reliability(memory, k: int) -> tuple[rel_mod.Reliability, ReliabilityRun]:
    """Reliability of the live version at k: stored, or updated from the newest earlier
    version that has it (only what changed is re-queried), or a full pass."""
    version, index = memory.live_index()
    enc = memory.encoder.id
    stored = memory.ledger.query(
        "SELECT index_version, mode, base_version, n_samples, n_requeried, seconds, path FROM reliability_runs"
        " WHERE encoder_id = ? AND k = ? AND index_version <= ? ORDER BY index_version DESC LIMIT 1",
        [enc, k, version.version])
    ids = held_ids(index)
    if len(stored) and stored["index_version"][0] == version.version:
        row = stored.row(0, named=True)
        return rel_mod.load(memory.layout.absolute(row["path"])), ReliabilityRun(
            version.version, k, row["mode"], row["base_version"], row["n_samples"], row["n_requeried"], row["seconds"])
    ids, vectors = memory.stored_vectors(index)
    order = np.argsort(ids)
    sorted_ids = ids[order]

    def vectors_of(wanted: np.ndarray) -> np.ndarray:
        return vectors[order[np.searchsorted(sorted_ids, wanted)]]

    catalog = memory.catalog()
    codes = {name: label_code(name) for name in catalog.label_names}
    label_of = dict(zip(catalog.vector_ids.tolist(), (codes[catalog.label_names[c]] for c in catalog.label_codes)))
    current = catalog_codes(catalog)
    t0 = time.perf_counter()
    base = None
    if len(stored):
        # A relabel updates only the live version's statistics: an older base may hold old labels.
        base = with_labels(rel_mod.load(memory.layout.absolute(stored["path"][0])), *current)
        added = np.setdiff1d(ids, base.vector_ids)
        removed = np.setdiff1d(base.vector_ids, ids)
        if len(added) + len(removed) > INCREMENTAL_UP_TO * max(len(ids), 1):
            base = None
    if base is None:
        result = rel_mod.compute(ids, vectors, [label_of[i] for i in ids.tolist()], k)
        mode, base_version, n_requeried = "full", None, len(ids)
    else:
        result, n_requeried = base, 0
        if len(removed):
            result, stats = rel_mod.remove(result, removed, vectors_of)
            n_requeried += stats.get("n_requeried", 0)
        if len(added):
            result, stats = rel_mod.add(result, added, vectors_of(added), [label_of[i] for i in added.tolist()],
                                        vectors_of)
            n_requeried += stats.get("n_touched", 0) + stats.get("n_new", 0)
        mode, base_version = "incremental", int(stored["index_version"][0])
    seconds = time.perf_counter() - t0
    run = ReliabilityRun(version.version, k, mode, base_version, len(result.vector_ids), n_requeried, seconds)
    if memory.read_only:  # a cache: a reader without write access computes it and keeps nothing
        return result, run
    path = memory.layout.root / "reliability" / memory.encoder.slug / f"v{version.version:06d}-k{k}.parquet"
    with memory.ledger.transaction() as con:
        # Saved under the ledger's lock, with the labels as they are now: a relabel that committed
        # while this pass ran would otherwise be stored as if it had not happened.
        result = with_labels(result, *catalog_codes(Catalog.query(con)))
        rel_mod.save(result, path)
        con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?",
                    [enc, version.version, k])
        insert_rows(con, "reliability", {
            "encoder_id": ("VARCHAR", [enc] * len(result.vector_ids)),
            "index_version": ("INTEGER", [version.version] * len(result.vector_ids)),
            "k": ("INTEGER", [k] * len(result.vector_ids)),
            "vector_id": ("BIGINT", result.vector_ids.tolist()),
            "v": ("INTEGER", result.v.tolist()),
        })
        con.execute("INSERT OR REPLACE INTO reliability_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [enc, version.version, k, mode, base_version, len(result.vector_ids), n_requeried, seconds,
                     memory.layout.relative(path)])
    return result, run


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


def weights(memory, mode: str, hard_threshold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vector_ids, weight) of the live version for 'soft' or 'hard' pruning."""
    if mode == "soft":
        rel, _ = reliability(memory, SOFT_K)
        return rel.vector_ids, rel_mod.soft_weights(rel.v)
    if mode == "hard":
        rel, _ = reliability(memory, HARD_K)
        threshold = hard_threshold if hard_threshold is not None else default_hard_threshold(rel.v)
        return rel.vector_ids, rel_mod.hard_weights(rel.v, threshold)
    raise ValueError(f"unknown pruning {mode!r}; choose one of {', '.join(MODES)}")


def weights_by_row(memory, catalog, mode: str | None, hard_threshold: int | None = None) -> np.ndarray | None:
    """Per-catalog-row weights for `mode` ('none'/None: no weights)."""
    if mode in (None, "none"):
        return None
    ids, w = weights(memory, mode, hard_threshold)
    out = np.ones(len(catalog.vector_ids))
    pos = np.searchsorted(ids, catalog.vector_ids)
    pos = np.clip(pos, 0, len(ids) - 1)
    found = ids[pos] == catalog.vector_ids
    out[found] = w[pos[found]]
    return out


def plan(memory, mode: str, hard_threshold: int | None = None) -> pl.DataFrame:
    """What a weight set would change: per label, samples down-weighted (soft) or excluded (hard)."""
    ids, w = weights(memory, mode, hard_threshold)
    catalog = memory.catalog()
    rows = catalog.rows(ids)
    labels = [catalog.label_names[catalog.label_codes[r]] for r in rows]
    frame = pl.DataFrame({"label": labels, "weight": w})
    return (frame.group_by("label").agg(pl.len().alias("samples"), (pl.col("weight") < 1).sum().alias("changed"),
                                        pl.col("weight").mean().alias("mean_weight"))
            .sort("label"))


def activate(memory, mode: str, hard_threshold: int | None = None) -> dict:
    """Store the weight set for the live version and make it the one classification uses."""
    version, _ = memory.live_index()
    enc = memory.encoder.id
    if mode == "hard" and hard_threshold is None:
        hard_threshold = default_hard_threshold(reliability(memory, HARD_K)[0].v)
    ids, w = weights(memory, mode, hard_threshold)
    params = json.dumps({"k": SOFT_K if mode == "soft" else HARD_K,
                         **({"threshold": hard_threshold} if mode == "hard" else {"gamma": rel_mod.SOFT_GAMMA})})
    with memory.ledger.transaction() as con:
        con.execute("DELETE FROM sample_weights WHERE encoder_id = ? AND index_version = ? AND name = ?",
                    [enc, version.version, mode])
        insert_rows(con, "sample_weights", {
            "encoder_id": ("VARCHAR", [enc] * len(ids)), "index_version": ("INTEGER", [version.version] * len(ids)),
            "name": ("VARCHAR", [mode] * len(ids)), "vector_id": ("BIGINT", ids.tolist()),
            "weight": ("DOUBLE", w.tolist())})
        con.execute("UPDATE weight_sets SET active = FALSE WHERE encoder_id = ?", [enc])
        con.execute("INSERT OR REPLACE INTO weight_sets VALUES (?, ?, ?, ?, TRUE, now())",
                    [enc, version.version, mode, params])
    return {"index_version": version.version, "pruning": mode, "params": json.loads(params),
            "changed": int((w < 1).sum()), "samples": len(w)}


def deactivate(memory) -> None:
    with memory.ledger.transaction() as con:
        con.execute("UPDATE weight_sets SET active = FALSE WHERE encoder_id = ?", [memory.encoder.id])


def rollback(memory) -> dict | None:
    """Make the weight set activated before the current one active again (None: pruning off)."""
    sets = memory.ledger.query("SELECT index_version, name, active FROM weight_sets WHERE encoder_id = ?"
                               " ORDER BY created_at DESC", [memory.encoder.id])
    current = sets.filter(pl.col("active"))
    earlier = sets.filter(~pl.col("active")) if len(current) else sets.slice(1)
    with memory.ledger.transaction() as con:
        con.execute("UPDATE weight_sets SET active = FALSE WHERE encoder_id = ?", [memory.encoder.id])
        if earlier.is_empty():
            return None
        row = earlier.row(0, named=True)
        con.execute("UPDATE weight_sets SET active = TRUE WHERE encoder_id = ? AND index_version = ? AND name = ?",
                    [memory.encoder.id, row["index_version"], row["name"]])
    return row


def active_mode(memory) -> tuple[str, int | None] | None:
    """(mode, hard threshold) of the active weight set, if pruning is switched on."""
    row = memory.ledger.query("SELECT name, params FROM weight_sets WHERE encoder_id = ? AND active",
                              [memory.encoder.id])
    if row.is_empty():
        return None
    return row["name"][0], json.loads(row["params"][0] or "{}").get("threshold")


@dataclass
class StoredRelabel:
    runs: list[dict]            # encoder_id, index_version, k, rows_recounted, v_changed
    written: list              # new reliability files (to remove if the transaction fails)
    replaced: list             # the files they replace (to remove once it committed)


def relabel_stored(layout, con, vector_ids: list[int], label: str, tag: str) -> StoredRelabel:
    """In the caller's transaction: bring the stored reliability of every live index version
    (each k it was computed for) to these samples' new label, incrementally (rel_mod.relabel),
    and the weight sets stored for that version with it. Each update goes to a new file named
    in the ledger as the transaction commits; older versions are brought up to date when they
    next serve as the base of an incremental pass (`reliability`)."""
    stored = to_frame(con.execute(
        "SELECT r.encoder_id, r.index_version, r.k, r.path FROM reliability_runs r JOIN index_versions v"
        " ON v.encoder_id = r.encoder_id AND v.version = r.index_version AND v.status = 'live'"
        " ORDER BY r.encoder_id, r.k"))
    ids = np.asarray(vector_ids, np.int64)
    codes = np.full(len(ids), label_code(label), np.int64)
    out = StoredRelabel([], [], [])
    for row in stored.iter_rows(named=True):
        enc, version, k = row["encoder_id"], row["index_version"], row["k"]
        old_path = layout.absolute(row["path"])
        before = rel_mod.load(old_path)
        after, stats = rel_mod.relabel(before, ids, codes)
        moved = after.v != before.v
        path = old_path.with_name(f"v{version:06d}-k{k}-relabel-{tag}.parquet")
        rel_mod.save(after, path)
        out.written.append(path)
        if path != old_path:
            out.replaced.append(old_path)
        con.execute("UPDATE reliability_runs SET path = ? WHERE encoder_id = ? AND index_version = ? AND k = ?",
                    [layout.relative(path), enc, version, k])
        changed_ids = after.vector_ids[moved]
        con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?"
                    " AND vector_id IN (SELECT unnest(?::BIGINT[]))", [enc, version, k, changed_ids.tolist()])
        insert_rows(con, "reliability", {
            "encoder_id": ("VARCHAR", [enc] * len(changed_ids)),
            "index_version": ("INTEGER", [version] * len(changed_ids)),
            "k": ("INTEGER", [k] * len(changed_ids)),
            "vector_id": ("BIGINT", changed_ids.tolist()),
            "v": ("INTEGER", after.v[moved].tolist()),
        })
        _reweigh(con, enc, version, k, changed_ids, after.v[moved])
        out.runs.append({"encoder_id": enc, "index_version": version, "k": k,
                         "rows_recounted": stats["n_rows"], "v_changed": int(moved.sum())})
    return out


def _reweigh(con, enc: str, version: int, k: int, ids: np.ndarray, v: np.ndarray) -> None:
    """Stored weight sets of this version computed at k: the samples whose v moved get their new weight."""
    sets = con.execute("SELECT name, params FROM weight_sets WHERE encoder_id = ? AND index_version = ?",
                       [enc, version]).fetchall()
    for name, params in sets:
        params = json.loads(params or "{}")
        if params.get("k") != k or not len(ids):
            continue
        w = rel_mod.soft_weights(v) if name == "soft" else rel_mod.hard_weights(v, params["threshold"])
        con.execute("DELETE FROM sample_weights WHERE encoder_id = ? AND index_version = ? AND name = ?"
                    " AND vector_id IN (SELECT unnest(?::BIGINT[]))", [enc, version, name, ids.tolist()])
        insert_rows(con, "sample_weights", {
            "encoder_id": ("VARCHAR", [enc] * len(ids)), "index_version": ("INTEGER", [version] * len(ids)),
            "name": ("VARCHAR", [name] * len(ids)), "vector_id": ("BIGINT", ids.tolist()),
            "weight": ("DOUBLE", w.tolist())})
