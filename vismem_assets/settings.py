"""One settings object: every `VISMEM_*` variable, typed, with its default and what it does.

The entry points (the CLI's main, the Dagster code location and resource, the benchmarks, the
tests' conftest) read it once (`Settings.from_env`, flags and resource fields overriding) and
pass it down; `setup` makes it the process's and runs the BLAS set-up. The core never reads
the environment itself: this is the one module that does. Importing it (or `vismem_assets`)
changes nothing: no environment variable, no import hook.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import blas
from .home import DEFAULT_HOME

PREFIX = "VISMEM_"


def redact_url(url: str) -> str:
    """A URL without its password, for messages and `vismem status`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class SettingsError(ValueError):
    """A VISMEM_* value that does not parse or is out of range; names the variable."""


class Settings(BaseSettings):
    # frozen: hashable, so the Dagster resource can cache one Memory per settings; empty values
    # count as unset, as the hand-written parsing did (VISMEM_INDEX_TYPE= means auto).
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    home: Path = Field(Path(DEFAULT_HOME), description="memory home (--home overrides)")
    lock_timeout: float = Field(600.0, gt=0, description="seconds a writer waits for the ledger lock")
    ledger_url: str | None = Field(None, description=(
        "PostgreSQL ledger (postgresql://user:password@host:port/db), for a cluster; unset: the DuckDB file "
        "in the home"))
    index_type: Literal["auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq"] = Field(
        "auto", description="index type builds write; auto: exact below ivf_from vectors, IVF-Flat above")
    ivf_from: int = Field(200_000, ge=1, description="auto: IVF-Flat from this many vectors")
    recall_floor: float = Field(0.95, gt=0, le=1, description="recall@10 an approximate index must reach")
    pq_bytes: int | None = Field(None, ge=1, description="IVF-PQ code bytes per vector (default about d / 8)")
    delta_fraction: float = Field(0.10, ge=0, le=1, description="an add writes a delta while deltas stay within "
                                                                "this share of the base")
    max_deltas: int = Field(16, ge=0, description="delta files before they fold into a new base")
    shards: int = Field(1, ge=1, le=256, description="shards (by sample id) a new memory is split into; an "
                                                     "existing one keeps its own until `vismem rebuild --shards S`")
    shard_workers: bool = Field(False, description=(
        "search and erase the shards through their shard workers (shard_workers.py: one Celery worker per "
        "shard, on queue vismem-shard-<j>); unset: every shard in this process"))
    broker_url: str | None = Field(None, description="shard workers: the Celery broker (redis://host:port/0)")
    broker_backend: str | None = Field(None, description="shard workers: the Celery result backend "
                                                         "(redis://host:port/1)")
    shard_timeout: float = Field(30.0, gt=0, description="shard workers: seconds to wait for every shard's answer "
                                                         "to a search (an erasure waits ten times as long)")
    shard_mib: int = Field(64, ge=1, description="MiB per file piece of an exact base (forgetting rewrites one)")
    query_set: str | None = Field(None, description="labelled query folder (relative to the home) evaluated after "
                                                    "edits; unset: leave-one-out")
    cache: Path | None = Field(None, description="cache root (ONNX exports under onnx/); unset: "
                                                 "$XDG_CACHE_HOME/vismem, else ~/.cache/vismem")
    onnx_threads: int | None = Field(None, description="ONNX Runtime intra-op threads; unset: every available core")
    fashion_mnist: Path = Field(Path("/usr/share/datasets/fashion-mnist"),
                                description="folder of the four Fashion-MNIST idx .gz files")
    blas_auto: bool = Field(True, description="choose OPENBLAS_CORETYPE and faiss's BLAS settings (blas.py)")
    openblas_coretype: str | None = Field(None, description="OpenBLAS kernel to use when the CPU runs it")
    faiss_blas_threshold: int = Field(blas.FAISS_BLAS_THRESHOLD, ge=1,
                                      description="queries x d from which faiss flat search uses BLAS")
    schedules: bool = Field(True, description="Dagster: the nightly compaction and daily evaluation are deployed "
                                              "running (0: stopped, to turn on in the UI)")
    git_url: str | None = Field(None, description="Dagster: asset code links open this hosted repository")
    git_branch: str = Field("main", description="Dagster: branch of git_url")

    @field_validator("ledger_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("the ledger is the DuckDB file in the home, or a postgresql://user:password@host:port/"
                             "database URL; unset VISMEM_LEDGER_URL for the file")
        return url

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """The environment's settings, with the given (non-None) values overriding: flags, resource
        fields. A bad value raises SettingsError naming the variable (or the overriding field)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as e:
            def name(loc) -> str:
                field = "_".join(map(str, loc))
                return field if field in given else PREFIX + field.upper()

            raise SettingsError("; ".join(f"{name(err['loc'])}={err.get('input')!r}: {err['msg']}"
                                          for err in e.errors())) from None

    @classmethod
    def defaults(cls) -> "Settings":
        """The defaults alone, the environment not read."""
        return cls.model_construct()

    def cache_root(self) -> Path:
        if self.cache:
            return self.cache.expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vismem"

    def table(self) -> list[tuple[str, str, str]]:
        """(variable, effective value, description) per setting, for `vismem status`."""
        values = self.model_dump(mode="json")
        for url in ("ledger_url", "broker_url", "broker_backend"):
            if values.get(url):
                values[url] = redact_url(values[url])  # status prints it: never the password
        return [(PREFIX + name.upper(), "" if values[name] is None else str(values[name]), field.description or "")
                for name, field in type(self).model_fields.items()]


_current: Settings | None = None


def current() -> Settings:
    """The settings an entry point installed with `setup`; the defaults when none did (library use)."""
    return _current if _current is not None else Settings.defaults()


def setup(settings: Settings | None = None) -> Settings:
    """What an entry point runs first, before numpy or faiss load their OpenBLAS: read the
    settings (unless given), make them the process's, and run the BLAS set-up (once per process)."""
    global _current
    _current = settings if settings is not None else Settings.from_env()
    blas.configure(_current, os.environ)
    return _current
