"""Forgetting with proof.

A request is accepted in one transaction (its samples become 'forgotten', so their hashes
are blocked at once), then every trace is removed — erased in place from every index file of
the live and retained versions (the live index moving to a new version) and from every
embedding part (erasure.py), images, quarantine copies, pruning weights — and only then are the
hash-chained `deletions` rows written and the request marked applied. A crash anywhere leaves
the request 'pending'; running it again (or `apply_pending`) finishes it, since each step is
idempotent. Finally the ledger file itself is rewritten, because DuckDB keeps old bytes (a
redacted file name) in its file after an UPDATE or DELETE.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from . import erasure, near_copies, store
from .atomic import atomic_path
from .embeddings import write_part
from .index_store import GENESIS, IndexStore
from .ledger import insert_rows, to_frame

CATEGORIES = ("gdpr", "license", "quality", "bias", "other")
NO_LABEL = "(no label)"   # per_label's key for quarantined files that arrived without a label
REQUEST_EXAMPLE = '{"label": "Bag", "requested_by": "dpo@example.com", "reason": "licence withdrawn", "category": "gdpr"}'


class ForgetError(ValueError):
    """A request that cannot be applied as asked: nothing was changed."""


@dataclass
class ForgetRequest:
    requested_by: str
    reason: str
    sample_ids: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)       # files: forgotten by their content hash
    label: str | None = None
    image_set: str | None = None
    category: str | None = None
    external_ref: str | None = None

    def validate(self) -> None:
        kinds = [k for k, v in (("sample", self.sample_ids), ("image", self.images), ("label", self.label),
                                ("image_set", self.image_set)) if v]
        if len(kinds) != 1:
            raise ForgetError("say what to forget with exactly one of: sample ids, image files, a label, an image set")
        if not (self.requested_by or "").strip():
            raise ForgetError("a forget request needs requested_by (who asked)")
        if not (self.reason or "").strip():
            raise ForgetError("a forget request needs a reason")
        if self.category and self.category not in CATEGORIES:
            raise ForgetError(f"unknown category {self.category!r}; use one of {', '.join(CATEGORIES)}")

    @property
    def target_kind(self) -> str:
        return "sample" if self.sample_ids else "image" if self.images else "label" if self.label else "image_set"

    def target(self) -> list[str]:
        return {"sample": sorted(self.sample_ids), "image": [image_hash(p) for p in self.images],
                "label": [self.label], "image_set": [self.image_set]}[self.target_kind]

    @property
    def request_id(self) -> str:
        """The same request (same target, requester and reason) has the same id: applied once."""
        body = [self.target_kind, self.target(), self.requested_by, self.reason, self.category, self.external_ref]
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> "ForgetRequest":
        """A request from JSON (an inbox file): every problem is a ForgetError that says what to fix,
        never a TypeError (a missing field, a list given as a string, a number as a label)."""
        if not isinstance(data, dict):
            raise ForgetError(f"a forget request is a JSON object, such as {REQUEST_EXAMPLE}; not a {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ForgetError(f"unknown field(s) {sorted(unknown)} in forget request; known: {sorted(known)}")
        missing = [f for f in ("requested_by", "reason") if f not in data]
        if missing:
            raise ForgetError(f"a forget request needs {' and '.join(missing)} (who asked, and why); "
                              f"for example {REQUEST_EXAMPLE}")
        for name, value in data.items():
            lists = name in ("sample_ids", "images")
            ok = value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value) if lists
                                   else isinstance(value, str))
            if not ok:
                raise ForgetError(f"field {name!r} must be {'a list of strings' if lists else 'a string'}, "
                                  f"not {json.dumps(value)[:60]}")
        return cls(**{k: (v if v is not None or k not in ("sample_ids", "images") else []) for k, v in data.items()})


@dataclass
class ForgetReport:
    request_id: str
    dry_run: bool
    samples: list[dict]                      # sample_id, label, image_set, status
    already_applied: bool = False
    index_versions: list[str] = field(default_factory=list)   # new live versions, "slug:version"
    versions_rewritten: list[str] = field(default_factory=list)
    files_removed: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step (see apply_pending)

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def per_label(self) -> dict[str, int]:
        """Samples per label; a quarantined file that came without one counts as NO_LABEL."""
        out: dict[str, int] = {}
        for s in self.samples:
            label = NO_LABEL if s["label"] is None else s["label"]
            out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {**asdict(self), "n_samples": self.n_samples, "per_label": self.per_label()}


def image_hash(path: str | Path) -> str:
    """The sha256 of a file's bytes, read as ingest reads them: a regular file of at most
    MAX_BYTES (a FIFO would block, /dev/zero never ends; neither could be a stored image)."""
    from .imagesets import read_bounded

    try:
        return hashlib.sha256(read_bounded(path)).hexdigest()
    except OSError as exc:  # RefusedFile (not a regular file, too large) says why in its text
        raise ForgetError(f"cannot read {path} to find its content hash: {exc.strerror or exc}") from exc


def resolve(memory, request: ForgetRequest) -> pl.DataFrame:
    """The samples a request names, or a clear error if it names something the memory never had."""
    request.validate()
    q = memory.ledger.query
    kind, target = request.target_kind, request.target()
    columns = "SELECT sample_id, vector_id, label, image_set, status FROM samples"
    if kind in ("sample", "image"):
        found = q(f"{columns} WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [target])
        missing = sorted(set(target) - set(found["sample_id"]))
        if missing:
            what = "sample id" if kind == "sample" else "image (by content hash)"
            names = missing if kind == "sample" else [p for p in request.images if image_hash(p) in missing]
            raise ForgetError(f"unknown {what}: {', '.join(map(str, names[:5]))}"
                              f"{' …' if len(names) > 5 else ''}; nothing was changed")
        return found
    if kind == "label":
        found = q(f"{columns} WHERE label = ?", [request.label])
        if found.is_empty():
            labels = q("SELECT DISTINCT label FROM samples WHERE status = 'active' AND label IS NOT NULL"
                       " ORDER BY 1")["label"].to_list()
            raise ForgetError(f"no sample has label {request.label!r} (labels: {', '.join(labels) or 'none yet'}); "
                              f"nothing was changed{_did_you_mean(request.label, labels)}")
        return found
    # Quarantined files of the set count too: their bytes sit in quarantine/ and their names in the ledger.
    found = q(f"{columns} WHERE image_set = ? OR sample_id IN (SELECT sample_id FROM sample_sources WHERE image_set = ?"
              " UNION SELECT sample_id FROM quarantine WHERE image_set = ?)", [request.image_set] * 3)
    if found.is_empty():
        raise ForgetError(f"unknown image set {request.image_set!r}; nothing was changed")
    return found


def _did_you_mean(name: str, known: list[str]) -> str:
    """A hint for a typo ('Bgg' -> 'Bag', 'bag' -> 'Bag'), or nothing."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f". Did you mean {by_lower[close[0]]!r}?" if close else ""


def check_request(memory, request: ForgetRequest) -> ForgetReport:
    """What a request would forget, changing nothing (a dry run), or a ForgetError that says what
    to fix: a missing field, a label, set, sample or image the memory never held, or nothing left
    to forget. Run it before launching work that would otherwise fail half-way (a Dagster run)."""
    request.validate()
    report = forget(memory, request, dry_run=True)
    if not report.samples and not report.already_applied:
        raise ForgetError("every sample this request names is already forgotten; nothing to do")
    return report


def forget(memory, request: ForgetRequest, dry_run: bool = False) -> ForgetReport:
    t0 = time.perf_counter()
    found = resolve(memory, request)
    state = memory.ledger.query("SELECT state FROM forget_requests WHERE request_id = ?", [request.request_id])
    if len(state):  # accepted before (a retry after a crash): report what the request itself named
        found = found.filter(pl.col("sample_id").is_in(memory.ledger.query(
            "SELECT sample_id FROM forget_targets WHERE request_id = ?", [request.request_id])["sample_id"].to_list()))
        todo = found
    else:
        todo = found.filter(pl.col("status") != "forgotten")
    report = ForgetReport(request.request_id, dry_run, todo.select("sample_id", "label", "image_set", "status").to_dicts())
    if len(state) and state["state"][0] == "applied":
        report.already_applied = True
        return report
    if dry_run:
        return report
    if todo.is_empty() and not len(state):
        raise ForgetError("every sample this request names is already forgotten; nothing to do")
    # Hashed before the transaction (reading images needs no lock) and before any byte is erased.
    phashes = None if len(state) else _perceptual_hashes(memory, todo["sample_id"].to_list())
    with memory.ledger.transaction() as con:
        if not len(state):
            con.execute(
                "INSERT INTO forget_requests VALUES (?, ?, ?, ?, ?, ?, ?, now(), NULL, 'pending', ?)",
                [request.request_id, request.requested_by, request.reason, request.category, request.external_ref,
                 request.target_kind, json.dumps(request.target()), len(todo)])
            con.execute("INSERT INTO forget_targets SELECT ?, unnest(?::VARCHAR[]), unnest(?::BIGINT[])",
                        [request.request_id, todo["sample_id"].to_list(), todo["vector_id"].to_list()])
            # From here on the hashes are blocked: ingest refuses them, search never returns them.
            con.execute("UPDATE samples SET status = 'forgotten' WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                        [todo["sample_id"].to_list()])
            insert_rows(con, "blocklist_phashes", {
                "sample_id": ("VARCHAR", todo["sample_id"].to_list()),
                "request_id": ("VARCHAR", [request.request_id] * len(todo)),
                "algorithm": ("VARCHAR", [near_copies.ALGORITHM] * len(todo)),
                "phash": ("VARCHAR", phashes[0]),
                "note": ("VARCHAR", phashes[1]),
            }, on_conflict="ON CONFLICT DO NOTHING", created_at="now()")
    accepted = round(time.perf_counter() - t0, 4)
    finished = apply_pending(memory, only=request.request_id)[request.request_id]
    report.index_versions, report.versions_rewritten = finished.index_versions, finished.versions_rewritten
    report.files_removed, report.phases = finished.files_removed, {"accept": accepted, **finished.phases}
    report.seconds = time.perf_counter() - t0
    return report


def _perceptual_hashes(memory, sample_ids: list[str]) -> tuple[list[str | None], list[str]]:
    """(hashes, notes) in the order of `sample_ids`: each one's perceptual hash (near_copies.py),
    from its stored image or its quarantine copy, so that near-copies stay out once the bytes
    are gone; None, with the reason in its note, where there is no picture to hash."""
    from .imagesets import read_bounded

    rows = memory.ledger.query(
        "SELECT s.sample_id, coalesce(s.image_path, (SELECT min(q.stored_path) FROM quarantine q"
        " WHERE q.sample_id = s.sample_id)) AS path FROM samples s WHERE s.sample_id IN (SELECT unnest(?::VARCHAR[]))",
        [sample_ids])
    where = dict(rows.iter_rows())
    hashes, notes = [], []
    for sample_id in sample_ids:
        data = None
        if where.get(sample_id):
            try:
                data = read_bounded(memory.layout.absolute(where[sample_id]))
            except OSError:
                data = None  # (a crash's leftovers may lack it: the note says nothing was hashed)
        phash, note = near_copies.try_hash_bytes(data)
        hashes.append(phash)
        notes.append(note)
    return hashes, notes


@dataclass
class Applied:
    index_versions: list[str]
    versions_rewritten: list[str]
    files_removed: int
    phases: dict[str, float]


def apply_pending(memory, only: str | None = None) -> dict[str, Applied]:
    """Finish accepted requests (all pending ones, or one): purge every trace, then chain the
    proof. Each one's `phases`: seconds erasing in the index files, in the embedding files,
    deleting image files, erasing file names, writing the proof (and the pruning statistics,
    the manifests, the ledger's commit), and marking the request applied. Without `only`, the
    file names a set's forget left behind (before forgetting a set took its quarantined files'
    names too) are erased as well."""
    pending = memory.ledger.query(
        "SELECT request_id FROM forget_requests WHERE state = 'pending'" + (" AND request_id = ?" if only else "")
        + " ORDER BY requested_at", [only] if only else [])
    done = {}
    for request_id in pending["request_id"]:
        clock = _Phases()
        with memory.ledger.connect() as con:  # one writer: nothing else changes the memory meanwhile
            targets = to_frame(con.execute(
                "SELECT t.sample_id, t.vector_id, s.image_path FROM forget_targets t JOIN samples s USING (sample_id)"
                " WHERE t.request_id = ?", [request_id]))
            vector_ids = np.sort(targets["vector_id"].drop_nulls().to_numpy().astype(np.int64))
            new_versions = clock("indexes", _purge_indexes, memory, vector_ids, request_id)
            rewritten = _rewritten_versions(con, request_id)
            removed = clock("embeddings", _purge_embeddings, memory, con, targets)
            removed += clock("image_files", _purge_files, memory, targets)
            clock("names", _erase_names, memory, con, request_id)
            clock("proof", _prove, memory, con, request_id, vector_ids)
        # Applied only now: a crash before this leaves the request pending, and a retry finishes it.
        clock("finish", _mark_applied, memory, request_id)
        done[request_id] = Applied(new_versions, rewritten, removed, clock.seconds)
    if only is None:
        _erase_left_set_names(memory)
    return done


def _erase_left_set_names(memory) -> list[str]:
    """Applied image_set requests whose quarantine rows still name a file (applied by a vismem
    that forgot only the set's samples): their names and copies go now. Returns those requests."""
    with memory.ledger.connect() as con:
        left = [r for (r,) in con.execute("SELECT request_id FROM forget_requests WHERE state = 'applied'"
                                          " AND target_kind = 'image_set' ORDER BY requested_at").fetchall()
                if con.execute("SELECT count(*) FROM quarantine WHERE (name_pos IS NOT NULL OR stored_path IS NOT NULL)"
                               f" AND {SET_QUARANTINE}", [r]).fetchone()[0]]
        for request_id in left:
            _erase_names(memory, con, request_id)  # (its samples' names are erased already: only the set's rows)
            with memory.ledger.transaction():
                con.execute("UPDATE quarantine SET name_pos = NULL, name_len = NULL, stored_path = NULL"
                            f" WHERE {SET_QUARANTINE}", [request_id])
    return left


def _mark_applied(memory, request_id: str) -> None:
    with memory.ledger.transaction() as con:
        con.execute("UPDATE forget_requests SET state = 'applied', applied_at = (SELECT max(applied_at)"
                    " FROM deletions WHERE request_id = ?) WHERE request_id = ?", [request_id, request_id])


class _Phases:
    """Seconds per step, as laps: a step's time runs from where the last one ended, so the
    glue between steps (finding the targets, closing the ledger connection) is counted in the
    step it leads to or finishes, and the steps add up to the whole."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def __call__(self, name: str, fn, *args):
        try:
            return fn(*args)
        finally:
            now = time.perf_counter()
            self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._mark, 4)
            self._mark = now


def _prove(memory, con, request_id: str, vector_ids: np.ndarray) -> None:
    """What is left once every trace is gone: pruning statistics without them, the hash-chained
    deletions rows, and every live version's manifest carrying the new chain head."""
    con.execute("DELETE FROM sample_weights WHERE vector_id IN (SELECT unnest(?::BIGINT[]))", [vector_ids.tolist()])
    memory._index_cache = None
    _forget_in_reliability(memory, con)
    _chain(con, request_id)
    for store in _index_stores(memory, con):  # every version written from now on carries the new head
        live = store.live()
        if live is not None:
            store.refresh_manifest(live, con)


def _forget_in_reliability(memory, con) -> None:
    """Pruning statistics that counted the forgotten samples go: the newest ones are brought to
    the new live version (the forgotten rows removed, their neighbours re-queried), the rest deleted."""
    from . import pruning

    stored = to_frame(con.execute("SELECT encoder_id, index_version, k, path FROM reliability_runs"))
    keep = set()
    if memory.indexes.live() is not None:
        for k in stored.filter(pl.col("encoder_id") == memory.encoder.id)["k"].unique().to_list():
            pruning.reliability(memory, k)
            keep.add((memory.encoder.id, memory.indexes.live().version, k))
    for row in stored.iter_rows(named=True):
        if (row["encoder_id"], row["index_version"], row["k"]) not in keep:
            memory.layout.absolute(row["path"]).unlink(missing_ok=True)
            con.execute("DELETE FROM reliability_runs WHERE encoder_id = ? AND index_version = ? AND k = ?",
                        [row["encoder_id"], row["index_version"], row["k"]])
            con.execute("DELETE FROM reliability WHERE encoder_id = ? AND index_version = ? AND k = ?",
                        [row["encoder_id"], row["index_version"], row["k"]])


def _index_stores(memory, con) -> list[IndexStore]:
    rows = con.execute("SELECT encoder_id, slug, dim FROM encoders ORDER BY encoder_id").fetchall()
    return [IndexStore(memory.layout, memory.ledger, encoder_id, slug, dim, policy=memory.index_policy) for encoder_id, slug, dim in rows]


def _purge_indexes(memory, vector_ids: np.ndarray, request_id: str) -> list[str]:
    """Erase the vectors in place from every index file of every version that holds them;
    returns the new live versions ("slug:version")."""
    new_versions = []
    with memory.ledger.connect() as con:
        for store in _index_stores(memory, con):
            version = store.erase(vector_ids, request_id)
            if version is not None:
                new_versions.append(f"{store.root.name}:{version.version}")
            store.remove_unreferenced_files()
    return new_versions


def _purge_embeddings(memory, con, targets: pl.DataFrame) -> int:
    """Erase the rows in place from each embedding part that holds them (erasure.py), or, for a
    part not laid out for that (written before it), rewrite the part without them. Parts no
    ledger row names (a crash between a rewrite and its record, or after it) go first."""
    sample_ids = targets["sample_id"].to_list()
    vectors = targets.drop_nulls("vector_id").sort("vector_id")  # each vector id with its sample, to check the rows
    vector_ids, their_samples = vectors["vector_id"].to_numpy().astype(np.int64), vectors["sample_id"].to_list()
    referenced = {p for (p,) in con.execute("SELECT DISTINCT path FROM embeddings").fetchall()}
    stray = [p for p in memory.layout.root.glob("embeddings/*/*/part-*.parquet")
             if memory.layout.relative(p) not in referenced]
    for path in stray:  # (parts are written under the ledger lock, which this process holds)
        path.unlink()
    parts = dict(con.execute("SELECT DISTINCT e.path, c.dim FROM embeddings e JOIN encoders c USING (encoder_id)"
                             " WHERE e.sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids]).fetchall())
    present = [p for p in parts if memory.layout.absolute(p).exists()]
    metadata: dict[str, list[dict]] = {}
    if present:  # every footer in one query
        rows = to_frame(con.execute("SELECT * FROM parquet_metadata(?::VARCHAR[])",
                                    [[str(memory.layout.absolute(p)) for p in present]]))
        for row in rows.to_dicts():
            metadata.setdefault(memory.layout.relative(Path(row["file_name"])), []).append(row)
    forgotten = pl.Series(sample_ids, dtype=pl.String)
    moved, erased = {}, {}
    for rel in present:
        path = memory.layout.absolute(rel)
        try:
            erased[path] = erasure.part_holes(path, metadata[rel], vector_ids, their_samples, parts[rel])
        except erasure.LayoutError:
            keep = pl.read_parquet(path).filter(~pl.col("sample_id").is_in(forgotten.implode()))
            moved[rel] = None
            if len(keep):
                new = path.with_name(f"part-{uuid.uuid4().hex[:16]}.parquet")
                with atomic_path(new) as tmp:
                    write_part(keep, tmp)
                moved[rel] = memory.layout.relative(new)
    erasure.apply(erased)
    with memory.ledger.transaction():
        con.execute("DELETE FROM embeddings WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids])
        for old, new in moved.items():
            if new:
                con.execute("UPDATE embeddings SET path = ? WHERE path = ?", [new, old])
    for old in moved:
        memory.layout.absolute(old).unlink(missing_ok=True)
    # Cached query embeddings are vectors too.
    for cache in memory.layout.root.glob("embeddings/*/_queries.parquet"):
        frame = pl.read_parquet(cache)
        keep = frame.filter(~pl.col("sample_id").is_in(forgotten.implode()))
        if len(keep) < len(frame):
            with atomic_path(cache) as tmp:
                write_part(keep, tmp)
    return len(parts) + len(stray)


def _purge_files(memory, targets: pl.DataFrame) -> int:
    """Every file holding a forgotten sample's bytes: its stored image and quarantine copies, and
    what crashed writes left (the `.<name>.tmp` of a killed store write beside it, a dead ingest's
    staged copy, a temp embedding part). A file counts if the sample id is anywhere in its name
    or, for a file not named the store's way, if its bytes hash to it (store.holds_sample). Each
    folder is listed once (a glob per sample compiled a pattern each time: seconds for thousands)."""
    layout = memory.layout
    wanted = set(targets["sample_id"].to_list())
    found = {layout.absolute(p) for p in targets["image_path"].drop_nulls()}
    for folder in {layout.images / sid[:2] for sid in wanted} | {layout.quarantine}:
        found |= {p for p in (folder.iterdir() if folder.is_dir() else ()) if p.is_file() and store.holds_sample(p, wanted)}
    found |= {p for p in store.walk(store.staging_root(layout)) if store.holds_sample(p, wanted)}
    found |= {p for p in store.embedding_leftovers(layout) if store.mentions(p, wanted)}
    removed = 0
    for path in found:
        if path.exists():
            path.unlink()
            removed += 1
    return removed


def _rewritten_versions(con, request_id: str) -> list[str]:
    """Every retained version this request rewrote, in this attempt or one a crash interrupted."""
    return [f"{slug}:{version}" for slug, version in con.execute(
        "SELECT e.slug, r.version FROM index_rewrites r JOIN encoders e USING (encoder_id)"
        " WHERE r.request_id = ? ORDER BY e.slug, r.version", [request_id]).fetchall()]


def _chain(con, request_id: str) -> None:
    """Append the deletions rows (hash-chained; once per request) and redact names."""
    if con.execute("SELECT count(*) FROM deletions WHERE request_id = ?", [request_id]).fetchone()[0]:
        _redact(con, request_id)  # a retry after a crash: the proof is written, finish the rest
        return
    rewritten = _rewritten_versions(con, request_id)
    with_rows = to_frame(con.execute(
        "SELECT t.sample_id, s.label, r.requested_by, r.reason, r.category, r.external_ref, r.requested_at"
        " FROM forget_targets t JOIN samples s USING (sample_id) JOIN forget_requests r USING (request_id)"
        " WHERE t.request_id = ? ORDER BY t.sample_id", [request_id]))
    prev, seq = con.execute("SELECT row_hash, seq FROM deletions ORDER BY seq DESC LIMIT 1").fetchone() or (GENESIS, 0)
    applied_at = con.execute("SELECT now()::TIMESTAMP").fetchone()[0]
    versions = json.dumps(rewritten)
    rows = []
    for row in with_rows.iter_rows(named=True):
        seq += 1
        fields = {"seq": seq, "request_id": request_id, **row, "applied_at": applied_at, "versions_rewritten": versions}
        fields["prev_hash"] = prev
        fields["row_hash"] = prev = row_hash(prev, fields)
        rows.append(fields)
    columns = {"seq": "BIGINT", "request_id": "VARCHAR", "sample_id": "VARCHAR", "label": "VARCHAR",
               "requested_by": "VARCHAR", "reason": "VARCHAR", "category": "VARCHAR", "external_ref": "VARCHAR",
               "requested_at": "TIMESTAMP", "applied_at": "TIMESTAMP", "versions_rewritten": "VARCHAR",
               "prev_hash": "VARCHAR", "row_hash": "VARCHAR"}
    con.begin()
    try:
        insert_rows(con, "deletions", {name: (sqltype, [r[name] for r in rows]) for name, sqltype in columns.items()})
        _redact(con, request_id)
        con.commit()
    except BaseException:
        con.rollback()
        raise


_TARGETS = "SELECT sample_id FROM forget_targets WHERE request_id = ?"
# The quarantine rows of the image set an image_set request forgets, as the set was when the
# request was accepted (none for other requests; a later add of the set brings new files), those
# without a sample id too: a file whose bytes could not be read still left its name.
SET_QUARANTINE = ("EXISTS (SELECT 1 FROM forget_requests r WHERE r.request_id = ? AND r.target_kind = 'image_set'"
                  " AND quarantine.image_set = json_extract_string(r.target, '$[0]')"
                  " AND quarantine.quarantined_at <= r.requested_at)")


def _erase_names(memory, con, request_id: str) -> int:
    """A file name can itself be personal data: its bytes are zeroed in the name file (the
    ledger's references to them go with the proof, so a crash between finds them again).
    Forgetting a set also takes the names (and any stored copy) of every file it quarantined."""
    positions, lengths = memory.ledger.names.spans_of(con, _TARGETS, [request_id])
    for pos, n, stored in con.execute(f"SELECT name_pos, name_len, stored_path FROM quarantine WHERE {SET_QUARANTINE}",
                                      [request_id]).fetchall():
        if pos is not None:
            positions.append(pos)
            lengths.append(n)
        if stored:
            memory.layout.absolute(stored).unlink(missing_ok=True)
    return memory.ledger.names.erase(positions, lengths)


def _redact(con, request_id: str) -> None:
    """Only the hash and the label stay: no reference to a name, no stored path."""
    con.execute(f"UPDATE samples SET name_pos = NULL, name_len = NULL, image_path = NULL WHERE sample_id IN ({_TARGETS})",
                [request_id])
    con.execute(f"UPDATE sample_sources SET name_pos = NULL, name_len = NULL WHERE sample_id IN ({_TARGETS})", [request_id])
    con.execute(f"UPDATE quarantine SET name_pos = NULL, name_len = NULL, stored_path = NULL WHERE sample_id IN ({_TARGETS})",
                [request_id])
    con.execute(f"UPDATE quarantine SET name_pos = NULL, name_len = NULL, stored_path = NULL WHERE {SET_QUARANTINE}",
                [request_id])


HASHED_FIELDS = ("seq", "request_id", "sample_id", "label", "requested_by", "reason", "category", "external_ref",
                 "requested_at", "applied_at", "versions_rewritten")


def row_hash(prev_hash: str, fields: dict) -> str:
    canonical = json.dumps([fields[k] for k in HASHED_FIELDS], default=str, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()
