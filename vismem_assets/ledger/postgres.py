"""The PostgreSQL ledger (`VISMEM_LEDGER_URL=postgresql://...`): the DuckDB file's schema,
groups and hash-chained deletions, in a server that machines of a cluster share.

The groups' SQL is written once. A thin connection adapter gives psycopg2 DuckDB's calling
convention (`?` parameters, `execute(...).fetchnumpy()`, `begin()`), and maps the one type name
that differs (DOUBLE); the few statements that truly differ are dialect variants in their group,
and the migrations and audit queries that do have twins in sql/postgres/.

One writer at a time, as with the DuckDB file: a session that may write holds a session-level
advisory lock (the file lock's rule: a writer's reads and writes are one critical section), and
every transaction also takes the transaction-level one, so a writer that comes without the
session lock (another tool) still waits. Readers of a read-only ledger take no lock (MVCC).
File names stay out of the database here too (PostgreSQL keeps dead tuples and WAL as DuckDB
keeps old bytes): names.bin lives in the shared memory home.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ..names import NAMES_FILE, NameFile
from ..settings import redact_url
from .base import LedgerBase, ReadOnlyLedger, to_frame
from .session import Session
from .sql_files import migrations, named_query

# pg_advisory_lock key of the single writer (any 64-bit number, the same in every process).
WRITER_LOCK = 0x7669736D656D  # "vismem"

# numpy scalars as parameters (vector ids, weights) adapt as the Python numbers they are.
for _t in (np.integer, np.floating, np.bool_):
    psycopg2.extensions.register_adapter(_t, lambda v: psycopg2.extensions.adapt(v.item()))

_INT_TYPES = {20, 21, 23}          # int8, int2, int4
_FLOAT_TYPES = {700, 701, 1700}    # float4, float8, numeric
_BOOL_TYPES = {16}
# Outside quoted text and comments: '?' (a parameter), '%' (psycopg2's own marker), DOUBLE.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?|%|\bDOUBLE\b(?!\s+PRECISION)", re.IGNORECASE)


@lru_cache(maxsize=1024)
def translate(sql: str, with_params: bool) -> str:
    """DuckDB's spelling of a statement in psycopg2's: `?` -> `%s` (and `%` -> `%%`) when it has
    parameters, DOUBLE -> DOUBLE PRECISION always. Quoted text and comments are left alone."""
    def one(m: re.Match) -> str:
        token = m.group(0)
        if token == "?":
            return "%s" if with_params else token
        if token == "%":
            return "%%" if with_params else token
        if token.upper() == "DOUBLE":
            return "DOUBLE PRECISION"
        return token
    return _TOKENS.sub(one, sql)


class Result:
    """A cursor as the groups use DuckDB's: fetchone, fetchall, fetchnumpy, description."""

    def __init__(self, cursor):
        self._cursor = cursor
        self.description = cursor.description

    def fetchone(self):
        return self._cursor.fetchone()

    def fetchall(self):
        return self._cursor.fetchall()

    def fetchnumpy(self) -> dict[str, np.ndarray]:
        rows = self._cursor.fetchall()
        out = {}
        for i, column in enumerate(self.description):
            values = [row[i] for row in rows]
            dtype = object
            if None not in values:
                if column.type_code in _INT_TYPES:
                    dtype = np.int64
                elif column.type_code in _FLOAT_TYPES:
                    dtype = np.float64
                elif column.type_code in _BOOL_TYPES:
                    dtype = np.bool_
            out[column.name] = np.array(values, dtype=dtype)
        return out


class Connection:
    """A psycopg2 connection in autocommit mode, spoken to as the groups speak to DuckDB."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql: str, params=None) -> Result:
        cursor = self.raw.cursor()
        if params:
            cursor.execute(translate(sql, True), list(params))
        else:
            cursor.execute(translate(sql, False))
        return Result(cursor)

    def begin(self) -> None:
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", [WRITER_LOCK])

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()


class LedgerUnavailable(ConnectionError):
    """The server named by VISMEM_LEDGER_URL cannot be reached or refuses us."""


class PostgresLedger(LedgerBase):
    dialect = "postgres"
    driver_error = psycopg2.Error

    def __init__(self, url: str, home: Path, lock_timeout: float = 600.0, read_only: bool = False):
        """`home`: the (shared) memory home, where names.bin lives; `read_only`: the home is not
        writable here, so nothing is changed (the server may still allow it, we do not ask)."""
        super().__init__(NameFile(Path(home) / NAMES_FILE), lock_timeout, read_only)
        self.url = url

    def describe(self) -> str:
        return redact_url(self.url)

    def _raw(self):
        try:
            raw = psycopg2.connect(self.url, options="-c timezone=UTC", connect_timeout=10)
        except psycopg2.OperationalError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LedgerUnavailable(f"cannot reach the PostgreSQL ledger {self.describe()}: {reason}. Start it "
                                    "(scripts/cluster.sh up), fix VISMEM_LEDGER_URL, or unset it for the DuckDB "
                                    "file in the memory home") from None
        raw.autocommit = True
        con = Connection(raw)
        # The function original_name() (sql/postgres/migrations/007) reads names from here.
        con.execute("SELECT set_config('vismem.names_file', ?, false)", [str(self.names.path.resolve())])
        con.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")
        return con

    @contextmanager
    def _session(self) -> Iterator[Session]:
        con = self._raw()
        try:
            if not self.read_only:
                self._lock(con, "pg_advisory_lock")
                self.names.ensure()
            if self.read_only and not self._migrated:
                self._check_schema(con)
            elif not self._migrated:
                self._migrate(con)
            yield Session(con, self)
        finally:
            con.close()  # a session-level advisory lock ends with its connection

    def _lock(self, con: Connection, function: str) -> None:
        try:
            con.execute(f"SELECT {function}(?)", [WRITER_LOCK])
        except psycopg2.errors.LockNotAvailable:
            raise self._timeout() from None

    def _check_schema(self, con: Connection) -> None:
        have = con.execute("SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN NULL"
                           " ELSE (SELECT max(version) FROM schema_migrations) END").fetchone()[0]
        want = migrations("postgres")[-1][0]
        if have is None or have < want:
            raise ReadOnlyLedger(f"the ledger {self.describe()} is at schema version {have or 0}, this vismem needs "
                                 f"{want}, and the memory home is read-only here: run any vismem command once with "
                                 "write access to migrate it")
        self._migrated = True

    def _migrate(self, con: Connection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
        applied = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, name, sql in migrations("postgres"):
            if version in applied:
                continue
            con.begin()
            try:
                con.execute(sql)  # no Python hooks here: a PostgreSQL ledger is born after 007's
                con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
                con.commit()
            except BaseException:
                con.rollback()
                raise
        self._migrated = True

    def run_named(self, name: str, variables: dict[str, str] | None = None) -> pl.DataFrame:
        """An audit query from sql/audit/ (or its twin in sql/postgres/audit/), its parameters
        set as `vismem.<name>` settings that getvariable() reads (as `SET vismem.from = '...'`
        does in psql), in a read-only transaction of its own: an audit cannot change the ledger."""
        sql = named_query(name, "postgres")
        for key in variables or {}:
            if not key.isidentifier():
                raise ValueError(f"parameter name {key!r} is not an identifier")
        body = re.sub(r"--[^\n]*", "", sql).strip().rstrip(";").strip()
        if ";" in body or not re.match(r"(?is)(select|with)\b", body):
            raise ValueError(f"audit query {name!r} must be one SELECT statement")
        if not self._migrated:
            with self.connect():  # a new or older ledger is created or migrated first (checked, when read-only)
                pass
        con = self._raw()
        try:
            con.execute("BEGIN TRANSACTION READ ONLY")
            for key, value in (variables or {}).items():
                con.execute("SELECT set_config(?, ?, true)", [f"vismem.{key}", value])
            frame = to_frame(con.execute(body))
            con.rollback()
            return frame
        finally:
            con.close()
