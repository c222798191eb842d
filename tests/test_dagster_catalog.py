"""What a Dagster user reads without clicking: the catalog (kinds, owners, tags, code versions,
links to source, the `vismem` location), metadata that is honest after a forget, quality
figures as plain numbers (and ids or versions never as plotted numbers), and a misclassified
gallery picked by confidence across labels. Real instance, real images, real ledger."""
import inspect
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import (
    AssetKey,
    AutomationCondition,
    Definitions,
    DynamicPartitionsDefinition,
    FloatMetadataValue,
    IntMetadataValue,
    TextMetadataValue,
    asset,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)

from dagster_project import assets as assets_module
from dagster_project import editing as editing_module
from dagster_project.assets import (
    embeddings,
    evaluation,
    image_set_partitions,
    image_sets,
    memory_index,
    pruning_weights,
)
from dagster_project.definitions import defs
from dagster_project.resources import VisualMemory
from dagster_project.sensors import embeddings_sensor
from vismem_assets.evaluation import BORDERLINE, CONFIDENTLY_WRONG, Evaluation, gallery_picks
from vismem_assets.glance import accuracy_on

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
REFRESH = [memory_index, pruning_weights, evaluation]

# Numeric metadata is plotted by Dagster over materializations: only measurements may be numbers.
MEASUREMENTS = {
    "image_sets": {"files", "added", "duplicates", "blocked", "quarantined", "seconds", "files_per_second"},
    "embeddings": {"embedded", "vectors_in_set", "seconds", "images_per_second"},
    "memory_index": {"nprobe", "recall_at_10", "recall_at_100", "n_vectors", "n_added", "n_removed", "samples",
                     "labels", "holes", "pending_forgets", "files", "delta_files", "vectors_in_deltas", "seconds",
                     "embedded_pending",  # what the run embedded first (samples waiting for their vectors)
                     "forgotten"},
    "pruning_weights": {"k10_requeried", "k100_requeried", "k10_seconds", "k100_seconds", "samples",
                        "soft_down_weighted", "hard_excluded"},
    "evaluation": {"top1_rank_k20", "top1_rank_k20_old_classes", "top1_rank_k20_new_classes",
                   "top1_rank_k20_soft_pruning", "top1_rank_k20_hard_pruning", "best_top1", "n_queries", "seconds"},
}
NOT_NUMBERS = {"index_version", "parent_version", "recall_measured_at_version", "sha256", "forget_request_id",
               "previous_index_version", "version", "dimension", "expected_dimension", "max_drop", "ingest_id"}


def test_every_asset_is_catalogued_with_kinds_owners_tags_code_version_and_source():
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == {"image_sets", "embeddings", "memory_index", "pruning_weights", "evaluation", "experiments",
                          "sample_labels", "user_weights"}  # the last two: editing labels and weights (editing.py)
    for name, spec in specs.items():
        assert spec.kinds, name
        assert spec.owners == ["team:vismem"], name
        assert spec.code_version, name
        assert spec.tags.get("vismem/stage") and spec.tags.get("vismem/ledger") in ("writes", "none"), name
        # The link to source points at the function that computes the asset.
        (reference,) = spec.metadata["dagster/code_references"].code_references
        lines = Path(reference.file_path).read_text().splitlines()
        module = editing_module if name in ("sample_labels", "user_weights") else assets_module
        assert Path(reference.file_path) == Path(inspect.getsourcefile(module)), name
        assert f"def {name}(" in "\n".join(lines[reference.line_number - 1:reference.line_number + 8]), name
    assert {"faiss", "duckdb"} <= specs["memory_index"].kinds
    assert {"onnx", "pytorch", "parquet"} <= specs["embeddings"].kinds
    assert "polars" in specs["evaluation"].kinds
    # A freshness policy on the evaluation: a day without one warns, two fail.
    policy = specs["evaluation"].freshness_policy
    assert policy is not None and policy.warn_window.to_timedelta().total_seconds() == 26 * 3600
    assert policy.fail_window.to_timedelta().total_seconds() == 50 * 3600
    assert all(specs[n].freshness_policy is None for n in specs if n != "evaluation")
    # Every check says what it checks.
    graph = defs.resolve_asset_graph()
    for key in graph.asset_check_keys:
        assert graph.get_check_spec(key).description, key
    assert "both" in graph.get_check_spec(
        next(k for k in graph.asset_check_keys if k.name == "top1_not_dropped")).description
    # The code location is named vismem where dagster dev reads it.
    (entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    assert entry["python_module"]["location_name"] == "vismem"


@pytest.mark.slow
def test_eager_automation_would_strand_sets_behind_a_failed_one_so_the_sensor_stays(resources, fm_sets):
    """Why embeddings_sensor is not replaced by AutomationCondition.eager(): with one image set's
    run failed, eager never folds in the sets that did land; the sensor does."""
    sets = DynamicPartitionsDefinition(name="sets")

    @asset(partitions_def=sets)
    def up(context):
        if context.partition_key == "bad":
            raise ValueError("a set that cannot be read")

    @asset(deps=[up], automation_condition=AutomationCondition.eager())
    def down():
        pass

    toy = Definitions(assets=[up, down])
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("sets", ["good", "bad"])
        assert not materialize([up], partition_key="bad", instance=instance, raise_on_error=False).success
        assert materialize([up], partition_key="good", instance=instance).success
        assert evaluate_automation_conditions(defs=toy, instance=instance).total_requested == 0

    home = Path(resources["visual_memory"].memory().layout.root)
    drop(home, "set-a", fm_sets["train"], ["Bag", "Coat"], 2)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a", "missing-set"])
        assert not materialize([image_sets, embeddings], partition_key="missing-set", instance=instance,
                               resources=resources, raise_on_error=False).success
        assert materialize([image_sets, embeddings], partition_key="set-a", instance=instance,
                           resources=resources).success
        tick = embeddings_sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        assert len(tick.run_requests) == 1  # the refresh that folds set-a in


def drop(home: Path, name: str, source: Path, labels, per_label: int) -> None:
    target = home / "inbox" / "sets" / name
    for label in labels:
        (target / label).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / label).glob("*.png"))[:per_label]:
            shutil.copy(f, target / label / f.name)


@pytest.fixture
def resources(tmp_path, encoder, monkeypatch):
    from dagster_project import resources as res

    home = tmp_path / "home"
    monkeypatch.setenv("VISMEM_HOME", str(home))
    monkeypatch.delenv("VISMEM_QUERY_SET", raising=False)
    res._memory.cache_clear()
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    return {"visual_memory": VisualMemory()}


def latest(instance, key: str):
    return instance.get_latest_materialization_event(AssetKey(key)).asset_materialization.metadata


def ingest(instance, resources, name: str):
    instance.add_dynamic_partitions(image_set_partitions.name, [name])
    assert materialize([image_sets, embeddings], partition_key=name, instance=instance, resources=resources).success


def messages(instance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id)]


def assert_only_measurements_plotted(instance, key: str):
    for name, value in latest(instance, key).items():
        if isinstance(value, (IntMetadataValue, FloatMetadataValue)):
            assert name in MEASUREMENTS[key], f"{key}: {name} is plotted but is not a measurement"
            if isinstance(value, FloatMetadataValue) and value.value is not None:
                assert value.value == round(value.value, 4), (key, name, value.value)
        if name in NOT_NUMBERS:
            assert isinstance(value, TextMetadataValue), (key, name, value)


@pytest.mark.slow
def test_forget_makes_a_new_version_and_says_so_with_a_reason_of_its_own(resources, fm_sets):
    memory = resources["visual_memory"].memory()
    home = memory.layout.root
    drop(home, "set-a", fm_sets["train"], ["Bag", "Coat", "Sneaker"], 4)
    drop(home, "set-b", fm_sets["more"], ["Bag", "Coat", "Sneaker"], 2)
    with instance_for_test() as instance:
        ingest(instance, resources, "set-a")
        assert materialize([memory_index], instance=instance, resources=resources).success
        first = latest(instance, "memory_index")
        assert first["new_version"].value is True and first["index_version"].value == "1"
        assert first["build_reason"].value == "exact: 12 vectors, below the IVF threshold of 200,000"
        ingest(instance, resources, "set-b")
        assert materialize([memory_index], instance=instance, resources=resources).success
        added = latest(instance, "memory_index")
        assert (added["index_version"].value, added["operation"].value, added["n_vectors"].value) == ("2", "add", 18)
        # An add builds nothing: the reason is v1's, and says so, with v2's own count.
        assert added["build_reason"].value.startswith("exact: 12 vectors")
        assert "chosen by the build of v1; v2, an add from v1, keeps that type with 18 vectors" in \
            added["build_reason"].value

        config = {"label": "Bag", "requested_by": "dpo@example.com", "reason": "licence withdrawn"}
        run = defs.resolve_job_def("forget").execute_in_process(instance=instance, resources=resources,
                                                                run_config=config)
        assert run.success
        forgot = latest(instance, "memory_index")
        assert forgot["new_version"].value is True  # the forget made v3: read before, not after, it
        assert (forgot["index_version"].value, forgot["parent_version"].value) == ("3", "2")
        assert (forgot["operation"].value, forgot["n_vectors"].value, forgot["forgotten"].value) == ("forget", 12, 6)
        assert "v3, a forget from v2, keeps that type with 12 vectors" in forgot["build_reason"].value
        # Forgotten vectors are erased in place: holes until the compaction.
        assert (forgot["samples"].value, forgot["labels"].value, forgot["holes"].value,
                forgot["pending_forgets"].value) == (12, 2, 6, 0)
        logs = messages(instance, run)
        assert any("index version 3 (forget from v2): 12 vectors" in m for m in logs)
        assert not any("nothing new to fold in" in m for m in logs)
        assert_only_measurements_plotted(instance, "memory_index")

        # Nothing changed since: the same version, and said so.
        again = materialize([memory_index], instance=instance, resources=resources)
        same = latest(instance, "memory_index")
        assert same["new_version"].value is False and same["index_version"].value == "3"
        assert any("nothing new to fold in: version 3 stays live" in m for m in messages(instance, again))

        # A compaction builds afresh: its own reason, and no holes left.
        assert defs.resolve_job_def("nightly_compaction").execute_in_process(instance=instance,
                                                                             resources=resources).success
        compacted = latest(instance, "memory_index")
        assert compacted["index_version"].value == "4" and compacted["operation"].value == "compact"
        assert compacted["build_reason"].value == "exact: 12 vectors, below the IVF threshold of 200,000"
        assert (compacted["holes"].value, compacted["purged_versions"].value) == (0, "none")
        assert memory.indexes.live().version == 4


@pytest.mark.slow
def test_evaluation_publishes_quality_per_old_and_new_classes_as_plain_numbers(resources, fm_sets, monkeypatch):
    memory = resources["visual_memory"].memory()
    home = memory.layout.root
    old, new = ["Bag", "Coat", "Sneaker"], ["Trouser"]
    drop(home, "set-a", fm_sets["train"], old, 6)
    drop(home, "set-b", fm_sets["train"], new, 6)
    for label in old + new:  # a labelled query set of all four classes
        shutil.copytree(fm_sets["test"] / label, home / "queries" / label)
    monkeypatch.setenv("VISMEM_QUERY_SET", "queries")
    with instance_for_test() as instance:
        ingest(instance, resources, "set-a")
        assert materialize(REFRESH, instance=instance, resources=resources).success
        first = latest(instance, "evaluation")
        assert first["new_classes"].value == "Bag, Coat, Sneaker" and first["old_classes"].value == "none"
        assert "top1_rank_k20_old_classes" not in first  # a first version knew nothing before
        assert isinstance(first["top1_rank_k20"], FloatMetadataValue)

        ingest(instance, resources, "set-b")
        second = materialize(REFRESH, instance=instance, resources=resources)
        assert second.success
        meta = latest(instance, "evaluation")
        assert (meta["old_classes"].value, meta["new_classes"].value) == ("Bag, Coat, Sneaker", "Trouser")
        per_label = pl.DataFrame([r.data for r in meta["per_label"].value.records])
        assert meta["top1_rank_k20_old_classes"].value == pytest.approx(accuracy_on(per_label, old), abs=1e-4)
        assert meta["top1_rank_k20_new_classes"].value == pytest.approx(accuracy_on(per_label, new), abs=1e-4)
        assert meta["top1_rank_k20_new_classes"].value >= 0.5  # learned from one set, no training
        # What the ledger holds for this version's evaluation, at the vote the key names.
        top1 = memory.ledger.query(
            "SELECT accuracy FROM evaluations WHERE index_version = 2 AND strategy = 'rank' AND k = 20"
            " AND pruning = 'none' ORDER BY evaluation_id DESC LIMIT 1")["accuracy"][0]
        assert meta["top1_rank_k20"].value == round(top1, 4)
        assert meta["index_version"].value == "2"
        for key in ("image_sets", "embeddings", "memory_index", "pruning_weights", "evaluation"):
            assert_only_measurements_plotted(instance, key)
        assert latest(instance, "memory_index")["labels"].value == 4
        assert latest(instance, "memory_index")["samples"].value == 24

        (check,) = [c for c in second.get_asset_check_evaluations() if c.check_name == "top1_not_dropped"]
        data = check.metadata
        # Only the labels both versions hold are compared, and the names say so.
        assert data["shared_labels"].value == "Bag, Coat, Sneaker"
        assert data["previous_index_version"].value == "1"
        assert data["top1_rank_k20_shared_labels_now"].value == pytest.approx(
            meta["top1_rank_k20_old_classes"].value, abs=1e-4)
        assert isinstance(data["max_drop"], TextMetadataValue)
        assert {"top1", "drop", "previous_top1"}.isdisjoint(data)


def test_gallery_picks_confidently_wrong_then_borderline_across_labels():
    labels = ["Bag", "Bag", "Coat", "Shirt", "Shirt", "Coat", "Dress"]
    confidence = [0.90, 0.95, 0.40, 0.80, 0.35, 0.60, 0.99]
    result = Evaluation("q", 1, len(labels), pl.DataFrame(), pl.DataFrame(), pl.DataFrame(),
                        misclassified=[0, 1, 2, 3, 4, 5], query_labels=labels, confidence=confidence,
                        predicted=["Coat"] * len(labels))  # query 6 was right: never shown
    assert gallery_picks(result, 4) == [(1, CONFIDENTLY_WRONG), (3, CONFIDENTLY_WRONG),
                                        (2, BORDERLINE), (4, BORDERLINE)]
    # More picks than labels: one per label first, then labels repeat, each half still by confidence.
    assert gallery_picks(result, 6) == [(1, CONFIDENTLY_WRONG), (3, CONFIDENTLY_WRONG), (5, CONFIDENTLY_WRONG),
                                        (4, BORDERLINE), (2, BORDERLINE), (0, BORDERLINE)]
    assert gallery_picks(result, 1) == [(1, CONFIDENTLY_WRONG)]


@pytest.mark.slow
def test_misclassified_gallery_is_ordered_by_confidence_across_labels_with_a_legend(resources, fm_sets,
                                                                                     monkeypatch):
    memory = resources["visual_memory"].memory()
    home = memory.layout.root
    drop(home, "set-a", fm_sets["train"], sorted(p.name for p in fm_sets["train"].iterdir()), 10)
    shutil.copytree(fm_sets["test"], home / "queries")
    monkeypatch.setenv("VISMEM_QUERY_SET", "queries")
    with instance_for_test() as instance:
        ingest(instance, resources, "set-a")
        assert materialize(REFRESH, instance=instance, resources=resources).success
        gallery = latest(instance, "evaluation")["misclassified"].value
    # The evaluation's own vote, for every query: which were wrong, and how confidently.
    queries = sorted((home / "queries").glob("*/*.png"))
    predictions = memory.classify(queries, k=20, strategy="rank", pruning="none", progress=False)
    wrong = {f"{q.parent.name}/{q.name}": p.confidence for q, p in zip(queries, predictions)
             if p.label != q.parent.name}
    assert len({w.split("/")[0] for w in wrong}) >= 4, wrong  # enough to show several labels
    shown = re.findall(r"\*\*\d\. ([^*]+)\*\* → predicted \*\*([^*]+)\*\* with confidence ([0-9.]+) \(([a-z ]+)\)",
                       gallery)
    assert len(shown) == 4
    names, whys = [s[0] for s in shown], [s[3] for s in shown]
    assert whys == [CONFIDENTLY_WRONG] * 2 + [BORDERLINE] * 2
    assert all(name in wrong for name in names)
    confidences = [wrong[name] for name in names]
    assert confidences[0] == max(wrong.values())  # the most confidently wrong first
    assert min(confidences[:2]) >= max(confidences[2:])
    assert confidences[2] == min(wrong.values())  # then the most borderline
    assert len({name.split("/")[0] for name in names}) == 4  # four true labels, not one folder's files
    assert names != sorted(wrong)[:4]  # not by file path
    for line in ("green border", "red border", "w 0.500", "x1.00"):
        assert line in gallery
    # The pages, kept to be looked at.
    pages = sorted((home / "reports" / "evaluation").glob("v000001-misclassified/*.png"))
    assert len(pages) == 4
    ARTIFACTS.mkdir(exist_ok=True)
    for page in pages:
        shutil.copy(page, ARTIFACTS / f"gallery-{page.name}")
