"""Ledger group: leave-one-out pruning statistics and their runs."""
from __future__ import annotations

from .session import Group


class PruningStats(Group):
    """leave-one-out pruning statistics and their runs"""
