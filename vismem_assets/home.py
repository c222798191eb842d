"""Where things live under a memory home (VISMEM_HOME)."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "vismem_home"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The home as an absolute path (./vismem_home when None); the entry points pass the
    settings' home, which --home or VISMEM_HOME set."""
    return Path(home or DEFAULT_HOME).expanduser().resolve()


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

    @property
    def inbox_relabel(self) -> Path:
        return self.root / "inbox" / "relabel"

    @property
    def inbox_weights(self) -> Path:
        return self.root / "inbox" / "weights"

    def embeddings(self, encoder_slug: str) -> Path:
        return self.root / "embeddings" / encoder_slug

    def indexes(self, encoder_slug: str) -> Path:
        return self.root / "indexes" / encoder_slug

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def create(self) -> "Layout":
        # A home that is a file or cannot be written to is one clear error naming the setting
        # to change, not a traceback from mkdir.
        try:
            for d in (self.root, self.images, self.quarantine, self.inbox_sets, self.inbox_forget, self.inbox_relabel,
                      self.inbox_weights):
                # quarantine/ holds whatever bad files arrived: private to the owner (0700).
                d.mkdir(mode=0o700 if d == self.quarantine else 0o777, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"the memory home {self.root} (or a folder in it) is a file, not a folder: "
                                     "point --home or VISMEM_HOME at a folder") from None
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(f"cannot create the memory home {self.root} ({os.strerror(exc.errno).lower()}): "
                                  "point --home or VISMEM_HOME at a folder you can write to") from None
        return self

    def read_only(self) -> bool:
        """An existing memory this user may read but not change (another user's home, a
        read-only mount): it is then opened read-only and nothing is created in it."""
        lock = self.ledger.with_name(self.ledger.name + ".lock")
        return self.ledger.is_file() and any(p.exists() and not os.access(p, os.W_OK)
                                             for p in (self.root, self.ledger, lock))
