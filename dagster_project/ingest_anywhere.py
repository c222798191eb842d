"""The `image_sets` asset of the cluster profile: reading on any worker, registering by one.

    plan_ingest (embedding queue)  ->  read_files x N (embedding queue, in parallel)
                                   ->  register_ingest (ledger queue, pool)

The core's seam (vismem_assets/ingest.py): `read_part` reads, hashes and fully decodes a slice of
the set's files and hands over what it found without the bytes; `Ingest.register_read`, the single
writer, reads the bytes again (checking each hash), screens them against the blocklist, stages them
and registers everything in one ledger transaction, as `ingest` does. The files are read twice,
decoded once: the decode, the expensive part, runs in parallel.

The embedded default keeps the one-step `image_sets` asset of assets.py; definitions.py picks this
one when the deployment is the cluster (deployment.py).
"""
import time
from dataclasses import dataclass

from dagster import DynamicOut, DynamicOutput, OpExecutionContext, Out, Output, graph_asset, op

from vismem_assets.imagesets import SourceFile, read_image_set
from vismem_assets.ingest import read_part
from vismem_assets.slices import even_slices

from .assets import LEDGER_POOL, catalog_entry, image_set_partitions, ingest_metadata
from .deployment import DEPLOYMENT, EMBED_QUEUE, LEDGER_QUEUE, QUEUE_TAG
from .embedding_anywhere import step_metadata
from .resources import VisualMemory

READ_CHUNK = 4096  # files per read step at most


@dataclass(frozen=True)
class ReadJob:
    index: int               # the slice's place in the set: the writer registers in the listing's order
    files: list[SourceFile]


@op(tags={QUEUE_TAG: EMBED_QUEUE}, out={"jobs": DynamicOut()},
    description="The set's files, listed once and cut into read steps (at least one per worker); no ledger.")
def plan_ingest(context: OpExecutionContext, visual_memory: VisualMemory):
    name = context.partition_key
    files = read_image_set(visual_memory.home_path() / "inbox" / "sets" / name)
    slices = even_slices(len(files), DEPLOYMENT.embed_workers, READ_CHUNK) or [(0, 0)]
    context.log.info(f"{name}: {len(files)} files in {len(slices)} read step(s)")
    for i, (start, stop) in enumerate(slices):
        yield DynamicOutput(ReadJob(i, files[start:stop]), mapping_key=f"part_{i}", output_name="jobs")


@op(tags={QUEUE_TAG: EMBED_QUEUE}, out=Out(description="(slice index, what read_part found)"),
    description="Read, hash and decode one slice of the set's files; hands over what it found, not the bytes.")
def read_files(context: OpExecutionContext, job):
    started = time.time()
    checked = read_part(job.files)
    seconds = time.time() - started
    bad = sum(not c.ok for c in checked)
    context.log.info(f"read {len(checked)} files ({bad} to quarantine) in {seconds:.2f} s")
    return Output((job.index, checked), metadata={"files": len(checked), "to_quarantine": bad,
                                                  **step_metadata(started)})


@op(pool=LEDGER_POOL, tags={QUEUE_TAG: LEDGER_QUEUE},
    description="The single writer: the files' bytes read again and checked, then registered in one transaction.")
def register_ingest(context: OpExecutionContext, visual_memory: VisualMemory, parts):
    started = time.time()
    memory = visual_memory.memory()
    name = context.partition_key
    checked = [c for _, part in sorted(parts, key=lambda p: p[0]) for c in part]
    report = memory.ingestion.register_read(memory.layout.inbox_sets / name, name, checked)
    metadata = ingest_metadata(context, memory, name, report, time.time() - started)
    return Output(None, metadata={**metadata, "read_steps": len(parts), **step_metadata(started)})


@graph_asset(name="image_sets", partitions_def=image_set_partitions, group_name="visual_memory",
             **catalog_entry("ingest", {"duckdb", "pillow"}, "1"),
             description="An arrived image set, read and checked in parallel on the workers, registered in the "
                         "ledger by one step; bad files quarantined (the cluster profile).")
def cluster_image_sets():
    return register_ingest(plan_ingest().map(read_files).collect())
