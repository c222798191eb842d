"""The ledger: the truth of the memory, behind a repository.

What belongs here: every SQL statement the core runs. `Ledger` opens sessions (short-lived,
one writer at a time); a session's groups (`session.samples`, `session.indexes`,
`session.forgetting`, ...) have one typed method per thing the core needs. The DuckDB file
(`duckdb_file.py`) is the one implementation today; a PostgreSQL ledger plugs in as a ledger
whose sessions' groups speak its dialect. Schema and audit queries live in the top-level `sql/`.
"""
from .duckdb_file import (AUDIT_DIR, MIGRATION_HOOKS, MIGRATIONS_DIR, SQL_DIR, Ledger, LedgerLockTimeout,
                          ReadOnlyLedger, audit_queries, insert_rows, migrations, named_query, to_frame)
from .session import Group, Session

__all__ = ["AUDIT_DIR", "MIGRATION_HOOKS", "MIGRATIONS_DIR", "SQL_DIR", "Group", "Ledger", "LedgerLockTimeout",
           "ReadOnlyLedger", "Session", "audit_queries", "insert_rows", "migrations", "named_query", "to_frame"]
