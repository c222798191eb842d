"""The live version cached in a long-lived reader (issue 20): a search on an unchanged memory
does not open the ledger (the change token, a few bytes in the home, says nothing committed);
any committed transaction, from this process or another, makes the next search look again."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.ledger.base import CHANGES_FILE
from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parent.parent


def sessions_opened(memory: Memory, monkeypatch) -> list:
    opened = []
    real = type(memory.ledger)._session

    def counting(self):
        opened.append(1)
        return real(self)

    monkeypatch.setattr(type(memory.ledger), "_session", counting)
    return opened


def test_an_unchanged_memory_is_searched_without_opening_the_ledger(tmp_path, encoder, fm_sets, monkeypatch):
    memory = Memory(tmp_path / "home", encoder=encoder)
    memory.add(fm_sets["train"], progress=False)
    assert (memory.layout.root / CHANGES_FILE).is_file()
    queries = encoder.embed(sorted(fm_sets["test"].rglob("*.png"))[:5], progress=False)
    first, catalog = memory.search(queries, 10), memory.catalog()
    opened = sessions_opened(memory, monkeypatch)
    for _ in range(20):
        again = memory.search(queries, 10)
    np.testing.assert_array_equal(again[1], first[1])
    assert memory.catalog() is catalog
    assert opened == []                                   # neither the live version nor the catalog re-read

    # Another process adds a set: the token changes, the next search sees the new version.
    before = memory.live_index()[0].version
    done = subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(memory.layout.root), "add",
                           str(fm_sets["more"])], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stored = sorted((fm_sets["more"] / "Bag").glob("*.png"))[0]
    sims, ids = memory.search(encoder.embed([stored], progress=False), 1)
    assert memory.live_index()[0].version > before and sims[0, 0] > 0.999
    assert opened                                          # it asked the ledger, once something had changed

    # A forget accepted in this process: its samples are gone from the next search.
    victim = memory.catalog().sample_ids[memory.catalog().rows(ids)[0, 0]]
    memory.forget(ForgetRequest(sample_ids=[victim], requested_by="alice", reason="asked"))
    assert memory.search(encoder.embed([stored], progress=False), 1)[1][0, 0] != ids[0, 0]
    assert victim not in set(memory.catalog().sample_ids[memory.catalog().rows(memory.search(queries, 50)[1]).ravel()])


def test_a_version_switch_costs_what_changed(tmp_path):
    """After an add the held base stays as it is and only the new delta is read; after a forget
    the held exact files are patched in place (holes), not read again; the answers equal a fresh
    reader's, which loads everything."""
    from benchmarks.synthetic import QueryVectors, build_memory, clustered_vectors, insert_vectors
    from vismem_assets.index_types import IndexPolicy

    memory = build_memory(tmp_path / "home", 3000, QueryVectors(64), index_policy=IndexPolicy(kind="flat"))
    queries = clustered_vectors(50, 64, seed=5)[0]
    memory.search(queries, 10)
    files = memory.recall.live_files()
    base_path = memory.indexes.live().files[0].path
    base = files.files[base_path]
    assert files.last.loaded == 1

    vectors, labels = clustered_vectors(40, 64, seed=6)
    insert_vectors(memory, vectors, labels, prefix="more")
    version = memory.index_pending(embed=False)
    assert [f.role for f in version.files] == ["base", "delta"]
    sims, ids = memory.search(vectors[:5], 1)
    assert (files.last.kept, files.last.patched, files.last.loaded) == (1, 0, 1)
    assert files.files[base_path] is base and sims[:, 0].min() > 0.999   # the new ones, found

    victims = memory.ledger.query("SELECT sample_id, vector_id FROM samples ORDER BY vector_id LIMIT 7 OFFSET 100")
    memory.forget(ForgetRequest(sample_ids=victims["sample_id"].to_list(), requested_by="alice", reason="asked"))
    got = memory.search(queries, 3000)
    assert files.last.loaded == 0 and files.last.patched >= 1
    assert files.files[base_path].index is base.index                     # the same copy, with holes
    assert not set(got[1].ravel().tolist()) & set(victims["vector_id"].to_list())
    fresh = Memory(memory.layout.root, encoder=memory.encoder, index_policy=IndexPolicy(kind="flat"))
    expected = fresh.search(queries, 3000)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)

    # The fresh reader's copy was read without the file's holes (its positions no longer line up
    # with the file's): a second forget is patched into it by id, with the same answers.
    more = memory.ledger.query("SELECT sample_id, vector_id FROM samples WHERE status = 'active' ORDER BY vector_id"
                               " LIMIT 5 OFFSET 500")
    memory.forget(ForgetRequest(sample_ids=more["sample_id"].to_list(), requested_by="bob", reason="asked"))
    again = fresh.search(queries, 3000)
    assert fresh.recall.live_files().last.patched >= 1 and fresh.recall.live_files().last.loaded == 0
    assert not set(again[1].ravel().tolist()) & set(more["vector_id"].to_list() + victims["vector_id"].to_list())
    np.testing.assert_array_equal(again[1], memory.search(queries, 3000)[1])


def test_status_says_where_the_index_bytes_are(tmp_path):
    """Live versions, retained-only files, and files no version names, each in bytes."""
    from benchmarks.synthetic import QueryVectors, build_memory
    from vismem_assets.index_types import IndexPolicy

    memory = build_memory(tmp_path / "home", 2000, QueryVectors(32), index_policy=IndexPolicy(kind="flat"))
    old = memory.indexes.live()
    memory.rebuild()
    stray = memory.indexes.root / "v000099.faiss"
    stray.write_bytes(b"x" * 1234)
    disk = memory.status()["index_disk_bytes"]
    # each file with its pages' digests (digests.py)
    size = lambda v: sum(p.stat().st_size for f in v.files for p in (memory.layout.absolute(f.path),  # noqa: E731
                                                                     memory.layout.absolute(f.path).with_suffix(".leaves")))
    assert disk == {"live_versions": size(memory.indexes.live()), "retained_versions_only": size(old),
                    "unreferenced": 1234, "retained_versions": 1}
