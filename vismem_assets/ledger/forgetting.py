"""Ledger group: forget requests, the hash-chained deletions, the blocklist and near-copy hashes."""
from __future__ import annotations

from .session import Group


class ForgetRecords(Group):
    """forget requests, the hash-chained deletions, the blocklist and near-copy hashes"""
