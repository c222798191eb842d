"""Ledger group: image sets, ingests, samples, sample sources, quarantine and embedding rows.

The tables an ingest writes (one transaction per set) and the embedding rows the single
recorder writes per part, with the reads that decide what is new, what is pending and what
the memory holds. A few reads of other families (the blocklist) serve ingest from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from .base import insert_rows, to_frame
from .session import Group

# Active samples of one encoder that have an embedding row: the memory's vectors.
_EMBEDDED_ACTIVE = ("SELECT {} FROM samples s JOIN embeddings e ON e.sample_id = s.sample_id"
                    " WHERE e.encoder_id = ? AND s.status = 'active'")
_IN = "IN (SELECT unnest(?::VARCHAR[]))"


@dataclass(frozen=True)
class NewSample:
    """One samples row an ingest writes (name_pos/name_len: its first name in names.bin)."""
    sample_id: str
    label: str | None
    name_pos: int
    name_len: int
    format: str | None
    width: int | None
    height: int | None
    n_bytes: int | None
    image_path: str | None = None     # active samples only: where the store keeps the bytes


@dataclass(frozen=True)
class Refusal:
    """One quarantine row: a file of a set that was refused, and why."""
    sample_id: str | None
    name_pos: int
    name_len: int
    reason: str
    stored_path: str | None           # the private copy under quarantine/, if the bytes could be read


class Samples(Group):
    """image sets, ingests, samples, quarantine and embedding rows"""

    # ---- ingest ----------------------------------------------------------------------------

    def blocklist(self) -> set[str]:
        """Sample ids that may never come back (the view unites samples, deletions and forget targets)."""
        return {sid for (sid,) in self.con.execute("SELECT sample_id FROM blocklist").fetchall()}

    def is_active(self, sample_id: str) -> bool:
        return self.con.execute("SELECT 1 FROM samples WHERE sample_id = ? AND status = 'active'",
                                [sample_id]).fetchone() is not None

    def set_sources(self, image_set: str) -> list[str]:
        """Every source (folder or manifest) the set was read from."""
        return [s for (s,) in self.con.execute(
            "SELECT source FROM image_sets WHERE name = ? UNION SELECT source FROM ingests WHERE image_set = ?",
            [image_set, image_set]).fetchall()]

    def next_ingest_id(self) -> int:
        return self.con.execute("SELECT nextval('ingest_id_seq')").fetchone()[0]

    def touch_image_set(self, name: str, source: str) -> None:
        """Create the set, or note that it grew (the set keeps its first source)."""
        self.con.execute("INSERT INTO image_sets VALUES (?, ?, now(), now())"
                         " ON CONFLICT (name) DO UPDATE SET last_added_at = now()", [name, source])

    def statuses(self, sample_ids: list[str]) -> dict[str, str]:
        """{sample id: status} of those the ledger knows."""
        return dict(self.con.execute(f"SELECT sample_id, status FROM samples WHERE sample_id {_IN}",
                                     [sample_ids]).fetchall())

    def labels(self, sample_ids: list[str]) -> dict[str, str]:
        """{sample id: label} of those the ledger knows."""
        return dict(self.con.execute(f"SELECT sample_id, label FROM samples WHERE sample_id {_IN}",
                                     [sample_ids]).fetchall())

    def delete(self, sample_ids: list[str]) -> None:
        self.con.execute(f"DELETE FROM samples WHERE sample_id {_IN}", [sample_ids])

    def insert(self, image_set: str, status: str, rows: list[NewSample]) -> None:
        """New samples; an active one gets the next vector id and its first label_history row."""
        active = status == "active"
        insert_rows(self.con, "samples", {
            "sample_id": ("VARCHAR", [r.sample_id for r in rows]),
            "label": ("VARCHAR", [r.label for r in rows]),
            "image_set": ("VARCHAR", [image_set] * len(rows)),
            "status": ("VARCHAR", [status] * len(rows)),
            "image_path": ("VARCHAR", [r.image_path for r in rows]),
            "name_pos": ("BIGINT", [r.name_pos for r in rows]),
            "name_len": ("INTEGER", [r.name_len for r in rows]),
            "format": ("VARCHAR", [r.format for r in rows]),
            "width": ("INTEGER", [r.width for r in rows]),
            "height": ("INTEGER", [r.height for r in rows]),
            "n_bytes": ("BIGINT", [r.n_bytes for r in rows]),
        }, added_at="now()", **({"vector_id": "nextval('vector_id_seq')"} if active else {}))
        if active:
            insert_rows(self.con, "label_history", {
                "sample_id": ("VARCHAR", [r.sample_id for r in rows]),
                "label": ("VARCHAR", [r.label for r in rows]),
            }, changed_at="now()", reason="'ingest'")

    def insert_sources(self, image_set: str, ingest_id: int, sample_ids: list[str], labels: list[str | None],
                       spans: list[tuple[int, int]]) -> None:
        """Where each arrival came from, duplicates included (spans: its name in names.bin)."""
        insert_rows(self.con, "sample_sources", {
            "sample_id": ("VARCHAR", sample_ids),
            "image_set": ("VARCHAR", [image_set] * len(sample_ids)),
            "name_pos": ("BIGINT", [pos for pos, _ in spans]),
            "name_len": ("INTEGER", [n for _, n in spans]),
            "label": ("VARCHAR", labels),
            "ingest_id": ("BIGINT", [ingest_id] * len(sample_ids)),
        }, arrived_at="now()")

    def insert_quarantine(self, image_set: str, ingest_id: int, refusals: list[Refusal]) -> None:
        insert_rows(self.con, "quarantine", {
            "ingest_id": ("BIGINT", [ingest_id] * len(refusals)),
            "image_set": ("VARCHAR", [image_set] * len(refusals)),
            "name_pos": ("BIGINT", [r.name_pos for r in refusals]),
            "name_len": ("INTEGER", [r.name_len for r in refusals]),
            "sample_id": ("VARCHAR", [r.sample_id for r in refusals]),
            "reason": ("VARCHAR", [r.reason for r in refusals]),
            "stored_path": ("VARCHAR", [r.stored_path for r in refusals]),
        }, quarantined_at="now()")

    def record_ingest(self, ingest_id: int, image_set: str, source: str, n_files: int, added: int,
                      duplicates: int, quarantined: int) -> None:
        self.con.execute("INSERT INTO ingests VALUES (?, ?, ?, now(), now(), ?, ?, ?, ?)",
                         [ingest_id, image_set, source, n_files, added, duplicates, quarantined])

    # ---- embeddings --------------------------------------------------------------------------

    def pending_embeddings(self, encoder_id: str, image_set: str | None = None) -> pl.DataFrame:
        """(sample_id, vector_id, image_path, image_set) of active samples the encoder has not
        embedded (optionally only those that arrived in one set), in vector id order."""
        sql = ("SELECT s.sample_id, s.vector_id, s.image_path, s.image_set FROM samples s"
               " WHERE s.status = 'active' AND NOT EXISTS (SELECT 1 FROM embeddings e"
               "  WHERE e.encoder_id = ? AND e.sample_id = s.sample_id)")
        params: list = [encoder_id]
        if image_set is not None:
            sql += " AND s.sample_id IN (SELECT sample_id FROM sample_sources WHERE image_set = ?)"
            params.append(image_set)
        return to_frame(self.con.execute(sql + " ORDER BY s.vector_id", params))

    def count_not_embedded(self, encoder_id: str | None) -> int:
        return self.con.execute(
            "SELECT count(*) FROM samples s WHERE s.status = 'active' AND NOT EXISTS (SELECT 1 FROM embeddings e"
            " WHERE e.encoder_id = ? AND e.sample_id = s.sample_id)", [encoder_id]).fetchone()[0]

    def not_to_record(self, encoder_id: str, sample_ids: list[str]) -> set[str]:
        """Of these, the samples no longer active (forgotten meanwhile) or already embedded."""
        return {sid for (sid,) in self.con.execute(
            f"SELECT sample_id FROM samples WHERE status <> 'active' AND sample_id {_IN}"
            f" UNION SELECT sample_id FROM embeddings WHERE encoder_id = ? AND sample_id {_IN}",
            [sample_ids, encoder_id, sample_ids]).fetchall()}

    def record_embeddings(self, encoder_id: str, sample_ids: list[str], path: str) -> None:
        """The rows naming one embedding part file (`path`, relative to the home)."""
        insert_rows(self.con, "embeddings", {
            "encoder_id": ("VARCHAR", [encoder_id] * len(sample_ids)),
            "sample_id": ("VARCHAR", sample_ids),
            "path": ("VARCHAR", [path] * len(sample_ids)),
        }, embedded_at="now()")

    def embedded_active(self, encoder_id: str) -> pl.DataFrame:
        """(vector_id, path) of the memory's vectors, in vector id (arrival) order: a rebuild then
        keeps each image set together in its shard, so forgetting a set rewrites one or two."""
        return to_frame(self.con.execute(_EMBEDDED_ACTIVE.format("s.vector_id, e.path") + " ORDER BY s.vector_id",
                                         [encoder_id]))

    def embedded_active_ids(self, encoder_id: str | None) -> np.ndarray:
        """Vector ids of the memory's vectors, as numpy (an add must not read the whole ledger)."""
        found = self.con.execute(_EMBEDDED_ACTIVE.format("s.vector_id"), [encoder_id]).fetchnumpy()["vector_id"]
        return np.asarray(found, np.int64)

    def count_embedded_active(self, encoder_id: str | None) -> int:
        return self.con.execute(_EMBEDDED_ACTIVE.format("count(*)"), [encoder_id]).fetchone()[0]

    def sample_ids_of(self, vector_ids: np.ndarray) -> list[str]:
        """The sample id of each vector id, in the order given (a shard is chosen by it)."""
        vector_ids = np.asarray(vector_ids, np.int64)
        found = self.con.execute("SELECT vector_id, sample_id FROM samples WHERE vector_id IN"
                                 " (SELECT unnest(?::BIGINT[]))", [vector_ids.tolist()]).fetchnumpy()
        known = dict(zip(np.asarray(found["vector_id"], np.int64).tolist(), list(found["sample_id"])))
        missing = [int(v) for v in vector_ids if int(v) not in known]
        if missing:
            raise KeyError(f"no sample has vector id {missing[:5]}")
        return [known[int(v)] for v in vector_ids]

    def embedding_paths(self, encoder_id: str, vector_ids: np.ndarray) -> list[str]:
        """The part files holding these active vectors."""
        return [p for (p,) in self.con.execute(
            _EMBEDDED_ACTIVE.format("DISTINCT e.path") + " AND s.vector_id IN (SELECT unnest(?::BIGINT[]))",
            [encoder_id, np.asarray(vector_ids).tolist()]).fetchall()]

    def embedding_files(self, encoder_id: str, image_set: str | None = None) -> list[str]:
        """Part files with rows of this encoder (optionally of samples that arrived in one set)."""
        sql = "SELECT DISTINCT e.path FROM embeddings e WHERE e.encoder_id = ?"
        params: list = [encoder_id]
        if image_set is not None:
            sql += " AND e.sample_id IN (SELECT sample_id FROM sample_sources WHERE image_set = ?)"
            params.append(image_set)
        return [p for (p,) in self.con.execute(sql + " ORDER BY 1", params).fetchall()]

    # ---- what the memory holds ---------------------------------------------------------------

    def count_active_among(self, sample_ids: list[str]) -> int:
        return self.con.execute(f"SELECT count(*) FROM samples WHERE status = 'active' AND sample_id {_IN}",
                                [sample_ids]).fetchone()[0]

    def active_labels(self) -> set[str]:
        return {label for (label,) in self.con.execute(
            "SELECT DISTINCT label FROM samples WHERE status = 'active'").fetchall()}

    def count_by_status(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT status, count(*) FROM samples GROUP BY status ORDER BY status").fetchall())

    def count_by_label(self) -> dict[str, int]:
        """Active samples per label."""
        return dict(self.con.execute("SELECT label, count(*) FROM samples WHERE status = 'active'"
                                     " GROUP BY label ORDER BY label").fetchall())

    def count_image_sets(self) -> int:
        return self.con.execute("SELECT count(*) FROM image_sets").fetchone()[0]
