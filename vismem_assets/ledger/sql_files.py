"""The SQL files: the schema's migrations and the named audit queries, per dialect.

`sql/migrations/` and `sql/audit/` are DuckDB's (and run as-is in the duckdb CLI). PostgreSQL
runs the same files except where `sql/postgres/migrations/` or `sql/postgres/audit/` holds a
twin of the same name (types, macros, JSON functions differ): one version number, one schema.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path


def _sql_dir() -> Path:
    """A wheel carries the SQL as package data (vismem_assets/sql); a checkout reads the repo's
    top-level sql/, the files the duckdb CLI and psql run."""
    packaged = resources.files("vismem_assets") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))  # an installed package lies on disk: Path(...).glob() works
    return Path(__file__).resolve().parents[2] / "sql"


SQL_DIR = _sql_dir()
MIGRATIONS_DIR = SQL_DIR / "migrations"
AUDIT_DIR = SQL_DIR / "audit"
DIALECT_DIRS = {"duckdb": SQL_DIR, "postgres": SQL_DIR / "postgres"}


def _twin(path: Path, dialect: str) -> Path:
    """The dialect's own version of a shared SQL file, where it has one."""
    own = DIALECT_DIRS[dialect] / path.parent.name / path.name
    return own if own.is_file() else path


def migrations(dialect: str = "duckdb") -> list[tuple[int, str, str]]:
    """(version, name, sql) of every file `NNN_name.sql`, in order, in the dialect's text."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d+)_(.+)\.sql", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), _twin(path, dialect).read_text()))
    if not found:
        raise FileNotFoundError(f"no ledger migrations in {MIGRATIONS_DIR}: is the checkout or installation complete?")
    return found


def audit_queries() -> list[str]:
    return sorted(p.stem for p in AUDIT_DIR.glob("*.sql") if p.is_file())


def named_query(name: str, dialect: str = "duckdb") -> str:
    """The SQL of an audit query, by its exact name in sql/audit/. The name is matched against
    the listing, never joined onto a path: `../migrations/001_init` or an absolute path would
    otherwise run any SQL file on the ledger."""
    known = audit_queries()
    if name not in known:
        raise ValueError(f"no audit query {name!r}; known: {', '.join(known)}")
    return _twin(AUDIT_DIR / f"{name}.sql", dialect).read_text()
