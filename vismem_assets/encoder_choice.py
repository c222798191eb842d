"""Which encoder a memory uses: the one asked for, else the one it used last, else the default.

Loading it records its use in the ledger (bookkeeping a read-only memory skips); its id can be
known without loading the model, for commands that only read (status, pending work).
"""
from __future__ import annotations

from .encoders import DEFAULT_ENCODER, Encoder, load_encoder
from .ledger import LedgerBase


class EncoderChoice:
    def __init__(self, ledger: LedgerBase, asked: str | Encoder | None, read_only: bool):
        self.ledger, self.asked, self.read_only = ledger, asked, read_only
        self.loaded: Encoder | None = asked if isinstance(asked, Encoder) else None
        self._recorded = False

    def use(self, encoder: Encoder) -> None:
        """Use this encoder from now on (one already loaded: tests, notebooks)."""
        self.asked = self.loaded = encoder
        self._recorded = False

    def spec(self) -> str:
        if isinstance(self.asked, str):
            return self.asked
        with self.ledger.connect() as s:
            return s.encoders.last_used_spec() or DEFAULT_ENCODER

    def load(self) -> Encoder:
        if self.loaded is None:
            self.loaded = load_encoder(self.spec())
        if not self.read_only and not self._recorded:
            with self.ledger.transaction() as s:
                s.encoders.record_use(self.loaded, getattr(self.loaded, "spec", None) or self.spec())
            self._recorded = True
        return self.loaded

    def known_id(self) -> str | None:
        """The encoder's id without loading the model (None: no encoder ran in this memory yet)."""
        if self.loaded is not None:
            return self.loaded.id
        with self.ledger.connect() as s:
            return s.encoders.id_for_spec(self.spec())
