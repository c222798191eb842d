"""The code location with a real Dagster instance: sensor ticks, materializations of the
asset graph on real image sets, checks, and declarative automation."""
import json
import shutil

import faiss
import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from dagster_project.assets import embeddings, evaluation, image_set_partitions, image_sets, memory_index
from dagster_project.checks import index_file_matches_sha256, live_index_matches_ledger
from dagster_project.definitions import defs
from dagster_project.resources import VisualMemory
from dagster_project.sensors import embeddings_sensor, image_set_sensor
from vismem_assets.index_store import index_ids


def drop_set(home, name, source, labels, per_label=5, ready=True):
    """Copy a few images per label into the inbox as a user would, marking the set ready last."""
    target = home / "inbox" / "sets" / name
    for label in labels:
        (target / label).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / label).glob("*.png"))[:per_label]:
            shutil.copy(f, target / label / f.name)
    if ready:
        (target / "_READY").touch()
    return target


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def resources(home, encoder, monkeypatch):
    from dagster_project import resources as res

    # The code location finds the memory exactly as users set it up: through $VISMEM_HOME.
    monkeypatch.setenv("VISMEM_HOME", str(home))
    res._memory.cache_clear()
    # The session's loaded encoder is reused through the per-process Memory cache.
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    return {"visual_memory": VisualMemory()}


def tick(instance, resources, cursor=None):
    context = build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return image_set_sensor(context), context


def test_sensor_takes_complete_sets_once_and_ignores_half_copied(home, resources, fm_sets):
    drop_set(home, "set-a", fm_sets["train"], ["Bag"], per_label=2)
    drop_set(home, "set-b", fm_sets["train"], ["Coat"], per_label=2, ready=False)  # still copying
    with instance_for_test() as instance:
        result, _ = tick(instance, resources)
        assert isinstance(result, SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["set-a"]
        assert result.run_requests[0].run_key == "image_set:set-a"
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["set-a"]
        cursor = result.cursor
        assert json.loads(cursor) == ["set-a"]
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])

        again, _ = tick(instance, resources, cursor)
        assert isinstance(again, SkipReason)

        (home / "inbox" / "sets" / "set-b" / "_READY").touch()
        later, _ = tick(instance, resources, cursor)
        assert [r.partition_key for r in later.run_requests] == ["set-b"]
        assert json.loads(later.cursor) == ["set-a", "set-b"]
        # A lost cursor does not take a set twice: partitions that exist are skipped.
        fresh, _ = tick(instance, resources, None)
        assert [r.partition_key for r in fresh.run_requests] == ["set-b"]


def test_sensor_skips_invalid_set_names(home, resources, fm_sets):
    drop_set(home, "bad name", fm_sets["train"], ["Bag"], per_label=1)
    with instance_for_test() as instance:
        result, _ = tick(instance, resources)
        assert isinstance(result, SkipReason)


def materialize_set(instance, resources, name):
    return materialize([image_sets, embeddings], partition_key=name, instance=instance, resources=resources)


def metadata(instance, key, field):
    event = instance.get_latest_materialization_event(AssetKey(key))
    return event.asset_materialization.metadata[field].value


@pytest.mark.slow
def test_two_sets_through_the_graph_with_checks(home, resources, fm_sets):
    drop_set(home, "set-a", fm_sets["train"], ["Bag", "Trouser", "Sneaker"], per_label=4)
    drop_set(home, "set-b", fm_sets["more"], ["Bag", "Trouser", "Sneaker"], per_label=3)
    (home / "inbox" / "sets" / "set-b" / "Bag" / "broken.png").write_bytes(b"not an image")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a", "set-b"])
        for name in ("set-a", "set-b"):
            assert materialize_set(instance, resources, name).success
        assert metadata(instance, "image_sets", "quarantined") == 1
        assert metadata(instance, "image_sets", "added") == 9
        assert metadata(instance, "embeddings", "embedded") == 9

        graph = materialize([memory_index, evaluation, live_index_matches_ledger, index_file_matches_sha256],
                            instance=instance, resources=resources)
        assert graph.success
        checks = {e.check_name: e.passed
                  for e in graph.get_asset_check_evaluations()}
        assert checks == {"live_index_matches_ledger": True, "index_file_matches_sha256": True,
                          "top1_not_dropped": True}
        assert metadata(instance, "memory_index", "n_vectors") == 21
        assert metadata(instance, "memory_index", "index_type") == "IDMap2,Flat"
        assert "below the IVF threshold of 200,000" in metadata(instance, "memory_index", "build_reason")
        assert metadata(instance, "evaluation", "query_set") == "leave-one-out"
        assert 0.5 < metadata(instance, "evaluation", "top1_rank_k20") <= 1.0
        assert metadata(instance, "evaluation", "chart").startswith("![accuracy against k](data:image/png;base64,")

        memory = resources["visual_memory"].memory()
        live = memory.indexes.live()
        ids = index_ids(faiss.read_index(str(memory.layout.absolute(live.path))))
        active = memory.ledger.query("SELECT vector_id FROM samples WHERE status = 'active'")["vector_id"]
        assert sorted(ids.tolist()) == sorted(active.to_list())

        # Tamper with the live index file: the sha256 check fails and says what to do.
        path = memory.layout.absolute(live.path)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        tampered = materialize([memory_index, index_file_matches_sha256], instance=instance, resources=resources,
                               selection=AssetSelection.checks(index_file_matches_sha256), raise_on_error=False)
        (check,) = tampered.get_asset_check_evaluations()
        assert check.passed is False
        assert "rebuild" in check.metadata["next_step"].value


@pytest.mark.slow
def test_compaction_rebuilds_and_purges(home, resources, fm_sets):
    drop_set(home, "set-a", fm_sets["train"], ["Bag", "Coat"], per_label=3)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
        assert materialize_set(instance, resources, "set-a").success
        assert materialize([memory_index], instance=instance, resources=resources).success
        job = defs.resolve_job_def("nightly_compaction")
        for _ in range(2):
            assert job.execute_in_process(instance=instance, resources=resources).success
        memory = resources["visual_memory"].memory()
        versions = memory.ledger.query("SELECT version, operation, status FROM index_versions ORDER BY version")
        assert versions["operation"].to_list() == ["add", "compact", "compact"]
        assert versions["status"].to_list() == ["retained", "retained", "live"]  # retain_versions=5 keeps all


@pytest.mark.slow
def test_new_embeddings_trigger_one_refresh_each_and_none_is_lost(home, resources, fm_sets):
    drop_set(home, "set-a", fm_sets["train"], ["Bag", "Coat"], per_label=2)
    drop_set(home, "set-b", fm_sets["more"], ["Bag", "Coat"], per_label=2)
    drop_set(home, "set-c", fm_sets["more"], ["Trouser"], per_label=2)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a", "set-b", "set-c"])

        def tick(cursor=None):
            context = build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            data = embeddings_sensor.evaluate_tick(context)
            return data.run_requests, data.cursor

        assert tick()[0] == []  # nothing embedded yet
        assert materialize_set(instance, resources, "set-a").success
        requests, cursor = tick()
        assert len(requests) == 1 and requests[0].job_name in (None, "refresh_memory")
        assert tick(cursor)[0] == []  # the same event is not taken twice
        run = defs.resolve_job_def("refresh_memory").execute_in_process(instance=instance, resources=resources)
        assert run.success
        # Two sets land while nobody looks: one refresh folds in both.
        assert materialize_set(instance, resources, "set-b").success
        assert materialize_set(instance, resources, "set-c").success
        requests, cursor = tick(cursor)
        assert len(requests) == 1
        assert defs.resolve_job_def("refresh_memory").execute_in_process(instance=instance, resources=resources).success
        memory = resources["visual_memory"].memory()
        assert memory.index_consistency()["ok"]
        assert memory.indexes.live().n_vectors == 10
        assert metadata(instance, "evaluation", "index_version") == str(memory.indexes.live().version)


@pytest.mark.slow
def test_compaction_builds_the_configured_index_type_and_shows_its_recall(home, encoder, monkeypatch):
    """Resource config chooses the index type; the rebuild's measured recall and nprobe sweep
    are materialization metadata."""
    from benchmarks.synthetic import build_memory
    from dagster_project import resources as res
    from vismem_assets.index_types import IndexPolicy

    build_memory(home, 4_000, encoder, index_policy=IndexPolicy(kind="flat"))
    monkeypatch.setenv("VISMEM_HOME", str(home))
    res._memory.cache_clear()
    resource = VisualMemory(index_type="ivf-flat", recall_floor=0.6)
    resource.memory().encoder_choice.use(encoder)
    with instance_for_test() as instance:
        result = materialize([memory_index], instance=instance, resources={"visual_memory": resource},
                             run_config={"ops": {"memory_index": {"config": {"rebuild": True}}}})
        assert result.success
        assert metadata(instance, "memory_index", "index_type").startswith("IVF")
        assert metadata(instance, "memory_index", "recall_at_10") >= 0.6
        assert metadata(instance, "memory_index", "recall_measured_at_version") == "2"
        sweep = metadata(instance, "memory_index", "nprobe_sweep")
        assert sweep.records[-1].data["recall_at_10"] >= 0.6
        assert "recall@10" in metadata(instance, "memory_index", "build_reason")


def test_schedules_skip_an_empty_memory_saying_what_to_do_and_run_once_it_has_an_index(home, resources, fm_sets):
    from dagster import RunRequest, build_schedule_context

    from dagster_project.schedules import daily_evaluation, nightly_compaction

    with instance_for_test() as instance:
        def ticks():
            return [s.evaluate_tick(build_schedule_context(instance=instance, resources=resources))
                    for s in (nightly_compaction, daily_evaluation)]

        for data in ticks():  # a fresh deployment at 03:00 and 05:00: no failed run, a reason instead
            assert data.run_requests == []
            assert "Add an image set first: vismem add SET_PATH" in data.skip_message
        drop_set(home, "set-a", fm_sets["train"], ["Bag", "Coat"], per_label=2)
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
        assert materialize_set(instance, resources, "set-a").success
        assert materialize([memory_index], instance=instance, resources=resources).success
        for data in ticks():
            assert [type(r) for r in data.run_requests] == [RunRequest]
            assert data.skip_message is None
        assert nightly_compaction.job_name == "nightly_compaction"
        assert daily_evaluation.job_name == "scheduled_evaluation"


def test_schedules_deploy_stopped_when_the_setting_says_so(monkeypatch):
    import subprocess
    import sys

    code = "from dagster_project.schedules import daily_evaluation as d, nightly_compaction as n; " \
           "print(d.default_status.value, n.default_status.value)"
    for value, status in (("0", "STOPPED STOPPED"), ("1", "RUNNING RUNNING")):
        monkeypatch.setenv("VISMEM_SCHEDULES", value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.split() == status.split()
