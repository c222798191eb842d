"""The memory as a Dagster resource: the same settings as the CLI (VISMEM_*, settings.py), its
fields overriding them."""
from __future__ import annotations

from functools import lru_cache

from dagster import ConfigurableResource
from pydantic import Field

from vismem_assets.evaluation import query_set_path
from vismem_assets.home import resolve_home
from vismem_assets.index_types import IndexPolicy
from vismem_assets.memory import Memory
from vismem_assets.settings import Settings


@lru_cache(maxsize=4)
def _memory(home: str, encoder: str | None, policy: IndexPolicy | None = None, shards: int | None = None) -> Memory:
    # One Memory (and so one loaded torch model) per process: the steps of a run share it. Its
    # settings are the environment's as the first step found them, as when Memory read them itself.
    return Memory(home, encoder=encoder, index_policy=policy, settings=Settings.from_env(shards=shards))


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
    index_type: str | None = Field(
        default=None, description="index type builds write: auto, flat, ivf-flat or ivf-pq (default $VISMEM_INDEX_TYPE, "
                                  "else auto: exact below ivf_from vectors, IVF-Flat above if its recall passes)")
    ivf_from: int | None = Field(default=None, description="auto: IVF-Flat from this many vectors (default 200,000)")
    recall_floor: float | None = Field(
        default=None, description="recall@10 on held-out memory vectors an approximate index must reach, else the "
                                  "memory stays exact (default 0.95)")
    shards: int | None = Field(
        default=None, description="shards (by sample id) a new memory is split into (default $VISMEM_SHARDS, else 1); "
                                  "an existing memory keeps its own until `vismem rebuild --shards S`")

    def settings(self) -> Settings:
        """The environment's settings (VISMEM_*), this resource's fields overriding them."""
        return Settings.from_env(home=self.home, query_set=self.query_set, index_type=self.index_type,
                                 ivf_from=self.ivf_from, recall_floor=self.recall_floor, shards=self.shards)

    def home_path(self):
        return resolve_home(self.settings().home)

    def memory(self) -> Memory:
        settings = self.settings()
        # No override: the settings' policy (Memory takes it), one cached Memory per home and encoder.
        overridden = any(v is not None for v in (self.index_type, self.ivf_from, self.recall_floor))
        policy = IndexPolicy.from_settings(settings) if overridden else None
        return _memory(str(resolve_home(settings.home)), self.encoder, policy, self.shards)

    def query_set_path(self):
        """The configured query folder, or None for leave-one-out."""
        return query_set_path(self.settings(), self.memory().layout)


# The resource definitions.py binds; a config mapping (which gets no resources) reads the same memory.
VISUAL_MEMORY = VisualMemory()
