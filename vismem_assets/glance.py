"""What a person reads at a glance after each change of the memory: how big it is, how it
was built, and how accurate it is on the classes it already knew and on the ones it just
learned. Plain functions over the ledger and the index store, shared by the Dagster code
location and the headless demo (no Dagster here)."""
from __future__ import annotations

import numpy as np
import polars as pl

from .catalog import Catalog
from .index_store import IndexIntegrityError, IndexStore, IndexVersion
from .ledger import Ledger


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
        added = indexes.ledger.query("SELECT vector_id FROM index_deltas WHERE encoder_id = ? AND version = ?"
                                     " AND change = 'add'", [indexes.encoder_id, version.version])["vector_id"]
        held = indexes.ids(version)
        before = _labels_of(catalog, held[~np.isin(held, added.to_numpy())])
    return sorted(now & before), sorted(now - before)


def memory_figures(ledger: Ledger, live: IndexVersion | None) -> dict[str, int]:
    """The memory's size: active samples, labels, forgotten vectors still present as holes in the
    live version's files (until a compaction), forget requests accepted but not yet applied."""
    counts = ledger.query(
        "SELECT count(*) AS samples, count(DISTINCT label) AS labels FROM samples WHERE status = 'active'").row(0)
    pending = ledger.query("SELECT count(*) AS n FROM forget_requests WHERE state = 'pending'")["n"][0]
    return {"samples": int(counts[0]), "labels": int(counts[1]),
            "holes": sum(f.holes for f in live.files) if live is not None else 0,
            "pending_forgets": int(pending)}


def build_reason(ledger: Ledger, version: IndexVersion) -> str:
    """Why the version has its index type, saying which build chose it. An add or a forget keeps
    its parent's type (and its recorded reason, with the vector count of that build) until the
    next compaction builds afresh: said so, with the version's own count."""
    reason = version.build_reason or f"{version.index_type}: no build report recorded"
    rows = ledger.query("SELECT version, parent_version, build_report IS NOT NULL AS built FROM index_versions"
                        " WHERE encoder_id = ?", [version.encoder_id])
    lineage = {r["version"]: r for r in rows.iter_rows(named=True)}
    built, seen = version.version, set()
    while built in lineage and not lineage[built]["built"] and lineage[built]["parent_version"] is not None \
            and built not in seen:
        seen.add(built)
        built = lineage[built]["parent_version"]
    if built == version.version:
        return reason
    article = "an" if version.operation[:1] in "aeiou" else "a"
    return (f"{reason} (chosen by the build of v{built}; v{version.version}, {article} {version.operation} from "
            f"v{version.parent_version}, keeps that type with {version.n_vectors:,} vectors until the next compaction)")
