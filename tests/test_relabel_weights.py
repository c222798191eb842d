"""Editing labels and vote weights (issue 17, item 8), with real parts only: real Fashion-MNIST
images, the real encoder, the real DuckDB ledger, real FAISS indexes, a real Dagster instance.

One small memory is built once per module (set a: 4 labels x 6 images, index v1, with
reliability at k=4 stored for v1; set b: 2 more per label, v2): so v1's statistics are an older
base for v2's. Every test works on its own copy of that home, so nothing is embedded twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import duckdb
import numpy as np
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInvalidConfigError, build_sensor_context, instance_for_test

from vismem_assets import pruning
from vismem_assets import reliability as rel_mod
from vismem_assets.cli import main as cli_main
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.memory import Memory
from vismem_assets.relabel import EditError, RelabelRequest, WeightRequest
from vismem_assets.voting import vote_weights

REPO = Path(__file__).resolve().parents[1]
LABELS = ("Bag", "Coat", "Shirt", "Sneaker")
WHO, WHY = "curator@example.com", "checked by hand"


def copy_set(source: Path, target: Path, labels, n: int) -> Path:
    for label in labels:
        (target / label).mkdir(parents=True)
        for f in sorted((source / label).glob("*.png"))[:n]:
            shutil.copy(f, target / label / f.name)
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder, fm_sets) -> Path:
    root = tmp_path_factory.mktemp("relabel")
    memory = Memory(root / "home", encoder=encoder)
    memory.add(copy_set(fm_sets["train"], root / "a", LABELS, 6), progress=False)
    memory.pruning.reliability(4)  # stored for v1 only: the base of v2's next incremental pass
    memory.add(copy_set(fm_sets["more"], root / "b", LABELS, 2), progress=False)
    copy_set(fm_sets["test"], root / "home" / "queries", LABELS, 3)  # a query set inside the home
    return root / "home"


@pytest.fixture
def mem(built, tmp_path, encoder) -> Memory:
    home = tmp_path / "home"
    shutil.copytree(built, home)
    return Memory(home, encoder=encoder)


def ids_of(memory: Memory, label: str) -> list[str]:
    return memory.ledger.query("SELECT sample_id FROM samples WHERE label = ? AND status = 'active'"
                               " ORDER BY vector_id", [label])["sample_id"].to_list()


def full_pass(memory: Memory, k: int) -> rel_mod.Reliability:
    """Reliability computed from scratch on the live index with the ledger's labels now."""
    ids, vectors = memory.stored_vectors()
    vids, codes = pruning.catalog_codes(memory.catalog())
    return rel_mod.compute(ids, vectors, codes[np.searchsorted(vids, ids)], k)


def snapshot(memory: Memory) -> tuple[dict, dict]:
    """Every ledger table's rows and every file's bytes under the home: what 'nothing changed' means."""
    names = memory.ledger.query("SELECT table_name FROM duckdb_tables() ORDER BY 1")["table_name"].to_list()
    tables = {t: sorted(map(repr, memory.ledger.query(f'SELECT * FROM "{t}"').rows())) for t in names}
    files = {p.relative_to(memory.layout.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(memory.layout.root.rglob("*")) if p.is_file() and p.name != "ledger.duckdb.lock"}
    return tables, files


def cli(home: Path, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["--home", str(home), *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


# ---- relabel ---------------------------------------------------------------------------------

def test_relabel_then_classify_votes_with_the_new_label_at_once(mem, fm_sets):
    query = sorted((fm_sets["test"] / "Bag").glob("*.png"))[0]
    (before,) = mem.classify([query], k=5, pruning="none", progress=False)
    assert before.label == "Bag"
    nearest = [n.sample_id for n in before.neighbors]
    report = mem.edits.relabel(RelabelRequest(sample_ids=nearest, to="Handbag", requested_by=WHO, reason=WHY))
    assert report.n_changed == len({*nearest}) and report.new_label
    # The same Memory object (as the Dagster resource keeps one): nothing it cached holds the old label.
    (after,) = mem.classify([query], k=5, pruning="none", progress=False)
    assert [n.sample_id for n in after.neighbors] == nearest  # the same neighbours ...
    assert {n.label for n in after.neighbors} == {"Handbag"}  # ... voting with their new label
    assert after.label == "Handbag" and after.scores == {"Handbag": pytest.approx(sum(before.scores.values()))}
    assert sorted(mem.status()["labels"]) == ["Bag", "Coat", "Handbag", "Shirt", "Sneaker"]


def test_relabel_updates_reliability_incrementally_and_equals_a_full_recomputation(mem):
    live = mem.indexes.live().version
    assert live == 2
    stored_before = {k: mem.pruning.reliability(k)[0] for k in (3, 5)}  # full passes, stored for v2
    mem.pruning.activate("soft")  # a stored weight set of v2 (k=10) follows the relabel too
    moved = ids_of(mem, "Shirt")[:3] + ids_of(mem, "Bag")[:1]
    report = mem.edits.relabel(RelabelRequest(sample_ids=moved, to="Coat", requested_by=WHO, reason=WHY))

    assert sorted((r["k"], r["index_version"]) for r in report.reliability) == [(3, 2), (5, 2), (10, 2)]
    vector_ids = mem.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                  [moved])["vector_id"].to_numpy()
    for k in (3, 5, 10):
        stored, run = mem.pruning.reliability(k)
        assert (run.mode, run.version) == ("full", 2)  # v2's stored pass, read back, not computed again
        assert rel_mod.equal(stored, full_pass(mem, k)), k
        rows = mem.ledger.query("SELECT vector_id, v FROM reliability WHERE index_version = 2 AND k = ?"
                                " ORDER BY vector_id", [k])
        assert rows["vector_id"].to_list() == stored.vector_ids.tolist() and rows["v"].to_list() == stored.v.tolist()
        # Incremental: only the relabelled rows and the rows whose top-k holds one were counted again.
        touched = np.isin(stored.vector_ids, vector_ids) | np.isin(stored.neighbors, vector_ids).any(axis=1)
        (entry,) = [r for r in report.reliability if r["k"] == k]
        assert entry["rows_recounted"] == int(touched.sum()) < len(stored)
    for k, before in stored_before.items():
        assert not np.array_equal(before.v, mem.pruning.reliability(k)[0].v), k  # the relabel did move v
    # The stored soft weight set is what the new v gives.
    soft = mem.ledger.query("SELECT vector_id, weight FROM sample_weights WHERE name = 'soft' AND index_version = 2"
                            " ORDER BY vector_id")
    assert np.allclose(soft["weight"].to_numpy(), rel_mod.soft_weights(full_pass(mem, 10).v), rtol=0, atol=0)
    # The files the ledger named before are gone; it names the new ones.
    paths = mem.ledger.query("SELECT path FROM reliability_runs WHERE index_version = 2")["path"].to_list()
    assert all("-relabel-" in p and mem.layout.absolute(p).exists() for p in paths)
    assert sorted(p.name for p in (mem.layout.root / "reliability").rglob("*.parquet")) == \
           sorted([Path(p).name for p in paths] + ["v000001-k4.parquet"])

    # v1's statistics at k=4 still hold the old labels: as the base of v2's pass they are brought up to date.
    rel4, run4 = mem.pruning.reliability(4)
    assert (run4.mode, run4.base_version) == ("incremental", 1)
    assert rel_mod.equal(rel4, full_pass(mem, 4))


def test_dry_runs_report_and_change_nothing(mem):
    mem.pruning.reliability(5)
    before = snapshot(mem)
    report = mem.edits.relabel(RelabelRequest(label="Shirt", to="Top", requested_by=WHO, reason=WHY), dry_run=True)
    assert (report.dry_run, report.change_id, report.n_changed) == (True, None, 8)
    assert report.per_old_value() == {"Shirt": 8} and report.reliability == []
    weights = mem.edits.set_weights(WeightRequest(sample_ids=ids_of(mem, "Bag")[:2], weight=0, requested_by=WHO,
                                             reason=WHY), dry_run=True)
    assert (weights.dry_run, weights.n_changed, [c["old"] for c in weights.changes]) == (True, 2, [1.0, 1.0])
    rc, out, err = cli(mem.layout.root, "relabel", "--label", "Shirt", "--to", "Top", "--requested-by", WHO,
                       "--reason", WHY, "--dry-run", "--json")
    assert rc == 0, err
    assert json.loads(out)["n_changed"] == 8 and json.loads(out)["dry_run"] is True
    rc, out, err = cli(mem.layout.root, "weight", "--sample", ids_of(mem, "Bag")[0], "--weight", "3",
                       "--requested-by", WHO, "--reason", WHY, "--dry-run")
    assert rc == 0 and "would change 1 sample" in out, err
    assert snapshot(mem) == before


def test_unknown_forgotten_or_badly_named_targets_are_refused_and_nothing_changes(mem, tmp_path, capsys):
    gone = ids_of(mem, "Sneaker")[0]
    mem.forget(ForgetRequest(requested_by="dpo", reason="asked", sample_ids=[gone]))
    shirt = ids_of(mem, "Shirt")[0]
    before = snapshot(mem)
    refused = [
        (RelabelRequest(sample_ids=["0" * 64], to="Coat", requested_by=WHO, reason=WHY), "unknown sample id: 0000"),
        (RelabelRequest(sample_ids=[shirt[:12]], to="Coat", requested_by=WHO, reason=WHY), "full 64-character"),
        (RelabelRequest(label="Sandal", to="Coat", requested_by=WHO, reason=WHY),
         "unknown label 'Sandal': the memory holds Bag, Coat, Shirt, Sneaker"),
        (RelabelRequest(sample_ids=[gone], to="Coat", requested_by=WHO, reason=WHY),
         "forgotten samples cannot be relabelled"),
        (RelabelRequest(sample_ids=[shirt], to="a/b", requested_by=WHO, reason=WHY), "contains '/'"),
        (RelabelRequest(sample_ids=[shirt], to="  ", requested_by=WHO, reason=WHY), "it is empty"),
        (RelabelRequest(sample_ids=[shirt], to="Shirt", requested_by=WHO, reason=WHY), "nothing to change"),
        (RelabelRequest(sample_ids=[shirt], to="Coat", requested_by=" ", reason=WHY), "needs requested_by"),
        (RelabelRequest(sample_ids=[shirt], label="Shirt", to="Coat", requested_by=WHO, reason=WHY), "exactly one"),
        (RelabelRequest(images=[str(tmp_path / "nowhere.png")], to="Coat", requested_by=WHO, reason=WHY),
         "cannot read"),
    ]
    for request, message in refused:
        with pytest.raises(EditError, match=None) as caught:
            mem.edits.relabel(request)
        assert message in str(caught.value), (request, str(caught.value))
    for request, message in [
        (WeightRequest(sample_ids=[shirt], weight=-1, requested_by=WHO, reason=WHY), "finite number >= 0"),
        (WeightRequest(sample_ids=[shirt], weight=float("nan"), requested_by=WHO, reason=WHY), "finite number"),
        (WeightRequest(sample_ids=[gone], weight=0, requested_by=WHO, reason=WHY), "cannot be weighted"),
        (WeightRequest(sample_ids=[shirt], weight=1, requested_by=WHO, reason=WHY), "already have weight 1"),
    ]:
        with pytest.raises(EditError) as caught:
            mem.edits.set_weights(request)
        assert message in str(caught.value), (request, str(caught.value))
    # From the command line: exit 2 and one line saying what is wrong.
    rc, out, err = cli(mem.layout.root, "relabel", "--label", "Sandal", "--to", "Coat", "--requested-by", WHO,
                       "--reason", WHY)
    assert rc == 2 and err.startswith("vismem relabel: error: unknown label 'Sandal'") and "nothing was changed" in err
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error: who asks is required
        cli_main(["--home", str(mem.layout.root), "relabel", "--label", "Shirt", "--to", "Coat", "--reason", WHY])
    assert usage.value.code == 2 and "required: --requested-by" in capsys.readouterr().err
    assert snapshot(mem) == before


def test_label_history_and_the_label_changes_audit_query_say_who_why_old_and_new(mem, fm_sets):
    bag = sorted((mem.layout.root / "queries" / "Bag").glob("*.png"))  # test images, not stored: refused
    with pytest.raises(EditError, match="unknown image"):
        mem.edits.relabel(RelabelRequest(images=[str(bag[0])], to="Coat", requested_by=WHO, reason=WHY))
    stored_image = sorted((fm_sets["train"] / "Shirt").glob("*.png"))[0]  # in set a: found by its content
    first = mem.edits.relabel(RelabelRequest(images=[str(stored_image)], to="Coat", requested_by="alice", reason="a coat"))
    second = mem.edits.relabel(RelabelRequest(label="Bag", to="Handbag", requested_by="bob", reason="finer class"))
    assert first.n_changed == 1 and second.n_changed == 8
    history = mem.ledger.query("SELECT sample_id, old_label, label, requested_by, reason, kind, change_id, changed_at"
                               " FROM label_history WHERE kind = 'relabel' ORDER BY change_id, sample_id")
    assert len(history) == 9 and history["changed_at"].null_count() == 0
    rows = {(r["old_label"], r["label"], r["requested_by"], r["reason"], r["change_id"]) for r in history.iter_rows(named=True)}
    assert rows == {("Shirt", "Coat", "alice", "a coat", first.change_id),
                    ("Bag", "Handbag", "bob", "finer class", second.change_id)}
    assert mem.ledger.query("SELECT count(*) AS n FROM label_history WHERE kind = 'ingest' AND reason = 'ingest'")["n"][0] == 32

    audit = mem.ledger.run_named("label_changes", {"requested_by": "bob"})
    assert len(audit) == 8 and set(audit["old_label"]) == {"Bag"} and set(audit["label_now"]) == {"Handbag"}
    assert set(mem.ledger.run_named("label_changes", {"label": "Coat"})["requested_by"]) == {"alice"}
    rc, out, _ = cli(mem.layout.root, "audit", "query", "label_changes", "--json")
    assert rc == 0 and len(json.loads(out)) == 9
    # As in the plain duckdb CLI: SET VARIABLE, then the file's text.
    con = duckdb.connect(str(mem.layout.ledger), read_only=True)
    try:
        con.execute("SET VARIABLE requested_by = 'alice'")
        (row,) = con.execute((REPO / "sql" / "audit" / "label_changes.sql").read_text()).fetchall()
    finally:
        con.close()
    assert row[1:5] == ("alice", "a coat", "Shirt", "Coat")


# ---- user weights ------------------------------------------------------------------------------

def test_a_user_weight_changes_the_vote_as_the_rule_says(mem, fm_sets):
    # A query whose 8 nearest hold more than one label, so that there is a runner-up.
    queries = sorted((fm_sets["test"] / "Shirt").glob("*.png")) + sorted((fm_sets["test"] / "Coat").glob("*.png"))
    before = next(p for p in mem.classify(queries, k=8, pruning="none", progress=False) if len(p.scores) > 1)
    query = before.path
    rank_w = vote_weights(np.zeros((1, 8)), "rank")[0]
    # One neighbour x 2.5: its vote is rank weight x pruning factor x user weight; no other moves.
    doubled = next(n for n in before.neighbors if n.label != before.label)
    mem.edits.set_weights(WeightRequest(sample_ids=[doubled.sample_id], weight=2.5, requested_by=WHO, reason=WHY))
    (after,) = mem.classify([query], k=8, pruning="none", progress=False)
    for b, a in zip(before.neighbors, after.neighbors):
        assert a.sample_id == b.sample_id
        assert a.user_weight == (2.5 if a.sample_id == doubled.sample_id else 1.0)
        assert a.weight == pytest.approx(rank_w[a.rank] * a.pruning_factor * a.user_weight, rel=1e-12)
    assert after.scores[doubled.label] == pytest.approx(before.scores[doubled.label] + 1.5 * rank_w[doubled.rank])
    # With soft pruning the three factors multiply too.
    (soft,) = mem.classify([query], k=8, pruning="soft", progress=False)
    assert any(n.pruning_factor != 1 for n in soft.neighbors)
    for n in soft.neighbors:
        assert n.weight == pytest.approx(rank_w[n.rank] * n.pruning_factor * n.user_weight, rel=1e-12)

    # Weight 0 on every neighbour of the winning label: it casts no vote, the runner-up wins.
    winner = before.label
    runner_up = max((lab for lab in before.scores if lab != winner), key=lambda lab: before.scores[lab])
    excluded = [n.sample_id for n in before.neighbors if n.label == winner]
    mem.edits.set_weights(WeightRequest(sample_ids=excluded, weight=0, requested_by=WHO, reason="mislabelled"))
    (gone,) = mem.classify([query], k=8, pruning="none", progress=False)
    assert gone.scores.get(winner, 0.0) == 0.0 and gone.label == runner_up != winner
    # W = 1 undoes it: the vote is the one before.
    mem.edits.set_weights(WeightRequest(sample_ids=excluded + [doubled.sample_id], weight=1, requested_by=WHO, reason="undo"))
    (back,) = mem.classify([query], k=8, pruning="none", progress=False)
    assert back.label == before.label and back.scores == pytest.approx(before.scores)

    # The evaluation honours user weights as classify does: a class weighted 0 is never predicted.
    queries = mem.layout.root / "queries"
    assert mem.evaluate(queries, record=False).per_label.filter(label="Sneaker")["accuracy"][0] > 0
    mem.edits.set_weights(WeightRequest(sample_ids=ids_of(mem, "Sneaker"), weight=0, requested_by=WHO, reason=WHY))
    result = mem.evaluate(queries, record=False)
    assert result.per_label.filter(label="Sneaker")["accuracy"][0] == 0 and "Sneaker" not in result.predicted

    history = mem.ledger.query("SELECT sample_id, old_weight, new_weight, requested_by, reason FROM weight_history"
                               " WHERE sample_id = ? ORDER BY changed_at", [doubled.sample_id])
    assert history.select("old_weight", "new_weight").rows() == [(1.0, 2.5), (2.5, 1.0)]
    audit = mem.ledger.run_named("weight_changes", {"sample_id": doubled.sample_id})
    assert audit.select("old_weight", "new_weight", "weight_now").rows() == [(2.5, 1.0, 1.0), (1.0, 2.5, 1.0)]
    assert set(mem.ledger.run_named("weight_changes", {"requested_by": WHO})["reason"]) == \
           {WHY, "mislabelled", "undo"}


def test_cli_relabel_and_weight_reevaluate_a_configured_query_set(mem, monkeypatch):
    monkeypatch.setenv("VISMEM_QUERY_SET", "queries")
    home = mem.layout.root
    rc, out, err = cli(home, "relabel", "--sample", *ids_of(mem, "Coat")[:2], "--to", "Shirt", "--requested-by", WHO,
                       "--reason", WHY, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["n_changed"] == 2 and {c["old"] for c in report["changes"]} == {"Coat"}
    assert report["evaluation"]["top1"] is not None and report["evaluation"]["top1_before"] is None
    rc, out, err = cli(home, "weight", "--sample", ids_of(mem, "Coat")[0], "--weight", "0", "--requested-by", WHO,
                       "--reason", WHY)
    assert rc == 0, err
    assert "changed 1 sample" in out and "strategy weight x pruning factor x user weight" in out
    assert "evaluation on" in out and "top-1" in out and "before" in out and "none before" not in out
    evaluations = mem.ledger.query("SELECT count(DISTINCT evaluation_id) AS n FROM evaluations")["n"][0]
    assert evaluations == 2  # one after each edit, recorded for the history
    monkeypatch.delenv("VISMEM_QUERY_SET")
    rc, out, _ = cli(home, "weight", "--sample", ids_of(mem, "Coat")[0], "--weight", "1", "--requested-by", WHO,
                     "--reason", WHY)
    assert rc == 0 and "vismem eval QUERY_SET" in out


# ---- Dagster -----------------------------------------------------------------------------------

def dagster_resources(home: Path, monkeypatch, encoder) -> dict:
    from dagster_project import resources as res
    from dagster_project.resources import VisualMemory

    monkeypatch.setenv("VISMEM_HOME", str(home))
    monkeypatch.setenv("VISMEM_QUERY_SET", "queries")
    res._memory.cache_clear()
    res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
    return {"visual_memory": VisualMemory()}


@pytest.mark.slow
def test_inbox_requests_launch_typed_jobs_and_bad_ones_are_rejected_with_an_error_file(mem, monkeypatch, encoder):
    from dagster_project.definitions import defs
    from dagster_project.editing import relabel_request_sensor, weight_request_sensor

    home = mem.layout.root
    resources = dagster_resources(home, monkeypatch, encoder)
    memory = resources["visual_memory"].memory()  # the run's Memory: what it classifies after the edit
    inbox = home / "inbox" / "relabel"
    (inbox / "shirts.json").write_text(json.dumps({"label": "Shirt", "to": "Top", "requested_by": WHO, "reason": WHY}))
    (inbox / "typo.json").write_text(json.dumps({"label": "Shrit", "to": "Top", "requested_by": WHO, "reason": WHY}))
    (inbox / "nobody.json").write_text(json.dumps({"label": "Shirt", "to": "Top", "reason": WHY}))
    (inbox / "broken.json").write_text("{not json")
    weights = home / "inbox" / "weights"
    bag = ids_of(mem, "Bag")[:2]
    (weights / "bags.json").write_text(json.dumps({"sample_ids": bag, "weight": 0, "requested_by": WHO,
                                                   "reason": "blurry"}))
    (weights / "negative.json").write_text(json.dumps({"sample_ids": bag, "weight": -2, "requested_by": WHO,
                                                       "reason": "x"}))
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources=resources)
        (request,) = relabel_request_sensor(context)
        assert sorted(p.name for p in (inbox / "rejected").glob("*.json")) == ["broken.json", "nobody.json", "typo.json"]
        assert "unknown label 'Shrit'" in (inbox / "rejected" / "typo.json.error.txt").read_text()
        assert "missing field(s) ['requested_by']" in (inbox / "rejected" / "nobody.json.error.txt").read_text()
        assert ids_of(mem, "Top") == []  # validated, not applied, by the sensor

        run = defs.resolve_job_def("relabel").execute_in_process(instance=instance, resources=resources,
                                                                  run_config=request.run_config)
        assert run.success
        assert (inbox / "applied" / "shirts.json").exists() and not (inbox / "shirts.json").exists()
        done = {e.event_specific_data.materialization.asset_key.to_user_string()
                for e in run.get_asset_materialization_events()}
        assert done == {"sample_labels", "pruning_weights", "evaluation"}  # the relabel run re-evaluates
        meta = instance.get_latest_materialization_event(AssetKey("sample_labels")).asset_materialization.metadata
        assert meta["changed"].value == 8 and meta["to"].value == "Top"
        per_label = instance.get_latest_materialization_event(AssetKey("evaluation")).asset_materialization.metadata[
            "per_label"].value.records
        # The queries of Shirt keep their true label, which the memory no longer holds: scored 0 now.
        assert {r.data["label"]: r.data["accuracy"] for r in per_label}["Shirt"] == 0.0
        assert len(ids_of(mem, "Top")) == 8 and ids_of(mem, "Shirt") == []
        shirt_query = sorted((home / "queries" / "Shirt").glob("*.png"))
        assert "Shirt" not in {p.label for p in memory.classify(shirt_query, progress=False)}

        (request,) = weight_request_sensor(build_sensor_context(instance=instance, resources=resources))
        assert (weights / "rejected" / "negative.json.error.txt").read_text().startswith("weight must be a finite")
        run = defs.resolve_job_def("set_weights").execute_in_process(instance=instance, resources=resources,
                                                                      run_config=request.run_config)
        assert run.success and (weights / "applied" / "bags.json").exists()
        assert memory.ledger.query("SELECT sample_id FROM user_weights WHERE weight = 0 ORDER BY sample_id"
                                   )["sample_id"].to_list() == sorted(bag)
        # Nothing left to take: the next tick skips.
        assert relabel_request_sensor(build_sensor_context(instance=instance, resources=resources)).skip_message


@pytest.mark.slow
def test_launchpad_jobs_take_typed_config_and_a_dry_run_changes_nothing(mem, monkeypatch, encoder):
    from dagster_project.definitions import defs

    resources = dagster_resources(mem.layout.root, monkeypatch, encoder)
    job = defs.resolve_job_def("set_weights")
    coat = ids_of(mem, "Coat")[:3]
    config = {"sample_ids": coat, "weight": 0.5, "requested_by": WHO, "reason": "half trust"}
    with instance_for_test() as instance:
        for bad in ({**config, "weight": "heavy"}, {k: v for k, v in config.items() if k != "requested_by"},
                    {**config, "who": "x"}):
            with pytest.raises(DagsterInvalidConfigError):  # refused by the typed config before any step runs
                job.execute_in_process(instance=instance, resources=resources,
                                       run_config={"ops": {"user_weights": {"config": bad}}})
        before = snapshot(mem)
        dry = job.execute_in_process(instance=instance, resources=resources,
                                     run_config={"ops": {"user_weights": {"config": {**config, "dry_run": True}}}})
        assert dry.success and not dry.get_asset_materialization_events()  # evaluation skipped: nothing changed
        (observed,) = [e for e in dry.all_events if e.event_type == DagsterEventType.ASSET_OBSERVATION]
        assert observed.event_specific_data.asset_observation.metadata["changed"].value == 3
        assert snapshot(mem) == before

        run = job.execute_in_process(instance=instance, resources=resources,
                                     run_config={"ops": {"user_weights": {"config": config}}})
        assert run.success
        assert {e.event_specific_data.materialization.asset_key.to_user_string()
                for e in run.get_asset_materialization_events()} == {"user_weights", "evaluation"}
        assert mem.ledger.query("SELECT weight FROM user_weights ORDER BY sample_id")["weight"].to_list() == [0.5] * 3

        # A relabel of a forgotten sample fails its own step with the reason; the core assets are not run.
        gone = ids_of(mem, "Sneaker")[0]
        mem.forget(ForgetRequest(requested_by="dpo", reason="asked", sample_ids=[gone]))
        failed = defs.resolve_job_def("relabel").execute_in_process(
            instance=instance, resources=resources, raise_on_error=False,
            run_config={"ops": {"sample_labels": {"config": {"sample_ids": [gone], "to": "Bag", "requested_by": WHO,
                                                             "reason": WHY}}}})
        assert not failed.success
        (failure,) = [e for e in failed.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        assert failure.step_key == "sample_labels"
        assert "forgotten samples cannot be relabelled" in failure.event_specific_data.error.message
        assert not failed.get_asset_materialization_events()
