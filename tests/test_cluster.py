"""The cluster profile on one machine, with real processes: scripts/cluster.sh starts PostgreSQL,
Redis, dagster-daemon, the webserver, two embedding workers and a ledger worker (Celery) in a
temporary folder, on free ports, once for this module; the finalizer stops them, also when a test
fails, and checks that nothing it started is left.

Four image sets dropped in the inbox with _READY, and nothing else done, must become four
successful ingest runs and a refresh; the read and encode steps ran on the workers, the encode
steps in two worker processes at the same time, each loading the encoder once; no two steps that write the ledger overlapped; the ledger and
the live index agree; and classify answers as a plain in-process memory of the same sets does.
Then a fault: the process running an encode step is killed with SIGKILL; the run fails, nothing
of its set is recorded, and the next set brings everything in.
Everything is read back from the Dagster instance (on PostgreSQL) and the memory itself.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.local_cluster import LocalCluster, steps
from vismem_assets.fashion_mnist import write_image_folders
from vismem_assets.ledger.postgres import PostgresLedger
from vismem_assets.memory import Memory
from vismem_assets.settings import Settings

SETS = {"cluster-a": (0, 1, 2, 3), "cluster-b": (4, 5, 6, 7), "cluster-c": (0, 2, 4, 8), "cluster-d": (1, 3, 7, 9)}
PER_SET = 40
PIPELINE_S = 900
LEDGER_STEPS = {"image_sets.register_ingest", "embeddings.plan_embedding", "embeddings.record_embeddings", "memory_index",
                "pruning_weights", "evaluation"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Up once for the module; down in the finalizer, also when a test failed, and nothing left."""
    cluster = LocalCluster({"VISMEM_SCHEDULES": "0"})  # no 03:00 or 05:00 run halfway through a test
    try:
        cluster.up()  # stops what it started if it fails
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        status = cluster.sh("status").stdout
        assert len(cluster.pids()) == 7 and status.count(" alive") == 7, status  # 5 processes, Redis, PostgreSQL
        yield cluster
    finally:
        left = cluster.down()
        assert not left, f"scripts/cluster.sh down left processes running: {left}"


def make_sets(root: Path) -> dict[str, Path]:
    """Four sets of distinct Fashion-MNIST images (never one image in two sets)."""
    used = np.empty(0, np.int64)
    out = {}
    for i, (name, classes) in enumerate(SETS.items()):
        used = np.union1d(used, write_image_folders(root / name, "train", PER_SET, seed=50 + i, classes=classes,
                                                    exclude=used))
        out[name] = root / name
    return out


def wait_for(what: str, probe, timeout: float, cluster: LocalCluster, every: float = 3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def test_sets_dropped_in_the_inbox_are_embedded_on_two_workers_and_recorded_by_one(cluster, encoder, fm_sets,
                                                                                    tmp_path):
    from dagster import AssetKey, DagsterRunStatus

    sets = make_sets(tmp_path / "sets")
    for name, folder in sets.items():  # copied whole, then marked ready
        cluster.drop(folder, name)
    total = PER_SET * len(SETS)
    instance = cluster.instance()

    def indexed():
        failed = [r for r in instance.get_runs() if r.status == DagsterRunStatus.FAILURE]
        if failed:
            pytest.fail(f"run {failed[0].run_id} ({failed[0].job_name}) failed\n{cluster.logs()}")
        event = instance.get_latest_materialization_event(AssetKey("evaluation"))
        index = instance.get_latest_materialization_event(AssetKey("memory_index"))
        runs = instance.get_runs()
        busy = [r for r in runs if not r.is_finished]
        return (event and index and index.asset_materialization.metadata["n_vectors"].value == total
                and event.run_id == index.run_id and not busy and runs)

    wait_for(f"the sensors to ingest, embed, index and evaluate {total} images", indexed, PIPELINE_S, cluster)

    def quiet():  # the embeddings sensor may still request a refresh for the last events: let it settle
        before = {r.run_id for r in instance.get_runs()}
        time.sleep(25)  # more than two ticks of the sensors (10 s)
        return indexed() and {r.run_id for r in instance.get_runs()} == before

    wait_for("the sensors to settle (no new run for 25 s)", quiet, 300, cluster)

    runs = instance.get_runs()
    ingests = [r for r in runs if r.job_name == "ingest_image_set"]
    assert sorted(r.tags["dagster/partition"] for r in ingests) == sorted(SETS)
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [(r.job_name, r.status) for r in runs]
    refreshes = [r for r in runs if r.job_name == "refresh_memory"]
    assert refreshes and all(r.tags.get("dagster/sensor_name") == "embeddings_sensor" for r in refreshes)
    assert {r.job_name for r in runs} == {"ingest_image_set", "refresh_memory"}  # no other action

    # Every set was cut into encode steps for both workers; they ran in two processes at once.
    all_steps = {(r.run_id, key): step for r in runs for key, step in steps(instance, r.run_id).items()}
    encodes = [s for (_, key), s in all_steps.items() if key.startswith("embeddings.encode_part[")]
    assert len(encodes) >= 2 * len(SETS) and all(s["status"] == "STEP_SUCCESS" for s in encodes)
    assert sum(s["metadata"]["images"] for s in encodes) == total
    pids = {s["metadata"]["pid"] for s in encodes}
    assert len(pids) >= 2, pids
    overlapping = [(a, b) for a in encodes for b in encodes if a["metadata"]["pid"] < b["metadata"]["pid"]
                   and a["metadata"]["started_at"] < b["metadata"]["ended_at"]
                   and b["metadata"]["started_at"] < a["metadata"]["ended_at"]]
    assert overlapping, [(s["metadata"]["pid"], s["metadata"]["started_at"], s["metadata"]["ended_at"]) for s in encodes]
    # The encoder was loaded once per worker process, not once per step.
    loads = [s["metadata"]["pid"] for s in encodes if s["metadata"]["encoder_loaded_in_this_step"]]
    assert len(loads) == len(set(loads)) <= len(pids), loads
    # Reading and decoding the files ran in read steps on the workers too, registering in one step.
    reads = [s for (_, key), s in all_steps.items() if key.startswith("image_sets.read_files[")]
    assert len(reads) >= 2 * len(SETS) and sum(s["metadata"]["files"] for s in reads) == total
    assert len({s["metadata"]["pid"] for s in reads}) >= 2
    registers = [s for (_, key), s in all_steps.items() if key == "image_sets.register_ingest"]
    assert len(registers) == len(SETS) and sum(s["metadata"]["added"] for s in registers) == total
    # Recording ran apart from encoding: in the ledger worker, never in an embedding worker.
    records = [s for (_, key), s in all_steps.items() if key == "embeddings.record_embeddings"]
    assert len(records) == len(SETS) and not {s["metadata"]["pid"] for s in records} & pids
    assert sum(s["metadata"]["embedded"] for s in records) == total

    # No two steps that write the ledger ever ran at the same time, across all runs.
    writers = sorted((s["start"], s["end"], key) for (_, key), s in all_steps.items() if key in LEDGER_STEPS)
    assert len(writers) >= 3 * len(SETS) + 3 * len(refreshes)
    for (s1, e1, k1), (s2, e2, k2) in zip(writers, writers[1:]):
        assert e1 <= s2, f"{k1} [{s1}, {e1}] overlaps {k2} [{s2}, {e2}]"

    # The PostgreSQL ledger (cluster.env's VISMEM_LEDGER_URL; no DuckDB file in the home) and the
    # live index agree, and the audit holds.
    memory = Memory(cluster.home, encoder=encoder, settings=cluster.settings())
    assert isinstance(memory.ledger, PostgresLedger) and not (cluster.home / "ledger.duckdb").exists()
    consistency = memory.index_consistency()
    assert consistency["ok"] and consistency["n_index"] == consistency["n_ledger"] == total, consistency
    assert memory.pending_embeddings().is_empty()
    assert memory.audit.verify().ok

    # The same sets in a plain in-process memory (the embedded default) classify alike.
    plain = Memory(tmp_path / "plain", encoder=encoder, settings=Settings.from_env(home=str(tmp_path / "plain")))
    for name, folder in sets.items():
        plain.add(folder, name=name, progress=False)
    queries = sorted(fm_sets["test"].rglob("*.png"))
    ours = memory.classify(queries, k=20, progress=False)
    theirs = plain.classify(queries, k=20, progress=False)
    assert [p.label for p in ours] == [p.label for p in theirs]
    assert np.allclose([p.confidence for p in ours], [p.confidence for p in theirs], atol=1e-5)


def pool_children(leader: int) -> list[int]:
    """The Celery pool processes (the ones that run steps) of the worker whose process group leader
    is `leader` (the `dagster-celery worker start` that cluster.sh spawned): grandchildren of it."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))   # ppid, pgrp
    mains = [pid for pid, (ppid, pgrp) in procs.items() if ppid == leader and pgrp == leader]
    return [pid for pid, (ppid, _) in procs.items() if ppid in mains]


def test_an_embedding_worker_killed_mid_step_fails_the_run_cleanly_and_the_next_set_completes(
        cluster, encoder, tmp_path):
    """kill -9 of the process running an encode step: the run fails, nothing of the set is recorded
    and the index still matches the ledger; the next set dropped in the inbox, and nothing else,
    brings everything in (the refresh embeds what the killed run left). Runs after the test above."""
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    instance = cluster.instance()
    memory = Memory(cluster.home, encoder=encoder, settings=cluster.settings())
    before = memory.indexes.live().n_vectors
    killed_idx = write_image_folders(tmp_path / "killed", "test", 800, seed=91)
    write_image_folders(tmp_path / "after", "test", 40, seed=92, exclude=killed_idx)
    cluster.drop(tmp_path / "killed", "killed")

    def encoding():
        runs = instance.get_runs(RunsFilter(job_name="ingest_image_set", tags={"dagster/partition": "killed"}))
        if runs and any(k.startswith("embeddings.encode_part[") and "start" in s and "end" not in s
                        for k, s in steps(instance, runs[0].run_id).items()):
            return runs[0]
        return None

    run = wait_for("an encode step of the set to start", encoding, 300, cluster, every=0.2)
    leader = int((cluster.root / "pids" / "embed-worker-1.pid").read_text())
    victims = pool_children(leader)
    assert victims, "no Celery pool process under embed-worker-1"
    time.sleep(0.5)  # mid-step: the model is loaded, the images are being encoded
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    def finished():
        r = instance.get_run_by_id(run.run_id)
        return r if r.is_finished else None

    assert wait_for("the run with the killed step to end", finished, 300, cluster).status == DagsterRunStatus.FAILURE
    # Nothing of the set was recorded; what is recorded is exactly what the live index holds.
    assert len(memory.pending_embeddings("killed")) == 800
    assert memory.index_consistency()["ok"]

    cluster.drop(tmp_path / "after", "after")
    total = before + 800 + 40

    def indexed():
        index = instance.get_latest_materialization_event(AssetKey("memory_index"))
        busy = [r for r in instance.get_runs() if not r.is_finished]
        return index and index.asset_materialization.metadata["n_vectors"].value == total and not busy

    wait_for(f"the next set's runs to index all {total} vectors", indexed, PIPELINE_S, cluster)
    after = instance.get_runs(RunsFilter(job_name="ingest_image_set", tags={"dagster/partition": "after"}))
    assert [r.status for r in after] == [DagsterRunStatus.SUCCESS]
    memory = Memory(cluster.home, encoder=encoder, settings=cluster.settings())  # sees the new versions
    consistency = memory.index_consistency()
    assert consistency["ok"] and consistency["n_index"] == total, consistency
    assert memory.pending_embeddings().is_empty() and memory.audit.verify().ok
    # The worker lives on: its pool replaced the killed process, and every worker still runs.
    assert cluster.sh("status").stdout.count(" alive") == 7
