"""Original file names, kept out of DuckDB in one file that is erased in place.

A file name can itself be personal data, so forgetting a sample must take its names away for
good. DuckDB keeps the old bytes of changed rows in its file's free blocks, and the only way
to drop them there is to copy the whole ledger into a new file: seconds per forget at a
million samples. Here names are appended to `names.bin` beside the ledger and each ledger row
holds where its name lies (`name_pos`, `name_len`, in bytes). Forgetting overwrites those
bytes with zeros, costing only what is forgotten, and the row's reference goes.

A name is kept as its original bytes, UTF-8 or not (`name_bytes`); it is shown with the bytes
that are not UTF-8 escaped (`shown_name`, `NameFile.read`, and the SQL macro, migration 009).
The ledger reads names with the SQL macro `original_name(name_pos, name_len)` (migration 007),
which finds `names.bin` on DuckDB's `file_search_path`: the memory home, set by every ledger
connection (or the working directory, for the duckdb CLI started in the home).
Every access happens under the ledger's lock: one writer, as for the ledger itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import fsync_dir

if TYPE_CHECKING:
    from .ledger import Session

NAMES_FILE = "names.bin"


class NameFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def ensure(self) -> None:
        """The file exists (empty for a new memory): the SQL macro cannot read a missing file."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            fsync_dir(self.path.parent)

    def append(self, session: Session, names: list[str]) -> tuple[list[int], list[int]]:
        """Write names after the last one the ledger references, durably, before the ledger
        row that refers to them commits; (positions, lengths). Bytes past that end (a write whose
        transaction never committed) are dropped first."""
        encoded = [name_bytes(name) for name in names]
        lengths = [len(b) for b in encoded]
        start = session.forgetting.names_end()
        positions = (start + np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])).tolist() if names else []
        self.ensure()
        with open(self.path, "r+b") as f:
            f.truncate(start)
            f.seek(start)
            f.write(b"".join(encoded))
            f.flush()
            os.fsync(f.fileno())
        return positions, lengths

    def erase(self, positions: list[int], lengths: list[int]) -> int:
        """Overwrite each span with zeros, in place, durably; the bytes overwritten."""
        if not positions:
            return 0
        size = self.path.stat().st_size
        fd = os.open(self.path, os.O_RDWR)
        try:
            for pos, n in zip(positions, lengths):
                if pos + n > size:
                    raise ValueError(f"{self.path} ends at byte {size}, before the name at {pos}+{n} the ledger "
                                     "refers to: the file was truncated or replaced; restore it from a backup")
                os.pwrite(fd, bytes(n), pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        return int(sum(lengths))

    def read(self, pos: int, n: int) -> str:
        """The name for display: bytes that are not UTF-8 shown as \\xNN escapes."""
        with open(self.path, "rb") as f:
            f.seek(pos)
            return f.read(n).decode("utf-8", "backslashreplace")


def name_bytes(name: str) -> bytes:
    """A name's original bytes. A file name need not be UTF-8 (Python reads such bytes as
    surrogates): it is kept as it was, byte for byte, not refused."""
    return os.fsencode(name)


def shown_name(name: str) -> str:
    """A name printable anywhere (terminal, JSON, DuckDB, polars): bytes that are not UTF-8
    become \\xNN escapes (the SQL macro original_name() escapes such a name too, migration 008)."""
    return name_bytes(name).decode("utf-8", "backslashreplace")
