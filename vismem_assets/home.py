"""Where things live under a memory home (VISMEM_HOME)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "vismem_home"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """--home, else $VISMEM_HOME, else ./vismem_home: the CLI and Dagster resolve it the same way."""
    return Path(home or os.environ.get("VISMEM_HOME") or DEFAULT_HOME).expanduser().resolve()


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.duckdb"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def inbox_sets(self) -> Path:
        return self.root / "inbox" / "sets"

    @property
    def inbox_forget(self) -> Path:
        return self.root / "inbox" / "forget"

    def embeddings(self, encoder_slug: str) -> Path:
        return self.root / "embeddings" / encoder_slug

    def indexes(self, encoder_slug: str) -> Path:
        return self.root / "indexes" / encoder_slug

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def create(self) -> "Layout":
        for d in (self.root, self.images, self.quarantine, self.inbox_sets, self.inbox_forget):
            d.mkdir(parents=True, exist_ok=True)
        return self
