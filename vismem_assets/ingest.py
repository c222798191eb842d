"""Ingest: an image set's files into the image store and the ledger, bad ones into quarantine.

Three steps. *Read*: each file is read within bounds, hashed and checked (`read_files`: no
ledger, no shared state, so it runs on any number of workers: `read_part` there, then
`Ingest.register_read` in the writer, which reads the bytes again and checks their hash). *Screen*: arrivals the
blocklist refuses (forgotten images and their near-copies) are dropped, and the bytes of the
rest are staged (image_store.py). *Register*: the single writer records the set, its samples,
sources and refusals in one ledger transaction, moving the staged bytes into the store last.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from .home import Layout
from .image_store import ImageStore, without_bytes
from .imagesets import (CheckedImage, ImageSetError, SourceFile, check_set_name, check_source, read_bounded,
                        read_image_set)
from .ledger import LedgerBase, Session
from .ledger.samples import NewSample, Refusal
from .names import shown_name
from .near_copies import NearCopyBlocklist
from .store import Staging, clean_dead

BLOCKED_EXACT = "the image of a forgotten sample (its sha256 is on the blocklist)"


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

    def block(self, images: list[CheckedImage], reason: str = BLOCKED_EXACT) -> None:
        self.blocked += len(images)
        self.blocked_files += [{"name": shown_name(c.source.name), "reason": reason} for c in images]


@dataclass
class AddReport:
    """An ingest followed by embedding and indexing what is pending (Memory.add)."""
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


def read_files(files: Iterable[SourceFile]) -> Iterator[CheckedImage]:
    """Each file read within bounds, hashed and checked: no ledger, nothing shared."""
    return map(check_source, files)


def read_part(files: Iterable[SourceFile]) -> list[CheckedImage]:
    """`read_files` on any worker, keeping what was found and not the bytes (b"" marks bytes that
    were read): the expensive half of an ingest (the full decode), to hand to `Ingest.register_read`."""
    return [without_bytes(c, keep_marker=c.data is not None) for c in read_files(files)]


def restore_bytes(checked: Iterable[CheckedImage]) -> Iterator[CheckedImage]:
    """Images `read_part` checked elsewhere, with their bytes read again by the writer: the same
    bytes (their sha256 is the sample id) keep their check; a file that changed or went since is
    checked anew, as it is now; one whose bytes were never read (refused, unreadable) stays so."""
    for c in checked:
        if c.data is None:
            yield c
            continue
        try:
            data = read_bounded(c.source.path, follow_links=False)
        except OSError:
            yield check_source(c.source)  # the reason as a first read would give it
            continue
        yield replace(c, data=data) if hashlib.sha256(data).hexdigest() == c.sample_id else check_source(c.source)


@dataclass
class _Screened:
    """What reading a set left to register; the bytes are staged, not held."""
    arrivals: list[CheckedImage] = field(default_factory=list)    # usable files, duplicates included
    good: dict[str, CheckedImage] = field(default_factory=dict)   # one per sample id
    bad: list[CheckedImage] = field(default_factory=list)         # for quarantine


class Ingest:
    def __init__(self, layout: Layout, ledger: LedgerBase):
        self.layout = layout
        self.ledger = ledger
        self.images = ImageStore(layout)

    def ingest(self, source: str | Path, name: str | None = None, root: str | Path | None = None) -> IngestReport:
        """Register a set's images in the ledger and the image store; bad files go to quarantine.
        `root`: for a manifest, the folder its paths must stay under (default: the manifest's own).
        A name taken from the folder or manifest must not already belong to another source."""
        with self.ledger.connect() as s:  # what a dead ingest staged or moved without recording goes first
            clean_dead(self.layout, s)
        with Staging(self.layout) as staging:  # this ingest's bytes, until the rows naming them commit
            source = Path(source)
            if not name:
                name = check_set_name(source.name if source.is_dir() else source.stem)
                self._refuse_other_source(name, source)
            name = check_set_name(name)
            files = read_image_set(source, None if root is None else Path(root))
            report = IngestReport(image_set=name, ingest_id=0, n_files=len(files))
            screened = self._screen(read_files(files), staging, report)
            self._register(staging, name, source, screened, report)
            return report

    def register_read(self, source: str | Path, name: str, checked: list[CheckedImage]) -> IngestReport:
        """The single writer's half of an ingest read elsewhere: `checked` is what `read_part` found
        for the files of `source` (read_image_set), in their order. Their bytes are read again and
        must hash as they did (restore_bytes), then everything goes as in `ingest`: the blocklist,
        staging, one ledger transaction. `name` is required: a split ingest is of a named set."""
        with self.ledger.connect() as s:
            clean_dead(self.layout, s)
        with Staging(self.layout) as staging:
            name = check_set_name(name)
            report = IngestReport(image_set=name, ingest_id=0, n_files=len(checked))
            screened = self._screen(restore_bytes(checked), staging, report)
            self._register(staging, name, Path(source), screened, report)
            return report

    def _refuse_other_source(self, name: str, source: Path) -> None:
        """Two folders both called 'photos' are two sets: merging the second into the first by its
        base name alone would mix them silently. Re-adding a source the set came from is fine."""
        with self.ledger.connect() as s:
            known = [k for k in s.samples.set_sources(name) if k]
        if known and os.path.abspath(source) not in {os.path.abspath(k) for k in known}:
            raise ImageSetError(
                f"image set {name!r} already exists, read from {sorted(known)[0]}, not from {source}: "
                f"pass --name OTHER to add this as another set, or --name {name} to add it to {name!r} on purpose")

    # ---- screen: refuse what the blocklist names, stage the rest --------------------------------

    def _screen(self, checked_images: Iterable[CheckedImage], staging: Staging, report: IngestReport) -> _Screened:
        with self.ledger.connect() as s:
            blocklist = s.samples.blocklist()
            near = NearCopyBlocklist.load(s)  # perceptual hashes of forgotten images (near_copies.py)
        near_reasons: dict[str, str | None] = {}
        out = _Screened()
        for checked in checked_images:
            if checked.sample_id in blocklist:
                report.block([checked])
                continue
            # Before quarantining too: a near-copy without a label would otherwise be kept in quarantine/.
            if len(near) and checked.data and checked.sample_id not in out.good:
                if checked.sample_id not in near_reasons:
                    near_reasons[checked.sample_id] = self._near_copy_reason(near, checked)
                if near_reasons[checked.sample_id]:
                    report.block([checked], near_reasons[checked.sample_id])
                    continue
            if not checked.ok:
                out.bad.append(self.images.stage_quarantine_copy(checked, staging))
                continue
            out.arrivals.append(checked)
            if checked.sample_id not in out.good:
                out.good[checked.sample_id] = self.images.stage_image(checked, staging)
        return out

    def _near_copy_reason(self, near: NearCopyBlocklist, c: CheckedImage) -> str | None:
        """Why these bytes are refused as a near-copy of a forgotten image, or None. An image the
        memory already holds is no arrival: it stays a duplicate (the forget did not name it)."""
        reason = near.check(c.data)
        if reason:
            with self.ledger.connect() as s:
                if s.samples.is_active(c.sample_id):
                    return None
        return reason

    # ---- register: the single writer ------------------------------------------------------------

    @contextmanager
    def _recording(self, staging: Staging) -> Iterator[Session]:
        """The ingest's ledger transaction, with the staged files moved into the store at its
        end: a failure before the commit takes them out again (store.py explains the crash case)."""
        with self.ledger.connect():  # the lock is held through an undo too: no other ingest sees the files meanwhile
            try:
                with self.ledger.transaction() as s:
                    yield s
                    staging.move_in()
            except BaseException:
                staging.undo()
                raise
        staging.moved = []  # committed: they stay

    def _register(self, staging: Staging, name: str, source: Path, screened: _Screened, report: IngestReport) -> None:
        good = screened.good
        with self._recording(staging) as s:
            report.ingest_id = s.samples.next_ingest_id()
            s.samples.touch_image_set(name, os.path.abspath(source))
            known = s.samples.statuses(list(good) + [c.sample_id for c in screened.bad if c.sample_id])
            labels = s.samples.labels(list(good))
            new = [c for sid, c in good.items() if known.get(sid) in (None, "quarantined")]
            # Forgotten while we were reading the set: blocked, and its stored copy goes again.
            for sid in [sid for sid in good if known.get(sid) == "forgotten"]:
                report.block([c for c in screened.arrivals if c.sample_id == sid])
                self.images.image_path(good[sid]).unlink(missing_ok=True)
            arrivals = [c for c in screened.arrivals if known.get(c.sample_id) != "forgotten"]
            report.block([c for c in screened.bad if known.get(c.sample_id) == "forgotten"])
            bad = [c for c in screened.bad if known.get(c.sample_id) != "forgotten"]
            # The bytes enter the store with the rows that name them: moved in last, before the commit.
            for c in new:
                self.images.plan_image(staging, c)
            for c in bad:
                self.images.plan_quarantine_copy(staging, c)
            # Names go to the name file (durably, before the rows that point at them commit).
            named = arrivals + bad
            spans = list(zip(*self.ledger.names.append(s, [c.source.name for c in named]))) if named else []
            first_span: dict[str, tuple[int, int]] = {}
            for c, span in zip(named, spans):
                if c.sample_id:
                    first_span.setdefault(c.sample_id, span)
            revived = [c.sample_id for c in new if known.get(c.sample_id) == "quarantined"]
            if revived:  # bytes once refused (e.g. for a missing label) now arrive usable
                s.samples.delete(revived)
            s.samples.insert(name, "active", [self._new_sample(c, first_span, active=True) for c in new])
            report.added = len(new)
            self._count_duplicates(report, arrivals, good, known, labels)
            # Everything that arrived, duplicates included, is remembered with where it came from.
            s.samples.insert_sources(name, report.ingest_id, [c.sample_id for c in arrivals],
                                     [c.source.label for c in arrivals], spans[:len(arrivals)])
            quarantined_new = [c for c in {c.sample_id: c for c in bad if c.sample_id}.values()
                               if c.sample_id not in known and c.sample_id not in good]
            s.samples.insert(name, "quarantined", [self._new_sample(c, first_span, active=False)
                                                   for c in quarantined_new])
            s.samples.insert_quarantine(name, report.ingest_id, [
                Refusal(c.sample_id, pos, n, shown_name(c.reason),  # the reason may quote the file's name
                        None if c.data is None else self.layout.relative(self.images.quarantine_path(c)))
                for c, (pos, n) in zip(bad, spans[len(arrivals):])])
            report.quarantined = [{"name": shown_name(c.source.name), "reason": shown_name(c.reason)} for c in bad]
            s.samples.record_ingest(report.ingest_id, name, os.path.abspath(source), report.n_files, report.added,
                                    report.duplicates, len(bad))

    @staticmethod
    def _count_duplicates(report: IngestReport, arrivals: list[CheckedImage], good: dict[str, CheckedImage],
                          known: dict[str, str], labels: dict[str, str]) -> None:
        """Arrivals the memory holds already (or twice in this set), and those whose label differs."""
        first_label = {sid: labels.get(sid) or c.source.label for sid, c in good.items()}
        seen: set[str] = set()
        for c in arrivals:
            if c.sample_id in seen or known.get(c.sample_id) == "active":
                report.duplicates += 1
                if first_label[c.sample_id] != c.source.label:
                    report.label_conflicts.append({"name": shown_name(c.source.name), "label": c.source.label,
                                                   "stored_label": first_label[c.sample_id]})
            seen.add(c.sample_id)

    def _new_sample(self, c: CheckedImage, spans: dict[str, tuple[int, int]], active: bool) -> NewSample:
        pos, n = spans[c.sample_id]
        return NewSample(c.sample_id, c.source.label, pos, n, c.format, c.width, c.height, c.n_bytes,
                         image_path=self.layout.relative(self.images.image_path(c)) if active else None)
