"""The ledger: the truth of the memory, behind a repository.

What belongs here: every SQL statement the core runs. A ledger opens sessions (short-lived,
one writer at a time); a session's groups (`session.samples`, `session.indexes`,
`session.forgetting`, ...) have one typed method per thing the core needs. Two backends share
them: the DuckDB file in the memory home (`duckdb_file.py`, the default) and a PostgreSQL
server (`postgres.py`, when the settings name one). Schema and audit queries live in the
top-level `sql/` (PostgreSQL's few twins in `sql/postgres/`).
"""
from __future__ import annotations

from pathlib import Path

from .base import LedgerBase, LedgerLockTimeout, ReadOnlyLedger, insert_rows, to_frame
from .duckdb_file import MIGRATION_HOOKS, Ledger
from .forgetting import parquet_footers
from .session import Group, Session
from .sql_files import AUDIT_DIR, MIGRATIONS_DIR, SQL_DIR, audit_queries, migrations, named_query


def open_ledger(duckdb_path: Path, url: str | None = None, lock_timeout: float = 600.0,
                read_only: bool = False) -> LedgerBase:
    """The PostgreSQL ledger at `url` (postgresql://...), else the DuckDB file at `duckdb_path`.
    Either way file names live in names.bin beside `duckdb_path`, in the memory home."""
    if url:
        from .postgres import PostgresLedger  # psycopg2 loads only where a server is named
        return PostgresLedger(url, Path(duckdb_path).parent, lock_timeout=lock_timeout, read_only=read_only)
    return Ledger(duckdb_path, lock_timeout=lock_timeout, read_only=read_only)


__all__ = ["AUDIT_DIR", "MIGRATION_HOOKS", "MIGRATIONS_DIR", "SQL_DIR", "Group", "Ledger", "LedgerBase",
           "LedgerLockTimeout", "ReadOnlyLedger", "Session", "audit_queries", "insert_rows", "migrations",
           "named_query", "open_ledger", "parquet_footers", "to_frame"]
