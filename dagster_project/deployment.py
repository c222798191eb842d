"""Which deployment this code location runs in, read from the environment once at load.

The embedded default (nothing set): one process per run (`in_process_executor`), Dagster's own
default IO manager, `dagster dev`. The cluster profile (deploy/cluster/, scripts/cluster.sh;
`VISMEM_DAGSTER_EXECUTOR=celery`): steps go to Celery workers through the broker, embedding is
split into encode steps on the embedding queue and one recording step on the ledger queue, and
step outputs live on shared storage. Every process that loads this code location (webserver,
daemon, run workers, Celery workers) must see the same variables: cluster.env holds them.

    VISMEM_DAGSTER_EXECUTOR   in_process (default) | celery
    VISMEM_BROKER_URL         celery: the broker (redis://host:port/0)
    VISMEM_BROKER_BACKEND     celery: the result backend (redis://host:port/1)
    VISMEM_DAGSTER_IO_DIR     celery: folder for step outputs, on storage every worker sees
    VISMEM_EMBED_WORKERS      celery: embedding workers; a set is cut into at least this many steps (2)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CELERY_YAML = REPO / "deploy" / "cluster" / "celery.yaml"

QUEUE_TAG = "dagster-celery/queue"      # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
EMBED_QUEUE = "vismem-embed"            # encode steps: any number of workers, on any machine
LEDGER_QUEUE = "vismem-ledger"          # steps that write the ledger: one worker, concurrency 1
EXECUTORS = ("in_process", "celery")


class DeploymentError(RuntimeError):
    """The environment names a deployment this code location cannot run; says what to set."""


@dataclass(frozen=True)
class Deployment:
    executor_name: str = "in_process"
    broker_url: str | None = None
    broker_backend: str | None = None
    io_dir: str | None = None
    embed_workers: int = 2

    @classmethod
    def from_env(cls, env=None) -> "Deployment":
        env = os.environ if env is None else env
        name = env.get("VISMEM_DAGSTER_EXECUTOR", "") or "in_process"
        if name not in EXECUTORS:
            raise DeploymentError(f"VISMEM_DAGSTER_EXECUTOR={name!r}: expected one of {', '.join(EXECUTORS)} "
                                  "(unset for the embedded default)")
        workers = env.get("VISMEM_EMBED_WORKERS", "") or "2"
        if not workers.isdigit() or int(workers) < 1:
            raise DeploymentError(f"VISMEM_EMBED_WORKERS={workers!r}: expected a whole number of at least 1")
        deployment = cls(name, env.get("VISMEM_BROKER_URL") or None, env.get("VISMEM_BROKER_BACKEND") or None,
                         env.get("VISMEM_DAGSTER_IO_DIR") or None, int(workers))
        if deployment.cluster:
            missing = [v for v, value in (("VISMEM_BROKER_URL", deployment.broker_url),
                                          ("VISMEM_BROKER_BACKEND", deployment.broker_backend),
                                          ("VISMEM_DAGSTER_IO_DIR", deployment.io_dir)) if not value]
            if missing:
                raise DeploymentError(
                    f"VISMEM_DAGSTER_EXECUTOR=celery needs {' and '.join(missing)}: source the cluster's "
                    "cluster.env (scripts/cluster.sh up writes it), or set them by hand")
        return deployment

    @property
    def cluster(self) -> bool:
        return self.executor_name == "celery"

    def executor(self):
        """The executor every job of the code location uses."""
        if not self.cluster:
            from dagster import in_process_executor
            return in_process_executor
        import yaml
        from dagster_celery import celery_executor

        # The workers read the same file (`dagster-celery worker start -y`); the broker comes from
        # the environment ({env: VISMEM_BROKER_URL}) on both sides.
        config = yaml.safe_load(CELERY_YAML.read_text())["execution"]["config"]
        return celery_executor.configured(config, name="vismem_celery")

    def resources(self) -> dict:
        """Extra resources: on the cluster, step outputs go to the shared folder (every worker
        reads what another wrote); the default keeps Dagster's own IO manager."""
        if not self.cluster:
            return {}
        from dagster import FilesystemIOManager
        return {"io_manager": FilesystemIOManager(base_dir=self.io_dir)}


def ingest_sets_in_flight(instance) -> set[str]:
    """The image sets whose ingest runs are queued or running: on the cluster their encode steps
    may be under way. A run killed with its process stays STARTED until Dagster's run monitoring
    (or a person) marks it failed; until then its set is not caught up by memory_index."""
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    runs = instance.get_runs(RunsFilter(job_name="ingest_image_set", statuses=statuses))
    return {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}


DEPLOYMENT = Deployment.from_env()
