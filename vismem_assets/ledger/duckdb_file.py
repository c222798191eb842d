"""The DuckDB ledger: one file that is the truth of the memory.

DuckDB lets one process write at a time (and no reader may open the file while a writer has
it), so every connection is short-lived and taken under an exclusive file lock: two runs at
once wait for each other instead of failing with a lock error. Within a thread, nested
`connect()` calls share the outer connection.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import polars as pl
from filelock import FileLock, Timeout

from ..atomic import fsync_dir
from ..names import NAMES_FILE, NameFile
from .base import LedgerBase, ReadOnlyLedger, to_frame
from .session import Session
from .sql_files import migrations, named_query


def _names_out_of_duckdb(ledger: Ledger, con: duckdb.DuckDBPyConnection) -> None:
    if Session(con, ledger).forgetting.move_names_out(ledger.names):
        ledger._stale_bytes.touch()  # their old bytes leave with a fresh copy of the file (see connect)


# Python a migration needs after its SQL, run in the same transaction: {version: hook}.
MIGRATION_HOOKS: dict[int, Callable[[Ledger, duckdb.DuckDBPyConnection], None]] = {
    7: _names_out_of_duckdb,
}


class Ledger(LedgerBase):
    """The DuckDB file (`ledger.duckdb` in the memory home)."""
    dialect = "duckdb"
    driver_error = duckdb.Error
    _POLL_S = 0.02  # how often a waiting process tries the lock again

    def __init__(self, path: Path, lock_timeout: float = 600.0, read_only: bool = False):
        """`read_only`: for a memory home this user may not write (a read-only mount, another
        user's memory): connections open read-only under a shared lock (readers wait for a
        writer, not for each other), nothing is created, and a transaction is refused."""
        self.path = Path(path)
        super().__init__(NameFile(self.path.with_name(NAMES_FILE)), lock_timeout, read_only)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # flock on the lock file, held per thread (filelock's default): two threads wait for each
        # other as two processes do; nested connections in one thread share the outer one.
        self._write_lock = FileLock(self.lock_path, mode=0o644, poll_interval=self._POLL_S)
        # Written before a migration that moved names out commits, removed once the file is copied.
        self._stale_bytes = self.path.with_name(self.path.name + ".copy-pending")

    @contextmanager
    def _lock(self, shared: bool = False) -> Iterator[None]:
        """Exclusive (a writer), or shared (read-only connections: several may read at once,
        none while a writer holds the ledger, which DuckDB would refuse anyway)."""
        if shared:
            with self._shared_lock():
                yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write_lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            raise self._timeout() from None
        try:
            yield
        finally:
            self._write_lock.release()

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        # flock by hand: filelock has no shared lock on the writers' file (its ReadWriteLock is a
        # SQLite database it must write), and a reader may only open the lock file read-only.
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            # No writer ever ran here (or its lock file is private) and a reader may not
            # create it: go unlocked; DuckDB itself refuses to read under an active writer.
            yield
            return
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise self._timeout() from None
                    time.sleep(self._POLL_S)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """A connection under the exclusive lock (shared when read-only), migrated."""
        with self._lock(shared=self.read_only):
            con = self._open(read_only=self.read_only)
            try:
                if self.read_only:
                    if not self._migrated:
                        self._check_schema(con)
                elif not self._migrated:
                    self._migrate(con)
                if not self.read_only and self._stale_bytes.exists():  # names moved out of DuckDB: their old bytes go with a fresh copy
                    con.close()
                    self._copy_to_fresh_file()
                    self._stale_bytes.unlink()
                    con = self._open()
                yield Session(con, self)
            finally:
                con.close()

    def run_named(self, name: str, variables: dict[str, str] | None = None) -> pl.DataFrame:
        """An audit query from sql/audit/, its parameters set as DuckDB variables (as in the CLI),
        run on a read-only connection of its own: an audit reads, and whatever a file in
        sql/audit says, it cannot change the ledger."""
        sql = named_query(name)
        for key in variables or {}:
            if not key.isidentifier():
                raise ValueError(f"parameter name {key!r} is not an identifier")
        if getattr(self._local, "session", None) is not None:
            # DuckDB refuses a read-only connection beside this thread's open read-write one.
            raise RuntimeError("Ledger.run_named opens its own read-only connection: call it outside Ledger.connect()")
        if not self._migrated:
            with self.connect():  # a new or older ledger is created or migrated first (checked, when read-only)
                pass
        with self._lock(shared=True):
            con = self._open(read_only=True)
            try:
                # Read-only stops writes to the ledger, not COPY ... TO a file: one SELECT only.
                kinds = [st.type for st in con.extract_statements(sql)]
                if kinds != [duckdb.StatementType.SELECT]:
                    raise ValueError(f"audit query {name!r} must be one SELECT statement, not "
                                     f"{', '.join(k.name for k in kinds) or 'nothing'}")
                for key, value in (variables or {}).items():
                    con.execute(f'SET VARIABLE "{key}" = ?', [value])  # quoted: 'from' and 'to' are keywords
                return to_frame(con.execute(sql))  # one statement per file
            finally:
                con.close()

    def _open(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"no ledger at {self.path}: there is no memory in {self.path.parent} yet "
                                    "(and this user cannot create one there); check --home / VISMEM_HOME")
        con = duckdb.connect(str(self.path), read_only=read_only)
        home = str(self.path.parent.resolve()).replace("'", "''")
        con.execute(f"SET file_search_path = '{home}'")  # where the macro original_name() finds names.bin
        if not read_only:
            self.names.ensure()
        return con

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        """A read-only ledger cannot be migrated: it must already be at this code's schema."""
        try:
            have = con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        except duckdb.CatalogException:
            have = None
        want = migrations()[-1][0]
        if have is None or have < want:
            raise ReadOnlyLedger(f"the ledger {self.path} is at schema version {have or 0}, this vismem needs {want}, "
                                 "and it is read-only here: run any vismem command once with write access to migrate it")
        self._migrated = True

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
        )
        applied = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, name, sql in migrations():
            if version in applied:
                continue
            con.begin()
            try:
                con.execute(sql)
                if version in MIGRATION_HOOKS:
                    MIGRATION_HOOKS[version](self, con)
                con.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name]
                )
                con.commit()
            except BaseException:
                con.rollback()
                raise
        self._migrated = True

    def _copy_to_fresh_file(self) -> None:
        """Copy the database into a fresh file and swap it in (under the lock): DuckDB keeps the
        old bytes of updated or deleted rows in its file's free blocks."""
        fresh = self.path.with_name(self.path.name + ".fresh")
        fresh.unlink(missing_ok=True)
        con = duckdb.connect(str(self.path))
        try:
            source = con.execute("SELECT current_database()").fetchone()[0]
            con.execute(f"ATTACH '{fresh}' AS fresh")
            con.execute(f'COPY FROM DATABASE "{source}" TO fresh')
            con.execute("DETACH fresh")
        finally:
            con.close()
        with open(fresh, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(fresh, self.path)
        fsync_dir(self.path.parent)
