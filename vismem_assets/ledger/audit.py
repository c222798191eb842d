"""Ledger group: the reads behind audit verify and proofs of forgetting."""
from __future__ import annotations

from .session import Group


class AuditRecords(Group):
    """the reads behind audit verify and proofs of forgetting"""
