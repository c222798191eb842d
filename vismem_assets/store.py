"""The image store's crash safety: an ingest's bytes enter the store only with the ledger rows
that name them.

An ingest writes each image (and each quarantine copy) into its own staging folder,
`images/.staging/<id>/`, whose `.lock` it holds with flock for its whole life: a staging folder
whose lock nobody holds belongs to a dead process. The staged files are moved into
`images/<xx>/` and `quarantine/` inside the ledger transaction that records them (under the
ledger lock), after the list of moves is written down in the folder (`moving`). So:

- an exception or a kill before the moves leaves only a staging folder, which the next writer
  removes;
- a kill between the moves and the commit leaves moved files no ledger row names: the next
  writer reads the dead folder's `moving` list and removes each of those files that no row names
  (another ingest may have recorded the same bytes since, and then it stays);
- nothing else writes under images/ or quarantine/, so any other file there that no ledger row
  names is a leftover: `vismem audit verify` reports it, and `Memory.rebuild` (the repair
  command, and the nightly compaction) removes it, as it removes the `.<name>.tmp` files of a
  killed store write of an older vismem.

Two processes may ingest at once: each has its own folder, and all moves and clean-ups happen
under the ledger lock, one writer at a time.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import fsync_dir
from .home import Layout

if TYPE_CHECKING:
    from .ledger import Session

STAGING = ".staging"
_LOCK = ".lock"
_MOVING = "moving"
_NEW_PREFIX = ".new-"          # a staging folder not yet locked: the clean-up skips it ...
_NEW_MAX_AGE = 3600.0          # ... unless a crash left it behind this long ago (it holds no image bytes)
SAMPLE_ID = re.compile(r"[0-9a-f]{64}")
CANONICAL = re.compile(r"[0-9a-f]{64}(\.[A-Za-z0-9]+)?")   # how the store names a file: <sample id>.<ext>


def staging_root(layout: Layout) -> Path:
    return layout.images / STAGING


class Staging:
    """One ingest's staging folder (created on the first staged file), locked until `close`."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.folder: Path | None = None
        self._fd: int | None = None
        self.planned: list[tuple[Path, Path]] = []   # (staged, final) for `move_in`
        self._planned_finals: set[Path] = set()
        self.moved: list[Path] = []

    def _open(self) -> Path:
        if self.folder is None:
            root = staging_root(self.layout)
            root.mkdir(parents=True, exist_ok=True)
            # Locked under a name the clean-up skips, then renamed: a cleaner can never see this
            # folder unlocked (the lock stays with the open file across the rename).
            new = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=root))
            fd = os.open(new / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            folder = root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            os.rename(new, folder)
            self.folder, self._fd = folder, fd
        return self.folder

    def stage(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        """Write `data` durably as `name` in the staging folder; its path."""
        path = self._open() / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask: 0644 for the store, 0600 for quarantine copies
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def staged(self, name: str) -> Path | None:
        path = self.folder / name if self.folder is not None else None
        return path if path is not None and path.exists() else None

    def plan(self, staged: Path, final: Path) -> None:
        """Once per final path: two files of a set with the same bytes share one staged copy."""
        if final not in self._planned_finals:
            self._planned_finals.add(final)
            self.planned.append((staged, final))

    def move_in(self) -> list[Path]:
        """Move the planned staged files onto their final paths in the store (call inside the
        ledger transaction that records them, last). A final path that exists already holds the
        same bytes (content-addressed): it is kept. Returns the paths this call moved."""
        todo = [(staged, final) for staged, final in self.planned if not final.exists()]
        self.planned, self._planned_finals = [], set()
        if not todo:
            return []
        # Written down first: if this process dies before the commit, the next writer removes them.
        listing = self._open() / _MOVING
        with open(listing, "a", encoding="utf-8") as f:
            f.write("".join(self.layout.relative(final) + "\n" for _, final in todo))
            f.flush()
            os.fsync(f.fileno())
        folders = set()
        for staged, final in todo:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged, final)
            self.moved.append(final)
            folders.add(final.parent)
        for folder in folders:
            fsync_dir(folder)
        return [final for _, final in todo]

    def undo(self) -> None:
        """The transaction failed: the files this ingest moved into the store go again (under
        the ledger lock nobody else can have recorded them meanwhile)."""
        for path in self.moved:
            path.unlink(missing_ok=True)
        self.moved = []

    def close(self) -> None:
        """Remove the staging folder and release its lock (after the commit, or after `undo`)."""
        if self.folder is not None:
            _remove_folder(self.folder)
        if self._fd is not None:
            os.close(self._fd)
        self.folder, self._fd, self.moved = None, None, []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_folder(folder: Path) -> None:
    """Staged files and the move list first, the lock last: a folder without its lock has been
    dealt with (see clean_dead)."""
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name != _LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    (folder / _LOCK).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def _try_lock(folder: Path) -> int | None | bool:
    """The locked descriptor of a dead ingest's folder; None while its ingest lives; False when
    the folder has no lock file any more (its clean-up was interrupted: nothing to undo)."""
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def dead_folders(layout: Layout) -> list[Path]:
    """Staging folders whose ingest is gone (checked without keeping any lock)."""
    root = staging_root(layout)
    dead = []
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.name.startswith(_NEW_PREFIX):
            if time.time() - folder.stat().st_mtime > _NEW_MAX_AGE:
                dead.append(folder)
            continue
        fd = _try_lock(folder)
        if fd is not None:
            if fd is not False:
                os.close(fd)
            dead.append(folder)
    return dead


def clean_dead(layout: Layout, session: Session) -> int:
    """Remove the staging folders of dead ingests, and the files such an ingest moved into the
    store that no ledger row names (it died before its commit). Call under the ledger lock
    (`session`): moves and their records happen under it. Returns the files removed from the store."""
    root = staging_root(layout)
    removed = 0
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.name.startswith(_NEW_PREFIX):
            if time.time() - folder.stat().st_mtime > _NEW_MAX_AGE:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        fd = _try_lock(folder)
        if fd is None:
            continue  # a live ingest
        try:
            listing = folder / _MOVING
            moved = listing.read_text(encoding="utf-8").split() if listing.exists() else []
            if moved:
                named = session.audit.stored_paths_among(moved)
                for rel in moved:
                    path = layout.absolute(rel)
                    if rel not in named and path.is_file():
                        path.unlink()
                        removed += 1
            _remove_folder(folder)
        finally:
            if fd is not False:
                os.close(fd)
    return removed


def walk(folder: Path):
    """Every file under `folder` (hidden ones and staging folders included), without following links."""
    for top, dirs, files in os.walk(folder):
        for name in files:
            yield Path(top) / name


def unnamed_files(layout: Layout, session: Session) -> list[Path]:
    """Files under images/ and quarantine/ that no ledger row names, staging folders aside
    (see `dead_folders`): leftovers of a crash, such as the `.<name>.tmp` of a killed store
    write or a file a dead ingest moved in. Call under the ledger lock, so that no ingest is
    between its moves and its commit."""
    staging = staging_root(layout)
    found = {layout.relative(path): path for folder in (layout.images, layout.quarantine) for path in walk(folder)
             if not path.is_relative_to(staging)}
    named = session.audit.stored_paths_among(list(found)) if found else set()
    return sorted(path for rel, path in found.items() if rel not in named)


def sweep(layout: Layout, session: Session) -> int:
    """Remove what dead processes left in the store: dead staging folders (undoing their moves)
    and every file no ledger row names. Call under the ledger lock. Returns the files removed."""
    removed = clean_dead(layout, session)
    for path in unnamed_files(layout, session):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def is_leftover_name(name: str) -> bool:
    """Not how the store names a file (`<sample id>.<ext>`): a temp or staged file, whose name
    need not say what it holds."""
    return not CANONICAL.fullmatch(name)


def sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def holds_sample(path: Path, wanted: set[str]) -> str | None:
    """The forgotten sample id a store file is a trace of: named anywhere in its file name, or,
    for a file not named the store's way (a `.x.tmp` of a killed write, a staged file), the
    sha256 of its bytes (a sample's id is the hash of its image bytes)."""
    name = path.name
    if name[:64] in wanted:   # the store's own name (the common case, checked first: stores are large)
        return name[:64]
    if not is_leftover_name(name):
        return None
    for sid in SAMPLE_ID.findall(name):
        if sid in wanted:
            return sid
    digest = sha256_file(path)
    return digest if digest in wanted else None


def embedding_leftovers(layout: Layout) -> list[Path]:
    """Temp files a killed embedding write left under embeddings/ (not `part-*.parquet`)."""
    root = layout.root / "embeddings"
    return sorted(p for p in walk(root) if p.name.endswith(".tmp")) if root.is_dir() else []


def mentions(path: Path, wanted: set[str]) -> str | None:
    """A forgotten sample id written in a file's bytes (an embedding part stores them as text, uncompressed)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    found = {m.decode() for m in re.findall(rb"[0-9a-f]{64}", data)} & wanted
    return min(found) if found else None
