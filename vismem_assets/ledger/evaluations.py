"""Ledger group: evaluation runs and their per-k accuracy rows."""
from __future__ import annotations

from .session import Group


class Evaluations(Group):
    """evaluation runs and their per-k accuracy rows"""
