"""Ledger group: reliability statistics (`reliability`, `reliability_runs`) and pruning weight
sets (`weight_sets`, `sample_weights`), per encoder, index version and k."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from .base import insert_rows, to_frame
from .session import Group


@dataclass(frozen=True)
class StoredReliability:
    """One row of `reliability_runs`: how a version's reliability at k was computed, and its file."""
    encoder_id: str
    index_version: int
    k: int
    mode: str                   # 'full', 'incremental', or 'forget' (its rows that held a forgotten sample wait to be searched again)
    base_version: int | None
    n_samples: int
    n_requeried: int
    seconds: float
    path: str                   # relative to the memory home


_RUN_COLUMNS = ("encoder_id", "index_version", "k", "mode", "base_version", "n_samples", "n_requeried", "seconds", "path")


class PruningStats(Group):
    """Reliability per sample and the weight sets classification honours."""

    # --- reliability ----------------------------------------------------------------------------

    def latest_reliability(self, encoder_id: str, k: int, up_to_version: int) -> StoredReliability | None:
        """The newest stored run at k of a version no later than `up_to_version`."""
        row = self.con.execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM reliability_runs WHERE encoder_id = ? AND k = ? AND index_version <= ?"
            " ORDER BY index_version DESC LIMIT 1", [encoder_id, k, up_to_version]).fetchone()
        return StoredReliability(*row) if row else None

    def live_reliability(self) -> list[StoredReliability]:
        """The stored runs of every encoder's live version, by encoder and k."""
        rows = self.con.execute(
            f"SELECT {', '.join('r.' + c for c in _RUN_COLUMNS)} FROM reliability_runs r"
            " JOIN index_versions v ON v.encoder_id = r.encoder_id AND v.version = r.index_version"
            " AND v.status = 'live' ORDER BY r.encoder_id, r.k").fetchall()
        return [StoredReliability(*row) for row in rows]

    def store_reliability(self, run: StoredReliability, vector_ids: np.ndarray, v: np.ndarray) -> None:
        """Replace the version's reliability at k (every sample's v) and its run."""
        key = [run.encoder_id, run.index_version, run.k]
        self.con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?", key)
        self._insert_reliability(run.encoder_id, run.index_version, run.k, vector_ids, v)
        self.con.execute("INSERT INTO reliability_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())"
                         " ON CONFLICT (encoder_id, index_version, k) DO UPDATE SET mode = excluded.mode,"
                         " base_version = excluded.base_version, n_samples = excluded.n_samples,"
                         " n_requeried = excluded.n_requeried, seconds = excluded.seconds, path = excluded.path,"
                         " created_at = excluded.created_at",
                         [*key, run.mode, run.base_version, run.n_samples, run.n_requeried, run.seconds, run.path])

    def update_reliability(self, encoder_id: str, version: int, k: int, path: str,
                           vector_ids: np.ndarray, v: np.ndarray) -> None:
        """These samples' new v at (version, k), the whole run now in the file at `path`."""
        self.con.execute("UPDATE reliability_runs SET path = ? WHERE encoder_id = ? AND index_version = ? AND k = ?",
                         [path, encoder_id, version, k])
        self.con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?"
                         " AND vector_id IN (SELECT unnest(?::BIGINT[]))", [encoder_id, version, k, vector_ids.tolist()])
        self._insert_reliability(encoder_id, version, k, vector_ids, v)

    def reliability_runs(self) -> list[StoredReliability]:
        """Every stored run, oldest version first."""
        rows = self.con.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM reliability_runs"
                                " ORDER BY index_version, encoder_id, k").fetchall()
        return [StoredReliability(*row) for row in rows]

    def forget_in_run(self, run: StoredReliability, removed: np.ndarray, changed: np.ndarray, v: np.ndarray,
                      n_samples: int, seconds: float) -> None:
        """A forget dropped these samples from the run (reliability.drop): their rows go, the
        changed samples get their new v, and the run says a forget changed it last."""
        key = [run.encoder_id, run.index_version, run.k]
        self.con.execute("UPDATE reliability_runs SET mode = 'forget', n_samples = ?, n_requeried = 0, seconds = ?,"
                         " created_at = now() WHERE encoder_id = ? AND index_version = ? AND k = ?",
                         [n_samples, seconds, *key])
        self.con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?"
                         " AND vector_id IN (SELECT unnest(?::BIGINT[]))",
                         [*key, np.concatenate([removed, changed]).tolist()])
        self._insert_reliability(run.encoder_id, run.index_version, run.k, changed, v)

    def drop_reliability_run(self, encoder_id: str, index_version: int, k: int) -> None:
        for table in ("reliability_runs", "reliability"):
            self.con.execute(f"DELETE FROM {table} WHERE encoder_id = ? AND index_version = ? AND k = ?",
                             [encoder_id, index_version, k])

    def _insert_reliability(self, encoder_id: str, version: int, k: int, vector_ids: np.ndarray,
                            v: np.ndarray) -> None:
        insert_rows(self.con, "reliability", {
            "encoder_id": ("VARCHAR", [encoder_id] * len(vector_ids)),
            "index_version": ("INTEGER", [version] * len(vector_ids)),
            "k": ("INTEGER", [k] * len(vector_ids)),
            "vector_id": ("BIGINT", vector_ids.tolist()),
            "v": ("INTEGER", v.tolist()),
        })

    # --- weight sets ------------------------------------------------------------------------------

    def weight_sets_of(self, encoder_id: str, version: int) -> list[tuple[str, dict]]:
        """(name, params) of the weight sets stored for this version."""
        rows = self.con.execute("SELECT name, params FROM weight_sets WHERE encoder_id = ? AND index_version = ?",
                                [encoder_id, version]).fetchall()
        return [(name, json.loads(params or "{}")) for name, params in rows]

    def weight_sets(self, encoder_id: str) -> pl.DataFrame:
        """index_version, name, active of the encoder's weight sets, newest first."""
        return to_frame(self.con.execute("SELECT index_version, name, active FROM weight_sets WHERE encoder_id = ?"
                                         " ORDER BY created_at DESC", [encoder_id]))

    def active_weight_set(self, encoder_id: str) -> tuple[str, dict] | None:
        """(name, params) of the active weight set, if pruning is switched on."""
        row = self.con.execute("SELECT name, params FROM weight_sets WHERE encoder_id = ? AND active",
                               [encoder_id]).fetchone()
        return (row[0], json.loads(row[1] or "{}")) if row else None

    def activate_weight_set(self, encoder_id: str, version: int, name: str, params: dict,
                            vector_ids: np.ndarray, weights: np.ndarray) -> None:
        """Store the weight set (replacing one of that name and version) and make it the only active one."""
        self.con.execute("DELETE FROM sample_weights WHERE encoder_id = ? AND index_version = ? AND name = ?",
                         [encoder_id, version, name])
        self._insert_weights(encoder_id, version, name, vector_ids, weights)
        self.deactivate_weight_sets(encoder_id)
        self.con.execute("INSERT INTO weight_sets VALUES (?, ?, ?, ?, TRUE, now())"
                         " ON CONFLICT (encoder_id, index_version, name) DO UPDATE SET params = excluded.params,"
                         " active = excluded.active, created_at = excluded.created_at",
                         [encoder_id, version, name, json.dumps(params)])

    def reactivate_weight_set(self, encoder_id: str, version: int, name: str) -> None:
        """Make a stored weight set the active one again."""
        self.deactivate_weight_sets(encoder_id)
        self.con.execute("UPDATE weight_sets SET active = TRUE WHERE encoder_id = ? AND index_version = ? AND name = ?",
                         [encoder_id, version, name])

    def deactivate_weight_sets(self, encoder_id: str) -> None:
        self.con.execute("UPDATE weight_sets SET active = FALSE WHERE encoder_id = ?", [encoder_id])

    def update_weights(self, encoder_id: str, version: int, name: str, vector_ids: np.ndarray,
                       weights: np.ndarray) -> None:
        """These samples' new weight in a stored weight set."""
        self.con.execute("DELETE FROM sample_weights WHERE encoder_id = ? AND index_version = ? AND name = ?"
                         " AND vector_id IN (SELECT unnest(?::BIGINT[]))", [encoder_id, version, name, vector_ids.tolist()])
        self._insert_weights(encoder_id, version, name, vector_ids, weights)

    def _insert_weights(self, encoder_id: str, version: int, name: str, vector_ids: np.ndarray,
                        weights: np.ndarray) -> None:
        insert_rows(self.con, "sample_weights", {
            "encoder_id": ("VARCHAR", [encoder_id] * len(vector_ids)),
            "index_version": ("INTEGER", [version] * len(vector_ids)),
            "name": ("VARCHAR", [name] * len(vector_ids)), "vector_id": ("BIGINT", vector_ids.tolist()),
            "weight": ("DOUBLE", weights.tolist())})
