"""The image store: where a sample's bytes live under the home (`images/<xx>/<sha256>.<ext>`, a
refused file's private copy under `quarantine/`), and how an ingest stages them so that they
enter the store only with the ledger rows that name them (store.py tells the crash story).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from .home import Layout
from .imagesets import CheckedImage, ImageSetError, check_source
from .names import shown_name
from .store import Staging

_PLAIN_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")


def without_bytes(c: CheckedImage, keep_marker: bool = False) -> CheckedImage:
    """Drop the bytes once staged, so a large set is never held in memory at once (`keep_marker`:
    b"" instead of None, to remember that the bytes could be read)."""
    return replace(c, data=b"" if keep_marker else None)


class ImageStore:
    def __init__(self, layout: Layout):
        self.layout = layout

    def image_path(self, c: CheckedImage) -> Path:
        return self.layout.images / c.sample_id[:2] / f"{c.sample_id}.{c.format}"

    def quarantine_path(self, c: CheckedImage) -> Path:
        suffix = c.source.path.suffix.lower()  # the file's own, when plain: a name's bytes need not be UTF-8
        return self.layout.quarantine / f"{c.sample_id}{suffix if _PLAIN_SUFFIX.fullmatch(suffix) else '.bin'}"

    def stage_image(self, c: CheckedImage, staging: Staging) -> CheckedImage:
        """Stage a good image's bytes (unless the store holds them: same name, same bytes); the
        image without its bytes."""
        if not self.image_path(c).exists():
            staging.stage(self.image_path(c).name, c.data)
        return without_bytes(c)

    def stage_quarantine_copy(self, c: CheckedImage, staging: Staging) -> CheckedImage:
        """Stage a private copy of a refused file's bytes, if they could be read; the image
        without its bytes (b"" marks that there were some)."""
        if c.data is not None:
            path = self.quarantine_path(c)
            if not path.exists():
                # Quarantined bytes are anything someone dropped in a set: readable by the owner only.
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(path.parent, 0o700)  # a home made before this rule has a 0755 folder
                staging.stage("q-" + path.name, c.data, mode=0o600)
        return without_bytes(c, keep_marker=c.data is not None)

    def plan_image(self, staging: Staging, c: CheckedImage) -> None:
        self._plan_move(staging, c, self.image_path(c), self.image_path(c).name)

    def plan_quarantine_copy(self, staging: Staging, c: CheckedImage) -> None:
        if c.data is not None:
            self._plan_move(staging, c, self.quarantine_path(c), "q-" + self.quarantine_path(c).name)

    def _plan_move(self, staging: Staging, c: CheckedImage, final: Path, staged_name: str) -> None:
        """Plan the move of a staged file into the store. Not staged because the store held it
        when the file was read, and gone since (a dead ingest's uncommitted file, removed by the
        clean-up of dead staging folders): its source is read again."""
        staged = staging.staged(staged_name)
        if staged is None and not final.exists():
            again = check_source(c.source)
            if again.sample_id != c.sample_id or again.data is None:
                raise ImageSetError(f"{shown_name(c.source.name)} changed while the set was being added: add the set again")
            staged = staging.stage(staged_name, again.data, mode=0o600 if final.parent == self.layout.quarantine else 0o644)
        if staged is not None:
            staging.plan(staged, final)
