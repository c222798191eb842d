"""A memory in S shards by sample id (issue 19), with real Fashion-MNIST images, the real encoder,
real FAISS files and the real DuckDB ledger: sharded neighbours and predictions equal the
unsharded memory's, before and after forgetting 50 samples spread over the shards; a forget
interrupted between shards stays pending and never lets its samples be found, and `vismem
forget --resume` finishes it; `vismem rebuild --shards S` re-shards; status shows each shard.
"""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from vismem_assets.cli import main as cli_main
from vismem_assets.fashion_mnist import write_image_folders
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_store import IndexStore, file_digest
from vismem_assets.memory import Memory
from vismem_assets import settings as settings_module
from vismem_assets.settings import Settings
from vismem_assets.shards import merge_top_k, shard_of

WHO = dict(requested_by="dpo@example.com", reason="asked to be removed", category="gdpr")


def cli(home: Path, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["--home", str(home), *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def sharded(home: Path, encoder, n_shards: int) -> Memory:
    return Memory(home, encoder=encoder, settings=Settings(home=home, shards=n_shards))


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    """8 more images: an add small enough to go into delta files."""
    root = tmp_path_factory.mktemp("few")
    write_image_folders(root / "few", "train", 8, seed=11)
    return root / "few"


@pytest.fixture(scope="module")
def query_vectors(encoder, fm_sets) -> tuple[list[Path], np.ndarray]:
    paths = sorted(fm_sets["test"].rglob("*.png"))
    return paths, encoder.embed(paths, progress=False)


@pytest.fixture
def memories(tmp_path, encoder, fm_sets, few) -> dict[int, Memory]:
    """The same three image sets added to a memory of 1, 2 and 4 shards (a fold, then deltas)."""
    out = {}
    for n in (1, 2, 4):
        memory = sharded(tmp_path / f"s{n}", encoder, n)
        for source in (fm_sets["train"], fm_sets["more"], few):
            memory.add(source, progress=False)
        out[n] = memory
    return out


def assert_same_search(memories: dict[int, Memory], queries: np.ndarray, k: int = 20) -> None:
    sims1, ids1 = memories[1].search(queries, k)
    for n in (2, 4):
        sims, ids = memories[n].search(queries, k)
        np.testing.assert_allclose(sims, sims1, atol=1e-6)
        tied = np.isclose(sims, sims1, atol=1e-6)
        assert (ids == ids1).all() or tied.all()  # ids in the same order (up to exact ties)
        assert (ids == ids1).mean() == 1.0


def forgotten_vector_ids(memory: Memory) -> set[int]:
    with memory.ledger.connect() as s:
        return {v for (v,) in s.con.execute("SELECT vector_id FROM samples WHERE status = 'forgotten'").fetchall()}


def files_match_ledger(memory: Memory) -> None:
    """Every file of every version kept hashes to what the ledger recorded for it."""
    versions = [v for v in memory.indexes.versions() if v.status != "purged"]
    assert versions
    for v in versions:
        for f in v.files:
            assert file_digest(memory.layout.absolute(f.path), f) == f.sha256, f.path


def test_shards_split_by_sample_id_and_search_equals_one_index(memories, query_vectors):
    paths, queries = query_vectors
    live = {n: m.indexes.live() for n, m in memories.items()}
    assert [live[n].n_shards for n in (1, 2, 4)] == [1, 2, 4]
    # Each shard holds exactly the samples whose sha256 maps to it, in its own folder.
    with memories[4].ledger.connect() as s:
        pairs = s.con.execute("SELECT vector_id, sample_id FROM samples WHERE status = 'active'").fetchall()
    expected = dict(zip([v for v, _ in pairs], shard_of([sid for _, sid in pairs], 4).tolist()))
    store = memories[4].indexes
    for j in range(4):
        _, index = store.load(live[4], shard=j)
        from vismem_assets.index_store import held_ids
        held = held_ids(index).tolist()
        assert held and all(expected[v] == j for v in held)
        assert all(f"shard-{j}-of-4" in f.path for f in live[4].shard_files(j))
    assert sum(s["n_vectors"] for s in live[4].shards()) == live[1].n_vectors
    assert any(f.role == "delta" for f in live[4].files)  # the last add wrote deltas in the shards it touched
    assert_same_search(memories, queries)
    preds = {n: [(p.label, [x.sample_id for x in p.neighbors]) for p in m.classify(paths, k=10)]
             for n, m in memories.items()}
    assert preds[2] == preds[1] and preds[4] == preds[1]


def test_forgetting_50_spread_over_shards(memories, query_vectors):
    _, queries = query_vectors
    with memories[1].ledger.connect() as s:
        chosen = [sid for (sid,) in s.con.execute(
            "SELECT sample_id FROM samples WHERE status = 'active' ORDER BY sample_id LIMIT 50").fetchall()]
    assert len(set(shard_of(chosen, 4).tolist())) == 4  # spread over every shard
    for n, memory in memories.items():
        report = memory.forget(ForgetRequest(sample_ids=chosen, **WHO))
        assert report.n_samples == 50
        gone = forgotten_vector_ids(memory)
        assert len(gone) == 50
        _, ids = memory.search(queries, memory.indexes.live().n_vectors)
        assert not set(ids.ravel().tolist()) & gone
        files_match_ledger(memory)
        rc, out, _ = cli(memory.layout.root, "audit", "verify")
        assert rc == 0, out
        with memory.ledger.connect() as s:
            reports = s.con.execute("SELECT n_shards, shard FROM forget_shard_reports ORDER BY shard").fetchall()
        assert reports == [(n, j) for j in range(n)]  # every shard reported
    assert_same_search(memories, queries)


@pytest.mark.parametrize("dies_at", [1, 3])  # before any shard erased (the live version unchanged), or after two
def test_a_forget_interrupted_between_shards_stays_pending_until_resumed(memories, query_vectors, monkeypatch, dies_at):
    _, queries = query_vectors
    memory = memories[4]
    with memory.ledger.connect() as s:
        chosen = [sid for (sid,) in s.con.execute(
            "SELECT sample_id FROM samples WHERE status = 'active' ORDER BY sample_id DESC LIMIT 30").fetchall()]
    memory.search(queries, 5)  # its shards loaded before the request: the reader must notice it
    prepare, calls = IndexStore.prepare_erasure, []

    def dies_on_the_third_shard(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == dies_at:
            raise KeyboardInterrupt("the process was killed")
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(IndexStore, "prepare_erasure", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        memory.forget(ForgetRequest(sample_ids=chosen, **WHO))
    monkeypatch.setattr(IndexStore, "prepare_erasure", prepare)
    with memory.ledger.connect() as s:
        assert s.con.execute("SELECT state FROM forget_requests").fetchall() == [("pending",)]
        # The shards recorded before it are reported only with the proof (they are erased again, holes too).
        assert s.con.execute("SELECT shard FROM forget_shard_reports").fetchall() == []
        recorded = s.con.execute("SELECT count(DISTINCT path) FROM index_erasures").fetchone()[0]
        assert (recorded > 0) == (dies_at > 1)   # the shards before it: new digests recorded, bytes not written
    pending = forgotten_vector_ids(memory)
    # Neither this process nor a fresh one finds a pending sample, in erased shards or not.
    for reader in (memory, sharded(memory.layout.root, memory.encoder, 4)):
        _, ids = reader.search(queries, 200)
        assert not set(ids.ravel().tolist()) & pending
    rc, out, err = cli(memory.layout.root, "audit", "verify")
    assert rc == 1 and "still pending" in out + err
    rc, out, err = cli(memory.layout.root, "forget", "--resume")
    assert rc == 0, err
    assert "finished 1 pending forget request" in out
    with memory.ledger.connect() as s:
        assert s.con.execute("SELECT state FROM forget_requests").fetchall() == [("applied",)]
        assert s.con.execute("SELECT shard FROM forget_shard_reports ORDER BY 1").fetchall() == [(j,) for j in range(4)]
    files_match_ledger(memory)
    rc, out, _ = cli(memory.layout.root, "audit", "verify")
    assert rc == 0, out
    memories[1].forget(ForgetRequest(sample_ids=chosen, **WHO))
    fresh = sharded(memory.layout.root, memory.encoder, 4)
    np.testing.assert_array_equal(fresh.search(queries, 20)[1], memories[1].search(queries, 20)[1])


def test_rebuild_reshards_and_forgetting_reaches_the_old_layout(memories, query_vectors):
    _, queries = query_vectors
    memory = memories[1]
    home = memory.layout.root
    rc, out, err = cli(home, "rebuild", "--shards", "3")
    assert rc == 0, err
    assert "in 3 shards" in out
    rc, out, _ = cli(home, "status", "--json")
    status = json.loads(out)
    assert status["shards"] == 3
    assert [row["shard"] for row in status["shard_table"]] == [0, 1, 2]
    assert sum(row["n_vectors"] for row in status["shard_table"]) == memories[2].indexes.live().n_vectors
    rc, out, _ = cli(home, "status")
    assert "shards: 3" in out and "VISMEM_SHARDS is 1 but this memory has 3 shard(s)" in out
    reopened = sharded(home, memory.encoder, 1)  # the setting only shapes a new memory
    np.testing.assert_array_equal(reopened.search(queries, 20)[1], memories[2].search(queries, 20)[1])
    # The one-piece versions are retained beside the new ones: a forget erases there too.
    assert {v.n_shards for v in reopened.indexes.versions() if v.status == "retained"} == {1}
    with reopened.ledger.connect() as s:
        chosen = [sid for (sid,) in s.con.execute(
            "SELECT sample_id FROM samples WHERE status = 'active' LIMIT 12").fetchall()]
    reopened.forget(ForgetRequest(sample_ids=chosen, **WHO))
    with reopened.ledger.connect() as s:
        groups = s.con.execute("SELECT n_shards, shard FROM forget_shard_reports ORDER BY 1, 2").fetchall()
    assert groups == [(1, 0), (3, 0), (3, 1), (3, 2)]
    files_match_ledger(reopened)
    rc, out, _ = cli(home, "audit", "verify")
    assert rc == 0, out
    rc, _, err = cli(home, "rebuild", "--shards", "0")
    assert rc == 2 and "1 to 256 shards" in err


def test_compaction_keeps_the_shards_and_drops_their_holes(memories, query_vectors):
    _, queries = query_vectors
    memory = memories[2]
    with memory.ledger.connect() as s:
        chosen = [sid for (sid,) in s.con.execute("SELECT sample_id FROM samples LIMIT 9").fetchall()]
    memory.forget(ForgetRequest(sample_ids=chosen, **WHO))
    memories[1].forget(ForgetRequest(sample_ids=chosen, **WHO))
    assert sum(s["holes"] for s in memory.indexes.live().shards()) == 9
    version, _ = memory.compact(retain=1)
    assert version.n_shards == 2 and sum(s["holes"] for s in version.shards()) == 0
    assert [v.status for v in memory.indexes.versions() if v.status != "purged"] == ["live"]
    folder = memory.layout.indexes(memory.encoder.slug)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    assert_same_search({1: memories[1], 2: memory, 4: memory}, queries)


def test_merge_top_k_equals_one_exact_search():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    ids = rng.permutation(10_000)[:3000]
    scores = q @ x.T
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=-1)[:, :10]
    route = rng.integers(0, 5, len(x))
    parts = []
    for j in range(5):
        mine = route == j
        s = q @ x[mine].T
        top = np.argsort(-s, axis=1)[:, :10]
        parts.append((np.take_along_axis(s, top, 1), ids[mine][top]))
    sims, got = merge_top_k(parts, 10)
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(sims, np.take_along_axis(scores, order, 1))
    # Exact ties between shards: the lower id first; a slot a shard could not fill (-1) comes last.
    tie = merge_top_k([(np.array([[0.5, 0.1]]), np.array([[9, 3]])), (np.array([[0.5, -1e30]]), np.array([[4, -1]]))], 3)
    np.testing.assert_array_equal(tie[1], [[4, 9, 3]])


@pytest.fixture
def own_settings(monkeypatch):
    """The CLI installs the settings it read as the process's: put the ones before back after."""
    monkeypatch.setattr(settings_module, "_current", settings_module._current)


def test_a_new_memory_takes_its_shards_from_the_setting(tmp_path, encoder, fm_sets, monkeypatch, own_settings):
    home = tmp_path / "home"
    monkeypatch.setenv("VISMEM_SHARDS", "2")
    rc, _, err = cli(home, "add", fm_sets["more"])
    assert rc == 0, err
    rc, out, _ = cli(home, "status", "--json")
    assert json.loads(out)["shards"] == 2
    assert json.loads(out)["settings"]["shards"] == 2
    monkeypatch.setenv("VISMEM_SHARDS", "0")
    rc, _, err = cli(home, "status")
    assert rc != 0 and "VISMEM_SHARDS" in err
    shutil.rmtree(home)


def test_dagster_memory_index_and_forget_job_on_shards(tmp_path, fm_sets, encoder, monkeypatch):
    """The memory_index asset and the forget job drive a memory of 3 shards: its metadata shows each
    shard's version, vectors and holes; the sha256 check and the nothing-forgotten check pass."""
    from dagster import AssetKey, instance_for_test, materialize

    from dagster_project import resources as res
    from dagster_project.assets import embeddings, image_set_partitions, image_sets, memory_index
    from dagster_project.checks import index_file_matches_sha256, live_index_matches_ledger, nothing_forgotten_remains
    from dagster_project.definitions import defs

    home = tmp_path / "home"
    shutil.copytree(fm_sets["train"], home / "inbox" / "sets" / "set-a")
    monkeypatch.setenv("VISMEM_HOME", str(home))
    monkeypatch.delenv("VISMEM_QUERY_SET", raising=False)  # evaluation: leave-one-out
    res._memory.cache_clear()
    resources = {"visual_memory": res.VisualMemory(shards=3)}
    resources["visual_memory"].memory().encoder_choice.use(encoder)

    def shard_table(instance) -> list[dict]:
        meta = instance.get_latest_materialization_event(AssetKey("memory_index")).asset_materialization.metadata
        assert meta["shards"].value == "3"   # a setting, not a measurement: text, not plotted
        return [r.data for r in meta["shard_table"].value.records]

    with instance_for_test() as instance:
        instance.add_dynamic_partitions(image_set_partitions.name, ["set-a"])
        assert materialize([image_sets, embeddings], partition_key="set-a", instance=instance, resources=resources).success
        result = materialize([memory_index, index_file_matches_sha256, live_index_matches_ledger],
                             instance=instance, resources=resources)
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        rows = shard_table(instance)
        assert [r["shard"] for r in rows] == [0, 1, 2] and sum(r["n_vectors"] for r in rows) == 100
        memory = resources["visual_memory"].memory()
        coats = memory.ledger.query("SELECT sample_id FROM samples WHERE label = 'Coat'")["sample_id"].to_list()
        config = {"label": "Coat", "requested_by": "alice", "reason": "licence withdrawn", "category": "license"}
        assert defs.resolve_job_def("forget").execute_in_process(instance=instance, resources=resources,
                                                                 run_config=config).success
        rows = shard_table(instance)
        meta = instance.get_latest_materialization_event(AssetKey("memory_index")).asset_materialization.metadata
        reported = [r.data for r in meta["forget_shards"].value.records]
        assert [(r["shard"], r["n_erased"]) for r in reported] == list(enumerate(np.bincount(shard_of(coats, 3)).tolist()))
        holes = {r["shard"]: r["holes"] for r in rows}
        expected = np.bincount(shard_of(coats, 3), minlength=3)
        assert [holes[j] for j in range(3)] == expected.tolist()
        result = materialize([memory_index, index_file_matches_sha256, nothing_forgotten_remains],
                             instance=instance, resources=resources)
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    res._memory.cache_clear()
