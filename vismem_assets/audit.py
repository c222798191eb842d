"""Audit: is the deletions chain intact, and is every forgotten sample really gone?

Both checks read what is on disk — the ledger's rows, every index file with plain
`faiss.read_index`, every parquet file, the image store — rather than trusting the ledger's
own account of what it did. The `Audit` service gets the memory's layout and ledger, and a
callable for what the live index lacks (Memory.pending), nothing else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import polars as pl

from . import erasure, store
from .forgetting import HASHED_FIELDS, row_hash
from .home import Layout
from .index_store import GENESIS, IndexVersion, recorded_hash_lists, verify_file
from .ledger import LedgerBase
from .near_copies import N_BYTES


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


def check_chain(rows: pl.DataFrame, report: AuditReport) -> None:
    """Each deletions row follows the one before it (seq, prev_hash) and hashes to its row_hash."""
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


class Audit:
    def __init__(self, layout: Layout, ledger: LedgerBase, pending: Callable[[], dict]):
        """`pending()`: what the live index lacks, read exactly (Memory.pending(exact=True)): a dict
        with `not_embedded` and `not_indexed` counts; it may raise when the index is unreadable."""
        self.layout, self.ledger, self.pending = layout, ledger, pending

    def verify(self) -> AuditReport:
        report = AuditReport()
        with self.ledger.connect() as s:
            rows = s.audit.deletions(HASHED_FIELDS)
            forgotten = s.audit.forgotten_samples()
            pending = s.audit.pending_requests()
            twice = s.audit.embedded_twice()
            names_end, names = s.forgetting.names_end(), self.ledger.names.path
        check_chain(rows, report)
        self.check_manifests(rows, report)
        self.check_index_files(report)
        report.problems += [f"sample {sid[:16]}… has {len(paths)} embeddings rows for encoder {encoder} ({', '.join(paths)})"
                            ": each is recorded once, so a hand edit or a bug wrote the others; delete all but one of"
                            " them from `embeddings`, then run `vismem rebuild`" for encoder, sid, paths in twice]
        report.problems += [f"forget request {r} is still pending (accepted, purge unfinished): run `vismem forget --resume`"
                            for r in pending]
        named = forgotten.filter(pl.col("named") | pl.col("image_path").is_not_null())
        if names.stat().st_size < names_end:
            report.problems.append(f"{names.name} ends at byte {names.stat().st_size}, before the file names the ledger"
                                   f" refers to (up to byte {names_end}): it was truncated or replaced; restore it from a backup")
        report.problems += [f"forgotten sample {s[:16]}… still has its file name or path in the ledger" for s in named["sample_id"]]
        # Whatever any table says was forgotten is looked for on disk, under any vector id it had.
        sample_ids, vector_ids = self.check_blocklist(report)
        sample_ids = sorted(set(sample_ids) | set(forgotten["sample_id"].to_list()))
        vector_ids = np.union1d(vector_ids, forgotten["vector_id"].drop_nulls().to_numpy().astype(np.int64))
        traces = self.find_traces(sample_ids, vector_ids, report)
        report.problems += traces
        report.problems += self.check_crash_leftovers()
        return report

    def check_blocklist(self, report: AuditReport) -> tuple[list[str], np.ndarray]:
        """`deletions`, `samples`, `forget_targets` and `blocklist_phashes` checked against each
        other, so that a hand edit of one (un-forgetting a sample by deleting its row or flipping
        its status) shows. Returns every sample id any of them says was forgotten, and every vector
        id those samples had or have now, for the look at the disk."""
        problems = report.problems
        with self.ledger.connect() as s:
            for seq, sid, status in s.audit.deletions_not_forgotten():
                if status is None:
                    problems.append(f"deletions row seq={seq} forgot sample {sid[:16]}…, but `samples` has no row for it: "
                                    "the row was deleted by hand (un-forgetting); restore it from a backup (its bytes stay "
                                    "blocked meanwhile)")
                else:
                    problems.append(f"deletions row seq={seq} forgot sample {sid[:16]}…, but `samples` says its status is "
                                    f"{status!r}: it was changed by hand (un-forgetting); set it back to 'forgotten' or "
                                    "restore the ledger from a backup")
            for request_id, sid in s.audit.applied_targets_without_proof():
                problems.append(f"forget request {request_id[:12]}… was applied to sample {sid[:16]}…, but no deletions "
                                "row proves it: the row was removed; restore the ledger from a backup")
            for sid in s.audit.forgotten_without_request():
                problems.append(f"sample {sid[:16]}… is marked forgotten but no forget request names it: its status was "
                                "changed by hand; forget it with `vismem forget --sample ID` to purge and prove it")
            ids = s.audit.said_forgotten()
            vector_ids = s.audit.vector_ids_of(ids)
            phashes = s.audit.perceptual_hashes()
            set_names = s.audit.set_quarantine_left_named()
        forgotten = set(ids)
        for sid in ids:
            if sid not in phashes:
                problems.append(f"forgotten sample {sid[:16]}… has no blocklist_phashes row: its perceptual hash was "
                                "deleted, so near-copies of it would be taken back; restore the ledger from a backup")
        for sid, phash in phashes.items():
            if sid not in forgotten:
                problems.append(f"blocklist_phashes holds a perceptual hash of sample {sid[:16]}…, which no forget "
                                "request names: it was added by hand; delete that row")
            elif phash is not None and (len(phash) != 2 * N_BYTES or any(c not in "0123456789abcdef" for c in phash)):
                problems.append(f"the perceptual hash of forgotten sample {sid[:16]}… is not {2 * N_BYTES} hex digits: "
                                "it was changed by hand; restore the ledger from a backup")
        for request_id, image_set, n in set_names:
            if n:
                problems.append(f"{n} quarantine row(s) of image set {image_set!r}, forgotten by request "
                                f"{request_id[:12]}…, still name a file or a stored copy: run `vismem forget --resume` "
                                "to erase them")
        report.blocklist = {"sample_ids": len(ids), "perceptual_hashes": sum(p is not None for p in phashes.values()),
                            "without_perceptual_hash": sum(p is None for p in phashes.values())}
        return ids, vector_ids

    def check_manifests(self, rows: pl.DataFrame, report: AuditReport) -> None:
        """Every index manifest names a chain head; the chain must still reach it (no truncation)."""
        hashes = rows["row_hash"].to_list()
        manifests = sorted(self.layout.root.glob("indexes/*/**/*.json"))
        report.files_checked["manifests"] = len(manifests)
        for path in manifests:
            body = json.loads(path.read_text())
            n, head = int(body.get("n_deletions", 0)), body.get("chain_head", GENESIS)
            if n > len(hashes):
                report.problems.append(f"{self.layout.relative(path)} records {n} deletions (head {head[:12]}…) but "
                                       f"the ledger holds {len(hashes)}: the chain was truncated")
            elif (hashes[n - 1] if n else GENESIS) != head:
                report.problems.append(f"{self.layout.relative(path)}: chain head {head[:12]}… is not deletions row "
                                       f"seq={n}: the chain was rewritten")

    def check_index_files(self, report: AuditReport) -> None:
        """Every file of every index version kept (live and retained), every block of it, against
        the digest and hash list the ledger recorded (digests.py)."""
        with self.ledger.connect() as s:
            versions = [IndexVersion.from_row(row) for row in s.indexes.kept_versions()]
            files = {f.path: f for v in versions for f in v.files}
            lists = recorded_hash_lists(s, files.values())
            unfinished = s.indexes.unfinished_forget_ids()
        for relative, file in sorted(files.items()):
            path = self.layout.absolute(relative)
            problem = verify_file(path, file, lists.get(relative), unfinished)[0] if path.is_file() else "is missing"
            if problem:
                report.problems.append(f"index file {relative} {problem}: it was changed or damaged; run `vismem "
                                       "rebuild` to write a fresh version from the ledger and embeddings")
        report.files_checked["index_digests"] = len(files)

    def find_traces(self, sample_ids: list[str], vector_ids: np.ndarray, report: AuditReport | None = None) -> list[str]:
        """Where do these samples still exist? Every index file, embedding file and stored image.
        A hole a forget left in a file (id -1) must hold no bytes of what was there either."""
        layout = self.layout
        problems = []
        counts = {"index_files": 0, "embedding_files": 0, "image_files": 0}
        if len(vector_ids):
            for path in sorted(layout.root.glob("indexes/*/**/*.faiss")):
                counts["index_files"] += 1
                found = erasure.index_holes(path, vector_ids, holes_too=True)
                held = np.intersect1d(found.vector_ids, vector_ids)
                if len(held):
                    problems.append(f"{layout.relative(path)} holds {len(held)} forgotten vector(s), e.g. id {held[0]}")
                elif not erasure.applied(path, found):
                    problems.append(f"{layout.relative(path)} has holes whose bytes were not erased")
        wanted = set(sample_ids)
        if wanted:
            for path in sorted(layout.root.glob("embeddings/**/*.parquet")):
                counts["embedding_files"] += 1
                part = pl.read_parquet(path)
                if "vector_id" not in part.columns:  # the cache of query embeddings
                    part = part.with_columns(vector_id=pl.lit(None, pl.Int64))
                held = part.filter(pl.col("sample_id").is_in(list(wanted)) | pl.col("vector_id").is_in(vector_ids.tolist()))
                holes = part.filter(pl.col("vector_id") == erasure.HOLE_ID)
                if len(held):
                    problems.append(f"{layout.relative(path)} holds {len(held)} forgotten embedding(s)")
                elif len(holes) and (holes["vector"].to_numpy().any() or (holes["sample_id"] != "0" * 64).any()):
                    problems.append(f"{layout.relative(path)} has erased rows that still hold a vector or sample id")
            # Every file under images/ and quarantine/, hidden and staged ones too: a sample id
            # anywhere in its name, or, for a file not named the store's way (the `.<name>.tmp` of a
            # killed write), its bytes hashing to one (an id is the sha256 of the image bytes).
            for folder in (layout.images, layout.quarantine):
                for path in store.walk(folder):
                    counts["image_files"] += 1
                    sid = store.holds_sample(path, wanted)
                    if sid:
                        problems.append(f"{layout.relative(path)} is the image of a forgotten sample" + (
                            f" ({sid[:16]}…){_LEFTOVER_FIX}" if store.is_leftover_name(path.name) else ""))
            # A killed embedding write's temp part holds sample ids and vectors.
            for path in store.embedding_leftovers(layout):
                counts["embedding_files"] += 1
                sid = store.mentions(path, wanted)
                if sid:
                    problems.append(f"{layout.relative(path)} (left by a killed write) holds forgotten sample "
                                    f"{sid[:16]}…: delete it")
        if report is not None:
            report.files_checked.update(counts)
        return problems

    def check_crash_leftovers(self) -> list[str]:
        """What a crash or kill -9 left half done: active samples never embedded or missing from the
        live index, files in the image store that no ledger row names (a dead ingest's, a killed
        write's temp file), and staging folders of dead ingests."""
        problems = []
        try:
            pending = self.pending()
        except Exception as exc:  # an index file missing or unreadable: reported, the audit goes on
            problems.append(f"the live index could not be read to compare with the ledger ({exc}): run `vismem rebuild`")
        else:
            if pending["not_embedded"] or pending["not_indexed"]:
                problems.append(
                    f"{pending['not_embedded'] + pending['not_indexed']} active sample(s) are missing from the live index"
                    f" ({pending['not_embedded']} never embedded, {pending['not_indexed']} embedded but not indexed: an"
                    " add was killed or crashed): run `vismem rebuild` (or the next `vismem add`) to embed and index them")
        with self.ledger.connect() as s:  # under the ledger lock: no ingest is between its moves and its commit
            unnamed = store.unnamed_files(self.layout, s)
            forgotten = s.audit.forgotten_ids()
        problems += [f"{self.layout.relative(p)} is in the image store but no ledger row names it{_LEFTOVER_FIX}"
                     for p in unnamed if not store.holds_sample(p, forgotten)]  # (those are reported as traces)
        problems += [f"{self.layout.relative(f)} is the staging folder of an add that died: the next `vismem add` "
                     "(or `vismem rebuild`) removes it" for f in store.dead_folders(self.layout)]
        return problems

    def proof(self, sample_id: str) -> dict:
        """Everything an auditor asks about one sample, and a fresh look at the disk."""
        rows = self.ledger.run_named("proof_of_forgetting", {"sample_id": sample_id})
        if rows.is_empty():
            raise ValueError(f"the memory never held sample {sample_id}; give a sample id (sha256) or the image file")
        first = rows.row(0, named=True)
        with self.ledger.connect() as s:
            vector_id = s.audit.vector_id_of(sample_id)
            # What is kept on purpose: the sha256 (the sample id) and, for an image, its perceptual hash.
            kept = s.audit.blocklist_entry(sample_id)
        traces = self.find_traces([sample_id], np.array([vector_id] if vector_id is not None else [], np.int64))
        return {"sample_id": sample_id, "label": first["label"], "status": first["status"],
                "blocklist": {"sha256": sample_id, **kept} if kept else None,
                "arrived_at": first["arrived_at"], "arrived_with": first["arrived_with"],
                "requests": rows.drop("sample_id", "label", "status", "arrived_at", "arrived_with").to_dicts()
                if first["request_id"] else [],
                "present_nowhere": first["status"] == "forgotten" and not traces, "traces": traces}


_LEFTOVER_FIX = ", left by a crashed write: `vismem rebuild` removes it"
