"""Ledger migrations: SQL files in sql/migrations, each with an optional Python hook from
ledger.MIGRATION_HOOKS that runs in the migration's own transaction."""
import pytest

from vismem_assets.ledger import duckdb_file as ledger_mod
from vismem_assets.ledger import Ledger, migrations


def test_every_hook_belongs_to_a_migration_file():
    assert set(ledger_mod.MIGRATION_HOOKS) <= {version for version, _, _ in migrations()}


def test_a_hook_runs_in_its_migrations_transaction_and_its_failure_undoes_that_migration(tmp_path, monkeypatch):
    seen = []

    def failing(ledger, con):
        seen.append(con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])
        raise RuntimeError("hook failed")

    monkeypatch.setattr(ledger_mod, "MIGRATION_HOOKS", {**ledger_mod.MIGRATION_HOOKS, 2: failing})
    with pytest.raises(RuntimeError, match="hook failed"):
        Ledger(tmp_path / "ledger.duckdb").schema_version()
    assert seen == [1]  # after migration 1 committed, inside migration 2
    monkeypatch.undo()
    fresh = Ledger(tmp_path / "ledger.duckdb")  # migration 2 left nothing behind: it applies again
    assert fresh.schema_version() == migrations()[-1][0]
    assert fresh.query("SELECT version FROM schema_migrations ORDER BY 1")["version"].to_list() == \
        [version for version, _, _ in migrations()]
