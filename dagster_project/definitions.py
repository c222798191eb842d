"""The code location: `dagster dev -w workspace.yaml`."""
from dagster import Definitions, in_process_executor

from .assets import embeddings, evaluation, experiments, image_sets, memory_index, pruning_weights
from .checks import index_file_matches_sha256, live_index_matches_ledger, nothing_forgotten_remains
from .resources import VisualMemory
from .schedules import compaction_job, daily_evaluation, evaluation_job, experiments_job, nightly_compaction
from .sensors import embeddings_sensor, forget_job, forget_request_sensor, image_set_sensor, ingest_job, refresh_job

defs = Definitions(
    assets=[image_sets, embeddings, memory_index, pruning_weights, evaluation, experiments],
    asset_checks=[live_index_matches_ledger, index_file_matches_sha256, nothing_forgotten_remains],
    jobs=[ingest_job, refresh_job, forget_job, compaction_job, evaluation_job, experiments_job],
    sensors=[image_set_sensor, embeddings_sensor, forget_request_sensor],
    schedules=[nightly_compaction, daily_evaluation],
    resources={"visual_memory": VisualMemory()},
    # One process per run: the torch model is loaded at most once per run.
    executor=in_process_executor,
)
