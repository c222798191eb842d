"""The code location `vismem` (workspace.yaml): `dagster dev -w workspace.yaml`."""
import warnings
from pathlib import Path

from dagster import (
    AnchorBasedFilePathMapping,
    BetaWarning,
    Definitions,
    link_code_references_to_git,
    with_source_code_references,
)

from vismem_assets.settings import Settings

from .assets import embeddings as embedded_embeddings
from .assets import evaluation, experiments, memory_index, pruning_weights
from .assets import image_sets as embedded_image_sets
from .editing import (relabel_job, relabel_request_sensor, sample_labels, set_weights_job, user_weights,
                      weight_request_sensor)
from .deployment import DEPLOYMENT
from .checks import index_file_matches_sha256, live_index_matches_ledger, nothing_forgotten_remains
from .resources import VISUAL_MEMORY
from .schedules import compaction_job, daily_evaluation, evaluation_job, experiments_job, nightly_compaction
from .sensors import embeddings_sensor, forget_job, forget_request_sensor, image_set_sensor, ingest_job, refresh_job

REPO = Path(__file__).resolve().parent.parent

if DEPLOYMENT.cluster:  # read and encode steps on the workers, one writing step each (*_anywhere.py)
    from .embedding_anywhere import cluster_embeddings as embeddings
    from .ingest_anywhere import cluster_image_sets as image_sets
else:  # one step each, in the run's one process
    embeddings, image_sets = embedded_embeddings, embedded_image_sets


def _with_code_references(assets: list) -> list:
    """Each asset links to the file and line that defines it; with VISMEM_GIT_URL (and
    VISMEM_GIT_BRANCH, default main) set, the links open the hosted repository instead."""
    with warnings.catch_warnings():  # beta in 1.13 (dagster is pinned): no warning on every load
        warnings.simplefilter("ignore", BetaWarning)
        assets = with_source_code_references(assets)
        settings = Settings.from_env()
        if settings.git_url:
            assets = link_code_references_to_git(
                assets, git_url=settings.git_url, git_branch=settings.git_branch,
                file_path_mapping=AnchorBasedFilePathMapping(local_file_anchor=REPO, file_anchor_path_in_repository=""))
    return list(assets)


defs = Definitions(
    assets=_with_code_references([image_sets, embeddings, memory_index, pruning_weights, evaluation, experiments,
                                  sample_labels, user_weights]),
    asset_checks=[live_index_matches_ledger, index_file_matches_sha256, nothing_forgotten_remains],
    jobs=[ingest_job, refresh_job, forget_job, compaction_job, evaluation_job, experiments_job, relabel_job,
          set_weights_job],
    sensors=[image_set_sensor, embeddings_sensor, forget_request_sensor, relabel_request_sensor, weight_request_sensor],
    schedules=[nightly_compaction, daily_evaluation],
    resources={"visual_memory": VISUAL_MEMORY, **DEPLOYMENT.resources()},
    # The embedded default: one process per run, so the torch model is loaded at most once per run.
    # The cluster profile: the Celery executor (deployment.py), each worker loading it once.
    executor=DEPLOYMENT.executor(),
)
