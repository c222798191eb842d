"""The deployment choice (dagster_project/deployment.py): the embedded default unless the
environment names the cluster profile, which swaps in the Celery executor, a shared IO manager and
the split `embeddings` asset (embedding_anywhere.py). The split graph itself is run here in-process
on a real memory; tests/test_cluster.py runs it on real Celery workers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from dagster import AssetKey, Definitions, define_asset_job, instance_for_test

from dagster_project.deployment import Deployment, DeploymentError

CLUSTER_ENV = {"VISMEM_DAGSTER_EXECUTOR": "celery", "VISMEM_BROKER_URL": "redis://127.0.0.1:1/0",
               "VISMEM_BROKER_BACKEND": "redis://127.0.0.1:1/1", "VISMEM_DAGSTER_IO_DIR": "/tmp/vismem-io"}

DESCRIBE = """
import json
from dagster_project.definitions import defs
job = defs.resolve_job_def("ingest_image_set")
ops = {n.name: n.definition for n in job.graph.nodes}
inner = {}
for asset in ("image_sets", "embeddings"):
    if hasattr(ops[asset], "node_defs"):
        inner.update({d.name: {"queue": d.tags.get("dagster-celery/queue"), "pool": d.pool} for d in ops[asset].node_defs})
print(json.dumps({"executor": job.executor_def.name, "refresh": defs.resolve_job_def("refresh_memory").executor_def.name,
                  "embeddings": inner, "io_manager": type(defs.resources.get("io_manager")).__name__}))
"""


def describe(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VISMEM_DAGSTER", "VISMEM_BROKER"))}
    out = subprocess.run([sys.executable, "-c", DESCRIBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_environment_chooses_the_deployment_and_says_what_is_missing():
    assert not Deployment.from_env({}).cluster
    assert Deployment.from_env(CLUSTER_ENV).cluster and Deployment.from_env(CLUSTER_ENV).embed_workers == 2
    with pytest.raises(DeploymentError, match="VISMEM_BROKER_URL and VISMEM_BROKER_BACKEND and VISMEM_DAGSTER_IO_DIR"
                                              ".*cluster.env"):
        Deployment.from_env({"VISMEM_DAGSTER_EXECUTOR": "celery"})
    with pytest.raises(DeploymentError, match="expected one of in_process, celery"):
        Deployment.from_env({"VISMEM_DAGSTER_EXECUTOR": "k8s"})
    with pytest.raises(DeploymentError, match="VISMEM_EMBED_WORKERS"):
        Deployment.from_env({**CLUSTER_ENV, "VISMEM_EMBED_WORKERS": "0"})


@pytest.mark.slow
def test_the_default_stays_in_process_and_the_cluster_profile_sends_steps_to_queues():
    default = describe({})
    assert default == {"executor": "in_process", "refresh": "in_process", "embeddings": {}, "io_manager": "NoneType"}
    cluster = describe(CLUSTER_ENV)
    assert cluster["executor"] == cluster["refresh"] == "vismem_celery"
    assert cluster["io_manager"] == "FilesystemIOManager"
    assert cluster["embeddings"] == {
        "plan_ingest": {"queue": "vismem-embed", "pool": None},
        "read_files": {"queue": "vismem-embed", "pool": None},                # runs anywhere, in parallel
        "register_ingest": {"queue": "vismem-ledger", "pool": "vismem_ledger"},
        "plan_embedding": {"queue": "vismem-ledger", "pool": "vismem_ledger"},
        "encode_part": {"queue": "vismem-embed", "pool": None},          # runs anywhere, in parallel
        "record_embeddings": {"queue": "vismem-ledger", "pool": "vismem_ledger"}}


@pytest.mark.slow
def test_the_split_assets_read_and_embed_in_parts_for_each_worker_and_record_once(tmp_path, fm_sets, encoder):
    from dagster_project.embedding_anywhere import cluster_embeddings
    from dagster_project.ingest_anywhere import cluster_image_sets as image_sets
    from dagster_project.resources import VisualMemory
    from vismem_assets.memory import Memory

    home = tmp_path / "home"
    target = home / "inbox" / "sets" / "split"
    for label in sorted(p.name for p in fm_sets["train"].iterdir())[:3]:
        shutil.copytree(fm_sets["train"] / label, target / label)
    n = sum(1 for _ in target.rglob("*.png"))
    defs = Definitions(assets=[image_sets, cluster_embeddings],
                       jobs=[define_asset_job("ingest", selection=[image_sets, cluster_embeddings])],
                       resources={"visual_memory": VisualMemory(home=str(home))})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("image_sets", ["split"])
        result = defs.resolve_job_def("ingest").execute_in_process(instance=instance, partition_key="split")
        assert result.success
        reads = [e for e in result.all_events if e.is_successful_output and e.step_key.startswith("image_sets.read")]
        assert len(reads) == 2 and sum(e.step_output_data.metadata["files"].value for e in reads) == n
        registered = instance.get_latest_materialization_event(AssetKey("image_sets")).asset_materialization.metadata
        assert registered["added"].value == registered["files"].value == n and registered["read_steps"].value == 2
        encodes = [e for e in result.all_events if e.is_successful_output and e.step_key.startswith("embeddings.encode")]
        assert len(encodes) == 2                                               # one per embedding worker (default 2)
        assert sum(e.step_output_data.metadata["images"].value for e in encodes) == n
        recorded = instance.get_latest_materialization_event(AssetKey("embeddings")).asset_materialization.metadata
        assert recorded["embedded"].value == recorded["vectors_in_set"].value == n
        assert recorded["parts"].value == 2 and recorded["max_norm_error"].value < 1e-3

        # Again: nothing is pending, one empty encode step, and the asset is still materialized.
        again = defs.resolve_job_def("ingest").execute_in_process(instance=instance, partition_key="split")
        assert again.success
        latest = instance.get_latest_materialization_event(AssetKey("embeddings")).asset_materialization.metadata
        assert latest["embedded"].value == 0 and latest["vectors_in_set"].value == n
        again_set = instance.get_latest_materialization_event(AssetKey("image_sets")).asset_materialization.metadata
        assert again_set["added"].value == 0 and again_set["duplicates"].value == n   # re-adding adds nothing
    memory = Memory(home, encoder=encoder)
    assert memory.pending_embeddings().is_empty() and len(memory.embedding_files("split")) == 2
