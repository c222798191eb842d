"""The `embeddings` asset of the cluster profile: encoding on any worker, recording by one.

    plan_embedding (ledger queue, pool)  ->  encode_part x N (embedding queue, in parallel)
                                         ->  record_embeddings (ledger queue, pool)

The core's seam (vismem_assets/embedding.py): `split_pending` cuts what the set left pending into
encode tasks, `encode_task` writes one part file to the shared home and touches no ledger, and the
`Recorder` is the single writer of the parts' rows. Each worker process loads the encoder once
(`load_encoder` keeps one model per spec and process) and uses it for every step it runs. Each
step reports its process, host and start and end times in its output's metadata.

The embedded default keeps the one-step `embeddings` asset of assets.py; definitions.py picks this
one when the deployment is the cluster (deployment.py).
"""

import os
import socket
import time
from dataclasses import dataclass

import numpy as np
from dagster import (AssetIn, DynamicOut, DynamicOutput, In, MetadataValue, Nothing, OpExecutionContext, Out, Output,
                     graph_asset, op)

from vismem_assets.embedding import EncodeTask, Recorder, encode_task, split_pending
from vismem_assets.embeddings import EmbeddingStore
from vismem_assets.encoders import load_encoder
from vismem_assets.home import Layout

from .assets import LEDGER_POOL, catalog_entry, image_set_partitions
from .deployment import DEPLOYMENT, EMBED_QUEUE, LEDGER_QUEUE, QUEUE_TAG
from .metadata import number, text
from .resources import VisualMemory


@dataclass(frozen=True)
class EncoderRef:
    """Which encoder the parts are for, without the model: what workers load and check."""
    spec: str
    id: str
    slug: str
    dim: int


@dataclass(frozen=True)
class EncodeJob:
    encoder: EncoderRef
    task: EncodeTask


def step_metadata(started: float) -> dict:
    """Where and when a step ran: its process, host and wall-clock interval (time.time())."""
    return {"pid": text(os.getpid()), "host": text(socket.gethostname()),
            "started_at": MetadataValue.float(started), "ended_at": MetadataValue.float(time.time())}


@op(pool=LEDGER_POOL, tags={QUEUE_TAG: LEDGER_QUEUE}, ins={"image_set": In(Nothing)},
    out={"jobs": DynamicOut(), "encoder": Out()},
    description="What the set left to embed, cut into encode steps (at least one per embedding worker).")
def plan_embedding(context: OpExecutionContext, visual_memory: VisualMemory):
    started = time.time()
    memory = visual_memory.memory()
    encoder = memory.encoder  # loads it once in this process and records its use (a ledger write: the pool)
    ref = EncoderRef(getattr(encoder, "spec", None) or memory.encoder_spec(), encoder.id, encoder.slug, encoder.dim)
    name = context.partition_key
    tasks = split_pending(memory.pending_embeddings(name), name, parts=DEPLOYMENT.embed_workers)
    context.log.info(f"{name}: {sum(map(len, tasks))} images to embed in {len(tasks)} encode step(s)")
    # Always one step at least (empty when nothing is pending): the recording step then still runs
    # and the asset is materialized, as the embedded default does for a set with nothing new.
    for i, task in enumerate(tasks or [EncodeTask(name, [], [], [])]):
        yield DynamicOutput(EncodeJob(ref, task), mapping_key=f"part_{i}", output_name="jobs")
    yield Output(ref, output_name="encoder", metadata={"encode_steps": max(len(tasks), 1), **step_metadata(started)})


@op(tags={QUEUE_TAG: EMBED_QUEUE}, out=Out(description="the part file written (None for an empty step)"),
    description="Encode one slice of the set and write its part file to the shared home; no ledger.")
def encode_part(context: OpExecutionContext, visual_memory: VisualMemory, job):
    started = time.time()
    misses = load_encoder.cache_info().misses
    encoder = load_encoder(job.encoder.spec)  # one model per spec and worker process
    loaded_now = load_encoder.cache_info().misses > misses
    if encoder.id != job.encoder.id:
        raise RuntimeError(
            f"this worker's {job.encoder.spec!r} is {encoder.id}, the memory's is {job.encoder.id}: install the "
            "same encoder weights and versions on every worker (pip install -e . from the same commit)")
    part = None
    if len(job.task):
        store = EmbeddingStore(Layout(visual_memory.home_path()), job.encoder.slug, job.encoder.dim)
        part = encode_task(encoder, store, job.task)
    seconds = time.time() - started
    context.log.info(f"encoded {len(job.task)} images in {seconds:.1f} s (pid {os.getpid()}, "
                     f"encoder {'loaded now' if loaded_now else 'already loaded'})")
    return Output(part, metadata={"images": len(job.task), "part": text(part.path if part else "none"),
                                  "encoder_loaded_in_this_step": loaded_now,
                                  "images_per_second": number(len(job.task) / max(seconds, 1e-9), 1),
                                  **step_metadata(started)})


@op(pool=LEDGER_POOL, tags={QUEUE_TAG: LEDGER_QUEUE},
    description="The single writer: records every part the encode steps wrote, then checks the set's vectors.")
def record_embeddings(context: OpExecutionContext, visual_memory: VisualMemory, encoder, parts):
    started = time.time()
    memory = visual_memory.memory()
    name = context.partition_key
    store = EmbeddingStore(memory.layout, encoder.slug, encoder.dim)
    recorder = Recorder(memory.ledger, store, encoder.id)
    n = sum(recorder.record(part) for part in parts if part is not None)
    with memory.ledger.connect() as s:
        files = s.samples.embedding_files(encoder.id, name)
    _, vectors = store.read(files)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.ones(0)
    worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
    dimension = vectors.shape[1] if vectors.ndim == 2 else encoder.dim
    # The embedded default's check `unit_vectors_of_encoder_dimension`, here as a failure of the step.
    if dimension != encoder.dim or worst >= 1e-3:
        raise ValueError(f"{name}: vectors of dimension {dimension} (expected {encoder.dim}) with a norm error of "
                         f"{worst:.3g} (at most 1e-3): the parts are not unit vectors of {encoder.id}; "
                         "re-embed the set after checking the workers' encoder")
    context.log.info(f"{name}: recorded {n} embeddings from {sum(p is not None for p in parts)} part(s)")
    return Output(None, metadata={
        "embedded": n, "vectors_in_set": len(vectors), "dimension": text(encoder.dim), "encoder": text(encoder.id),
        "parts": sum(p is not None for p in parts), "max_norm_error": MetadataValue.float(float(f"{worst:.3g}")),
        "files": MetadataValue.json(files), **step_metadata(started)})


@graph_asset(name="embeddings", partitions_def=image_set_partitions, group_name="visual_memory",
             ins={"image_set": AssetIn(key="image_sets", dagster_type=Nothing)},
             **catalog_entry("embed", {"onnx", "pytorch", "parquet", "duckdb"}, "1"),
             description="Vectors of the set's new samples, encoded in parallel on the embedding workers and "
                         "recorded by one step (the cluster profile).")
def cluster_embeddings(image_set):
    jobs, encoder = plan_embedding(image_set)
    return record_embeddings(encoder, jobs.map(encode_part).collect())
