"""The visual memory: one object that ingests image sets, embeds, indexes and classifies.

The CLI and the Dagster code location are both thin layers over this class.
"""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from .atomic import atomic_path
from .blas import blas_report
from .catalog import Catalog
from .embeddings import EmbeddingStore, write_part
from .encoders import DEFAULT_ENCODER, Encoder, EncoderMismatchError, load_encoder
from .evaluation import DEFAULT_K, Evaluation, score
from .evaluation import record as record_rows
from .home import Layout, resolve_home
from .names import shown_name
from .store import Staging, clean_dead, sweep
from .imagesets import CheckedImage, ImageSetError, check_set_name, check_source, read_image_set
from .erasure import HOLE_ID
from .index_store import IndexStore, IndexVersion, held_ids, index_ids, index_vectors
from .index_types import IndexPolicy, kind_of
from .near_copies import NearCopyBlocklist
from .ledger import Ledger, insert_rows, to_frame
from .ivf_search import ivf_searcher, settings as ivf_search_settings
from .search import flat_searcher
from .settings import Settings
from .settings import current as current_settings
from .voting import DEFAULT_STRATEGY, STRATEGIES, vote_all_k, vote_weights

BLOCKED_EXACT = "the image of a forgotten sample (its sha256 is on the blocklist)"
_PLAIN_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
UNKNOWN = "unknown"           # the answer for an image unlike anything in the memory
NOVELTY_PERCENTILE = 99.0
NOVELTY_SAMPLE = 5000         # vectors whose nearest-neighbour distance estimates the threshold
EMBED_CHUNK = 2048  # images per embedding part file: a crash loses at most one chunk of work


@dataclass
class IngestReport:
    image_set: str
    ingest_id: int
    n_files: int = 0
    added: int = 0
    duplicates: int = 0
    blocked: int = 0
    blocked_files: list[dict] = field(default_factory=list)     # {name, reason}: forgotten images, near-copies
    quarantined: list[dict] = field(default_factory=list)       # {name, reason}
    label_conflicts: list[dict] = field(default_factory=list)   # {name, label, stored_label}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AddReport:
    ingest: IngestReport
    embedded: int
    embed_seconds: float
    index_version: int | None
    n_vectors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


@dataclass
class Neighbor:
    rank: int
    sample_id: str
    vector_id: int
    label: str
    similarity: float
    weight: float             # its vote: strategy weight x pruning factor x user weight
    image_path: str
    pruning_factor: float = 1.0
    user_weight: float = 1.0  # set by `vismem weight` (relabel.py); 0 excludes the sample


@dataclass
class Prediction:
    path: str
    label: str | None         # the answer: the vote's winner, or UNKNOWN
    confidence: float         # the winner's share of the vote
    scores: dict[str, float]
    neighbors: list[Neighbor]
    voted_label: str | None = None
    unknown: bool = False
    nearest_distance: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Memory:
    def __init__(self, home: str | Path | None = None, encoder: str | Encoder | None = None,
                 index_policy: IndexPolicy | None = None, settings: Settings | None = None):
        """`settings`: what the entry point read (default: those `settings.setup` installed, else
        the defaults); `home` and `index_policy` override its home and index policy (index_types.py:
        exact below 200,000 vectors, IVF-Flat above if its recall passes)."""
        self.settings = settings = settings if settings is not None else current_settings()
        layout = Layout(resolve_home(home if home is not None else settings.home))
        # A memory this user may only read (classify, status, audit) is opened read-only and
        # nothing is created in it; a change is then refused by the ledger with a clear reason.
        self.read_only = layout.read_only()
        self.layout = layout if self.read_only else layout.create()
        self.ledger = Ledger(self.layout.ledger, lock_timeout=settings.lock_timeout, read_only=self.read_only)
        self._encoder_choice = encoder
        self.index_policy = index_policy or IndexPolicy.from_settings(settings)
        self._index_cache: tuple[tuple, IndexVersion, object] | None = None
        self._searcher_cache: tuple[object, object, int] | None = None  # (index, its searcher or None, its holes)

    # ---- encoder -----------------------------------------------------------------------------

    def encoder_spec(self) -> str:
        """The spec asked for, else the one this memory used last, else the default."""
        if isinstance(self._encoder_choice, str):
            return self._encoder_choice
        rows = self.ledger.query("SELECT spec FROM encoders ORDER BY last_used_at DESC LIMIT 1")
        return rows["spec"][0] if len(rows) else DEFAULT_ENCODER

    @cached_property
    def encoder(self) -> Encoder:
        encoder = self._encoder_choice if isinstance(self._encoder_choice, Encoder) else load_encoder(self.encoder_spec())
        spec = getattr(encoder, "spec", None)
        if self.read_only:  # the encoder's row is bookkeeping (last used): reading needs no write
            return encoder
        with self.ledger.transaction() as con:
            con.execute(
                "INSERT INTO encoders (encoder_id, slug, name, dim, weights_sha256, preprocessing, spec,"
                " first_used_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, now(), now())"
                " ON CONFLICT (encoder_id) DO UPDATE SET last_used_at = now(),"
                " spec = coalesce(excluded.spec, encoders.spec)",
                [encoder.id, encoder.slug, encoder.name, encoder.dim, encoder.weights_sha256,
                 encoder.preprocessing.tag, spec or self.encoder_spec()],
            )
        return encoder

    @cached_property
    def indexes(self) -> IndexStore:
        e = self.encoder
        return IndexStore(self.layout, self.ledger, e.id, e.slug, e.dim, policy=self.index_policy)

    @cached_property
    def embeddings(self) -> EmbeddingStore:
        return EmbeddingStore(self.layout, self.encoder.slug, self.encoder.dim)

    # ---- ingest ------------------------------------------------------------------------------

    def ingest(self, source: str | Path, name: str | None = None, root: str | Path | None = None) -> IngestReport:
        """Register a set's images in the ledger and the image store; bad files go to quarantine.
        `root`: for a manifest, the folder its paths must stay under (default: the manifest's own).
        A name taken from the folder or manifest must not already belong to another source."""
        self._clean_dead_staging()
        with Staging(self.layout) as staging:  # this ingest's bytes, until the rows naming them commit
            return self._ingest(staging, source, name, root)

    def _ingest(self, staging: Staging, source: str | Path, name: str | None, root: str | Path | None) -> IngestReport:
        source = Path(source)
        if not name:
            name = check_set_name(source.name if source.is_dir() else source.stem)
            self._refuse_other_source(name, source)
        name = check_set_name(name)
        files = read_image_set(source, None if root is None else Path(root))
        with self.ledger.connect() as con:
            # The view unites `samples`, the chained `deletions` and `forget_targets`: no hand edit of one reopens it.
            blocklist = {sid for (sid,) in con.execute("SELECT sample_id FROM blocklist").fetchall()}
            near = NearCopyBlocklist.load(con)  # perceptual hashes of forgotten images (near_copies.py)
        near_reasons: dict[str, str | None] = {}
        good: dict[str, CheckedImage] = {}
        report = IngestReport(image_set=name, ingest_id=0, n_files=len(files))
        arrivals: list[CheckedImage] = []
        bad: list[CheckedImage] = []
        for src in files:
            checked = check_source(src)
            if checked.sample_id in blocklist:
                report.blocked += 1
                report.blocked_files.append({"name": shown_name(src.name), "reason": BLOCKED_EXACT})
                continue
            # Before quarantining too: a near-copy without a label would otherwise be kept in quarantine/.
            if len(near) and checked.data and checked.sample_id not in good:
                if checked.sample_id not in near_reasons:
                    near_reasons[checked.sample_id] = self._near_copy_reason(near, checked)
                if near_reasons[checked.sample_id]:
                    report.blocked += 1
                    report.blocked_files.append({"name": shown_name(src.name), "reason": near_reasons[checked.sample_id]})
                    continue
            if not checked.ok:
                bad.append(self._quarantine_copy(checked, staging))
                continue
            arrivals.append(checked)
            if checked.sample_id not in good:
                self._store_image(checked, staging)
                good[checked.sample_id] = _without_bytes(checked)
        with self._recording(staging) as con:
            report.ingest_id = con.execute("SELECT nextval('ingest_id_seq')").fetchone()[0]
            con.execute(
                "INSERT INTO image_sets VALUES (?, ?, now(), now())"
                " ON CONFLICT (name) DO UPDATE SET last_added_at = now()",  # the set keeps its first source
                [name, os.path.abspath(source)],
            )
            known = dict(con.execute(
                "SELECT sample_id, status FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                [list(good) + [c.sample_id for c in bad if c.sample_id]],
            ).fetchall())
            labels = dict(con.execute(
                "SELECT sample_id, label FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [list(good)]
            ).fetchall())
            new = [c for sid, c in good.items() if known.get(sid) in (None, "quarantined")]
            # Forgotten while we were reading the set: blocked, and its stored copy goes again.
            for sid in [sid for sid in good if known.get(sid) == "forgotten"]:
                report.blocked += sum(1 for c in arrivals if c.sample_id == sid)
                report.blocked_files += [{"name": shown_name(c.source.name), "reason": BLOCKED_EXACT}
                                         for c in arrivals if c.sample_id == sid]
                self._image_path(good[sid]).unlink(missing_ok=True)
            arrivals = [c for c in arrivals if known.get(c.sample_id) != "forgotten"]
            report.blocked += sum(1 for c in bad if known.get(c.sample_id) == "forgotten")
            report.blocked_files += [{"name": shown_name(c.source.name), "reason": BLOCKED_EXACT}
                                     for c in bad if known.get(c.sample_id) == "forgotten"]
            bad = [c for c in bad if known.get(c.sample_id) != "forgotten"]
            # The bytes enter the store with the rows that name them: moved in last, before the commit.
            for c in new:
                self._plan_move(staging, c, self._image_path(c), self._image_path(c).name)
            for c in bad:
                if c.data is not None:
                    self._plan_move(staging, c, self._quarantine_path(c), "q-" + self._quarantine_path(c).name)
            # Names go to the name file (durably, before the rows that point at them commit).
            named = arrivals + bad
            spans = list(zip(*self.ledger.names.append(con, [c.source.name for c in named]))) if named else []
            first_span: dict[str, tuple[int, int]] = {}
            for c, span in zip(named, spans):
                if c.sample_id:
                    first_span.setdefault(c.sample_id, span)
            revived = [c.sample_id for c in new if known.get(c.sample_id) == "quarantined"]
            if revived:  # bytes once refused (e.g. for a missing label) now arrive usable
                con.execute("DELETE FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [revived])
            self._insert_samples(con, name, new, "active", first_span)
            report.added = len(new)
            # Everything that arrived, duplicates included, is remembered with where it came from.
            first_label = {sid: labels.get(sid) or c.source.label for sid, c in good.items()}
            seen: set[str] = set()
            for c in arrivals:
                if c.sample_id in seen or known.get(c.sample_id) == "active":
                    report.duplicates += 1
                    if first_label[c.sample_id] != c.source.label:
                        report.label_conflicts.append(
                            {"name": shown_name(c.source.name), "label": c.source.label,
                             "stored_label": first_label[c.sample_id]})
                seen.add(c.sample_id)
            insert_rows(con, "sample_sources", {
                "sample_id": ("VARCHAR", [c.sample_id for c in arrivals]),
                "image_set": ("VARCHAR", [name] * len(arrivals)),
                "name_pos": ("BIGINT", [pos for pos, _ in spans[:len(arrivals)]]),
                "name_len": ("INTEGER", [n for _, n in spans[:len(arrivals)]]),
                "label": ("VARCHAR", [c.source.label for c in arrivals]),
                "ingest_id": ("BIGINT", [report.ingest_id] * len(arrivals)),
            }, arrived_at="now()")
            quarantined_new = [c for c in {c.sample_id: c for c in bad if c.sample_id}.values()
                               if c.sample_id not in known and c.sample_id not in good]
            self._insert_samples(con, name, quarantined_new, "quarantined", first_span)
            insert_rows(con, "quarantine", {
                "ingest_id": ("BIGINT", [report.ingest_id] * len(bad)),
                "image_set": ("VARCHAR", [name] * len(bad)),
                "name_pos": ("BIGINT", [pos for pos, _ in spans[len(arrivals):]]),
                "name_len": ("INTEGER", [n for _, n in spans[len(arrivals):]]),
                "sample_id": ("VARCHAR", [c.sample_id for c in bad]),
                "reason": ("VARCHAR", [shown_name(c.reason) for c in bad]),  # it may quote the file's name
                "stored_path": ("VARCHAR", [None if c.data is None else
                                            self.layout.relative(self._quarantine_path(c)) for c in bad]),
            }, quarantined_at="now()")
            report.quarantined = [{"name": shown_name(c.source.name), "reason": shown_name(c.reason)} for c in bad]
            con.execute(
                "INSERT INTO ingests VALUES (?, ?, ?, now(), now(), ?, ?, ?, ?)",
                [report.ingest_id, name, os.path.abspath(source), report.n_files, report.added, report.duplicates,
                 len(bad)],
            )
        return report

    def _near_copy_reason(self, near: NearCopyBlocklist, c: CheckedImage) -> str | None:
        """Why these bytes are refused as a near-copy of a forgotten image, or None. An image the
        memory already holds is no arrival: it stays a duplicate (the forget did not name it)."""
        reason = near.check(c.data)
        if reason and len(self.ledger.query("SELECT 1 FROM samples WHERE sample_id = ? AND status = 'active'",
                                            [c.sample_id])):
            return None
        return reason

    def _image_path(self, c: CheckedImage) -> Path:
        return self.layout.images / c.sample_id[:2] / f"{c.sample_id}.{c.format}"

    def _quarantine_path(self, c: CheckedImage) -> Path:
        suffix = c.source.path.suffix.lower()  # the file's own, when plain: a name's bytes need not be UTF-8
        return self.layout.quarantine / f"{c.sample_id}{suffix if _PLAIN_SUFFIX.fullmatch(suffix) else '.bin'}"

    def _store_image(self, c: CheckedImage, staging: Staging) -> None:
        if not self._image_path(c).exists():  # content-addressed: same name, same bytes
            staging.stage(self._image_path(c).name, c.data)

    def _plan_move(self, staging: Staging, c: CheckedImage, final: Path, staged_name: str) -> None:
        """Plan the move of a staged file into the store. Not staged because the store held it
        when the file was read, and gone since (a dead ingest's uncommitted file, removed by
        `_clean_dead_staging`): its source is read again."""
        staged = staging.staged(staged_name)
        if staged is None and not final.exists():
            again = check_source(c.source)
            if again.sample_id != c.sample_id or again.data is None:
                raise ImageSetError(f"{shown_name(c.source.name)} changed while the set was being added: add the set again")
            staged = staging.stage(staged_name, again.data, mode=0o600 if final.parent == self.layout.quarantine else 0o644)
        if staged is not None:
            staging.plan(staged, final)

    @contextmanager
    def _recording(self, staging: Staging):
        """The ingest's ledger transaction, with the staged files moved into the store at its
        end: a failure before the commit takes them out again (store.py explains the crash case)."""
        with self.ledger.connect():  # the lock is held through an undo too: no other ingest sees the files meanwhile
            try:
                with self.ledger.transaction() as con:
                    yield con
                    staging.move_in()
            except BaseException:
                staging.undo()
                raise
        staging.moved = []  # committed: they stay

    def _clean_dead_staging(self) -> None:
        """What a dead ingest staged or moved without recording goes (the next writer's job)."""
        with self.ledger.connect() as con:
            clean_dead(self.layout, con)

    def _refuse_other_source(self, name: str, source: Path) -> None:
        """Two folders both called 'photos' are two sets: merging the second into the first by its
        base name alone would mix them silently. Re-adding a source the set came from is fine."""
        known = self.ledger.query("SELECT source FROM image_sets WHERE name = ?"
                                  " UNION SELECT source FROM ingests WHERE image_set = ?", [name, name])["source"]
        if len(known) and os.path.abspath(source) not in {os.path.abspath(s) for s in known if s}:
            raise ImageSetError(
                f"image set {name!r} already exists, read from {sorted(s for s in known if s)[0]}, not from {source}: "
                f"pass --name OTHER to add this as another set, or --name {name} to add it to {name!r} on purpose")

    def _quarantine_copy(self, c: CheckedImage, staging: Staging) -> CheckedImage:
        if c.data is not None:
            path = self._quarantine_path(c)
            if not path.exists():
                # Quarantined bytes are anything someone dropped in a set: readable by the owner only.
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(path.parent, 0o700)  # a home made before this rule has a 0755 folder
                staging.stage("q-" + path.name, c.data, mode=0o600)
        return _without_bytes(c, keep_marker=c.data is not None)

    def _insert_samples(self, con, image_set: str, items: list[CheckedImage], status: str,
                        spans: dict[str, tuple[int, int]]) -> None:
        active = status == "active"
        insert_rows(con, "samples", {
            "sample_id": ("VARCHAR", [c.sample_id for c in items]),
            "label": ("VARCHAR", [c.source.label for c in items]),
            "image_set": ("VARCHAR", [image_set] * len(items)),
            "status": ("VARCHAR", [status] * len(items)),
            "image_path": ("VARCHAR", [self.layout.relative(self._image_path(c)) if active else None for c in items]),
            "name_pos": ("BIGINT", [spans[c.sample_id][0] for c in items]),
            "name_len": ("INTEGER", [spans[c.sample_id][1] for c in items]),
            "format": ("VARCHAR", [c.format for c in items]),
            "width": ("INTEGER", [c.width for c in items]),
            "height": ("INTEGER", [c.height for c in items]),
            "n_bytes": ("BIGINT", [c.n_bytes for c in items]),
        }, added_at="now()", **({"vector_id": "nextval('vector_id_seq')"} if active else {}))
        if active:
            insert_rows(con, "label_history", {
                "sample_id": ("VARCHAR", [c.sample_id for c in items]),
                "label": ("VARCHAR", [c.source.label for c in items]),
            }, changed_at="now()", reason="'ingest'")

    # ---- embed and index ---------------------------------------------------------------------

    def pending_embeddings(self, image_set: str | None = None) -> pl.DataFrame:
        """Active samples this encoder has not embedded yet (optionally only those of one set)."""
        sql = ("SELECT s.sample_id, s.vector_id, s.image_path, s.image_set FROM samples s"
               " WHERE s.status = 'active' AND NOT EXISTS (SELECT 1 FROM embeddings e"
               "  WHERE e.encoder_id = ? AND e.sample_id = s.sample_id)")
        params: list = [self.encoder.id]
        if image_set is not None:
            sql += " AND s.sample_id IN (SELECT sample_id FROM sample_sources WHERE image_set = ?)"
            params.append(image_set)
        return self.ledger.query(sql + " ORDER BY s.vector_id", params)

    def embed_pending(self, image_set: str | None = None, progress: bool | None = None,
                      on_chunk=None) -> int:
        """Embed only what this encoder has not embedded; parts are recorded chunk by chunk.
        `on_chunk(done, total)` is called after each recorded chunk (for logs without a bar)."""
        # One embedding run per encoder at a time (store-wide lock, not the ledger's: embedding is
        # slow): three concurrent adds of the same images embedded them three times and left two
        # parts no row named. In a cluster encoding runs anywhere and only recording is serialised
        # (issue 18): there the drop of already-embedded samples below is what keeps parts whole.
        with self.embeddings.lock():
            return self._embed_pending(image_set, progress, on_chunk)

    def _embed_pending(self, image_set: str | None, progress: bool | None, on_chunk) -> int:
        pending = self.pending_embeddings(image_set)
        done = 0
        for start in range(0, len(pending), EMBED_CHUNK):
            chunk = pending.slice(start, EMBED_CHUNK)
            paths = [self.layout.absolute(p) for p in chunk["image_path"]]
            vectors = self.encoder.embed(paths, progress=progress,
                                         desc=f"embedding {start + len(chunk)}/{len(pending)}")
            folder = image_set or chunk["image_set"][0]
            with self.ledger.transaction() as con:
                # A sample forgotten while we embedded must not come back through its vector, and
                # one another run embedded meanwhile is not written again: every row of a part is
                # recorded, so no part holds vectors the ledger does not know of.
                gone = {sid for (sid,) in con.execute(
                    "SELECT sample_id FROM samples WHERE status <> 'active' AND sample_id IN (SELECT unnest(?::VARCHAR[]))"
                    " UNION SELECT sample_id FROM embeddings WHERE encoder_id = ? AND sample_id IN (SELECT unnest(?::VARCHAR[]))",
                    [chunk["sample_id"].to_list(), self.encoder.id, chunk["sample_id"].to_list()]).fetchall()}
                if gone:
                    keep = ~chunk["sample_id"].is_in(list(gone)).to_numpy()
                    chunk, vectors = chunk.filter(keep), vectors[keep]
                if chunk.is_empty():
                    continue
                part = self.embeddings.write(folder, chunk["sample_id"].to_list(), chunk["vector_id"].to_numpy(), vectors)
                try:
                    insert_rows(con, "embeddings", {
                        "encoder_id": ("VARCHAR", [self.encoder.id] * len(chunk)),
                        "sample_id": ("VARCHAR", chunk["sample_id"].to_list()),
                        "path": ("VARCHAR", [part] * len(chunk)),
                    }, embedded_at="now()")
                except BaseException:
                    self.layout.absolute(part).unlink(missing_ok=True)  # no part without its rows
                    raise
            done += len(chunk)
            if on_chunk:
                on_chunk(start + len(chunk), len(pending))
        return done

    def _embedded_active(self, con) -> pl.DataFrame:
        # In vector id (arrival) order: a rebuild then keeps each image set together in its
        # shard, so forgetting a set rewrites one or two shards.
        return to_frame(con.execute(_EMBEDDED_ACTIVE.format("s.vector_id, e.path") + " ORDER BY s.vector_id",
                                    [self.encoder.id]))

    def index_pending(self, embed: bool = True) -> IndexVersion | None:
        """Fold embedded-but-unindexed active samples into a new version; None if nothing to do.
        What no one embedded yet (a crash mid-add left it) is embedded first, unless `embed` is
        False (the caller just did)."""
        if embed:
            self.embed_pending()  # (outside the ledger connection: the embedding lock comes first)
        with self.ledger.connect() as con:
            # Ids only, as numpy: an add must cost O(new), not a read of the whole index or ledger.
            present = self.indexes.ids()
            embedded = con.execute(_EMBEDDED_ACTIVE.format("s.vector_id"), [self.encoder.id]).fetchnumpy()["vector_id"]
            embedded = np.asarray(embedded, np.int64)
            todo = np.unique(embedded[~np.isin(embedded, present, kind="table")]) if len(present) else np.unique(embedded)
            if not len(todo):
                return None
            paths = [p for (p,) in con.execute(
                _EMBEDDED_ACTIVE.format("DISTINCT e.path") + " AND s.vector_id IN (SELECT unnest(?::BIGINT[]))",
                [self.encoder.id, todo.tolist()]).fetchall()]
            ids, vectors = self.embeddings.read(paths, todo)
            return self.indexes.add(ids, vectors)

    def rebuild(self, operation: str = "rebuild") -> IndexVersion:
        """A fresh version from the ledger and the embedding files alone, after embedding what a
        crash left pending; what dead processes left in the image store goes too (store.sweep)."""
        self.embed_pending()
        with self.ledger.connect() as con:
            sweep(self.layout, con)
            embedded = self._embedded_active(con)
            ids, vectors = self.embeddings.read(embedded["path"].unique(maintain_order=True).to_list(),
                                                embedded["vector_id"].to_numpy())
            return self.indexes.rebuild(ids, vectors, operation)

    def add(self, source: str | Path, name: str | None = None, progress: bool | None = None,
            root: str | Path | None = None) -> AddReport:
        """Ingest + embed + index: the whole path for one image set (`root`: see ingest)."""
        t0 = time.perf_counter()
        report = self.ingest(source, name, root=root)
        t1 = time.perf_counter()
        # Every set's pending samples, not only this one's: a crash mid-add is finished here.
        embedded = self.embed_pending(progress=progress)
        t2 = time.perf_counter()
        version = self.index_pending(embed=False)
        live = version or self.indexes.live()
        return AddReport(report, embedded, t2 - t1, live.version if live else None,
                         live.n_vectors if live else 0, time.perf_counter() - t0)

    # ---- search and classify -----------------------------------------------------------------

    def live_index(self):
        """(version, index) of the live version, cached while it stays live."""
        live = self.indexes.live()
        if live is None:
            others = self.ledger.query("SELECT DISTINCT encoder_id FROM index_versions WHERE status = 'live'")
            hint = (f" This memory has indexes for: {', '.join(others['encoder_id'])}; pass the encoder that built them"
                    if len(others) else " Add an image set first: vismem add SET_PATH")
            raise FileNotFoundError(f"no index for encoder {self.encoder.id}.{hint}")
        if self._index_cache is None or self._index_cache[0] != (live.version, live.sha256):
            # IVF indexes are memory-mapped: a search touches a few lists, and the process shares
            # the file's pages instead of copying them. Flat ones are read whole: exact search
            # streams every vector, and over 4 KiB file pages (no transparent huge pages) its
            # GEMM ran 4x slower for single queries at 10^6 vectors (FAISS's own scan did not).
            self._index_cache = ((live.version, live.sha256),
                                 *self.indexes.load(live, mmap=live.index_type.startswith("IVF")))
        return self._index_cache[1], self._index_cache[2]

    def stored_vectors(self, index=None) -> tuple[np.ndarray, np.ndarray]:
        """(vector ids, exact vectors) of the live index (or `index`): a flat index's own storage,
        else (an approximate index keeps no exact vectors) read from the embedding files."""
        if index is None:
            _, index = self.live_index()
        ids = held_ids(index)
        if kind_of(index) == "flat":
            return ids, index_vectors(index)
        with self.ledger.connect() as con:
            embedded = self._embedded_active(con)
        paths = embedded.filter(pl.col("vector_id").is_in(ids.tolist()))["path"].unique().to_list()
        got_ids, vectors = self.embeddings.read(paths, ids)
        if len(got_ids) != len(ids):
            raise RuntimeError(f"the live index holds {len(ids)} vectors but the embedding files only {len(got_ids)}: "
                               "run `vismem rebuild` to write a version from the ledger and embeddings")
        return got_ids, vectors

    def catalog(self) -> Catalog:
        with self.ledger.connect() as con:
            return Catalog.query(con)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, vector_ids), each (n, min(k, N)), best first. A flat index is searched
        exactly by blocked matrix multiplication over its own stored vectors (search.py; exact
        ties: lower position first); an IVF-Flat one by FAISS, list by list for large batches
        (ivf_search.py); other index types by FAISS."""
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dim:
            raise EncoderMismatchError(f"query vectors of shape {vectors.shape} do not match encoder {self.encoder.id}")
        _, index = self.live_index()
        searcher, holes = self._searcher(index)
        k = max(1, min(k, index.ntotal - holes))
        if searcher is not None:
            return searcher.search(vectors, k)
        sims, ids = index.search(np.ascontiguousarray(vectors, np.float32), k)
        return sims, ids

    def _searcher(self, index) -> tuple[object, int]:
        """The searcher of the live index (exact for a flat one, list-batched for IVF-Flat, one
        that skips holes for an IVF index mapped with some, None for the rest) and its number of
        holes, cached with it: it reads the index's own vectors or lists (no copy) and keeps that
        index alive while cached."""
        if self._searcher_cache is None or self._searcher_cache[0] is not index:
            holes = int(np.count_nonzero(index_ids(index) == HOLE_ID))
            self._searcher_cache = (index, flat_searcher(index) or ivf_searcher(index, holes=holes > 0), holes)
        return self._searcher_cache[1], self._searcher_cache[2]

    def classify(self, images: list, k: int = DEFAULT_K, strategy: str = DEFAULT_STRATEGY,
                 progress: bool | None = None, unknown: bool = False, pruning: str | None = None) -> list[Prediction]:
        """Predict a label for each image, with the neighbours that decided it. With `unknown`,
        an image farther from its nearest neighbour than the memory's novelty threshold is
        answered UNKNOWN (the vote is kept in `voted_label`). `pruning`: 'none', 'soft', 'hard',
        or None for the memory's active weight set (vismem prune)."""
        from . import pruning as pruning_mod

        vote_weights(np.zeros((1, 1)), strategy)  # fail early on an unknown strategy
        self.live_index()  # ... and on a memory with nothing to search, before embedding anything
        threshold = self.novelty_threshold() if unknown else None
        vectors = self.encoder.embed(images, progress=progress)
        sims, ids = self.search(vectors, k)
        catalog = self.catalog()
        rows = catalog.rows(ids)
        labels = np.where(rows >= 0, catalog.label_codes[rows], -1)
        threshold_hard = None
        if pruning is None:
            pruning, threshold_hard = pruning_mod.active_mode(self) or ("none", None)
        row_weight = pruning_mod.weights_by_row(self, catalog, pruning, threshold_hard)
        factors = np.where(rows >= 0, row_weight[rows], 0.0) if row_weight is not None else np.ones(ids.shape)
        users = np.where(rows >= 0, catalog.user_weights[rows], 0.0)
        weights = vote_weights(sims, strategy) * factors * users  # the documented rule (README, relabel.py)
        pred, conf = vote_all_k(labels, weights, len(catalog.label_names))
        # Python lists, and each stored image's path joined once: this loop runs k times per query.
        root, names, sample_ids, image_paths = str(self.layout.root), catalog.label_names, catalog.sample_ids, catalog.image_paths
        path_of: dict[int, str] = {}
        rows_l, labels_l, ids_l, sims_l, weights_l, factors_l, users_l = (
            a.tolist() for a in (rows, labels, ids, sims, weights, factors, users))
        out = []
        for i, image in enumerate(images):
            scores: dict[str, float] = {}
            neighbors = []
            for r, j in enumerate(rows_l[i]):
                if j < 0:
                    continue
                name, weight = names[labels_l[i][r]], weights_l[i][r]
                scores[name] = scores.get(name, 0.0) + weight
                path = path_of.get(j)
                if path is None:
                    path = path_of[j] = f"{root}/{image_paths[j]}"
                neighbors.append(Neighbor(r, sample_ids[j], ids_l[i][r], name, sims_l[i][r], weight, path,
                                          factors_l[i][r], users_l[i][r]))
            voted = names[pred[i, -1]] if pred[i, -1] >= 0 else None
            distance = float(1.0 - sims[i, 0])
            novel = threshold is not None and distance > threshold
            out.append(Prediction(str(image) if isinstance(image, (str, Path)) else f"image[{i}]",
                                  UNKNOWN if novel else voted, float(conf[i, -1]), scores, neighbors,
                                  voted_label=voted, unknown=novel, nearest_distance=distance))
        return out

    # ---- evaluation ----------------------------------------------------------------------------

    def _pruning_weights(self, catalog: Catalog, pruning: bool) -> dict:
        """'none' always; with `pruning`, also the soft and hard weight sets of the live version."""
        if not pruning:
            return {"none": None}
        from . import pruning as pruning_mod

        return {"none": None, **{m: pruning_mod.weights_by_row(self, catalog, m) for m in ("soft", "hard")}}

    def evaluate(self, source: str | Path, k_max: int = 100, strategies=STRATEGIES,
                 progress: bool | None = None, record: bool = True, pruning: bool = False) -> Evaluation:
        """Accuracy of each strategy for every k in 1..k_max on a labelled query set (not stored)."""
        files = read_image_set(Path(source))
        checked = [check_source(f) for f in files]
        usable = [c for c in checked if c.ok]
        if not usable:
            raise ImageSetError(f"{source} holds no usable labelled image to evaluate with")
        version, _ = self.live_index()
        vectors = self._query_vectors(usable, progress)
        sims, ids = self.search(vectors, k_max)
        in_memory = self.ledger.query(
            "SELECT count(*) AS n FROM samples WHERE status = 'active' AND sample_id IN (SELECT unnest(?::VARCHAR[]))",
            [[c.sample_id for c in usable]])["n"][0]
        catalog = self.catalog()
        result = score(str(source), version.version, sims, ids, [c.source.label for c in usable], catalog,
                       strategies, self._pruning_weights(catalog, pruning),
                       novelty=(self.novelty_threshold(), NOVELTY_PERCENTILE))
        result.n_skipped, result.n_in_memory = len(checked) - len(usable), int(in_memory)
        result.query_paths = [str(c.source.path) for c in usable]
        return self.record_evaluation(result) if record else result

    def _query_vectors(self, images: list[CheckedImage], progress: bool | None) -> np.ndarray:
        """Query embeddings, cached by content hash: a query set is re-evaluated after every change."""
        cache = self.embeddings.root / "_queries.parquet"
        known = pl.read_parquet(cache) if cache.exists() else None
        have = dict(zip(known["sample_id"], known["vector"].to_numpy())) if known is not None else {}
        todo = list({c.sample_id: c for c in images if c.sample_id not in have}.values())
        if todo:
            new = self.encoder.embed([c.source.path for c in todo], progress=progress, desc="embedding queries")
            have.update(zip((c.sample_id for c in todo), new))
            frame = pl.DataFrame({"sample_id": list(have),
                                  "vector": pl.Series(np.stack(list(have.values())), dtype=pl.Array(pl.Float32, self.encoder.dim))})
            with atomic_path(cache) as tmp:
                write_part(frame, tmp)
        return np.stack([have[c.sample_id] for c in images]).astype(np.float32)

    def evaluate_leave_one_out(self, k_max: int = 100, strategies=STRATEGIES, record: bool = True,
                               batch: int = 4096, pruning: bool = False) -> Evaluation:
        """Each stored sample classified by all the others (for memories without a query split)."""
        version, index = self.live_index()
        ids_all, vectors = self.stored_vectors(index)
        if len(ids_all) < 2:
            raise ValueError("leave-one-out needs at least two samples in the memory")
        k = min(k_max, len(ids_all) - 1)
        sims = np.empty((len(ids_all), k), np.float32)
        ids = np.empty((len(ids_all), k), np.int64)
        for start in range(0, len(ids_all), batch):
            s, i = self.search(vectors[start:start + batch], k + 1)
            own = i == ids_all[start:start + batch, None]
            own[:, -1] |= ~own.any(axis=1)  # self not retrieved (exact duplicates): drop the last instead
            keep = ~own
            sims[start:start + batch] = s[keep].reshape(len(s), k)
            ids[start:start + batch] = i[keep].reshape(len(i), k)
        catalog = self.catalog()
        truth = [catalog.label_names[c] for c in catalog.label_codes[catalog.rows(ids_all)]]
        result = score("leave-one-out", version.version, sims, ids, truth, catalog, strategies,
                       self._pruning_weights(catalog, pruning), novelty=(self.novelty_threshold(), NOVELTY_PERCENTILE))
        return self.record_evaluation(result) if record else result

    def record_evaluation(self, result: Evaluation) -> Evaluation:
        with self.ledger.transaction() as con:
            result.evaluation_id = record_rows(con, self.encoder.id, result)
        return result

    def novelty_threshold(self, percentile: float = NOVELTY_PERCENTILE) -> float:
        """Nearest-neighbour distance (1 - cosine) beyond which a query is 'unknown': that
        percentile of the memory's own leave-one-out nearest-neighbour distances (estimated on
        a sample of its vectors, cached per index version)."""
        version, index = self.live_index()
        cached = self.ledger.query(
            "SELECT distance FROM novelty_thresholds WHERE encoder_id = ? AND index_version = ? AND percentile = ?",
            [self.encoder.id, version.version, percentile])
        if len(cached):
            return float(cached["distance"][0])
        ids, vectors = self.stored_vectors(index)
        if len(ids) < 2:
            raise ValueError("a novelty threshold needs at least two samples in the memory")
        pick = np.random.default_rng(version.version).choice(len(ids), min(len(ids), NOVELTY_SAMPLE), replace=False)
        sims, nn = self.search(vectors[pick], 2)
        nearest_other = np.where(nn[:, 0] == ids[pick], sims[:, 1], sims[:, 0])
        distance = float(np.percentile(1.0 - nearest_other, percentile))
        if self.read_only:  # a cache: computed again next time rather than written
            return distance
        with self.ledger.transaction() as con:
            con.execute("INSERT INTO novelty_thresholds VALUES (?, ?, ?, ?, ?, now())",
                        [self.encoder.id, version.version, percentile, distance, len(pick)])
        return distance

    def compare_with_previous(self, result: Evaluation) -> dict | None:
        """Top-1 (default strategy and k) against the previous index version's evaluation on the
        same query set, over the labels the memory still holds and that version held too:
        forgetting a class on purpose is not a regression, losing accuracy on the classes that
        stay is; a class new since then (scored 0 before) would only hide such a loss."""
        prev = self.ledger.query(
            "SELECT evaluation_id, index_version FROM evaluations WHERE encoder_id = ? AND query_set = ?"
            " AND index_version < ? ORDER BY evaluation_id DESC LIMIT 1",
            [self.encoder.id, result.query_set, result.index_version])
        if prev.is_empty():
            return None
        before = self.ledger.query("SELECT label, n_queries, accuracy FROM evaluation_labels"
                                   " WHERE evaluation_id = ? AND pruning = 'none'",
                                   [prev["evaluation_id"][0]])
        from .glance import labels_held

        held = set(self.ledger.query("SELECT DISTINCT label FROM samples WHERE status = 'active'")["label"])
        held_then = labels_held(self.indexes, self.catalog(), int(prev["index_version"][0]))
        labels = held & (held if held_then is None else held_then) & set(before["label"]) & set(result.per_label["label"])

        def top1(frame: pl.DataFrame) -> float:
            frame = frame.filter(pl.col("label").is_in(list(labels)))
            n = frame["n_queries"].sum()
            return float((frame["accuracy"] * frame["n_queries"]).sum() / n) if n else 0.0

        old, new = top1(before), top1(result.per_label)
        return {"previous_index_version": int(prev["index_version"][0]), "previous_top1": old, "top1": new,
                "drop": old - new, "labels_compared": sorted(labels)}

    def pending(self, exact: bool = False) -> dict:
        """Active samples this memory's encoder has not embedded, and embedded ones its live index
        lacks: what a crash or kill -9 between ingest and index leaves behind, until the next add,
        rebuild or memory_index run finishes them. From the ledger alone, without loading the
        encoder; `exact` reads the live index's ids instead of comparing counts."""
        encoder_id = self._known_encoder_id()
        with self.ledger.connect() as con:
            not_embedded = con.execute(
                "SELECT count(*) FROM samples s WHERE s.status = 'active' AND NOT EXISTS (SELECT 1 FROM embeddings e"
                " WHERE e.encoder_id = ? AND e.sample_id = s.sample_id)", [encoder_id]).fetchone()[0]
            live = con.execute("SELECT n_vectors FROM index_versions WHERE encoder_id = ? AND status = 'live'",
                               [encoder_id]).fetchall()
            if exact:
                embedded = con.execute(_EMBEDDED_ACTIVE.format("s.vector_id"), [encoder_id]).fetchnumpy()["vector_id"]
                row = con.execute("SELECT slug, dim FROM encoders WHERE encoder_id = ?", [encoder_id]).fetchone()
                held = (IndexStore(self.layout, self.ledger, encoder_id, row[0], row[1]).ids()
                        if live and row else np.empty(0, np.int64))
                not_indexed = len(np.setdiff1d(np.asarray(embedded, np.int64), held))
            else:
                n_embedded = con.execute(_EMBEDDED_ACTIVE.format("count(*)"), [encoder_id]).fetchone()[0]
                not_indexed = max(0, n_embedded - (live[0][0] if live else 0))
        return {"encoder_id": encoder_id, "not_embedded": int(not_embedded), "not_indexed": int(not_indexed)}

    def _known_encoder_id(self) -> str | None:
        """The id of this memory's encoder without loading it (None: no encoder ran here yet)."""
        if "encoder" in self.__dict__:
            return self.encoder.id
        if isinstance(self._encoder_choice, Encoder):
            return self._encoder_choice.id
        rows = self.ledger.query("SELECT encoder_id FROM encoders WHERE spec = ? ORDER BY last_used_at DESC LIMIT 1",
                                 [self.encoder_spec()])
        return rows["encoder_id"][0] if len(rows) else None

    def index_consistency(self) -> dict:
        """Does the live index hold exactly the active embedded samples of this encoder?"""
        _, index = self.live_index()
        in_index = held_ids(index)
        with self.ledger.connect() as con:
            expected = self._embedded_active(con)["vector_id"].to_numpy()
        missing = np.setdiff1d(expected, in_index)
        extra = np.setdiff1d(in_index, expected)
        return {"ok": bool(len(missing) == 0 and len(extra) == 0 and len(in_index) == len(np.unique(in_index))),
                "n_index": int(len(in_index)), "n_ledger": int(len(expected)),
                "missing_from_index": missing[:20].tolist(), "not_in_ledger": extra[:20].tolist()}

    def embedding_files(self, image_set: str | None = None) -> list[str]:
        sql = "SELECT DISTINCT e.path FROM embeddings e WHERE e.encoder_id = ?"
        params: list = [self.encoder.id]
        if image_set is not None:
            sql += " AND e.sample_id IN (SELECT sample_id FROM sample_sources WHERE image_set = ?)"
            params.append(image_set)
        return self.ledger.query(sql + " ORDER BY 1", params)["path"].to_list()

    def forget(self, request, dry_run: bool = False):
        """Forget samples for good (see forgetting.py); returns a ForgetReport."""
        from .forgetting import forget

        return forget(self, request, dry_run=dry_run)

    def resume_forgetting(self) -> list[str]:
        """Finish forget requests a crash left pending; returns their ids."""
        from .forgetting import apply_pending

        return list(apply_pending(self))

    def compact(self, retain: int = 5) -> tuple[IndexVersion, list[IndexVersion]]:
        """Nightly compaction: a full rebuild into a fresh version, then keep only the newest `retain`."""
        version = self.rebuild("compact")
        return version, self.indexes.retain(retain)

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict:
        """What a person asks first: which encoder, how many of what, which index, how much disk."""
        q = self.ledger.query
        live = q("SELECT encoder_id, version, n_vectors, index_type, nprobe, recall_at_10, recall_at_100,"
                 " recall_measured_at, build_reason, sha256, path, coalesce(json_array_length(files), 1) AS files,"
                 f" {HOLES}, created_at"
                 " FROM index_versions"
                 " WHERE status = 'live' ORDER BY encoder_id")
        return {
            "home": str(self.layout.root),
            "encoder": self.encoder_spec(),
            "encoders": q("SELECT encoder_id, spec, dim, last_used_at FROM encoders ORDER BY last_used_at DESC").to_dicts(),
            "samples": dict(q("SELECT status, count(*) FROM samples GROUP BY status ORDER BY status").iter_rows()),
            "labels": dict(q("SELECT label, count(*) FROM samples WHERE status = 'active' GROUP BY label ORDER BY label").iter_rows()),
            "image_sets": q("SELECT count(*) AS n FROM image_sets")["n"][0],
            "pending": self.pending(),  # left by a crash mid-add; the next add or rebuild finishes them
            "live_indexes": live.with_columns(pl.col("created_at").cast(pl.String)).to_dicts(),
            "disk_bytes": {d: _du(self.layout.root / d) for d in ("images", "embeddings", "indexes", "quarantine")}
                          | {"ledger": _du(self.layout.ledger)},
            "index_policy": asdict(self.index_policy),
            "blas": blas_report(),
            "ivf_search": ivf_search_settings(),
        }


# Erased entries (forgotten vectors' holes) a version's files hold until a compaction, from its `files` JSON.
HOLES = ("coalesce(list_sum(list_transform(json_transform(files, '[{\"holes\": \"BIGINT\"}]'),"
         " lambda f: coalesce(f.holes, 0))), 0) AS holes")

_EMBEDDED_ACTIVE = ("SELECT {} FROM samples s JOIN embeddings e ON e.sample_id = s.sample_id"
                    " WHERE e.encoder_id = ? AND s.status = 'active'")


def _without_bytes(c: CheckedImage, keep_marker: bool = False) -> CheckedImage:
    """Drop the bytes once stored, so a large set is never held in memory at once."""
    from dataclasses import replace

    return replace(c, data=b"" if keep_marker else None)


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
