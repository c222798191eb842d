"""Ledger group: image sets, ingests, samples, quarantine and embedding rows."""
from __future__ import annotations

from .session import Group


class Samples(Group):
    """image sets, ingests, samples, quarantine and embedding rows"""
