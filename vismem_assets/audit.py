"""Audit: is the deletions chain intact, and is every forgotten sample really gone?

Both checks read what is on disk — the ledger's rows, every index file with plain
`faiss.read_index`, every parquet file, the image store — rather than trusting the ledger's
own account of what it did.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from . import erasure
from .forgetting import HASHED_FIELDS, row_hash
from .index_store import GENESIS


@dataclass
class AuditReport:
    chain_rows: int = 0
    chain_head: str = GENESIS
    files_checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def verify(memory) -> AuditReport:
    report = AuditReport()
    rows = memory.ledger.query(f"SELECT {', '.join(HASHED_FIELDS)}, prev_hash, row_hash FROM deletions ORDER BY seq")
    check_chain(rows, report)
    check_manifests(memory, rows, report)
    forgotten = memory.ledger.query(
        "SELECT sample_id, vector_id, image_path, name_pos IS NOT NULL OR EXISTS (SELECT 1 FROM sample_sources src"
        " WHERE src.sample_id = s.sample_id AND src.name_pos IS NOT NULL) OR EXISTS (SELECT 1 FROM quarantine q"
        " WHERE q.sample_id = s.sample_id AND q.name_pos IS NOT NULL) AS named FROM samples s WHERE status = 'forgotten'")
    report.problems += [f"forget request {r} is still pending (accepted, purge unfinished): run `vismem forget --resume`"
                        for r in memory.ledger.query("SELECT request_id FROM forget_requests WHERE state = 'pending'")["request_id"]]
    named = forgotten.filter(pl.col("named") | pl.col("image_path").is_not_null())
    with memory.ledger.connect() as con:
        names_end, names = memory.ledger.names.end(con), memory.ledger.names.path
    if names.stat().st_size < names_end:
        report.problems.append(f"{names.name} ends at byte {names.stat().st_size}, before the file names the ledger"
                               f" refers to (up to byte {names_end}): it was truncated or replaced; restore it from a backup")
    report.problems += [f"forgotten sample {s[:16]}… still has its file name or path in the ledger" for s in named["sample_id"]]
    traces = find_traces(memory, forgotten["sample_id"].to_list(), forgotten["vector_id"].drop_nulls().to_numpy(), report)
    report.problems += traces
    return report


def check_chain(rows: pl.DataFrame, report: AuditReport) -> None:
    prev, prev_seq = GENESIS, 0
    for row in rows.iter_rows(named=True):
        where = f"deletions row seq={row['seq']} (request {row['request_id'][:12]}…, sample {row['sample_id'][:12]}…)"
        if row["seq"] != prev_seq + 1:
            report.problems.append(f"{where}: follows seq={prev_seq}: row(s) between were deleted or reordered")
        prev_seq = row["seq"]
        if row["prev_hash"] != prev:
            report.problems.append(f"{where}: prev_hash does not match the row before it: a row was deleted or reordered")
        if row_hash(row["prev_hash"], row) != row["row_hash"]:
            report.problems.append(f"{where}: row_hash does not match its content: the row was changed")
        prev = row["row_hash"]
    report.chain_rows, report.chain_head = len(rows), prev


def check_manifests(memory, rows: pl.DataFrame, report: AuditReport) -> None:
    """Every index manifest names a chain head; the chain must still reach it (no truncation)."""
    hashes = rows["row_hash"].to_list()
    manifests = sorted(memory.layout.root.glob("indexes/*/*.json"))
    report.files_checked["manifests"] = len(manifests)
    for path in manifests:
        body = json.loads(path.read_text())
        n, head = int(body.get("n_deletions", 0)), body.get("chain_head", GENESIS)
        if n > len(hashes):
            report.problems.append(f"{memory.layout.relative(path)} records {n} deletions (head {head[:12]}…) but the "
                                   f"ledger holds {len(hashes)}: the chain was truncated")
        elif (hashes[n - 1] if n else GENESIS) != head:
            report.problems.append(f"{memory.layout.relative(path)}: chain head {head[:12]}… is not deletions row "
                                   f"seq={n}: the chain was rewritten")


def find_traces(memory, sample_ids: list[str], vector_ids: np.ndarray, report: AuditReport | None = None) -> list[str]:
    """Where do these samples still exist? Every index file, embedding file and stored image.
    A hole a forget left in a file (id -1) must hold no bytes of what was there either."""
    problems = []
    counts = {"index_files": 0, "embedding_files": 0, "image_files": 0}
    root = memory.layout.root
    if len(vector_ids):
        for path in sorted(root.glob("indexes/*/*.faiss")):
            counts["index_files"] += 1
            found = erasure.index_holes(path, vector_ids, holes_too=True)
            held = np.intersect1d(found.vector_ids, vector_ids)
            if len(held):
                problems.append(f"{memory.layout.relative(path)} holds {len(held)} forgotten vector(s), e.g. id {held[0]}")
            elif not erasure.applied(path, found):
                problems.append(f"{memory.layout.relative(path)} has holes whose bytes were not erased")
    wanted = set(sample_ids)
    if wanted:
        for path in sorted(root.glob("embeddings/**/*.parquet")):
            counts["embedding_files"] += 1
            part = pl.read_parquet(path)
            if "vector_id" not in part.columns:  # the cache of query embeddings
                part = part.with_columns(vector_id=pl.lit(None, pl.Int64))
            held = part.filter(pl.col("sample_id").is_in(list(wanted)) | pl.col("vector_id").is_in(vector_ids.tolist()))
            holes = part.filter(pl.col("vector_id") == erasure.HOLE_ID)
            if len(held):
                problems.append(f"{memory.layout.relative(path)} holds {len(held)} forgotten embedding(s)")
            elif len(holes) and (holes["vector"].to_numpy().any() or (holes["sample_id"] != "0" * 64).any()):
                problems.append(f"{memory.layout.relative(path)} has erased rows that still hold a vector or sample id")
        for folder in (memory.layout.images, memory.layout.quarantine):
            for path in folder.rglob("*"):
                counts["image_files"] += 1
                if path.is_file() and path.name.split(".")[0] in wanted:
                    problems.append(f"{memory.layout.relative(path)} is the image of a forgotten sample")
    if report is not None:
        report.files_checked.update(counts)
    return problems


def proof(memory, sample_id: str) -> dict:
    """Everything an auditor asks about one sample, and a fresh look at the disk."""
    rows = memory.ledger.run_named("proof_of_forgetting", {"sample_id": sample_id})
    if rows.is_empty():
        raise ValueError(f"the memory never held sample {sample_id}; give a sample id (sha256) or the image file")
    first = rows.row(0, named=True)
    vector_id = memory.ledger.query("SELECT vector_id FROM samples WHERE sample_id = ?", [sample_id])["vector_id"][0]
    traces = find_traces(memory, [sample_id], np.array([vector_id] if vector_id is not None else [], np.int64))
    return {"sample_id": sample_id, "label": first["label"], "status": first["status"],
            "arrived_at": first["arrived_at"], "arrived_with": first["arrived_with"],
            "requests": rows.drop("sample_id", "label", "status", "arrived_at", "arrived_with").to_dicts()
            if first["request_id"] else [],
            "present_nowhere": first["status"] == "forgotten" and not traces, "traces": traces}
