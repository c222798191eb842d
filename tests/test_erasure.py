"""Erasing vectors in place (erasure.py): on real FAISS files of every index type vismem
writes and on real parquet parts, only the erased vectors' bytes change, plain FAISS and polars
still read the files, the digest recorded before the bytes change is the digest after them
(whatever part of the patches a crash let through), and a file laid out otherwise is refused.
Then the memory end to end: an IVF memory forgets, searches without the holes, and a
compaction writes them away."""
from __future__ import annotations

import hashlib

import faiss
import numpy as np
import polars as pl
import pytest

from benchmarks.synthetic import QueryVectors, build_memory, clustered_vectors
from vismem_assets import erasure, patches
from vismem_assets.embeddings import write_part
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_store import held_ids, index_ids, index_vectors
from vismem_assets.ledger import parquet_footers
from vismem_assets.ivf_search import IVFSearcher
from vismem_assets.index_kinds.flat import flat_index
from vismem_assets.index_types import IndexPolicy, build

D = 32
N = 6000
KINDS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_bytes(before: bytes, after: bytes) -> int:
    assert len(before) == len(after)
    return int(np.count_nonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8)))


@pytest.fixture(scope="module")
def data():
    x, _ = clustered_vectors(N, D, seed=1)
    ids = np.arange(1000, 1000 + N, dtype=np.int64)
    return ids, x, np.random.default_rng(2).choice(ids, 500, replace=False)


def write_index(kind, ids, x, path):
    index = flat_index(ids, x) if kind == "flat" else build(ids, x, IndexPolicy(kind=kind, recall_floor=0.01))[0]
    faiss.write_index(index, str(path))
    return index


@pytest.mark.parametrize("kind", KINDS)
def test_erasing_changes_only_the_erased_entries_and_plain_faiss_reads_the_file(tmp_path, data, kind):
    ids, x, gone = data
    path = tmp_path / "index.faiss"
    original = write_index(kind, ids, x, path)
    before = path.read_bytes()
    holes = erasure.index_holes(path, gone)
    assert sorted(holes.vector_ids) == sorted(gone)
    expected = erasure.sha256_patched(path, holes)
    assert sha(path) == hashlib.sha256(before).hexdigest()       # hashing as patched writes nothing

    erasure.apply({path: holes})

    assert sha(path) == expected
    code = 4 * D if kind in ("flat", "ivf-flat") else faiss.extract_index_ivf(original).code_size
    pairs = 16 if kind != "flat" else 0                          # IVF: the direct map's (id, place) pair
    assert 0 < changed_bytes(before, path.read_bytes()) <= len(gone) * (code + 8 + pairs)
    back = faiss.read_index(str(path))                          # plain FAISS, the whole file
    held = index_ids(back)
    assert (held == -1).sum() == len(gone) and not np.isin(gone, held).any()
    assert sorted(held[held >= 0]) == sorted(np.setdiff1d(ids, gone))
    assert erasure.applied(path, erasure.index_holes(path, [], holes_too=True))
    if kind == "flat":
        assert not index_vectors(back)[held == -1].any()
    assert len(erasure.index_holes(path, gone)) == 0             # nothing left to erase


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_part_way_leaves_a_file_that_hashes_to_the_recorded_digest_once_patched(tmp_path, data, kind):
    ids, x, gone = data
    path = tmp_path / "index.faiss"
    write_index(kind, ids, x, path)
    holes = erasure.index_holes(path, gone)
    recorded = erasure.sha256_patched(path, holes)
    # The codes of half of them written, no id yet (what a SIGKILL in `apply` can leave).
    codes = holes.patches[0]
    erasure.apply({path: erasure.Holes(holes.vector_ids, (erasure.Patch(codes.offsets[:len(codes) // 2], codes.data),))})
    assert sha(path) != recorded
    assert erasure.sha256_patched(path, erasure.index_holes(path, gone, holes_too=True)) == recorded
    # ... and finishing it (idempotent) gives exactly that file.
    erasure.apply({path: erasure.index_holes(path, gone, holes_too=True)})
    assert sha(path) == recorded


def test_the_digest_as_patched_matches_the_file_once_patched(tmp_path):
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 255, 1_000_003, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    # at the start, twice at one place (a retry's holes), overlapping, and ending at the last byte
    offsets = np.array([0, 500_000, 500_000, 500_020, len(data) - 40], np.int64)
    holes = erasure.Holes(np.arange(len(offsets)), (erasure.Patch(offsets, b"\xff" * 40),))
    patched = bytearray(data)
    for o in offsets:
        patched[o:o + 40] = b"\xff" * 40
    assert erasure.sha256_patched(path, holes) == hashlib.sha256(patched).hexdigest()
    assert erasure.sha256_patched(path) == hashlib.sha256(data).hexdigest()
    past_end = erasure.Holes(np.arange(1), (erasure.Patch(np.array([len(data) - 10]), b"\xff" * 40),))
    with pytest.raises(erasure.LayoutError, match="past the end"):
        erasure.sha256_patched(path, past_end)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert erasure.sha256_patched(empty) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("table_limit", [1 << 26, 100])   # flags in a table, and a binary search where the range is wide
def test_targets_are_found_among_ids_with_holes_and_ids_outside_their_range(monkeypatch, table_limit):
    monkeypatch.setattr(patches, "TABLE_LIMIT", table_limit)
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(-1, 5000, dtype=np.int64))   # a hole (-1) among them
    ids[rng.choice(len(ids), 50, replace=False)] = -1
    targets = np.unique(rng.choice(np.arange(200, 7000), 400, replace=False)).astype(np.int64)   # some beyond every id
    wanted = np.isin(ids, targets)
    assert wanted.sum() > 100
    assert np.array_equal(patches.is_target(ids, targets, holes_too=False), wanted)
    assert np.array_equal(patches.is_target(ids, targets, holes_too=True), wanted | (ids == -1))
    assert not patches.is_target(ids, np.empty(0, np.int64), holes_too=False).any()
    assert np.array_equal(patches.is_target(ids, targets[:1], holes_too=False), ids == targets[0])


def test_files_laid_out_otherwise_are_refused(tmp_path, data):
    ids, x, gone = data
    bare = tmp_path / "bare.faiss"                               # no id map: not vismem's layout
    index = faiss.IndexFlatIP(D)
    index.add(x)
    faiss.write_index(index, str(bare))
    with pytest.raises(erasure.LayoutError):
        erasure.index_holes(bare, gone)
    padded = tmp_path / "padded.faiss"                          # bytes after the ids
    write_index("flat", ids, x, padded)
    padded.write_bytes(padded.read_bytes() + b"\0" * 8)
    with pytest.raises(erasure.LayoutError):
        erasure.index_holes(padded, gone)


def part(tmp_path, n, d, **options):
    x, _ = clustered_vectors(n, d, seed=3)
    frame = pl.DataFrame({"sample_id": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
                          "vector_id": np.arange(n, dtype=np.int64) * 3 + 7,
                          "vector": pl.Series(x, dtype=pl.Array(pl.Float32, d))})
    path = tmp_path / f"part-{n}-{d}.parquet"
    if options:
        frame.write_parquet(path, **options)
    else:
        write_part(frame, path)
    meta = parquet_footers([path])[path]
    return path, frame, meta


@pytest.mark.parametrize("n, d", [(2048, 1280), (2048, 384), (40, 8)])  # many pages; one; a dictionary of ids
def test_erasing_rows_of_an_embedding_part(tmp_path, n, d):
    path, frame, meta = part(tmp_path, n, d)
    rows = [0, 1, n // 2, n - 1]
    before = path.read_bytes()
    holes = erasure.part_holes(path, meta, frame["vector_id"].to_numpy()[rows], frame["sample_id"].to_list()[:2] +
                               [frame["sample_id"][n // 2], frame["sample_id"][n - 1]], d)
    erasure.apply({path: holes})
    back = pl.read_parquet(path)
    others = [r for r in range(n) if r not in rows]
    assert back[others].equals(frame[others])
    assert back["vector_id"].to_numpy()[rows].tolist() == [-1] * 4
    assert back["sample_id"].to_list()[:2] == ["0" * 64] * 2 and not back["vector"].to_numpy()[rows].any()
    assert changed_bytes(before, path.read_bytes()) <= 4 * (4 * d + 64 + 8)
    assert erasure.applied(path, erasure.part_holes(path, meta, [], [], d, holes_too=True))


def test_a_part_whose_row_holds_another_sample_than_the_ledger_says_is_refused(tmp_path):
    path, frame, meta = part(tmp_path, 100, 16)
    before = path.read_bytes()
    ids, samples = frame["vector_id"].to_numpy()[:3], frame["sample_id"].to_list()[:3]
    with pytest.raises(erasure.LayoutError, match="row 1 does not hold the sample the ledger puts there"):
        erasure.part_holes(path, meta, ids, [samples[0], samples[2], samples[1]], 16)
    assert path.read_bytes() == before


def test_parts_written_with_statistics_or_compressed_are_refused(tmp_path):
    for options in ({"compression": "zstd"}, {"compression": "uncompressed"}):  # polars' default: statistics
        path, frame, meta = part(tmp_path, 100, 16, **options)
        with pytest.raises(erasure.LayoutError):
            erasure.part_holes(path, meta, frame["vector_id"].to_numpy()[:3], frame["sample_id"].to_list()[:3], 16)


def test_an_older_part_is_rewritten_instead(tmp_path):
    memory = build_memory(tmp_path / "home", 3000, QueryVectors(D), index_policy=IndexPolicy(kind="flat"))
    rel = memory.embedding_files()[0]
    old = memory.layout.absolute(rel)
    pl.read_parquet(old).write_parquet(old, compression="zstd")  # as parts were written before
    victim = pl.read_parquet(old)["sample_id"][5]
    memory.forget(ForgetRequest(requested_by="test", reason="old part", sample_ids=[victim]))
    assert not old.exists() and rel not in memory.embedding_files()
    assert memory.audit.verify().ok and memory.index_consistency()["ok"]


def test_a_part_a_crash_left_behind_goes_with_the_next_forget(tmp_path):
    """A crash between recording a rewritten part and deleting the old one leaves a part no
    ledger row names, holding what was forgotten: the next forget deletes it."""
    memory = build_memory(tmp_path / "home", 3000, QueryVectors(D), index_policy=IndexPolicy(kind="flat"))
    part = memory.layout.absolute(memory.embedding_files()[0])
    stray = part.with_name("part-left-by-a-crash.parquet")
    stray.write_bytes(part.read_bytes())
    victim = pl.read_parquet(part)["sample_id"][3]
    memory.forget(ForgetRequest(requested_by="test", reason="stray", sample_ids=[victim]))
    assert not stray.exists() and part.exists()
    assert memory.audit.verify().ok


@pytest.mark.slow
def test_an_ivf_memory_forgets_in_place_searches_without_the_holes_and_compaction_removes_them(tmp_path):
    memory = build_memory(tmp_path / "home", 12_000, QueryVectors(D),
                          index_policy=IndexPolicy(kind="ivf-flat", recall_floor=0.5))
    live = memory.indexes.live()
    assert live.index_type.startswith("IVF")
    files_before = sorted(p.name for p in memory.layout.indexes(memory.encoder.slug).iterdir())
    victims = memory.ledger.query("SELECT sample_id, vector_id FROM samples ORDER BY random() LIMIT 300")
    gone = victims["vector_id"].to_numpy()
    memory.forget(ForgetRequest(requested_by="test", reason="scattered", sample_ids=victims["sample_id"].to_list()))

    after = memory.indexes.live()
    assert after.path == live.path and after.files[0].holes == 300 and after.n_vectors == live.n_vectors - 300
    assert sorted(p.name for p in memory.layout.indexes(memory.encoder.slug).iterdir()) == files_before
    _, index = memory.live_index()                       # still memory-mapped, holes and all
    assert (index_ids(index) == -1).sum() == 300 and not np.isin(gone, index_ids(index)).any()
    assert len(held_ids(index)) == after.n_vectors and memory.index_consistency()["ok"]
    assert memory.stored_vectors()[1].shape == (after.n_vectors, D)
    q = clustered_vectors(200, D, seed=5)[0]
    _, found = memory.search(q, 50)
    assert not np.isin(found, gone).any()
    # The same answers as an IVF index that never held them: the remaining ids, same lists.
    reference = faiss.read_index(str(memory.layout.absolute(after.path)))
    reference = erasure_free(reference)
    assert np.array_equal(reference.search(q, 50)[1], found)
    assert memory.audit.verify().ok and memory.index_consistency()["ok"]

    compacted, _ = memory.compact(retain=1)
    assert not any(f.holes for f in compacted.files) and compacted.n_vectors == after.n_vectors
    assert not (index_ids(faiss.read_index(str(memory.layout.absolute(compacted.path)))) == -1).any()


@pytest.mark.parametrize("queries", [10, 600])   # FAISS's search; the list-batched kernel
def test_searching_a_mapped_ivf_index_with_holes_never_returns_them(tmp_path, data, queries):
    ids, x, gone = data
    path = tmp_path / "index.faiss"
    write_index("ivf-flat", ids, x, path)
    erasure.apply({path: erasure.index_holes(path, gone)})
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    reference = erasure_free(faiss.read_index(str(path)))   # the same lists without the holes
    q = clustered_vectors(queries, D, seed=8)[0]
    # Far queries: the zero vectors of the holes would outrank every stored one if searched.
    q[: queries // 2] *= -1
    searcher = IVFSearcher(mapped, min_batch=256, min_bytes=0, holes=True)
    assert searcher.lists_for(queries) == (queries >= 256)
    sims, found = searcher.search(q, 20)
    expected_sims, expected = reference.search(q, 20)
    assert not (found == -1).sum() > (expected == -1).sum()
    assert np.array_equal(found, expected) and np.allclose(sims, expected_sims, atol=1e-5)


def erasure_free(index):
    ivf = faiss.extract_index_ivf(index)
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    index.remove_ids(faiss.IDSelectorRange(-1, 0))
    return index


def test_forgetting_a_vector_that_trained_a_cluster_alone_leaves_none_of_its_bytes(tmp_path):
    """k-means leaves a centroid that is a copy of a vector wherever a cluster holds that vector
    alone; the IVF build must not, or the index file keeps a forgotten vector's bytes."""
    from benchmarks.peers import vectors_on_disk
    from benchmarks.synthetic import insert_vectors
    from vismem_assets.index_kinds.ivf import KMEANS_ITERATIONS, held_out_and_training, nlist_for
    from vismem_assets.memory import Memory

    x, labels = clustered_vectors(12_000, D, seed=3)
    loners = np.random.default_rng(4).standard_normal((40, D)).astype(np.float32)
    x[:40] = loners / np.linalg.norm(loners, axis=1, keepdims=True)   # far from every cluster
    nlist = nlist_for(len(x))
    train = x[np.sort(held_out_and_training(len(x), "ivf-flat", nlist)[1])]
    plain = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
    plain.cp.niter = KMEANS_ITERATIONS
    plain.train(train)
    copied = {bytes(c) for c in plain.quantizer.reconstruct_n(0, nlist)} & {bytes(v) for v in x[:40]}
    assert copied, "precondition: FAISS's own training copies some of these vectors into centroids"

    memory = Memory(tmp_path / "home", encoder=QueryVectors(D), index_policy=IndexPolicy(kind="ivf-flat", recall_floor=0.5))
    insert_vectors(memory, x, labels, "loners")
    memory.index_pending(embed=False)
    assert memory.indexes.live().index_type.startswith("IVF")
    assert vectors_on_disk(memory.layout.root, x[:40]) == 40      # the scan sees them while stored
    ids = memory.ledger.query("SELECT sample_id FROM samples ORDER BY vector_id LIMIT 40")["sample_id"].to_list()
    memory.forget(ForgetRequest(requested_by="test", reason="loners", sample_ids=ids))
    assert vectors_on_disk(memory.layout.root, x[:40]) == 0
    assert vectors_on_disk(memory.layout.root, x[40:80]) == 40    # and the others are still there
    assert memory.audit.verify().ok
