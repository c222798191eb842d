"""The asset graph: image_sets -> embeddings (one partition per arrived set) -> memory_index
-> evaluation. Each asset is one call on the core plus the metadata a person wants to see."""

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetObservation,
    Config,
    DynamicPartitionsDefinition,
    FreshnessPolicy,
    MaterializeResult,
    StaticPartitionsDefinition,
    MetadataValue,
    asset,
)
from pydantic import Field

from vismem_assets.evaluation import DEFAULT_K, gallery_picks
from vismem_assets.forgetting import ForgetError, ForgetRequest
from vismem_assets.glance import (accuracy_on, arrived_samples, build_reason, index_lineage, labels_old_and_new,
                                  memory_figures)
from vismem_assets.plots import contact_sheet, plot_accuracy, plot_reliability_diagram
from vismem_assets.voting import DEFAULT_STRATEGY

from .deployment import DEPLOYMENT, ingest_sets_in_flight
from .metadata import image_markdown, number, table, text
from .resources import VisualMemory

image_set_partitions = DynamicPartitionsDefinition(name="image_sets")
LEDGER_POOL = "vismem_ledger"  # every asset that writes the ledger: one at a time (dagster.yaml)
SHOWN_K = (1, 3, 5, 10, 20, 50, 100)
OWNERS = ["team:vismem"]


def catalog_entry(stage: str, kinds: set[str], code_version: str, ledger: str = "writes") -> dict:
    """Kinds, owners, tags and code version for the asset catalog. Bump an asset's code_version
    when what it computes changes (not its metadata): Dagster then marks what derives from it stale."""
    return {"kinds": kinds, "owners": OWNERS, "code_version": code_version,
            "tags": {"vismem/stage": stage, "vismem/ledger": ledger}}


@asset(partitions_def=image_set_partitions, pool=LEDGER_POOL, group_name="visual_memory",
       **catalog_entry("ingest", {"duckdb", "pillow"}, "1"),
       description="An arrived image set, validated and registered in the ledger; bad files quarantined.")
def image_sets(context: AssetExecutionContext, visual_memory: VisualMemory) -> MaterializeResult:
    memory = visual_memory.memory()
    name = context.partition_key
    t0 = time.perf_counter()
    report = memory.ingest(memory.layout.inbox_sets / name, name=name)
    return MaterializeResult(metadata=ingest_metadata(context, memory, name, report, time.perf_counter() - t0))


def ingest_metadata(context, memory, name: str, report, seconds: float) -> dict:
    """What a person sees of an ingest (also the cluster's split ingest, ingest_anywhere.py)."""
    context.log.info(f"{name}: {report.added} added, {report.duplicates} duplicates, "
                     f"{len(report.quarantined)} quarantined, {report.blocked} blocked")
    arrived = arrived_samples(memory.ledger, report.ingest_id)
    metadata = {
        "files": report.n_files, "added": report.added, "duplicates": report.duplicates,
        "blocked": report.blocked, "quarantined": len(report.quarantined),
        "seconds": number(seconds, 2), "files_per_second": number(report.n_files / max(seconds, 1e-9), 1),
        "ingest_id": text(report.ingest_id),
        "labels": table(arrived.group_by("label").len("samples").sort("label")),
    }
    if report.quarantined:
        metadata["quarantine"] = table(pl.DataFrame(report.quarantined))
    if report.label_conflicts:
        metadata["label_conflicts"] = table(pl.DataFrame(report.label_conflicts))
    if len(arrived):
        preview = arrived.group_by("label", maintain_order=True).head(2).head(12)
        sheet = contact_sheet([memory.layout.absolute(p) for p in preview["image_path"]], preview["label"].to_list(),
                              memory.layout.root / "reports" / "image_sets" / f"{name}.png", title=name)
        metadata["preview"] = image_markdown(sheet, f"images of {name}")
    return metadata


@asset(partitions_def=image_set_partitions, deps=[image_sets], pool=LEDGER_POOL, group_name="visual_memory",
       check_specs=[AssetCheckSpec("unit_vectors_of_encoder_dimension", asset="embeddings",
                                   description="Every vector of the set has the encoder's dimension and unit length "
                                               "(|norm - 1| < 1e-3): cosine similarity is their inner product.")],
       # the default encoder runs under ONNX Runtime (torch as its fallback, and for DINOv2 and CLIP)
       **catalog_entry("embed", {"onnx", "pytorch", "parquet", "duckdb"}, "1"),
       description="Vectors of the set's new samples (only what this encoder has not embedded), as parquet.")
def embeddings(context: AssetExecutionContext, visual_memory: VisualMemory):
    memory = visual_memory.memory()
    name = context.partition_key
    encoder = memory.encoder
    t0 = time.perf_counter()
    n = memory.embed_pending(name, progress=False, on_chunk=lambda done, total: context.log.info(
        f"{name}: embedded {done}/{total} ({done / max(time.perf_counter() - t0, 1e-9):.1f} img/s)"))
    seconds = time.perf_counter() - t0
    context.log.info(f"{name}: embedded {n} images with {encoder.id} in {seconds:.1f} s")
    files = memory.embedding_files(name)
    _, vectors = memory.embeddings.read(files)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.ones(0)
    worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
    yield MaterializeResult(
        metadata={"embedded": n, "vectors_in_set": len(vectors), "dimension": text(encoder.dim),
                  "encoder": text(encoder.id),
                  "seconds": number(seconds, 2), "images_per_second": number(n / seconds if n else 0.0, 1),
                  "files": MetadataValue.json(files)},
        check_results=[AssetCheckResult(
            check_name="unit_vectors_of_encoder_dimension", passed=vectors.shape[1] == encoder.dim and worst < 1e-3,
            metadata={"dimension": text(vectors.shape[1]), "expected_dimension": text(encoder.dim),
                      "max_norm_error": MetadataValue.float(float(f"{worst:.3g}")), "vectors": len(vectors)})],
    )


class ForgetConfig(Config):
    """A forget request, as typed run config: the `forget` job's Launchpad form (the whole run
    config), or a file in inbox/forget/. requested_by and reason are required; name what to
    forget with exactly one of label, image_set, sample_ids, images."""
    requested_by: str = Field(description="required: who asked (a person or an address)")
    reason: str = Field(description="required: why, in free text")
    label: str | None = Field(default=None, description="target (exactly one): every sample of this label")
    image_set: str | None = Field(default=None, description="target (exactly one): every sample of this image set")
    sample_ids: list[str] = Field(default=[], description="target (exactly one): sample ids (sha256 of the image bytes)")
    images: list[str] = Field(default=[], description="target (exactly one): image files, matched by their content")
    category: str | None = Field(default=None, description="gdpr, license, quality, bias or other")
    external_ref: str | None = Field(default=None, description="e.g. a ticket number")
    dry_run: bool = Field(default=False, description="only report what would be forgotten (metadata); change nothing")
    request_file: str | None = Field(default=None, description="set by forget_request_sensor: the inbox file, "
                                                               "archived to applied/ or rejected/; leave empty")

    def request(self) -> ForgetRequest:
        return ForgetRequest(**self.model_dump(exclude={"request_file", "dry_run"}))


class MemoryIndexConfig(Config):
    rebuild: bool = Field(default=False, description="compaction: rebuild from ledger + embeddings and purge old versions")
    forget: ForgetConfig | None = Field(default=None, description="forget these samples everywhere (new version)")


# output_required=False: a forget request that cannot be applied, or a dry run, materializes
# nothing, so that this asset and the ones after it (skipped) stay as they were, not failed.
@asset(deps=[embeddings], pool=LEDGER_POOL, group_name="visual_memory", output_required=False,
       **catalog_entry("index", {"faiss", "duckdb"}, "1"),
       description="The live FAISS index: newly embedded sets folded in as a new immutable version.")
def memory_index(context: AssetExecutionContext, config: MemoryIndexConfig,
                 visual_memory: VisualMemory) -> Iterator[MaterializeResult]:
    memory = visual_memory.memory()
    t0 = time.perf_counter()
    purged, forgotten = [], {}
    if config.forget is not None:
        # Checked before anything changes (the sensor and the job's config mapping checked it
        # already; the memory may have changed since, e.g. another request forgot the same label).
        try:
            planned = memory.forgetting.check(config.forget.request())
        except ForgetError as exc:
            archive_request_file(config.forget.request_file, "rejected", error=str(exc))
            context.log.error(f"forget request rejected, nothing changed: {exc}")
            context.log_event(AssetObservation(asset_key=context.asset_key,
                                               metadata={"forget_rejected": text(str(exc))}))
            return
        if config.forget.dry_run:
            context.log.info(f"dry run: would forget {planned.n_samples} sample(s) "
                             f"({', '.join(f'{k}: {v}' for k, v in planned.per_label().items())}); nothing changed")
            context.log_event(AssetObservation(asset_key=context.asset_key, metadata=forget_plan(planned)))
            return
    # Read before anything changes: a forget (or a resumed one) makes a new version itself.
    before = memory.indexes.live()
    # A crash mid-forget is finished before anything else (by the shard workers, where they serve
    # the memory: a dead one fails this run with what to do).
    resumed = memory.resume_forgetting(in_process=False)
    if resumed:
        context.log.warning(f"finished {len(resumed)} forget request(s) a crash had left pending")
    if config.forget is not None:
        try:
            report = memory.forget(config.forget.request())
        except ValueError as exc:  # checked above: only a change in between gets here; nothing changed
            archive_request_file(config.forget.request_file, "rejected", error=str(exc))
            raise
        context.log.info(f"forgot {report.n_samples} samples (request {report.request_id[:12]}); "
                         f"retained versions erased in place too: {report.versions_rewritten}")
        forgotten = {"forgotten": report.n_samples, "forget_request_id": text(report.request_id),
                     "forgotten_per_label": table(pl.DataFrame({"label": list(report.per_label()),
                                                                "samples": list(report.per_label().values())})),
                     "versions_rewritten": text(", ".join(report.versions_rewritten) or "none"),
                     # each shard erased its own files and reported (the request was pending until all had)
                     "forget_shards": table(shard_reports(memory, report.request_id)),
                     "forget_seconds": table(pl.DataFrame({"step": list(report.phases),
                                                           "seconds": [round(v, 3) for v in report.phases.values()]}))}
        archive_request_file(config.forget.request_file, "applied")
    # Samples of any set a killed run left unembedded are embedded before anything is folded in. On
    # the cluster, encode steps take no lock: the sets of ingest runs still in flight are left to
    # their own encode steps (their embeddings' refresh folds them in), so none is encoded twice.
    log_chunk = lambda done, total: context.log.info(f"embedding what earlier runs left pending: {done}/{total}")
    if DEPLOYMENT.cluster:
        busy = ingest_sets_in_flight(context.instance)
        left = sorted(set(memory.pending_embeddings()["image_set"].to_list()) - busy)
        if busy:
            context.log.info(f"ingest runs in flight for {', '.join(sorted(busy))}: their samples are theirs to embed")
        caught_up = sum(memory.embed_pending(name, progress=False, on_chunk=log_chunk) for name in left)
    else:
        caught_up = memory.embed_pending(progress=False, on_chunk=log_chunk)
    if caught_up:
        context.log.warning(f"embedded {caught_up} sample(s) an earlier run had left pending")
    if config.rebuild:
        version, purged = memory.compact(retain=visual_memory.retain_versions)
    else:
        version = memory.index_pending(embed=False) or memory.indexes.live()
    if version is None:
        raise FileNotFoundError("nothing to index yet: no image set has been embedded; drop a set in the inbox")
    seconds = time.perf_counter() - t0
    new_version = before is None or version.version != before.version
    context.log.info(f"index version {version.version} ({version.operation} from v{version.parent_version}): "
                     f"{version.n_vectors} vectors" if new_version
                     else f"nothing new to fold in: version {version.version} stays live")
    lineage = index_lineage(memory.ledger, memory.encoder.id)
    build = version.build if new_version else None  # built in this run, or none
    if build is not None:
        context.log.info(f"index type: {build.reason}")
    figures = memory_figures(memory.ledger, version)
    yield MaterializeResult(metadata={
        "index_version": text(version.version), "new_version": new_version,
        "parent_version": text(version.parent_version), "operation": text(version.operation),
        "index_type": text(version.index_type), "build_reason": text(build_reason(memory.ledger, version)),
        **({"nprobe": version.nprobe, "recall_at_10": number(version.recall_at_10),
            "recall_at_100": number(version.recall_at_100),
            "recall_measured_at_version": text(version.recall_measured_at)} if version.recall_at_10 is not None else {}),
        **({"nprobe_sweep": table(pl.DataFrame(build.sweep, schema=["nprobe", "recall_at_10"], orient="row"))}
           if build is not None and build.sweep else {}),
        # the memory at a glance: plotted over materializations
        "n_vectors": version.n_vectors, "n_added": version.n_added, "n_removed": version.n_removed,
        **figures,  # samples, labels, holes (forgotten vectors erased in place, until the compaction), pending_forgets
        "embedded_pending": caught_up, "files": len(version.files), "delta_files": len(version.deltas),
        # each shard (by sample id): the version that wrote its newest file, its vectors and holes
        "shards": text(version.n_shards), "shard_table": table(pl.DataFrame(version.shards())),
        "vectors_in_deltas": sum(d.n_vectors for d in version.deltas),
        "purged_versions": text(", ".join(str(v.version) for v in purged) or "none"),
        "sha256": text(version.sha256), "path": MetadataValue.path(str(memory.layout.absolute(version.path))),
        "seconds": number(seconds, 3), "lineage": table(lineage), **forgotten,
    })


class ExperimentConfig(Config):
    n_memory: int = Field(default=2000, description="Fashion-MNIST training images in the experiment's memory")
    n_queries: int = Field(default=500, description="Fashion-MNIST test images as queries")


EXPERIMENT_SETTINGS = {"n_memory", "n_queries", "seed", "k", "k_max", "soft_k", "percentile"}
experiment_partitions = StaticPartitionsDefinition(["label-noise", "new-classes", "memory-scaling", "novelty"])


@asset(partitions_def=experiment_partitions, group_name="experiments",
       **catalog_entry("research", {"onnx", "faiss", "polars"}, "1", ledger="none"),
       description="The paper's lifelong experiments on Fashion-MNIST copies (never the live memory): "
                   "a table and a PNG chart per experiment.")
def experiments(context: AssetExecutionContext, config: ExperimentConfig,
                visual_memory: VisualMemory) -> MaterializeResult:
    from vismem_assets.experiments import run

    memory = visual_memory.memory()
    name = context.partition_key
    result = run(name, memory.encoder, memory.layout.root / "reports" / "experiments", n_memory=config.n_memory,
                 n_queries=config.n_queries, cache_dir=memory.layout.root / "experiments" / "cache")
    context.log.info(f"{name}: {result.summary}")
    # Measurements are plotted; the experiment's settings (sizes, seed, k) are shown as text.
    numbers = {k: text(v) if k in EXPERIMENT_SETTINGS else number(v) for k, v in result.summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return MaterializeResult(metadata={"table": table(result.table.with_columns(pl.col(pl.Float64).round(4))),
                                       "chart": image_markdown(result.chart, name),
                                       "chart_path": MetadataValue.path(str(result.chart)), **numbers})


def misclassified_gallery(memory, result, folder: Path, k: int, n: int = 4) -> str | None:
    """Markdown with a few misclassified queries beside their neighbours (query sets only: in
    leave-one-out the query is itself stored), picked by confidence across labels
    (vismem_assets.evaluation.gallery_picks) and explained with the evaluation's own vote."""
    from vismem_assets.explain import LEGEND, render_png

    picks = gallery_picks(result, n) if result.query_paths else []
    if not picks:
        return None
    paths = [result.query_paths[i] for i, _ in picks]
    # The evaluation's vote (default strategy and k, no pruning), so each page shows the wrong answer it scored.
    predictions = memory.classify(paths, k=k, strategy=DEFAULT_STRATEGY, pruning="none", progress=False)
    parts = [f"{len(picks)} of {len(result.misclassified)} misclassified queries ({DEFAULT_STRATEGY} vote, k={k}, "
             "no pruning): the most confidently wrong first, then borderline ones, one per true label while "
             "labels are left.\n\n" + " · ".join(LEGEND)]
    for j, ((i, why), path, prediction) in enumerate(zip(picks, paths, predictions)):
        page = render_png(prediction, path, folder / f"{j:02d}-{Path(path).parent.name}-{Path(path).stem}.png",
                          strategy=DEFAULT_STRATEGY)
        parts.append(f"**{j + 1}. {Path(path).parent.name}/{Path(path).name}** → predicted **{prediction.label}** "
                     f"with confidence {prediction.confidence:.2f} ({why})\n\n"
                     + image_markdown(page, "explanation").value)
    return "\n\n".join(parts)


def archive_request_file(path: str | None, outcome: str, error: str | None = None) -> None:
    """Move an inbox forget request to inbox/forget/<outcome>/ so it is never taken again
    (a rejected one with <name>.error.txt beside it, saying what to fix)."""
    if path and Path(path).exists():
        target = Path(path).parent / outcome / Path(path).name
        target.parent.mkdir(exist_ok=True)
        if error is not None:
            target.with_name(f"{target.name}.error.txt").write_text(f"{error}\n")
        Path(path).replace(target)


def shard_reports(memory, request_id: str) -> pl.DataFrame:
    with memory.ledger.connect() as s:
        return s.indexes.shard_reports(request_id).drop("encoder_id").with_columns(pl.col("reported_at").cast(pl.String))


def forget_plan(report) -> dict:
    """A dry run's metadata: what the request would forget (vismem_assets.forgetting.ForgetReport)."""
    per_label = report.per_label()
    samples = pl.DataFrame(report.samples, schema={"sample_id": pl.String, "label": pl.String,
                                                   "image_set": pl.String, "status": pl.String})
    return {"dry_run": text("yes: nothing was changed"), "would_forget": report.n_samples,
            "forget_request_id": text(report.request_id),
            "already_applied": text("yes" if report.already_applied else "no"),
            "would_forget_per_label": table(pl.DataFrame({"label": list(per_label), "samples": list(per_label.values())},
                                                         schema={"label": pl.String, "samples": pl.Int64})),
            "samples": table(samples.head(200))}


# "sample_labels" and "user_weights" (editing.py, by key: that module imports this one): a relabel
# changes reliability and so the pruning weights, a user weight changes the votes evaluated.
@asset(deps=[memory_index, "sample_labels"], pool=LEDGER_POOL, group_name="visual_memory",
       **catalog_entry("prune", {"faiss", "duckdb", "numpy"}, "1"),
       description="Reliability of every sample (k=10 and k=100, updated incrementally from the previous version) "
                   "and the soft and hard pruning weight sets of the live index version.")
def pruning_weights(context: AssetExecutionContext, visual_memory: VisualMemory) -> MaterializeResult:
    from vismem_assets import pruning

    memory = visual_memory.memory()
    runs = {}
    for k in (pruning.SOFT_K, pruning.HARD_K):
        rel, run = memory.pruning.reliability(k)
        runs[k] = run
        context.log.info(f"reliability k={k}: {run.mode} over {run.n_samples} samples, "
                         f"{run.n_requeried} re-queried, {run.seconds:.2f} s")
    active = memory.pruning.active_mode()
    if active:  # keep the switched-on weight set current with the index
        memory.pruning.activate(active[0], active[1])
    plans = {mode: memory.pruning.plan(mode) for mode in ("soft", "hard")}
    per_label = plans["soft"].select("label", "samples", pl.col("changed").alias("soft_down_weighted"),
                                     pl.col("mean_weight").round(4).alias("soft_mean_weight")).join(
        plans["hard"].select("label", pl.col("changed").alias("hard_excluded")), on="label")
    return MaterializeResult(metadata={
        "index_version": text(runs[pruning.SOFT_K].version), "active": text(active[0] if active else "none"),
        **{f"k{k}_mode": text(run.mode) for k, run in runs.items()},
        **{f"k{k}_requeried": run.n_requeried for k, run in runs.items()},
        **{f"k{k}_seconds": number(run.seconds, 3) for k, run in runs.items()},
        "samples": runs[pruning.SOFT_K].n_samples,
        "soft_down_weighted": int(plans["soft"]["changed"].sum()), "hard_excluded": int(plans["hard"]["changed"].sum()),
        "per_label": table(per_label),
    })


TOP1_NOT_DROPPED = (
    "Top-1 of the default vote (rank, k=20, no pruning) on the labels that both this index version and the previous "
    "evaluated one hold, weighted by their queries, must not fall by more than max_top1_drop (the resource's "
    "setting). Labels forgotten on purpose or new in this version are left out: only the classes both versions know "
    "are compared.")


@asset(deps=[memory_index, pruning_weights, "user_weights"], pool=LEDGER_POOL, group_name="visual_memory",
       check_specs=[AssetCheckSpec("top1_not_dropped", asset="evaluation", description=TOP1_NOT_DROPPED)],
       **catalog_entry("evaluate", {"faiss", "duckdb", "polars"}, "1"),
       # Re-evaluated after every change and by the 05:00 schedule: a day without one is a warning
       # (the schedule missed once), two are a failure. Checked by the daemon's freshness loop.
       freshness_policy=FreshnessPolicy.time_window(fail_window=timedelta(hours=50), warn_window=timedelta(hours=26)),
       description="Accuracy of every voting strategy for k = 1..k_max after each index change.")
def evaluation(context: AssetExecutionContext, visual_memory: VisualMemory):
    memory = visual_memory.memory()
    t0 = time.perf_counter()
    query_set = visual_memory.query_set_path()
    if query_set is not None:
        result = memory.evaluate(query_set, k_max=visual_memory.k_max, progress=False, pruning=True)
    else:
        result = memory.evaluate_leave_one_out(k_max=visual_memory.k_max, pruning=True)
    seconds = time.perf_counter() - t0
    top1 = result.top1()
    # The vote's setting goes into the key, so a plotted series never mixes two settings. (A memory
    # with fewer neighbours than k votes with all it has: that is still this vote.)
    vote_k = min(DEFAULT_K, visual_memory.k_max)
    vote = f"{DEFAULT_STRATEGY}_k{vote_k}"
    chart = plot_accuracy(result.accuracy, memory.layout.root / "reports" / "evaluation" /
                          f"v{result.index_version:06d}.png",
                          title=f"{result.query_set}: index v{result.index_version}, {result.n_queries} queries")
    wide = (result.accuracy.filter(pl.col("k").is_in(SHOWN_K) & (pl.col("pruning") == "none"))
            .with_columns(pl.col("accuracy").round(4)).pivot(on="strategy", index="k", values="accuracy").sort("k"))
    best = result.best()
    top = best.sort("accuracy", descending=True).row(0, named=True)
    best_by_pruning = pl.concat([result.best(m).with_columns(pruning=pl.lit(m)) for m in ("none", "soft", "hard")])
    reports = memory.layout.root / "reports" / "evaluation"
    diagram = plot_reliability_diagram(result.calibration, reports / f"v{result.index_version:06d}-calibration.png",
                                       title=f"index v{result.index_version}: rank vote, k=20")
    gallery = misclassified_gallery(memory, result, reports / f"v{result.index_version:06d}-misclassified",
                                    k=vote_k)
    change = memory.compare_with_previous(result)
    # What the last change brought: accuracy on the classes the memory already knew, and on the new ones.
    evaluated = next((v for v in memory.indexes.versions() if v.version == result.index_version), None)
    old, new = labels_old_and_new(memory.indexes, memory.catalog(), evaluated) if evaluated else ([], [])
    split = {f"top1_{vote}_{name}_classes": number(acc) for name, labels in (("old", old), ("new", new))
             if (acc := accuracy_on(result.per_label, labels)) is not None}
    context.log.info(f"top-1 ({vote}) {top1:.4f} on {result.n_queries} queries ({result.query_set})")
    yield MaterializeResult(metadata={
        f"top1_{vote}": number(top1),
        **split,
        f"top1_{vote}_soft_pruning": number(result.top1(pruning="soft")),
        f"top1_{vote}_hard_pruning": number(result.top1(pruning="hard")),
        "best_top1": number(top["accuracy"]), "best_vote": text(f"{top['strategy']}, k={top['k']}"),
        "old_classes": text(", ".join(old) or "none"), "new_classes": text(", ".join(new) or "none"),
        "index_version": text(result.index_version), "query_set": text(result.query_set),
        "n_queries": result.n_queries, "seconds": number(seconds, 2),
        "accuracy_by_k": table(wide), "best_k": table(best.with_columns(pl.col("accuracy").round(4))),
        "per_label": table(result.per_label.with_columns(pl.col("accuracy").round(4))),
        "best_k_by_pruning": table(best_by_pruning.with_columns(pl.col("accuracy").round(4))),
        "chart": image_markdown(chart, "accuracy against k"),
        "chart_path": MetadataValue.path(str(chart)),
        "reliability_diagram": image_markdown(diagram, "accuracy per confidence bin"),
        "calibration": table(result.calibration.filter(pl.col("n_queries") > 0).with_columns(pl.col(pl.Float64).round(4))),
        **({"novelty": MetadataValue.json(result.novelty)} if result.novelty else {}),
        **({"misclassified": MetadataValue.md(gallery)} if gallery else {}),
    })
    shared = {}
    if change:  # only the labels both versions hold were compared: the names say so
        shared = {"previous_index_version": text(change["previous_index_version"]),
                  f"top1_{vote}_shared_labels_before": number(change["previous_top1"]),
                  f"top1_{vote}_shared_labels_now": number(change["top1"]),
                  "drop_on_shared_labels": number(change["drop"]),
                  "shared_labels": text(", ".join(change["labels_compared"]) or "none")}
    passed = change is None or change["drop"] <= visual_memory.max_top1_drop
    yield AssetCheckResult(
        check_name="top1_not_dropped", severity=AssetCheckSeverity.ERROR, passed=passed,
        description=(f"top-1 on the {len(change['labels_compared'])} labels both versions hold went from "
                     f"{change['previous_top1']:.4f} (v{change['previous_index_version']}) to {change['top1']:.4f}: "
                     f"a drop of {change['drop']:.4f}, {'within' if passed else 'beyond'} {visual_memory.max_top1_drop}"
                     if change else "no earlier evaluation of this query set to compare with"),
        metadata={"max_drop": text(visual_memory.max_top1_drop), **(shared or {"previous_index_version": text("none")})})
