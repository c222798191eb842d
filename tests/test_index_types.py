"""Index types: IVF-Flat and IVF-PQ beside exact flat, chosen by size, trained on the memory's
own vectors and kept only when their recall, measured at build time on held-out vectors, passes
the floor (otherwise exact, with the reason recorded). Adding and forgetting work on them, the
measured recall is real (recomputed here independently), and the live index is searched
memory-mapped."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from benchmarks.synthetic import QueryVectors, build_memory, clustered_vectors, insert_vectors
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_store import index_ids
from vismem_assets.index_kinds.ivf import nlist_for, pq_bytes_for, recall
from vismem_assets.index_types import IndexPolicy, IndexTypeError, build
from vismem_assets.settings import Settings, SettingsError
from vismem_assets.memory import Memory

D = 64


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries_at: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64, each query's own id left out: the reference neighbours."""
    scores = vectors[queries_at].astype(np.float64) @ vectors.astype(np.float64).T
    scores[np.arange(len(queries_at)), queries_at] = -np.inf
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def live_file_index(memory: Memory):
    return faiss.read_index(str(memory.layout.absolute(memory.indexes.live().path)))


@pytest.fixture
def ivf_memory(tmp_path):
    return build_memory(tmp_path / "home", 20_000, QueryVectors(D), index_policy=IndexPolicy(kind="ivf-flat"))


@pytest.mark.slow
def test_ivf_flat_is_kept_when_its_recall_passes_and_that_recall_is_real(ivf_memory):
    live = ivf_memory.indexes.live()
    assert live.index_type.startswith("IVF") and live.index_type.endswith(",Flat")
    assert live.recall_at_10 >= 0.95 and live.recall_at_100 is not None and live.recall_measured_at == live.version
    assert "recall@10" in live.build_reason and "floor 0.95" in live.build_reason
    # The file is plain FAISS, with the chosen nprobe and a hash-table direct map inside.
    on_disk = faiss.extract_index_ivf(live_file_index(ivf_memory))
    assert on_disk.nprobe == live.nprobe and on_disk.ntotal == 20_000
    assert on_disk.direct_map.type == faiss.DirectMap.Hashtable
    # Recall on a fresh sample of stored vectors, computed independently, agrees.
    ids, vectors = ivf_memory.stored_vectors()
    at = np.random.default_rng(7).choice(len(ids), 300, replace=False)
    truth = exact_top(vectors, ids, at, 10)
    _, found = ivf_memory.search(vectors[at], 11)
    found = np.array([[i for i in row if i != ids[a]][:10] for row, a in zip(found, at)])
    assert abs(recall(found, truth) - live.recall_at_10) < 0.03
    ledger = ivf_memory.ledger.query("SELECT build_report FROM index_versions WHERE version = ?", [live.version])
    report = json.loads(ledger["build_report"][0])
    assert [live.nprobe, live.recall_at_10] in report["sweep"] and report["speedup"] > 1
    # the smallest nprobe that reaches the floor (doubling, then bisected back)
    assert all(r < 0.95 for p, r in report["sweep"] if p < live.nprobe)


@pytest.mark.slow
def test_weakly_clustered_vectors_stay_exact_and_say_why(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12_000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, report = build(np.arange(len(x)), x, IndexPolicy(kind="ivf-flat", recall_floor=0.99))
    assert isinstance(faiss.downcast_index(index), faiss.IndexIDMap2) and index.ntotal == len(x)
    assert report.kind == "flat" and report.wanted == "ivf-flat"
    assert report.reason.startswith("exact:") and "below the floor 0.99" in report.reason
    assert report.recall_at_10 < 0.99 and len(report.sweep) >= 3  # it tried, doubling nprobe
    # Through the memory: the version says so in the ledger.
    memory = Memory(tmp_path / "home", encoder=QueryVectors(256), index_policy=IndexPolicy(kind="ivf-flat", recall_floor=0.99))
    insert_vectors(memory, x, np.zeros(len(x), int), "random")
    live = memory.index_pending()
    assert live.index_type == "IDMap2,Flat" and live.recall_at_10 is None and "below the floor" in live.build_reason


def test_auto_chooses_by_size(tmp_path):
    policy = IndexPolicy(kind="auto", ivf_from=6_000)
    memory = build_memory(tmp_path / "home", 4_000, QueryVectors(D), index_policy=policy)
    live = memory.indexes.live()
    assert live.index_type == "IDMap2,Flat" and "below the IVF threshold of 6,000" in live.build_reason
    x, labels = clustered_vectors(4_000, D, seed=5)
    insert_vectors(memory, x, labels, "more")
    grown = memory.index_pending()  # an add keeps the parent's type: switching is a rebuild's job
    assert grown.index_type == "IDMap2,Flat" and grown.n_vectors == 8_000
    rebuilt = memory.rebuild("compact")
    assert rebuilt.index_type.startswith("IVF") and rebuilt.recall_at_10 >= 0.95
    assert memory.index_consistency()["ok"]


def test_policy_from_the_settings_and_its_errors(monkeypatch):
    for name, value in {"VISMEM_INDEX_TYPE": "ivf-pq", "VISMEM_IVF_FROM": "10", "VISMEM_RECALL_FLOOR": "0.8"}.items():
        monkeypatch.setenv(name, value)
    p = IndexPolicy.from_settings(Settings.from_env())
    assert (p.kind, p.ivf_from, p.recall_floor) == ("ivf-pq", 10, 0.8)
    assert IndexPolicy.from_settings(Settings.from_env(), kind="ivf-flat").kind == "ivf-flat"  # explicit wins
    monkeypatch.setenv("VISMEM_INDEX_TYPE", "hnsw")
    with pytest.raises(SettingsError, match="VISMEM_INDEX_TYPE='hnsw'.*'auto', 'flat', 'ivf-flat', 'ivf-sq8' or 'ivf-pq'"):
        Settings.from_env()
    monkeypatch.setenv("VISMEM_INDEX_TYPE", "flat")
    monkeypatch.setenv("VISMEM_RECALL_FLOOR", "high")
    with pytest.raises(SettingsError, match="VISMEM_RECALL_FLOOR='high'"):
        Settings.from_env()
    with pytest.raises(IndexTypeError, match="unknown index type 'hnsw'.*auto, flat, ivf-flat, ivf-sq8, ivf-pq"):
        IndexPolicy(kind="hnsw")
    with pytest.raises(IndexTypeError, match="recall floor"):
        IndexPolicy(recall_floor=1.5)
    assert nlist_for(1_000_000) == 2048 and nlist_for(20_000) == 256 and nlist_for(100) == 2
    assert pq_bytes_for(1280, None) == 160 and 384 % pq_bytes_for(384, 50) == 0


@pytest.mark.slow
def test_adding_to_an_ivf_index_assigns_to_its_lists(ivf_memory):
    first = ivf_memory.indexes.live()
    x, labels = clustered_vectors(500, D, seed=11)
    insert_vectors(ivf_memory, x, labels, "late")
    added = ivf_memory.index_pending()
    assert added.index_type == first.index_type and added.n_added == 500 and added.n_vectors == 20_500
    assert added.recall_measured_at == first.version and added.nprobe == first.nprobe
    assert ivf_memory.index_consistency()["ok"]
    _, found = ivf_memory.search(x[:50], 1)  # the new vectors find themselves
    new_ids = ivf_memory.ledger.query("SELECT vector_id FROM samples WHERE image_set LIKE 'late%' ORDER BY vector_id")
    assert np.array_equal(found[:, 0], new_ids["vector_id"].to_numpy()[:50])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq"])
def test_forgetting_leaves_no_trace_in_ivf_versions(tmp_path, kind):
    policy = IndexPolicy(kind=kind, recall_floor=0.05)  # PQ's recall is low: kept here to test forgetting on it
    memory = build_memory(tmp_path / "home", 12_000, QueryVectors(D), index_policy=policy)
    x, labels = clustered_vectors(300, D, seed=3)
    insert_vectors(memory, x, labels, "second")
    memory.index_pending()  # v2; v1 retained
    victims = memory.ledger.query("SELECT sample_id, vector_id FROM samples ORDER BY vector_id LIMIT 200 OFFSET 11900")
    report = memory.forget(ForgetRequest(requested_by="test", reason="gdpr", sample_ids=victims["sample_id"].to_list()))
    assert report.index_versions and report.versions_rewritten
    gone = victims["vector_id"].to_numpy()
    for version in memory.indexes.versions():
        if version.status == "purged":
            continue
        index = faiss.read_index(str(memory.layout.absolute(version.path)))
        assert kind_name(index) == kind
        assert not np.isin(gone, index_ids(index)).any(), version
    assert memory.index_consistency()["ok"]
    _, found = memory.search(np.random.default_rng(0).standard_normal((100, D)).astype(np.float32), 50)
    assert not np.isin(gone, found).any()
    audit = memory.audit.verify()
    assert audit.ok, audit.problems


def kind_name(index) -> str:
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "ivf-pq"
    return "ivf-sq8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else "ivf-flat"


@pytest.mark.slow
def test_ivf_pq_measures_its_recall_and_is_refused_under_a_high_floor(tmp_path):
    x, _ = clustered_vectors(12_000, D, seed=2)
    kept, report = build(np.arange(len(x)), x, IndexPolicy(kind="ivf-pq", recall_floor=0.05))
    pq = faiss.downcast_index(faiss.extract_index_ivf(kept))
    assert isinstance(pq, faiss.IndexIVFPQ) and pq.pq.M == pq_bytes_for(D, None) and report.factory == f"IVF{pq.nlist},PQ{pq.pq.M}"
    refused, strict = build(np.arange(len(x)), x, IndexPolicy(kind="ivf-pq", recall_floor=1.0))
    assert strict.kind == "flat" and "below the floor 1.0" in strict.reason
    assert isinstance(faiss.downcast_index(refused), faiss.IndexIDMap2)


@pytest.mark.slow
def test_reliability_on_an_ivf_memory_equals_the_flat_one(tmp_path):
    """Pruning statistics are exact whatever the index: an IVF memory reads its exact vectors
    from the embedding files, and gets the same counts as a flat memory of the same data."""
    flat = build_memory(tmp_path / "flat", 6_000, QueryVectors(D), index_policy=IndexPolicy(kind="flat"))
    ivf = build_memory(tmp_path / "ivf", 6_000, QueryVectors(D), index_policy=IndexPolicy(kind="ivf-flat", recall_floor=0.5))
    assert ivf.indexes.live().index_type.startswith("IVF")
    a, _ = flat.pruning.reliability(10)
    b, _ = ivf.pruning.reliability(10)
    assert np.array_equal(a.vector_ids, b.vector_ids) and np.array_equal(a.v, b.v)
    assert 0 < ivf.novelty_threshold() < 2


SEARCH_CHILD = """
import sys, numpy as np
from benchmarks.synthetic import QueryVectors
from vismem_assets.memory import Memory
def anon():
    return int([l.split()[1] for l in open('/proc/self/status') if l.startswith('RssAnon')][0]) * 1024
warm = Memory(sys.argv[1], encoder=QueryVectors(int(sys.argv[2])))
q = np.ones((8, warm.encoder.dim), np.float32)
warm.search(q, 5)  # warm: imports, ledger, thread pool, OpenBLAS's buffers
m = Memory(sys.argv[1], encoder=warm.encoder)
before = anon()
m.search(q, 5)  # a second reader loads the live index
print(anon() - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, mapped", [("ivf-flat", True), ("flat", False)])
def test_ivf_indexes_are_searched_memory_mapped_flat_ones_read_whole(tmp_path, kind, mapped):
    """An IVF index is memory-mapped: a searching process's own (anonymous) memory grows by far
    less than the index file. A flat one is read whole (exact search streams every vector, and
    runs several times faster from anonymous memory than over file pages)."""
    d = 512
    memory = build_memory(tmp_path / "home", 60_000, QueryVectors(d), index_policy=IndexPolicy(kind=kind, recall_floor=0.5))
    assert memory.indexes.live().index_type.startswith("IVF") == (kind != "flat")
    files = [memory.layout.absolute(f.path) for f in memory.indexes.live().files]  # a flat base: shards
    size = sum(f.stat().st_size for f in files)
    out = subprocess.run([sys.executable, "-c", SEARCH_CHILD, str(memory.layout.root), str(d)], check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    grew = int(out.stdout.split()[-1])
    assert (grew < 0.3 * size) if mapped else (grew > 0.8 * size), (grew, size)
    # ... and finds what a plain read finds.
    q = clustered_vectors(20, d, seed=9)[0]
    _, found = memory.search(q, 10)
    plain = faiss.IndexShards(d, False, False)  # every file read with plain FAISS, searched together
    parts = [faiss.read_index(str(f)) for f in files]
    for part in parts:
        plain.add_shard(part)
    assert np.array_equal(found, plain.search(q, 10)[1])


@pytest.mark.slow
def test_cli_rebuild_with_an_index_type_prints_the_build_report(tmp_path, encoder):
    build_memory(tmp_path / "home", 3_000, encoder, index_policy=IndexPolicy(kind="flat"))
    env = {**os.environ, "VISMEM_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "vismem_assets.cli"]
    out = subprocess.run(cmd + ["rebuild", "--index-type", "ivf-flat", "--recall-floor", "0.5", "--json"], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    built = json.loads(out.stdout)
    assert built["index_type"].startswith("IVF") and built["build"]["recall_at_10"] >= 0.5
    assert [f["path"] for f in built["files"]] == [built["path"]] and built["files"][0]["sha256"] == built["sha256"]
    text = subprocess.run(cmd + ["status"], env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "IVF" in text and "recall@10" in text and "index policy: auto" in text
    bad = subprocess.run(cmd + ["rebuild", "--index-type", "ivf-flat", "--recall-floor", "7"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "recall_floor=7.0: Input should be less than or equal to 1" in bad.stderr
