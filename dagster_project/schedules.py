"""Nightly compaction and a scheduled evaluation."""
from __future__ import annotations

from dagster import DefaultScheduleStatus, ScheduleDefinition, define_asset_job

from .assets import evaluation, experiments, memory_index, pruning_weights

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

nightly_compaction = ScheduleDefinition(job=compaction_job, cron_schedule="0 3 * * *",
                                        default_status=DefaultScheduleStatus.RUNNING)
daily_evaluation = ScheduleDefinition(job=evaluation_job, cron_schedule="0 5 * * *",
                                      default_status=DefaultScheduleStatus.RUNNING)
