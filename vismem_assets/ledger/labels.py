"""Ledger group: label history and user weights (relabel, weight)."""
from __future__ import annotations

from .session import Group


class Labels(Group):
    """label history and user weights (relabel, weight)"""
