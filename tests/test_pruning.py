"""Pruning through the memory: reliability kept current incrementally (equal to a full pass)
after adding and forgetting sets, weight sets that classification honours, switched off and
rolled back, and the experiments reachable from the CLI and Dagster."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from dagster import AssetKey, instance_for_test, materialize

from vismem_assets import pruning
from vismem_assets import reliability as rel_mod
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.home import Layout
from vismem_assets.index_store import index_ids, index_vectors
from vismem_assets.ledger import Ledger
from vismem_assets.memory import Memory


def full_pass(memory, k):
    """A reliability computed from scratch on the live index, for comparison."""
    _, index = memory.live_index()
    ids = index_ids(index)
    catalog = memory.catalog()
    labels = {v: pruning.label_code(catalog.label_names[c]) for v, c in zip(catalog.vector_ids.tolist(),
                                                                             catalog.label_codes)}
    return rel_mod.compute(ids, index_vectors(index), [labels[i] for i in ids.tolist()], k)


def copy_set(source, target, labels, n):
    for label in labels:
        (target / label).mkdir(parents=True)
        for f in sorted((source / label).glob("*.png"))[:n]:
            shutil.copy(f, target / label / f.name)
    return target


def test_incremental_reliability_equals_a_full_pass_after_add_and_forget(tmp_path, encoder, fm_sets):
    memory = Memory(tmp_path / "home", encoder=encoder)
    memory.add(copy_set(fm_sets["train"], tmp_path / "a", ("Bag", "Coat", "Shirt", "Sneaker"), 6), progress=False)
    first, run = memory.pruning.reliability(5)
    assert run.mode == "full"
    memory.add(copy_set(fm_sets["more"], tmp_path / "b", ("Bag", "Coat", "Trouser"), 3), progress=False)
    second, run = memory.pruning.reliability(5)
    assert run.mode == "incremental" and run.base_version == 1
    assert run.n_requeried < run.n_samples  # only what could change was looked at again
    assert rel_mod.equal(second, full_pass(memory, 5))
    before = memory.indexes.live().version
    memory.forget(ForgetRequest(requested_by="t", reason="test", image_set="b"))
    # Forgetting searched nothing: it dropped the forgotten from the newest statistics (older ones
    # went) and left holes where they were among a row's neighbours.
    forgotten = memory.ledger.query("SELECT vector_id FROM samples WHERE status = 'forgotten'")["vector_id"].to_numpy()
    runs = memory.ledger.query("SELECT index_version, mode, n_samples, path FROM reliability_runs WHERE k = 5")
    assert runs.select("index_version", "mode").to_dicts() == [{"index_version": before, "mode": "forget"}]
    dropped = rel_mod.load(memory.layout.absolute(runs["path"][0]))
    assert runs["n_samples"][0] == len(dropped) == len(second) - 9
    assert not np.isin(dropped.vector_ids, forgotten).any() and not np.isin(dropped.neighbors, forgotten).any()
    assert len(rel_mod.unfilled(dropped)) > 0
    in_ledger = memory.ledger.query(f"SELECT vector_id, v FROM reliability WHERE k = 5 AND index_version = {before}"
                                    " ORDER BY vector_id")
    assert in_ledger["vector_id"].to_list() == dropped.vector_ids.tolist() and in_ledger["v"].to_list() == dropped.v.tolist()
    # The statistics, next used, search those rows again: the same as a full pass.
    third, run = memory.pruning.reliability(5)
    assert run.mode == "incremental" and run.version == memory.indexes.live().version
    assert run.n_requeried == len(rel_mod.unfilled(dropped))
    assert rel_mod.equal(third, full_pass(memory, 5))
    assert not np.isin(third.neighbors, forgotten).any()


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_a_forget_drops_statistics_whose_file_is_gone_or_damaged_and_they_are_computed_again(tmp_path, encoder, fm_sets,
                                                                                              damage):
    memory = Memory(tmp_path / "home", encoder=encoder)
    memory.add(copy_set(fm_sets["train"], tmp_path / "a", ("Bag", "Coat", "Shirt", "Sneaker"), 6), progress=False)
    memory.pruning.reliability(5)
    path = memory.layout.absolute(memory.ledger.query("SELECT path FROM reliability_runs")["path"][0])
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"PAR1" + b"\0" * 100)
    victim = memory.ledger.query("SELECT sample_id FROM samples WHERE label = 'Bag' LIMIT 1")["sample_id"][0]
    report = memory.forget(ForgetRequest(requested_by="t", reason="test", sample_ids=[victim]))
    assert report.samples and not path.exists()
    assert memory.ledger.query("SELECT count(*) AS n FROM reliability_runs")["n"][0] == 0
    assert memory.ledger.query("SELECT count(*) AS n FROM reliability")["n"][0] == 0
    again, run = memory.pruning.reliability(5)
    assert run.mode == "full" and rel_mod.equal(again, full_pass(memory, 5))


def test_the_pruning_service_needs_only_what_it_is_given(tmp_path):
    """A ledger, a layout, an encoder's id and slug, and two callables for the live index and its
    vectors: no Memory, no encoder model, synthetic vectors."""
    layout = Layout(tmp_path / "home").create()
    ledger = Ledger(layout.ledger)
    ids = np.arange(1, 41, dtype=np.int64)
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with ledger.transaction() as s:
        s.execute("INSERT INTO samples (sample_id, vector_id, label, image_set, status, added_at)"
                  " SELECT 's' || i, i, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, 'set', 'active', now()"
                  " FROM range(1, 41) t(i)")
    service = pruning.Pruning(ledger, layout, SimpleNamespace(id="enc", slug="enc"),
                              live_index=lambda: (SimpleNamespace(version=1), "the index"),
                              stored_vectors=lambda index: (ids, vectors))
    rel, run = service.reliability(5)
    labels = [pruning.label_code("a" if i % 2 == 0 else "b") for i in ids.tolist()]
    assert run.mode == "full" and rel_mod.equal(rel, rel_mod.compute(ids, vectors, labels, 5))
    stored, again = service.reliability(5)
    assert again == run and rel_mod.equal(stored, rel)
    assert (layout.root / "reliability" / "enc" / "v000001-k5.parquet").is_file()
    assert service.activate("soft", None)["samples"] == len(ids)
    assert service.active_mode() == ("soft", None)
    assert service.rollback() is None and service.active_mode() is None


@pytest.mark.slow
def test_weight_sets_are_honoured_switched_off_and_rolled_back(tmp_path, encoder, fm_sets):
    memory = Memory(tmp_path / "home", encoder=encoder)
    memory.add(copy_set(fm_sets["train"], tmp_path / "a", ("Pullover", "Coat", "Shirt"), 8), progress=False)
    query = sorted((fm_sets["test"] / "Shirt").glob("*.png"))[:3]
    plain = memory.classify(query, k=8, progress=False)
    assert all(n.pruning_factor == 1.0 for p in plain for n in p.neighbors)
    info = memory.pruning.activate("soft")
    assert info["pruning"] == "soft" and info["changed"] > 0
    ids, w = memory.pruning.weights("soft")
    weight_of = dict(zip(ids.tolist(), w.tolist()))
    for p in memory.classify(query, k=8, progress=False):  # the active set, without asking
        for n in p.neighbors:
            assert n.pruning_factor == pytest.approx(weight_of[n.vector_id])
            assert n.weight == pytest.approx(n.pruning_factor / (2 + n.rank))
    hard = memory.pruning.activate("hard", 1)
    excluded = [i for i, x in zip(*memory.pruning.weights("hard", 1)) if x == 0]
    assert hard["changed"] == len(excluded) > 0
    for p in memory.classify(query, k=8, progress=False):
        assert all(n.weight == 0 for n in p.neighbors if n.vector_id in excluded)
        assert all(n.vector_id in {x.vector_id for x in p.neighbors} for n in p.neighbors)  # excluded, not deleted
    assert memory.pruning.rollback()["name"] == "soft"
    assert memory.pruning.active_mode()[0] == "soft"
    memory.pruning.deactivate()
    assert memory.pruning.active_mode() is None
    assert [n.weight for n in memory.classify(query, k=8, progress=False)[0].neighbors] == \
        [n.weight for n in plain[0].neighbors]
    evaluation = memory.evaluate(fm_sets["test"], k_max=10, pruning=True, progress=False)
    assert set(evaluation.accuracy["pruning"]) == {"none", "soft", "hard"}


def test_prune_cli_dry_run_changes_nothing(tmp_path, encoder, fm_sets):
    from vismem_assets.cli import main

    home = tmp_path / "home"
    Memory(home, encoder=encoder).add(copy_set(fm_sets["train"], tmp_path / "a", ("Bag", "Coat"), 5), progress=False)
    assert main(["--home", str(home), "prune", "--soft", "--dry-run", "--json"]) == 0
    memory = Memory(home, encoder=encoder)
    assert memory.ledger.query("SELECT count(*) AS n FROM weight_sets")["n"][0] == 0
    assert main(["--home", str(home), "prune", "--hard", "3"]) == 0
    assert Memory(home, encoder=encoder).pruning.active_mode() == ("hard", 3)


@pytest.mark.slow
def test_experiment_from_the_cli_and_from_dagster(tmp_path, encoder, monkeypatch, capsys):
    from dagster_project import resources as res
    from dagster_project.assets import experiments
    from dagster_project.resources import VisualMemory
    from vismem_assets.cli import main

    home = tmp_path / "home"
    assert main(["--home", str(home), "experiment", "new-classes", "--n-memory", "100", "--n-queries", "40",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["new_before"] == 0.0 and out["summary"]["new_after"] > 0.5
    assert (home / "reports" / "experiments" / "new-classes.png").exists()
    assert not (home / "ledger.duckdb").exists() or Memory(home, encoder=encoder).indexes.live() is None

    monkeypatch.setenv("VISMEM_HOME", str(home))
    res._memory.cache_clear()
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    with instance_for_test() as instance:
        result = materialize([experiments], partition_key="memory-scaling", instance=instance,
                             resources={"visual_memory": VisualMemory()},
                             run_config={"ops": {"experiments": {"config": {"n_memory": 100, "n_queries": 40}}}})
        assert result.success
        meta = instance.get_latest_materialization_event(AssetKey("experiments")).asset_materialization.metadata
        assert meta["chart"].value.startswith("![memory-scaling](data:image/png;base64,")
        assert len(meta["table"].value.records) >= 3
