"""What every ledger backend shares: sessions reused within a thread, all-or-nothing
transactions, the refusal of changes to a read-only ledger, and raw queries for tools.

A backend supplies `_session()` (a fresh connection under its single-writer rule, migrated, as a
`Session`), its driver's error class, and `describe()`: where it lives, in words.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

from ..names import NameFile
from .session import Session


class LedgerLockTimeout(TimeoutError):
    pass


class ReadOnlyLedger(PermissionError):
    """A change was asked of a ledger opened read-only (its memory home is not writable)."""


def to_frame(cursor) -> pl.DataFrame:
    """Result of the last execute as a polars frame (no pyarrow needed)."""
    columns = [d[0] for d in cursor.description]
    return pl.DataFrame(cursor.fetchall(), schema=columns, orient="row", infer_schema_length=None)


def insert_rows(con, table: str, columns: dict[str, tuple[str, list]], on_conflict: str = "", **constants: str) -> None:
    """Bulk insert: one statement of parallel unnest()s, plus SQL constants for the other columns."""
    n = len(next(iter(columns.values()))[1])
    if n == 0:
        return
    unnested = ", ".join(f"unnest(?::{sqltype}[]) AS {name}" for name, (sqltype, _) in columns.items())
    # The constants go outside the unnest()s: PostgreSQL would evaluate a nextval() beside them
    # once more than there are rows (a vector id skipped per insert).
    names = list(columns) + list(constants)
    con.execute(f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(names[:len(columns)])}"
                f"{''.join(', ' + c for c in constants.values())} FROM (SELECT {unnested}) AS new_rows {on_conflict}",
                [values for _, values in columns.values()])


CHANGES_FILE = "ledger.changes"   # in the memory home: replaced after every committed transaction


class LedgerBase:
    dialect = ""                   # 'duckdb' | 'postgres': the groups pick their few dialect variants by it
    driver_error: type[Exception] = Exception

    def __init__(self, names: NameFile, lock_timeout: float, read_only: bool):
        self.names = names                       # names.bin: file names live outside the database (names.py)
        self.lock_timeout = float(lock_timeout)  # settings.lock_timeout (VISMEM_LOCK_TIMEOUT) at the entry points
        self.read_only = read_only
        self._local = threading.local()
        self._migrated = False
        self._changes = os.fspath(names.path.parent / CHANGES_FILE)   # read on every search: kept as a str

    def describe(self) -> str:
        raise NotImplementedError

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _timeout(self) -> LedgerLockTimeout:
        return LedgerLockTimeout(
            f"the ledger {self.describe()} stayed locked for {self.lock_timeout:.0f} s by another "
            "vismem process; wait for it to finish or raise VISMEM_LOCK_TIMEOUT")

    @contextmanager
    def connect(self) -> Iterator[Session]:
        """A session under the single-writer rule (shared when read-only); nested calls in one
        thread reuse it."""
        outer = getattr(self._local, "session", None)
        if outer is not None:
            yield outer
            return
        with self._session() as session:
            self._local.session = session
            try:
                yield session
            finally:
                self._local.session = None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """All or nothing: a crash or exception inside leaves the ledger as it was."""
        self.check_writable()
        outer = getattr(self._local, "session", None)
        with self.connect() as session:
            if outer is not None and getattr(self._local, "in_tx", False):
                yield session
                return
            con = session.con
            con.begin()
            self._local.in_tx = True
            try:
                yield session
                con.commit()
                self._changed()
            except BaseException:
                try:
                    con.rollback()
                except self.driver_error:
                    # A commit that failed (a full disk) already ended the transaction: the error
                    # to report is that one, not "no transaction is active".
                    pass
                raise
            finally:
                self._local.in_tx = False

    def change_token(self) -> bytes | None:
        """What changes whenever a transaction commits, read in microseconds (a few bytes of a
        file in the home): a long-lived reader checks it before asking the ledger again what it
        has cached (the live index version, the pending forgets, the catalog). None: no
        transaction has committed since the file was introduced (ask the ledger)."""
        try:
            fd = os.open(self._changes, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 256)   # (its content is under 100 bytes)
        finally:
            os.close(fd)

    def _changed(self) -> None:
        # Unique content, renamed over the old file (readers never see half of it). No fsync:
        # after a crash every reader starts afresh anyway.
        final = Path(self._changes)
        tmp = final.with_name(f".{CHANGES_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(b"%d %d %s\n" % (time.time_ns(), os.getpid(), os.urandom(8).hex().encode()))
        os.replace(tmp, final)

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyLedger(
                f"the memory home {self.names.path.parent} is not writable by this user: this command changes the "
                "memory and needs write access there (classify, status, audit verify/query/proof work read-only)")

    def query(self, sql: str, params: list | tuple | None = None) -> pl.DataFrame:
        """Raw SQL, for tests and tools that inspect the ledger; the core uses the session's groups."""
        with self.connect() as session:
            return to_frame(session.execute(sql, params))

    def schema_version(self) -> int:
        with self.connect() as session:
            return session.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
