"""Checks that stop a wrong index from being built upon: blocking, so evaluation and
everything downstream wait until they pass."""

import polars as pl
from dagster import AssetCheckResult, MetadataValue, asset_check

from vismem_assets.index_store import IndexIntegrityError

from .assets import memory_index
from .metadata import table, text
from .resources import VisualMemory


@asset_check(asset=memory_index, blocking=True,
             description="The live index holds exactly the active embedded samples of its encoder.")
def live_index_matches_ledger(visual_memory: VisualMemory) -> AssetCheckResult:
    report = visual_memory.memory().index_consistency()
    return AssetCheckResult(passed=report["ok"], metadata={
        "n_index": report["n_index"], "n_ledger": report["n_ledger"],
        # vector ids are not measurements: listed as text (the first 20 of each)
        "missing_from_index": text(", ".join(map(str, report["missing_from_index"])) or "none"),
        "not_in_ledger": text(", ".join(map(str, report["not_in_ledger"])) or "none")})


@asset_check(asset=memory_index, blocking=True,
             description="The live index's files (every shard's base and deltas) match the digests recorded in the ledger, block by block.")
def index_file_matches_sha256(visual_memory: VisualMemory) -> AssetCheckResult:
    memory = visual_memory.memory()
    live = memory.indexes.live()
    rows, lists = [], memory.indexes.hash_lists_of(live.files)
    for file in live.files:
        try:
            problem = memory.indexes.verify(file, lists.get(file.path))[0]
        except IndexIntegrityError as missing:
            problem = str(missing)
        rows.append({"shard": file.shard, "file": file.path, "n_vectors": file.n_vectors, "holes": file.holes,
                     "recorded_sha256": file.sha256, "hashed_in_blocks_of": file.block_size or "whole file", "pages_of": file.leaf_size or None,
                     "problem": problem or "none", "ok": problem is None})
    passed = all(r["ok"] for r in rows)
    return AssetCheckResult(
        passed=passed,
        metadata={"version": text(live.version), "path": MetadataValue.path(str(memory.layout.absolute(live.path))),
                  "recorded_sha256": text(live.sha256), "problem": text(rows[0]["problem"]),
                  "files": table(pl.DataFrame(rows)),
                  "next_step": "ok" if passed else "run `vismem rebuild` (or the compaction job)"})


@asset_check(asset=memory_index, blocking=True,
             description="Nothing forgotten remains anywhere: no index file, embedding file or image holds it, "
                         "and no forget request is left half-done.")
def nothing_forgotten_remains(visual_memory: VisualMemory) -> AssetCheckResult:
    report = visual_memory.memory().audit.verify()
    return AssetCheckResult(passed=report.ok, metadata={
        "deletions_in_chain": report.chain_rows, "chain_head": text(report.chain_head),
        # what was read to prove it, not a measurement of the memory: one table, not plotted series
        "checked": table(pl.DataFrame({"what": list(report.files_checked),
                                       "checked": list(report.files_checked.values())})),
        "problems": MetadataValue.md("\n".join(f"- {p}" for p in report.problems) or "none")})
