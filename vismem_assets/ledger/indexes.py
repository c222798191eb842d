"""Ledger group: index versions, their files, digests, lineage and erasures."""
from __future__ import annotations

from .session import Group


class IndexVersions(Group):
    """index versions, their files, digests, lineage and erasures"""
