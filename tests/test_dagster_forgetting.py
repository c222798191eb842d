"""Forgetting through Dagster: the inbox sensor, the typed forget job, the blocking check,
and the evaluation that follows."""
import json
import shutil

import pytest
from dagster import AssetKey, AssetSelection, build_sensor_context, instance_for_test, materialize

from dagster_project.assets import embeddings, evaluation, image_set_partitions, image_sets, memory_index
from dagster_project.checks import nothing_forgotten_remains
from dagster_project.definitions import defs
from dagster_project.resources import VisualMemory
from dagster_project.sensors import forget_request_sensor

LABELS = ("Bag", "Trouser", "Sneaker", "Coat")


def build(home, fm_sets, monkeypatch, encoder):
    from dagster_project import resources as res

    monkeypatch.setenv("VISMEM_HOME", str(home))
    target = home / "inbox" / "sets" / "set-a"
    for label in LABELS:
        (target / label).mkdir(parents=True)
        for f in sorted((fm_sets["train"] / label).glob("*.png")):
            shutil.copy(f, target / label / f.name)
    queries = home / "queries"
    for label in LABELS:
        shutil.copytree(fm_sets["test"] / label, queries / label)
    monkeypatch.setenv("VISMEM_QUERY_SET", "queries")
    res._memory.cache_clear()
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    return {"visual_memory": VisualMemory()}


def per_label(instance) -> dict[str, float]:
    meta = instance.get_latest_materialization_event(AssetKey("evaluation")).asset_materialization.metadata
    return {r.data["label"]: r.data["accuracy"] for r in meta["per_label"].value.records}


@pytest.mark.slow
def test_forget_from_the_inbox_once_then_evaluation_never_predicts_it(tmp_path, fm_sets, monkeypatch, encoder):
    home = tmp_path / "home"
    resources = build(home, fm_sets, monkeypatch, encoder)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
        assert materialize([image_sets, embeddings], partition_key="set-a", instance=instance,
                           resources=resources).success
        assert materialize([memory_index, evaluation], instance=instance, resources=resources).success
        before = per_label(instance)
        assert before["Bag"] >= 0.5

        inbox = home / "inbox" / "forget"
        (inbox / "forget-bags.json").write_text(json.dumps(
            {"label": "Bag", "requested_by": "dpo@example.com", "reason": "licence withdrawn", "category": "license"}))
        (inbox / "broken.json").write_text("{not json")
        (inbox / "unknown-field.json").write_text(json.dumps({"label": "Bag", "who": "x", "reason": "y"}))
        context = build_sensor_context(instance=instance, resources=resources)
        requests = forget_request_sensor(context)
        assert len(requests) == 1
        assert sorted(p.name for p in (inbox / "rejected").glob("*.json")) == ["broken.json", "unknown-field.json"]
        assert "unknown field" in (inbox / "rejected" / "unknown-field.json.error.txt").read_text()

        run = defs.resolve_job_def("forget").execute_in_process(
            instance=instance, resources=resources, run_config=requests[0].run_config)
        assert run.success
        checks = {e.check_name: e.passed for e in run.get_asset_check_evaluations()}
        # Forgetting a class on purpose is no regression: compared over the classes that stay.
        assert checks == {"nothing_forgotten_remains": True, "live_index_matches_ledger": True,
                          "index_file_matches_sha256": True, "top1_not_dropped": True}
        assert (inbox / "applied" / "forget-bags.json").exists() and not (inbox / "forget-bags.json").exists()
        meta = instance.get_latest_materialization_event(AssetKey("memory_index")).asset_materialization.metadata
        assert meta["forgotten"].value == 10 and meta["operation"].value == "forget"

        after = per_label(instance)
        assert after["Bag"] == 0.0  # a forgotten class is never predicted again
        for label in ("Trouser", "Sneaker", "Coat"):
            assert after[label] >= before[label] - 0.1, (label, before, after)
        memory = resources["visual_memory"].memory()
        bag_tests = sorted((fm_sets["test"] / "Bag").glob("*.png"))
        assert all(p.label != "Bag" and all(n.label != "Bag" for n in p.neighbors)
                   for p in memory.classify(bag_tests, k=10, progress=False))

        # The same request again (same content, new file name): the run key says it was taken.
        (inbox / "again.json").write_text((inbox / "applied" / "forget-bags.json").read_text())
        again = forget_request_sensor(build_sensor_context(instance=instance, resources=resources))
        assert again[0].run_key == requests[0].run_key


@pytest.mark.slow
def test_launchpad_config_and_the_blocking_check_catches_leftovers(tmp_path, fm_sets, monkeypatch, encoder):
    home = tmp_path / "home"
    resources = build(home, fm_sets, monkeypatch, encoder)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
        assert materialize([image_sets, embeddings], partition_key="set-a", instance=instance,
                           resources=resources).success
        assert materialize([memory_index], instance=instance, resources=resources).success
        memory = resources["visual_memory"].memory()
        victim = memory.ledger.query("SELECT sample_id, image_path FROM samples WHERE label = 'Coat' LIMIT 1").row(0)
        image_bytes = memory.layout.absolute(victim[1]).read_bytes()
        config = {"sample_ids": [victim[0]], "requested_by": "alice", "reason": "asked to be removed", "category": "gdpr"}
        run = defs.resolve_job_def("forget").execute_in_process(instance=instance, resources=resources,
                                                                run_config=config)
        assert run.success
        # Someone puts the image back by hand: the check fails and says where.
        path = memory.layout.images / victim[0][:2] / f"{victim[0]}.png"
        path.write_bytes(image_bytes)
        result = materialize([memory_index, nothing_forgotten_remains], instance=instance, resources=resources,
                             selection=AssetSelection.checks(nothing_forgotten_remains), raise_on_error=False)
        (check,) = result.get_asset_check_evaluations()
        assert check.passed is False
        assert victim[0][:16] in check.metadata["problems"].value or "forgotten sample" in check.metadata["problems"].value
