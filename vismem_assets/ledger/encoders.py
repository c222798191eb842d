"""Ledger group: the encoders table (which encoder a memory used, when)."""
from __future__ import annotations

from .session import Group


class Encoders(Group):
    """the encoders table (which encoder a memory used, when)"""
