"""Nightly compaction and a scheduled evaluation: each skips, saying why, while the memory has no
index to compact or evaluate (a fresh deployment), instead of failing a run every night."""
from __future__ import annotations

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from vismem_assets.settings import Settings

from .assets import evaluation, experiments, memory_index, pruning_weights
from .resources import VisualMemory

compaction_job = define_asset_job(
    "nightly_compaction", selection=[memory_index, pruning_weights, evaluation],
    config={"ops": {"memory_index": {"config": {"rebuild": True}}}},
    description="Full rebuild of the index from ledger + embeddings into a fresh version, purge old versions, evaluate.",
)
experiments_job = define_asset_job(
    "lifelong_experiments", selection=[experiments],
    description="Run the paper's experiments (label noise, new classes, memory scaling, novelty) on Fashion-MNIST.",
)
evaluation_job = define_asset_job("scheduled_evaluation", selection=[evaluation],
                                  description="Evaluate the live memory.")

# VISMEM_SCHEDULES=0 deploys them stopped (turned on in the UI): a demo, or a test that must not
# meet 03:00 or 05:00 halfway.
DEFAULT_STATUS = DefaultScheduleStatus.RUNNING if Settings.from_env().schedules else DefaultScheduleStatus.STOPPED


def live_index_or_skip(visual_memory: VisualMemory) -> RunRequest | SkipReason:
    # Asked of the ledger alone: the tick loads no encoder into the code server. (A memory indexed
    # only by another encoder than the resource's runs, and the run says which encoders it has.)
    with visual_memory.memory().ledger.connect() as s:
        indexed = s.indexes.live_encoders()
    if not indexed:
        return SkipReason("nothing to do yet: the memory has no index. Add an image set first: vismem add SET_PATH, "
                          "or drop a folder with a _READY file into inbox/sets/")
    return RunRequest()


@schedule(job=compaction_job, cron_schedule="0 3 * * *", default_status=DEFAULT_STATUS,
          description="03:00: rebuild the live index into a fresh version, purge versions beyond retain_versions, "
                      "evaluate; skipped while the memory has no index.")
def nightly_compaction(context: ScheduleEvaluationContext, visual_memory: VisualMemory):
    return live_index_or_skip(visual_memory)


@schedule(job=evaluation_job, cron_schedule="0 5 * * *", default_status=DEFAULT_STATUS,
          description="05:00: evaluate the live memory (the evaluation asset's freshness expects one a day); "
                      "skipped while the memory has no index.")
def daily_evaluation(context: ScheduleEvaluationContext, visual_memory: VisualMemory):
    return live_index_or_skip(visual_memory)
