"""The memory as a Dagster resource: the same home as the CLI ($VISMEM_HOME)."""
from __future__ import annotations

import os
from functools import lru_cache

from dagster import ConfigurableResource
from pydantic import Field

from vismem_assets.home import resolve_home
from vismem_assets.memory import Memory


@lru_cache(maxsize=4)
def _memory(home: str, encoder: str | None) -> Memory:
    # One Memory (and so one loaded torch model) per process: the steps of a run share it.
    return Memory(home, encoder=encoder)


class VisualMemory(ConfigurableResource):
    home: str | None = Field(default=None, description="memory home; default $VISMEM_HOME, else ./vismem_home")
    encoder: str | None = Field(default=None, description="encoder spec; default the memory's last, else efficientnet-lite0")
    query_set: str | None = Field(
        default=None,
        description="labelled query folder for evaluation (absolute, or relative to the memory home); "
                    "default: $VISMEM_QUERY_SET, else leave-one-out over the memory itself")
    k_max: int = Field(default=100, description="evaluate every k in 1..k_max")
    retain_versions: int = Field(default=5, description="index versions kept by compaction, the live one included")
    max_top1_drop: float = Field(default=0.02, description="largest tolerated drop of top-1 between index versions")

    def memory(self) -> Memory:
        return _memory(str(resolve_home(self.home)), self.encoder)

    def query_set_path(self):
        """The configured query folder, or None for leave-one-out."""
        chosen = self.query_set or os.environ.get("VISMEM_QUERY_SET")
        return self.memory().layout.root / chosen if chosen else None
