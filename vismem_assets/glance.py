"""What a person reads at a glance after each change of the memory: how big it is, how it
was built, and how accurate it is on the classes it already knew and on the ones it just
learned. Plain functions over the ledger and the index store, shared by the Dagster code
location and the headless demo (no Dagster here)."""
from __future__ import annotations

import numpy as np
import polars as pl

from .catalog import Catalog
from .index_store import IndexIntegrityError, IndexStore, IndexVersion
from .ledger import LedgerBase


def accuracy_on(per_label: pl.DataFrame, labels) -> float | None:
    """Accuracy over the queries of these labels (per-label accuracies weighted by their query
    counts), or None when no query has one of them."""
    frame = per_label.filter(pl.col("label").is_in(list(labels)))
    n = int(frame["n_queries"].sum()) if len(frame) else 0
    return float((frame["accuracy"] * frame["n_queries"]).sum() / n) if n else None


def _labels_of(catalog: Catalog, vector_ids: np.ndarray) -> set[str]:
    rows = catalog.rows(np.asarray(vector_ids, np.int64))
    return {catalog.label_names[c] for c in np.unique(catalog.label_codes[rows[rows >= 0]])}


def labels_held(indexes: IndexStore, catalog: Catalog, version: int) -> set[str] | None:
    """The labels (as the catalog has them now) of the samples a version holds, read from its own
    files; None if they are gone (a version purged by compaction). A forget's parent shares its
    files, erased: it reads as holding what remains."""
    found = next((v for v in indexes.versions() if v.version == version), None)
    if found is None:
        return None
    try:
        return _labels_of(catalog, indexes.ids(found))
    except (IndexIntegrityError, FileNotFoundError, RuntimeError):  # RuntimeError: FAISS cannot read it
        return None


def labels_old_and_new(indexes: IndexStore, catalog: Catalog, version: IndexVersion) -> tuple[list[str], list[str]]:
    """(labels `version` holds that its parent held too, labels its parent did not hold): what the
    last change of the memory brought. A first version's labels are all new; a forget brings none."""
    now = _labels_of(catalog, indexes.ids(version))
    if version.parent_version is None:
        return [], sorted(now)
    before = labels_held(indexes, catalog, version.parent_version)
    if before is None:  # the parent's files are gone: what the version held, less what it added
        with indexes.ledger.connect() as session:
            added = session.overview.added_in(indexes.encoder_id, version.version)
        held = indexes.ids(version)
        before = _labels_of(catalog, held[~np.isin(held, added)])
    return sorted(now & before), sorted(now - before)


def memory_figures(ledger: LedgerBase, live: IndexVersion | None) -> dict[str, int]:
    """The memory's size: active samples, labels, forgotten vectors still present as holes in the
    live version's files (until a compaction), forget requests accepted but not yet applied."""
    with ledger.connect() as session:
        sizes = session.overview.sizes()
    return {"samples": sizes["samples"], "labels": sizes["labels"],
            "holes": sum(f.holes for f in live.files) if live is not None else 0,
            "pending_forgets": sizes["pending_forgets"]}


def arrived_samples(ledger: LedgerBase, ingest_id: str) -> pl.DataFrame:
    """label, image_path of the active samples an ingest brought, by label."""
    with ledger.connect() as session:
        return session.overview.arrived(ingest_id)


def index_lineage(ledger: LedgerBase, encoder_id: str, limit: int = 20) -> pl.DataFrame:
    """The newest index versions of an encoder, newest first: operation, parent, type, size."""
    with ledger.connect() as session:
        return session.overview.lineage(encoder_id, limit)


def build_reason(ledger: LedgerBase, version: IndexVersion) -> str:
    """Why the version has its index type, saying which build chose it. An add or a forget keeps
    its parent's type (and its recorded reason, with the vector count of that build) until the
    next compaction builds afresh: said so, with the version's own count."""
    reason = version.build_reason or f"{version.index_type}: no build report recorded"
    with ledger.connect() as session:
        builds = session.overview.builds(version.encoder_id)
    built, seen = version.version, set()
    while built in builds and not builds[built][1] and builds[built][0] is not None and built not in seen:
        seen.add(built)
        built = builds[built][0]
    if built == version.version:
        return reason
    article = "an" if version.operation[:1] in "aeiou" else "a"
    return (f"{reason} (chosen by the build of v{built}; v{version.version}, {article} {version.operation} from "
            f"v{version.parent_version}, keeps that type with {version.n_vectors:,} vectors until the next compaction)")
