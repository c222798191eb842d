"""Status: what a person asks a memory first (which encoder, how many of what, which index, how
much disk, what a crash left pending), from the ledger and the home alone: no encoder is loaded."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import polars as pl

from .blas import blas_report
from .digests import leaves_path
from .home import Layout
from .index_store import IndexVersion
from .index_types import IndexPolicy
from .ivf_search import settings as ivf_search_settings
from .ledger import LedgerBase


def memory_status(layout: Layout, ledger: LedgerBase, encoder_spec: str, pending: dict, index_policy: IndexPolicy,
                  encoder_id: str | None = None, n_shards_setting: int = 1) -> dict:
    """`pending`: what indexing.pending_work says for the memory's encoder (`encoder_id`, if it has
    been used); `n_shards_setting`: the shards a new memory would get (VISMEM_SHARDS)."""
    with ledger.connect() as s:
        live = s.indexes.live_indexes()
        row = s.indexes.live(encoder_id) if encoder_id else None
        version = IndexVersion.from_row(row) if row else None
        encoders = s.encoders.listing()
        samples = s.samples.count_by_status()
        labels = s.samples.count_by_label()
        image_sets = s.samples.count_image_sets()
        ledger_bytes = s.overview.database_bytes()
        versions = [IndexVersion.from_row(r) for enc, _, _ in s.forgetting.encoders() for r in s.indexes.versions(enc)]
    return {
        "home": str(layout.root),
        "ledger": ledger.describe(),
        "encoder": encoder_spec,
        "encoders": encoders,
        "samples": samples,
        "labels": labels,
        "image_sets": image_sets,
        "pending": pending,  # left by a crash mid-add; the next add or rebuild finishes them
        "live_indexes": live.with_columns(pl.col("created_at").cast(pl.String)).to_dicts(),
        # The memory's shards (its encoder's live version), or what a new memory would get.
        "shards": version.n_shards if version else n_shards_setting,
        "shard_table": version.shards() if version else [],
        "disk_bytes": {d: _du(layout.root / d) for d in ("images", "embeddings", "indexes", "quarantine")}
                      | {"ledger": _du(layout.ledger) if ledger_bytes is None else ledger_bytes},
        "index_disk_bytes": index_disk(layout, versions),
        "index_policy": asdict(index_policy),
        "blas": blas_report(),
        "ivf_search": ivf_search_settings(),
    }


def index_disk(layout: Layout, versions: list[IndexVersion]) -> dict:
    """Where the index bytes are: files of the live versions, files only retained versions name
    (what a compaction's retention, `vismem compact`, would delete), and files no version names
    (left by a crash between writing and recording; the next write or forget deletes them)."""
    live = {f.path for v in versions if v.status == "live" for f in v.files}
    retained = {f.path for v in versions if v.status == "retained" for f in v.files} - live
    named = {layout.absolute(p) for p in live | retained}

    def size(paths) -> int:   # each file with its pages' digests (digests.py)
        files = [q for p in paths for q in (layout.absolute(p), leaves_path(layout.absolute(p)))]
        return sum(q.stat().st_size for q in files if q.exists())

    on_disk = [p for p in (layout.root / "indexes").rglob("*.faiss")] if (layout.root / "indexes").exists() else []
    return {"live_versions": size(live), "retained_versions_only": size(retained),
            "unreferenced": sum(p.stat().st_size for p in on_disk if p not in named),
            "retained_versions": sum(v.status == "retained" for v in versions)}


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
