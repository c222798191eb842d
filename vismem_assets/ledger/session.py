"""A session on the ledger: one connection (inside or outside a transaction) and its groups.

Callers reach the tables through typed groups, one per family of tables:
`session.samples.active_ids()`, `session.forgetting.append_deletion(...)`. The groups hold the
SQL; nothing outside this package writes SQL. Both backends (the DuckDB file, PostgreSQL)
yield these sessions: the groups' SQL is written once, and the few statements that differ look at
`session.ledger.dialect`.
"""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .audit import AuditRecords
    from .encoders import Encoders
    from .evaluations import Evaluations
    from .forgetting import ForgetRecords
    from .indexes import IndexVersions
    from .labels import Labels
    from .overview import Overview
    from .pruning import PruningStats
    from .samples import Samples


class Session:
    def __init__(self, con, ledger):
        self.con = con          # the backend's connection (duckdb here); groups use it
        self.ledger = ledger

    def execute(self, sql: str, params=None):
        """Raw SQL on this session's connection: for tests and tools that inspect the ledger.
        Core code calls a group's method instead (tests/test_layers.py holds that line)."""
        return self.con.execute(sql, params or [])

    # One group per family of tables, built on first use.
    @cached_property
    def encoders(self) -> Encoders:
        from .encoders import Encoders
        return Encoders(self)

    @cached_property
    def samples(self) -> Samples:
        from .samples import Samples
        return Samples(self)

    @cached_property
    def indexes(self) -> IndexVersions:
        from .indexes import IndexVersions
        return IndexVersions(self)

    @cached_property
    def forgetting(self) -> ForgetRecords:
        from .forgetting import ForgetRecords
        return ForgetRecords(self)

    @cached_property
    def audit(self) -> AuditRecords:
        from .audit import AuditRecords
        return AuditRecords(self)

    @cached_property
    def pruning(self) -> PruningStats:
        from .pruning import PruningStats
        return PruningStats(self)

    @cached_property
    def evaluations(self) -> Evaluations:
        from .evaluations import Evaluations
        return Evaluations(self)

    @cached_property
    def labels(self) -> Labels:
        from .labels import Labels
        return Labels(self)

    @cached_property
    def overview(self) -> Overview:
        from .overview import Overview
        return Overview(self)


class Group:
    """A family of tables: its methods are the only code that reads or writes them."""

    def __init__(self, session: Session):
        self.session = session
        self.con = session.con
