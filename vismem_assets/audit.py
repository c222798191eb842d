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

from . import erasure, store
from .forgetting import HASHED_FIELDS, row_hash
from .index_store import GENESIS


@dataclass
class AuditReport:
    chain_rows: int = 0
    chain_head: str = GENESIS
    files_checked: dict[str, int] = field(default_factory=dict)
    # What stays after forgetting, by design: each forgotten sample's sha256 and perceptual hash.
    blocklist: dict[str, int] = field(default_factory=dict)
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
    # Whatever any table says was forgotten is looked for on disk, under any vector id it had.
    sample_ids, vector_ids = check_blocklist(memory, report)
    sample_ids = sorted(set(sample_ids) | set(forgotten["sample_id"].to_list()))
    vector_ids = np.union1d(vector_ids, forgotten["vector_id"].drop_nulls().to_numpy().astype(np.int64))
    traces = find_traces(memory, sample_ids, vector_ids, report)
    report.problems += traces
    report.problems += check_crash_leftovers(memory)
    return report


def check_blocklist(memory, report: AuditReport) -> tuple[list[str], np.ndarray]:
    """`deletions`, `samples`, `forget_targets` and `blocklist_phashes` checked against each
    other, so that a hand edit of one (un-forgetting a sample by deleting its row or flipping
    its status) shows. Returns every sample id any of them says was forgotten, and every vector
    id those samples had or have now, for the look at the disk."""
    from .forgetting import SET_QUARANTINE
    from .near_copies import N_BYTES

    problems = report.problems
    with memory.ledger.connect() as con:
        for seq, sid, status in con.execute(
                "SELECT d.seq, d.sample_id, s.status FROM deletions d LEFT JOIN samples s USING (sample_id)"
                " WHERE s.status IS DISTINCT FROM 'forgotten' ORDER BY d.seq").fetchall():
            if status is None:
                problems.append(f"deletions row seq={seq} forgot sample {sid[:16]}…, but `samples` has no row for it: "
                                "the row was deleted by hand (un-forgetting); restore it from a backup (its bytes stay "
                                "blocked meanwhile)")
            else:
                problems.append(f"deletions row seq={seq} forgot sample {sid[:16]}…, but `samples` says its status is "
                                f"{status!r}: it was changed by hand (un-forgetting); set it back to 'forgotten' or "
                                "restore the ledger from a backup")
        for request_id, sid in con.execute(
                "SELECT t.request_id, t.sample_id FROM forget_targets t JOIN forget_requests r USING (request_id)"
                " WHERE r.state = 'applied' AND NOT EXISTS (SELECT 1 FROM deletions d"
                "  WHERE d.request_id = t.request_id AND d.sample_id = t.sample_id) ORDER BY 1, 2").fetchall():
            problems.append(f"forget request {request_id[:12]}… was applied to sample {sid[:16]}…, but no deletions row "
                            "proves it: the row was removed; restore the ledger from a backup")
        for (sid,) in con.execute(
                "SELECT sample_id FROM samples s WHERE status = 'forgotten'"
                " AND NOT EXISTS (SELECT 1 FROM forget_targets t WHERE t.sample_id = s.sample_id) ORDER BY 1").fetchall():
            problems.append(f"sample {sid[:16]}… is marked forgotten but no forget request names it: its status was "
                            "changed by hand; forget it with `vismem forget --sample ID` to purge and prove it")
        ids = [sid for (sid,) in con.execute(
            "SELECT sample_id FROM deletions UNION SELECT sample_id FROM forget_targets"
            " UNION SELECT sample_id FROM samples WHERE status = 'forgotten' ORDER BY 1").fetchall()]
        vector_ids = np.array(sorted({v for (v,) in con.execute(
            "SELECT vector_id FROM forget_targets WHERE vector_id IS NOT NULL UNION SELECT vector_id FROM samples"
            " WHERE vector_id IS NOT NULL AND sample_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()}), np.int64)
        phashes = dict(con.execute("SELECT sample_id, phash FROM blocklist_phashes").fetchall())
        set_names = [(r, name, con.execute("SELECT count(*) FROM quarantine WHERE (name_pos IS NOT NULL"
                                           f" OR stored_path IS NOT NULL) AND {SET_QUARANTINE}", [r]).fetchone()[0])
                     for r, name in con.execute(
                         "SELECT request_id, json_extract_string(target, '$[0]') FROM forget_requests"
                         " WHERE state = 'applied' AND target_kind = 'image_set' ORDER BY 1").fetchall()]
    forgotten = set(ids)
    for sid in ids:
        if sid not in phashes:
            problems.append(f"forgotten sample {sid[:16]}… has no blocklist_phashes row: its perceptual hash was deleted, "
                            "so near-copies of it would be taken back; restore the ledger from a backup")
    for sid, phash in phashes.items():
        if sid not in forgotten:
            problems.append(f"blocklist_phashes holds a perceptual hash of sample {sid[:16]}…, which no forget request "
                            "names: it was added by hand; delete that row")
        elif phash is not None and (len(phash) != 2 * N_BYTES or any(c not in "0123456789abcdef" for c in phash)):
            problems.append(f"the perceptual hash of forgotten sample {sid[:16]}… is not {2 * N_BYTES} hex digits: it was "
                            "changed by hand; restore the ledger from a backup")
    for request_id, image_set, n in set_names:
        if n:
            problems.append(f"{n} quarantine row(s) of image set {image_set!r}, forgotten by request {request_id[:12]}…, "
                            "still name a file or a stored copy: run `vismem forget --resume` to erase them")
    report.blocklist = {"sample_ids": len(ids), "perceptual_hashes": sum(p is not None for p in phashes.values()),
                        "without_perceptual_hash": sum(p is None for p in phashes.values())}
    return ids, vector_ids


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
        # Every file under images/ and quarantine/, hidden and staged ones too: a sample id
        # anywhere in its name, or, for a file not named the store's way (the `.<name>.tmp` of a
        # killed write), its bytes hashing to one (an id is the sha256 of the image bytes).
        for folder in (memory.layout.images, memory.layout.quarantine):
            for path in store.walk(folder):
                counts["image_files"] += 1
                sid = store.holds_sample(path, wanted)
                if sid:
                    problems.append(f"{memory.layout.relative(path)} is the image of a forgotten sample" + (
                        f" ({sid[:16]}…){_LEFTOVER_FIX}" if store.is_leftover_name(path.name) else ""))
        # A killed embedding write's temp part holds sample ids and vectors.
        for path in store.embedding_leftovers(memory.layout):
            counts["embedding_files"] += 1
            sid = store.mentions(path, wanted)
            if sid:
                problems.append(f"{memory.layout.relative(path)} (left by a killed write) holds forgotten sample "
                                f"{sid[:16]}…: delete it")
    if report is not None:
        report.files_checked.update(counts)
    return problems


_LEFTOVER_FIX = ", left by a crashed write: `vismem rebuild` removes it"


def check_crash_leftovers(memory) -> list[str]:
    """What a crash or kill -9 left half done: active samples never embedded or missing from the
    live index, files in the image store that no ledger row names (a dead ingest's, a killed
    write's temp file), and staging folders of dead ingests."""
    problems = []
    try:
        pending = memory.pending(exact=True)
    except Exception as exc:  # an index file missing or unreadable: reported, the audit goes on
        problems.append(f"the live index could not be read to compare with the ledger ({exc}): run `vismem rebuild`")
    else:
        if pending["not_embedded"] or pending["not_indexed"]:
            problems.append(
                f"{pending['not_embedded'] + pending['not_indexed']} active sample(s) are missing from the live index"
                f" ({pending['not_embedded']} never embedded, {pending['not_indexed']} embedded but not indexed: an add"
                " was killed or crashed): run `vismem rebuild` (or the next `vismem add`) to embed and index them")
    with memory.ledger.connect() as con:  # under the ledger lock: no ingest is between its moves and its commit
        unnamed = store.unnamed_files(memory.layout, con)
        forgotten = {s for (s,) in con.execute("SELECT sample_id FROM samples WHERE status = 'forgotten'").fetchall()}
    problems += [f"{memory.layout.relative(p)} is in the image store but no ledger row names it{_LEFTOVER_FIX}"
                 for p in unnamed if not store.holds_sample(p, forgotten)]  # (those are reported as traces)
    problems += [f"{memory.layout.relative(f)} is the staging folder of an add that died: the next `vismem add` "
                 "(or `vismem rebuild`) removes it" for f in store.dead_folders(memory.layout)]
    return problems


def proof(memory, sample_id: str) -> dict:
    """Everything an auditor asks about one sample, and a fresh look at the disk."""
    rows = memory.ledger.run_named("proof_of_forgetting", {"sample_id": sample_id})
    if rows.is_empty():
        raise ValueError(f"the memory never held sample {sample_id}; give a sample id (sha256) or the image file")
    first = rows.row(0, named=True)
    vector_id = memory.ledger.query("SELECT vector_id FROM samples WHERE sample_id = ?", [sample_id])["vector_id"][0]
    traces = find_traces(memory, [sample_id], np.array([vector_id] if vector_id is not None else [], np.int64))
    # What is kept on purpose: the sha256 (the sample id) and, for an image, its perceptual hash.
    kept = memory.ledger.query("SELECT phash AS perceptual_hash, algorithm, note FROM blocklist_phashes"
                               " WHERE sample_id = ?", [sample_id]).to_dicts()
    return {"sample_id": sample_id, "label": first["label"], "status": first["status"],
            "blocklist": {"sha256": sample_id, **kept[0]} if kept else None,
            "arrived_at": first["arrived_at"], "arrived_with": first["arrived_with"],
            "requests": rows.drop("sample_id", "label", "status", "arrived_at", "arrived_with").to_dicts()
            if first["request_id"] else [],
            "present_nowhere": first["status"] == "forgotten" and not traces, "traces": traces}
