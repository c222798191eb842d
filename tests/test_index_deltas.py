"""Delta files: a small add writes only its vectors (the base file is not read or rewritten),
loading a version sees base and deltas as one index, adds fold into a new base past the
policy's limits, and forgetting erases in place only in the files that hold a forgotten
vector, once for every version sharing them, and only those vectors' bytes. Real FAISS files,
a real ledger, the real forgetting path and audit."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from benchmarks.synthetic import QueryVectors, build_memory, clustered_vectors, insert_vectors
from vismem_assets import digests
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_store import IndexIntegrityError, index_ids
from vismem_assets.index_types import IndexPolicy, IndexTypeError
from vismem_assets.settings import Settings, SettingsError

D = 32
N = 2000


@pytest.fixture
def memory(tmp_path):
    return build_memory(tmp_path / "home", N, QueryVectors(D), index_policy=IndexPolicy(kind="flat"))


def add_set(memory, n: int, name: str, seed: int):
    vectors, labels = clustered_vectors(n, D, seed=seed)
    insert_vectors(memory, vectors, labels, name)
    return memory.index_pending()


def file_ids(memory, rel: str) -> set[int]:
    """The ids FAISS reads in a file, its holes (id -1, where a forgotten vector was) aside."""
    return set(index_ids(faiss.read_index(str(memory.layout.absolute(rel)))).tolist()) - {-1}


def changed_bytes(before: bytes, path) -> int:
    after = path.read_bytes()
    assert len(after) == len(before)
    return int(np.count_nonzero(np.frombuffer(after, np.uint8) != np.frombuffer(before, np.uint8)))


def files_on_disk(memory) -> set[str]:
    return {memory.layout.relative(p) for p in memory.layout.indexes(memory.encoder.slug).glob("*.faiss")}


def samples_of(memory, vector_ids) -> list[str]:
    return memory.ledger.query("SELECT sample_id FROM samples WHERE vector_id IN (SELECT unnest(?::BIGINT[]))",
                               [sorted(int(i) for i in vector_ids)])["sample_id"].to_list()


def sha(memory, rel: str) -> str:
    """The digest the ledger records for an index file: of its hash list (digests.py)."""
    return digests.hash_list(memory.layout.absolute(rel)).sha256


def test_small_add_writes_a_delta_and_leaves_the_base_untouched(memory):
    base = memory.indexes.live()
    base_file = memory.layout.absolute(base.path)
    stamp = base_file.stat().st_mtime_ns
    v = add_set(memory, 50, "small", seed=1)
    assert v.path == base.path and v.sha256 == base.sha256           # the same base file ...
    assert base_file.stat().st_mtime_ns == stamp and sha(memory, v.path) == base.sha256   # ... unwritten
    assert len(v.deltas) == 1 and v.deltas[0].n_vectors == 50 and v.n_vectors == N + 50
    assert v.deltas[0].path.endswith(f"v{v.version:06d}.delta.faiss") and v.deltas[0].sha256 == sha(memory, v.deltas[0].path)
    # Each file is plain FAISS; together they hold exactly the active samples.
    assert file_ids(memory, v.path) | file_ids(memory, v.deltas[0].path) == set(memory.indexes.ids().tolist())
    assert memory.index_consistency()["ok"]
    # The delta's manifest names every file of its version.
    manifest = json.loads(memory.layout.absolute(v.deltas[0].path).with_suffix(".json").read_text())
    assert manifest["role"] == "delta" and [f["path"] for f in manifest["version_files"]] == [v.path, v.deltas[0].path]


def test_search_over_base_and_deltas_equals_one_flat_index(memory):
    add_set(memory, 60, "d1", seed=1)
    add_set(memory, 70, "d2", seed=2)
    live = memory.indexes.live()
    assert len(live.deltas) == 2
    ids, vectors = memory.stored_vectors()
    reference = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    reference.add_with_ids(vectors, ids)
    queries = clustered_vectors(25, D, seed=99)[0]
    sims, found = memory.search(queries, 10)
    ref_sims, ref_ids = reference.search(queries, 10)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-6)
    assert (found == ref_ids).mean() > 0.99  # same neighbours (up to exact ties)
    # Vectors of the newest delta are found: each is its own nearest neighbour.
    newest = sorted(file_ids(memory, live.deltas[-1].path))
    position = {int(i): p for p, i in enumerate(ids)}
    _, top = memory.search(vectors[[position[i] for i in newest]], 1)
    assert top[:, 0].tolist() == newest


def test_adds_fold_into_a_new_base_past_the_delta_share(memory):
    add_set(memory, 150, "d1", seed=1)                       # 7.5% of the base: a delta
    first = memory.indexes.live()
    assert len(first.deltas) == 1
    v = add_set(memory, 100, "d2", seed=2)                   # 12.5% with the first: fold
    assert v.deltas == () and v.path != first.path and v.n_vectors == N + 250
    assert file_ids(memory, v.path) == set(memory.indexes.ids().tolist()) and memory.index_consistency()["ok"]
    # Rebuilding from ledger and embeddings gives the same set of vectors in one base file.
    rebuilt = memory.rebuild()
    assert rebuilt.deltas == () and file_ids(memory, rebuilt.path) == file_ids(memory, v.path)


def test_max_deltas_and_a_zero_share_fold_every_time(tmp_path):
    memory = build_memory(tmp_path / "home", N, QueryVectors(D),
                          index_policy=IndexPolicy(kind="flat", max_deltas=2))
    assert [len(add_set(memory, 10, f"d{i}", seed=i).deltas) for i in range(4)] == [1, 2, 0, 1]
    memory.indexes.policy = IndexPolicy(kind="flat", delta_fraction=0.0)
    assert add_set(memory, 1, "one", seed=9).deltas == ()
    assert memory.index_consistency()["ok"]


def test_policy_limits_are_checked_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("VISMEM_DELTA_FRACTION", "0.25")
    monkeypatch.setenv("VISMEM_MAX_DELTAS", "3")
    assert IndexPolicy.from_settings(Settings.from_env()) == IndexPolicy(delta_fraction=0.25, max_deltas=3)
    with pytest.raises(IndexTypeError, match="delta fraction"):
        IndexPolicy(delta_fraction=1.5)
    monkeypatch.setenv("VISMEM_MAX_DELTAS", "many")
    with pytest.raises(SettingsError, match="VISMEM_MAX_DELTAS"):
        Settings.from_env()


def test_forgetting_from_a_delta_erases_in_the_delta_only_its_vectors(memory):
    add_set(memory, 50, "d1", seed=1)
    add_set(memory, 50, "d2", seed=2)
    parent = memory.indexes.live()
    delta = memory.layout.absolute(parent.deltas[1].path)
    before, stamps = delta.read_bytes(), {f.path: memory.layout.absolute(f.path).stat().st_mtime_ns for f in parent.files}
    victims = sorted(file_ids(memory, parent.deltas[1].path))[:3]
    memory.forget(ForgetRequest(requested_by="test", reason="delta", sample_ids=samples_of(memory, victims)))
    live = memory.indexes.live()
    assert live.operation == "forget" and live.n_vectors == parent.n_vectors - 3
    assert live.files[:2] == parent.files[:2]                                  # base and first delta untouched
    assert all(memory.layout.absolute(f.path).stat().st_mtime_ns == stamps[f.path] for f in parent.files[:2])
    erased = live.deltas[1]
    assert erased.path == parent.deltas[1].path and (erased.n_vectors, erased.holes) == (47, 3)
    assert erased.sha256 == sha(memory, erased.path) != parent.deltas[1].sha256
    assert not file_ids(memory, erased.path) & set(victims)
    # Only the three vectors and their ids changed, in place: at most 3 x (4 d + 8) bytes.
    assert 0 < changed_bytes(before, delta) <= 3 * (4 * D + 8)
    assert memory.index_consistency()["ok"] and memory.audit.verify().ok


def test_a_file_shared_by_retained_versions_is_erased_once(memory):
    """Base B is named by three versions (B, B+d1, B+d1+d2): forgetting a vector of B erases it
    in B, once, for all of them; no file is written or deleted, and no file holds the vector."""
    base = memory.indexes.live()
    add_set(memory, 50, "d1", seed=1)
    add_set(memory, 50, "d2", seed=2)
    victim = sorted(file_ids(memory, base.path))[:2]
    before = files_on_disk(memory)
    memory.forget(ForgetRequest(requested_by="test", reason="base", sample_ids=samples_of(memory, victim)))
    versions = [v for v in memory.indexes.versions() if v.status != "purged"]
    assert {v.path for v in versions} == {base.path} and len({v.sha256 for v in versions}) == 1
    erasures = memory.ledger.query("SELECT path, n_erased, old_sha256, new_sha256 FROM index_erasures").rows()
    assert erasures == [(base.path, 2, base.sha256, versions[0].sha256)]
    rewrites = memory.ledger.query("SELECT version, old_path, new_path, n_removed FROM index_rewrites ORDER BY version")
    assert set(rewrites["old_path"]) == set(rewrites["new_path"]) == {base.path} and set(rewrites["n_removed"]) == {2}
    assert all(not file_ids(memory, f.path) & set(victim) for v in versions for f in v.files)
    assert memory.audit.verify().ok and memory.index_consistency()["ok"]
    assert files_on_disk(memory) == before


def test_retention_keeps_files_a_kept_version_still_names(memory):
    base = memory.indexes.live()
    add_set(memory, 40, "d1", seed=1)
    add_set(memory, 40, "d2", seed=2)
    purged = memory.indexes.retain(1)                  # only the live version stays
    assert {v.version for v in purged} == {base.version, base.version + 1}
    live = memory.indexes.live()
    assert files_on_disk(memory) == {f.path for f in live.files}   # base and both deltas stay
    assert memory.index_consistency()["ok"]
    memory.rebuild()
    memory.indexes.retain(1)
    assert files_on_disk(memory) == {memory.indexes.live().path}   # now nothing names them


def test_a_crash_between_writing_a_delta_and_recording_it_loses_nothing(memory, monkeypatch):
    live = memory.indexes.live()
    vectors, labels = clustered_vectors(20, D, seed=5)
    insert_vectors(memory, vectors, labels, "crash")

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the ledger recorded the delta")

    monkeypatch.setattr(type(memory.indexes), "_record", die)
    with pytest.raises(KeyboardInterrupt):
        memory.index_pending()
    monkeypatch.undo()
    assert memory.indexes.live() == live                                  # still live and loadable
    assert memory.indexes.load()[1].ntotal == N
    stray = memory.indexes.remove_unreferenced_files()
    assert [p.name for p in stray] == [f"v{live.version + 1:06d}.delta.faiss"]
    v = memory.index_pending()                                            # the retry writes it again
    assert v.n_vectors == N + 20 and memory.index_consistency()["ok"]


def test_a_damaged_delta_is_refused_with_advice(memory):
    v = add_set(memory, 30, "d1", seed=1)
    path = memory.layout.absolute(v.deltas[0].path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="vismem rebuild"):
        memory.indexes.load()
    rebuilt = memory.rebuild()                                            # the advice works
    assert rebuilt.deltas == () and memory.index_consistency()["ok"]


@pytest.mark.slow
def test_ivf_base_with_a_delta(tmp_path):
    memory = build_memory(tmp_path / "home", 20_000, QueryVectors(64), index_policy=IndexPolicy(kind="ivf-flat"))
    base = memory.indexes.live()
    assert base.index_type.startswith("IVF")
    vectors, labels = clustered_vectors(200, 64, seed=3)
    insert_vectors(memory, vectors, labels, "late")
    v = memory.index_pending()
    assert len(v.deltas) == 1 and v.index_type == base.index_type and v.recall_at_10 == base.recall_at_10
    _, index = memory.live_index()                         # read whole (deltas added to its lists)
    assert index.ntotal == 20_200 and memory.index_consistency()["ok"]
    new_ids = sorted(file_ids(memory, v.deltas[0].path))
    memory.encoder.queries = vectors
    _, top = memory.search(vectors, 1)
    assert (np.sort(top[:, 0]) == new_ids).mean() > 0.95   # approximate: nearly all find themselves
    memory.forget(ForgetRequest(requested_by="test", reason="ivf", sample_ids=samples_of(memory, new_ids[:5])))
    assert memory.audit.verify().ok and memory.index_consistency()["ok"]
    # After compaction the base is one IVF file again, searched memory-mapped.
    memory.compact(retain=1)
    assert memory.indexes.live().deltas == () and os.path.exists(memory.layout.absolute(memory.indexes.live().path))


# ---- exact bases in shards ----------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    """20,000 vectors of d = 32 with 1 MiB shards (8,192 vectors each): a base of three files."""
    return build_memory(tmp_path / "home", 20_000, QueryVectors(D), index_policy=IndexPolicy(kind="flat", shard_mib=1))


@pytest.mark.slow
def test_an_exact_base_is_written_in_shards_and_read_as_one(sharded):
    live = sharded.indexes.live()
    assert [f.n_vectors for f in live.files] == [8192, 8192, 3616] and [f.role for f in live.files] == ["base"] * 3
    assert [os.path.basename(f.path) for f in live.files] == [f"v{live.version:06d}.faiss",
                                                              f"v{live.version:06d}.s001.faiss",
                                                              f"v{live.version:06d}.s002.faiss"]
    held = [file_ids(sharded, f.path) for f in live.files]
    assert not (held[0] & held[1]) and set().union(*held) == set(sharded.indexes.ids().tolist())
    assert sharded.index_consistency()["ok"]
    ids, vectors = sharded.stored_vectors()
    reference = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    reference.add_with_ids(vectors, ids)
    queries = clustered_vectors(30, D, seed=7)[0]
    np.testing.assert_allclose(sharded.search(queries, 20)[0], reference.search(queries, 20)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_forgetting_one_vector_erases_it_in_its_shard(sharded):
    before = sharded.indexes.live()
    victim = sorted(file_ids(sharded, before.files[1].path))[0]
    sharded.forget(ForgetRequest(requested_by="test", reason="one", sample_ids=samples_of(sharded, [victim])))
    live = sharded.indexes.live()
    assert live.files[0] == before.files[0] and live.files[2] == before.files[2]     # untouched
    assert live.files[1].path == before.files[1].path and live.files[1].sha256 != before.files[1].sha256
    assert (live.files[1].n_vectors, live.files[1].holes) == (8191, 1)
    assert victim not in file_ids(sharded, live.files[1].path)
    assert sharded.audit.verify().ok and sharded.index_consistency()["ok"]
    # A small add then goes into a delta beside the shards, and a rebuild writes shards afresh, without holes.
    assert add_set(sharded, 100, "late", seed=3).files[-1].role == "delta"
    rebuilt = sharded.rebuild()
    assert [f.role for f in rebuilt.files] == ["base"] * 3 and not any(f.holes for f in rebuilt.files)
    assert set().union(*(set(index_ids(faiss.read_index(str(sharded.layout.absolute(f.path)))).tolist())
                         for f in rebuilt.files)) == set(sharded.indexes.ids().tolist())
