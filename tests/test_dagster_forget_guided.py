"""Guided, safe forgetting in Dagster (issue 17, item 4): a bad request is refused before any run
exists (by the inbox sensor, or by the forget job's config mapping at launch) and says what to
fix; one the memory changed under is refused by memory_index before anything changes; neither
fails, re-materializes or paints red memory_index, pruning_weights or evaluation. The forget
job's run config is one typed request (no default that would run a plain refresh), with a
dry run that reports as metadata and changes nothing. Real images, real ledger, real instance."""
import json
import shutil

import pytest
from dagster import (
    AssetKey,
    DagsterConfigMappingFunctionError,
    DagsterEventType,
    DagsterInvalidConfigError,
    DagsterRunStatus,
    RunsFilter,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from dagster_project.assets import embeddings, image_set_partitions, image_sets
from dagster_project.definitions import defs
from dagster_project.resources import VisualMemory
from dagster_project.sensors import forget_request_sensor

LABELS = ("Bag", "Trouser", "Sneaker", "Coat")
CORE = ("memory_index", "pruning_weights", "evaluation")
WHO = {"requested_by": "dpo@example.com", "reason": "licence withdrawn"}


def build(home, fm_sets, monkeypatch, encoder, instance) -> dict:
    """A memory of 4 labels x 10 real Fashion-MNIST images, ingested, embedded, indexed, pruned
    and evaluated through Dagster, so that each core asset has a materialization to keep."""
    from dagster_project import resources as res

    monkeypatch.setenv("VISMEM_HOME", str(home))
    monkeypatch.delenv("VISMEM_QUERY_SET", raising=False)  # leave-one-out: no query folder to copy
    target = home / "inbox" / "sets" / "set-a"
    for label in LABELS:
        shutil.copytree(fm_sets["train"] / label, target / label)
    res._memory.cache_clear()
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    resources = {"visual_memory": VisualMemory()}
    instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
    assert materialize([image_sets, embeddings], partition_key="set-a", instance=instance, resources=resources).success
    assert defs.resolve_job_def("refresh_memory").execute_in_process(instance=instance, resources=resources).success
    return resources


def core_state(instance) -> dict:
    """Per core asset: the storage ids of its materializations."""
    return {key: [r.storage_id for r in instance.fetch_materializations(AssetKey(key), limit=100).records]
            for key in CORE}


def assert_green(instance):
    """What the UI paints red (shouldDisplayRunFailure in Dagster's webapp): the latest run that
    planned the asset failed without materializing it. No run may have failed at all here."""
    assert not instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
    for key in CORE:
        planned = instance.get_latest_planned_materialization_info(AssetKey(key))
        run = instance.get_run_by_id(planned.run_id)
        assert run.status == DagsterRunStatus.SUCCESS, (key, run.status)


def ledger_state(memory) -> dict:
    live = memory.indexes.live()
    return {"version": live.version, "sha256": live.sha256,
            "requests": memory.ledger.query("SELECT count(*) AS n FROM forget_requests")["n"][0],
            "deletions": memory.ledger.query("SELECT count(*) AS n FROM deletions")["n"][0],
            "status": memory.ledger.query("SELECT status, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1").rows()}


def sensor_tick(instance, resources, capfd):
    """One evaluation of the sensor, and its log lines (written to stderr outside a daemon)."""
    capfd.readouterr()
    result = forget_request_sensor(build_sensor_context(instance=instance, resources=resources))
    return result, capfd.readouterr().err.splitlines()


@pytest.mark.slow
def test_bad_requests_are_refused_before_any_run_and_the_core_assets_stay_green(
        tmp_path, fm_sets, monkeypatch, encoder, capfd):
    home = tmp_path / "home"
    with instance_for_test() as instance:
        resources = build(home, fm_sets, monkeypatch, encoder, instance)
        memory = resources["visual_memory"].memory()
        before, ledger_before, runs_before = core_state(instance), ledger_state(memory), len(instance.get_runs())

        inbox = home / "inbox" / "forget"
        bad = {
            "typo.json": {"label": "Bgg", **WHO},
            "anonymous.json": {"label": "Bag", "reason": "licence withdrawn"},
            "two-targets.json": {"label": "Bag", "image_set": "set-a", **WHO},
            "ids-as-text.json": {"sample_ids": "abc", **WHO},
            "unknown-set.json": {"image_set": "set-z", **WHO},
        }
        for name, body in bad.items():
            (inbox / name).write_text(json.dumps(body))
        (inbox / "broken.json").write_text("{not json")
        result, logs = sensor_tick(instance, resources, capfd)

        assert isinstance(result, SkipReason) and "6 rejected" in result.skip_message
        assert not list(inbox.glob("*.json"))
        errors = {p.name.removesuffix(".error.txt"): p.read_text() for p in (inbox / "rejected").glob("*.error.txt")}
        assert sorted(errors) == sorted([*bad, "broken.json"])
        assert all((inbox / "rejected" / name).exists() for name in errors)
        # Each error says what to fix, in words (no Python TypeError).
        assert errors["typo.json"].startswith("no sample has label 'Bgg' (labels: Bag, Coat, Sneaker, Trouser)")
        assert "Did you mean 'Bag'?" in errors["typo.json"]
        assert "needs requested_by" in errors["anonymous.json"] and "for example" in errors["anonymous.json"]
        assert "exactly one of" in errors["two-targets.json"]
        assert "'sample_ids' must be a list of strings" in errors["ids-as-text.json"]
        assert "unknown image set 'set-z'" in errors["unknown-set.json"]
        assert "not valid JSON" in errors["broken.json"]
        assert not any("TypeError" in e for e in errors.values())
        # ... and so does the sensor's log, one line per file.
        assert any("forget request typo.json rejected: no sample has label 'Bgg'" in m for m in logs)
        assert any("forget request anonymous.json rejected" in m and "requested_by" in m for m in logs)

        # From the Launchpad: the same typo is refused when the run would be created.
        forget = defs.resolve_job_def("forget")
        with pytest.raises(DagsterConfigMappingFunctionError) as refused:
            forget.execute_in_process(instance=instance, resources=resources, run_config={"label": "Bgg", **WHO})
        assert str(refused.value).startswith("forget request refused (no run was created): no sample has label 'Bgg'")
        # Launching the defaults is no plain refresh: who and why are required, a target too.
        with pytest.raises(DagsterInvalidConfigError, match="reason', 'requested_by'"):
            forget.execute_in_process(instance=instance, resources=resources, run_config={})
        with pytest.raises(DagsterConfigMappingFunctionError) as empty:
            forget.execute_in_process(instance=instance, resources=resources,
                                      run_config={"requested_by": "", "reason": ""})
        assert "exactly one of" in str(empty.value)

        # No run was even created; nothing materialized, nothing failed; the memory is as it was.
        assert len(instance.get_runs()) == runs_before
        assert core_state(instance) == before
        assert_green(instance)
        assert ledger_state(memory) == ledger_before


@pytest.mark.slow
def test_dry_run_changes_nothing_then_the_request_forgets_and_a_late_duplicate_is_refused_green(
        tmp_path, fm_sets, monkeypatch, encoder, capfd):
    home = tmp_path / "home"
    with instance_for_test() as instance:
        resources = build(home, fm_sets, monkeypatch, encoder, instance)
        memory = resources["visual_memory"].memory()
        forget = defs.resolve_job_def("forget")
        before, ledger_before = core_state(instance), ledger_state(memory)

        # A dry run from the Launchpad: what it would forget, as metadata; nothing changes.
        dry = forget.execute_in_process(instance=instance, resources=resources,
                                        run_config={"label": "Bag", "dry_run": True, **WHO})
        assert dry.success
        (observation,) = [e.event_specific_data.asset_observation for e in dry.all_events
                          if e.event_type == DagsterEventType.ASSET_OBSERVATION]
        assert observation.asset_key == AssetKey("memory_index")
        meta = observation.metadata
        assert meta["would_forget"].value == 10
        assert [(r.data["label"], r.data["samples"]) for r in meta["would_forget_per_label"].value.records] == [("Bag", 10)]
        samples = meta["samples"].value.records
        assert len(samples) == 10 and {r.data["label"] for r in samples} == {"Bag"}
        assert set(r.data["sample_id"] for r in samples) == set(memory.ledger.query(
            "SELECT sample_id FROM samples WHERE label = 'Bag'")["sample_id"])
        assert ledger_state(memory) == ledger_before and core_state(instance) == before
        assert_green(instance)

        # The real request, from the inbox: checked, launched, applied end to end.
        inbox = home / "inbox" / "forget"
        (inbox / "forget-bags.json").write_text(json.dumps({"label": "Bag", "category": "license", **WHO}))
        requests, logs = sensor_tick(instance, resources, capfd)
        (request,) = requests
        assert any("forget request forget-bags.json: 10 sample(s) (Bag: 10)" in m for m in logs)
        assert request.run_config == {"label": "Bag", "category": "license", **WHO,
                                      "request_file": str(inbox / "forget-bags.json")}
        run = forget.execute_in_process(instance=instance, resources=resources, run_config=request.run_config)
        assert run.success
        assert (inbox / "applied" / "forget-bags.json").exists()
        index = instance.get_latest_materialization_event(AssetKey("memory_index")).asset_materialization.metadata
        assert (index["forgotten"].value, index["operation"].value) == (10, "forget")
        assert all(instance.get_latest_materialization_event(AssetKey(k)).run_id == run.run_id for k in CORE)
        after = core_state(instance)
        ledger_after = ledger_state(memory)
        assert ledger_after["version"] == ledger_before["version"] + 1 and ledger_after["requests"] == 1

        # Someone else asks for the same label: the sensor says it is already done ...
        (inbox / "bags-again.json").write_text(json.dumps({"label": "Bag", "requested_by": "bob", "reason": "me too"}))
        result, logs = sensor_tick(instance, resources, capfd)
        assert isinstance(result, SkipReason)
        assert "already forgotten" in (inbox / "rejected" / "bags-again.json.error.txt").read_text()
        # ... and launched by hand (the label exists, so launch allows it), memory_index refuses it
        # before changing anything: the run succeeds, nothing is materialized, nothing turns red.
        late = forget.execute_in_process(instance=instance, resources=resources,
                                         run_config={"label": "Bag", "requested_by": "bob", "reason": "me too"})
        assert late.success
        assert not late.get_asset_materialization_events()
        skipped = {e.step_key for e in late.all_events if e.event_type == DagsterEventType.STEP_SKIPPED}
        assert {"pruning_weights", "evaluation"} <= skipped
        (refusal,) = [e.event_specific_data.asset_observation for e in late.all_events
                      if e.event_type == DagsterEventType.ASSET_OBSERVATION]
        assert "already forgotten" in refusal.metadata["forget_rejected"].value
        assert any("forget request rejected, nothing changed: every sample this request names is already forgotten"
                   in e.user_message for e in instance.all_logs(late.run_id))
        assert core_state(instance) == after and ledger_state(memory) == ledger_after
        assert_green(instance)
        assert not instance.get_records_for_run(late.run_id, of_type=DagsterEventType.STEP_FAILURE).records
