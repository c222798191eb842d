"""The ledger: a DuckDB file that is the truth of the memory.

DuckDB lets one process write at a time (and no reader may open the file while a writer has
it), so every connection is short-lived and taken under an exclusive file lock: two runs at
once wait for each other instead of failing with a lock error. Within a thread, nested
`connect()` calls share the outer connection.
"""
from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl

from .atomic import fsync_dir
from .names import NAMES_FILE, NameFile, move_names_out

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
AUDIT_DIR = SQL_DIR / "audit"


class LedgerLockTimeout(TimeoutError):
    pass


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every file `NNN_name.sql`, in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d+)_(.+)\.sql", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path.read_text()))
    if not found:
        raise FileNotFoundError(f"no ledger migrations in {MIGRATIONS_DIR}: is the checkout complete?")
    return found


def audit_queries() -> list[str]:
    return sorted(p.stem for p in AUDIT_DIR.glob("*.sql"))


def named_query(name: str) -> str:
    path = AUDIT_DIR / f"{name}.sql"
    if not path.exists():
        raise ValueError(f"no audit query {name!r}; known: {', '.join(audit_queries())}")
    return path.read_text()


def to_frame(cursor: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Result of the last execute as a polars frame (no pyarrow needed)."""
    columns = [d[0] for d in cursor.description]
    return pl.DataFrame(cursor.fetchall(), schema=columns, orient="row", infer_schema_length=None)


def insert_rows(con, table: str, columns: dict[str, tuple[str, list]], on_conflict: str = "", **constants: str) -> None:
    """Bulk insert: one statement of parallel unnest()s, plus SQL constants for the other columns."""
    n = len(next(iter(columns.values()))[1])
    if n == 0:
        return
    names = list(columns) + list(constants)
    exprs = [f"unnest(?::{sqltype}[])" for sqltype, _ in columns.values()] + list(constants.values())
    con.execute(f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(exprs)} {on_conflict}",
                [values for _, values in columns.values()])


class Ledger:
    def __init__(self, path: Path, lock_timeout: float | None = None):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = float(lock_timeout or os.environ.get("VISMEM_LOCK_TIMEOUT", 600))
        self._local = threading.local()
        self._migrated = False
        self.names = NameFile(self.path.with_name(NAMES_FILE))
        # Written before a migration that moved names out commits, removed once the file is copied.
        self._stale_bytes = self.path.with_name(self.path.name + ".copy-pending")

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LedgerLockTimeout(
                            f"the ledger {self.path} stayed locked for {self.lock_timeout:.0f} s by another "
                            "vismem process; wait for it to finish or raise VISMEM_LOCK_TIMEOUT"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection under the exclusive lock; nested calls in one thread reuse it."""
        outer = getattr(self._local, "con", None)
        if outer is not None:
            yield outer
            return
        with self._lock():
            con = self._open()
            try:
                if not self._migrated:
                    self._migrate(con)
                if self._stale_bytes.exists():  # names moved out of DuckDB: their old bytes go with a fresh copy
                    con.close()
                    self._copy_to_fresh_file()
                    self._stale_bytes.unlink()
                    con = self._open()
                self._local.con = con
                yield con
            finally:
                self._local.con = None
                con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All or nothing: a crash or exception inside leaves the ledger as it was."""
        outer = getattr(self._local, "con", None)
        with self.connect() as con:
            if outer is not None and getattr(self._local, "in_tx", False):
                yield con
                return
            con.begin()
            self._local.in_tx = True
            try:
                yield con
                con.commit()
            except BaseException:
                con.rollback()
                raise
            finally:
                self._local.in_tx = False

    def query(self, sql: str, params: list | tuple | None = None) -> pl.DataFrame:
        with self.connect() as con:
            return to_frame(con.execute(sql, params or []))

    def run_named(self, name: str, variables: dict[str, str] | None = None) -> pl.DataFrame:
        """An audit query from sql/audit/, its parameters set as DuckDB variables (as in the CLI)."""
        sql = named_query(name)
        with self.connect() as con:
            for key, value in (variables or {}).items():
                if not key.isidentifier():
                    raise ValueError(f"parameter name {key!r} is not an identifier")
                con.execute(f'SET VARIABLE "{key}" = ?', [value])  # quoted: 'from' and 'to' are keywords
            try:
                return to_frame(con.execute(sql))  # one statement per file
            finally:
                for key in variables or {}:
                    con.execute(f'RESET VARIABLE "{key}"')

    def _open(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(str(self.path))
        home = str(self.path.parent.resolve()).replace("'", "''")
        con.execute(f"SET file_search_path = '{home}'")  # where the macro original_name() finds names.bin
        self.names.ensure()
        return con

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
                if version == 7 and move_names_out(con, self.names):
                    self._stale_bytes.touch()
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

    def schema_version(self) -> int:
        with self.connect() as con:
            return con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
