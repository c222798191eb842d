"""Index file digests as hash lists (issue 20, digests.py): the recorded digest is what standard
tools compute, an erasure re-hashes only the blocks it touches, a reader that checked a file
checks only the blocks that changed, and `vismem audit verify` checks every block of every file."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from vismem_assets import digests, erasure
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_kinds.ivf import IVF_FLAT
from vismem_assets.index_store import IndexIntegrityError, held_ids
from vismem_assets.index_types import IndexPolicy
from vismem_assets.patches import Holes, Patch

MiB = 1 << 20


def _standard_digest(path, scratch) -> str:
    """The README's command: coreutils only."""
    if shutil.which("split") is None or shutil.which("sha256sum") is None:
        pytest.skip("coreutils' split and sha256sum are not installed")
    scratch.mkdir()
    command = (f"split -a 8 -d -b {digests.LEAF_SIZE} {path} leaf. && ls leaf.* | xargs -r sha256sum | cut -c1-64"
               f" | split -l {digests.BLOCK_SIZE // digests.LEAF_SIZE} --filter='sha256sum | cut -c1-64' | sha256sum")
    return subprocess.run(command, shell=True, capture_output=True, text=True, check=True, cwd=scratch).stdout.split()[0]


def test_the_digest_is_what_split_and_sha256sum_give(tmp_path):
    path = tmp_path / "file.faiss"
    path.write_bytes(np.random.default_rng(0).bytes(9 * MiB + 12345))   # two whole blocks and a short one, a short leaf
    listed = digests.hash_list(path)
    assert len(listed.blocks) == 3 and listed.leaf_size == digests.LEAF_SIZE
    assert listed.sha256 == _standard_digest(path, tmp_path / "scratch")
    empty = tmp_path / "empty.faiss"
    empty.write_bytes(b"")
    assert digests.hash_list(empty).sha256 == _standard_digest(empty, tmp_path / "scratch-empty")


def test_an_erasure_hashes_only_the_blocks_its_patches_touch(tmp_path):
    block = 64 * 1024
    path = tmp_path / "file.faiss"
    data = bytearray(np.random.default_rng(1).bytes(10 * block))
    path.write_bytes(bytes(data))
    known = digests.hash_list(path, block_size=block)
    # One patch inside block 2, one across the boundary of blocks 6 and 7.
    holes = Holes(np.array([5, 9]), (Patch(np.array([2 * block + 10]), b"\0" * 8),
                                     Patch(np.array([7 * block - 4]), b"\xff" * 12)))
    patched = bytearray(data)
    patched[2 * block + 10: 2 * block + 18] = b"\0" * 8
    patched[7 * block - 4: 7 * block + 8] = b"\xff" * 12
    expected = digests.hash_list(_written(tmp_path / "patched", patched), block_size=block)

    # Block 4 is damaged on disk: its recorded digest is kept (it is not read), so the new list
    # still says what it should hold, and a check of every block finds it.
    data[4 * block] ^= 1
    path.write_bytes(bytes(data))
    again = digests.hash_list(path, holes, known=known)
    assert again == expected
    assert known.differing(again) == [2, 6, 7]
    assert digests.hash_list(path, holes, block_size=block).differing(expected) == [4]


def _written(path, data):
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def exact_memory(tmp_path, monkeypatch):
    from benchmarks.synthetic import QueryVectors, build_memory
    monkeypatch.setattr(digests, "BLOCK_SIZE", 64 * 1024)   # several blocks in a small file
    return build_memory(tmp_path / "home", 3000, QueryVectors(64), index_policy=IndexPolicy(kind="flat"))


def _blocks(memory, file) -> digests.HashList:
    return memory.indexes.hash_lists_of([file])[file.path]


def test_a_forget_records_a_new_hash_list_and_the_audit_checks_every_block(exact_memory):
    memory = exact_memory
    live = memory.indexes.live()
    file = live.files[0]
    before = _blocks(memory, file)
    assert file.block_size == 64 * 1024 and len(before.blocks) > 5 and before.sha256 == file.sha256
    manifest = json.loads(memory.layout.absolute(file.path).with_suffix(".json").read_text())
    assert manifest["sha256"] == file.sha256 and manifest["block_size"] == file.block_size

    victim = memory.ledger.query("SELECT sample_id FROM samples ORDER BY vector_id LIMIT 1")["sample_id"][0]
    memory.forget(ForgetRequest(sample_ids=[victim], requested_by="alice", reason="asked"))
    erased = memory.indexes.live().files[0]
    after = _blocks(memory, erased)
    assert erased.path == file.path and erased.sha256 != file.sha256
    assert after.sha256 == erased.sha256 == digests.hash_list(memory.layout.absolute(file.path), block_size=64 * 1024).sha256
    # A vector is 256 bytes and its id 8: its erasure changes two blocks at most, not the file's every block.
    assert 1 <= len(before.differing(after)) <= 2
    rows = memory.ledger.query("SELECT sha256 FROM index_file_blocks WHERE path = ?", [file.path])["sha256"].to_list()
    assert rows == [erased.sha256]                                 # the old list went with the old bytes
    assert memory.audit.verify().ok

    # One flipped byte in a block of the live file: the audit names the block, a load refuses it.
    path = memory.layout.absolute(file.path)
    with open(path, "r+b") as f:
        f.seek(3 * 64 * 1024 + 100)
        byte = f.read(1)
        f.seek(3 * 64 * 1024 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = memory.audit.verify()
    assert not report.ok and any(f"index file {file.path} differs from the ledger's hash list in 1 of" in p
                                 and f"(the first at byte {3 * 64 * 1024:,})" in p for p in report.problems)
    with pytest.raises(IndexIntegrityError, match="differs from the ledger's hash list"):
        memory.indexes.load()


def test_a_file_recorded_by_the_sha256_of_its_bytes_loads_and_gets_a_hash_list_at_its_first_erasure(exact_memory):
    """A memory from before hash lists (ledger version 12): its files' digests are plain sha256."""
    memory = exact_memory
    live = memory.indexes.live()
    files = [{**f.to_dict(), "block_size": 0,
              "sha256": erasure.sha256_patched(memory.layout.absolute(f.path))} for f in live.files]
    with memory.ledger.transaction() as s:
        s.execute("UPDATE index_versions SET files = ?, sha256 = ? WHERE version = ?",
                  [json.dumps(files), files[0]["sha256"], live.version])
        s.execute("DELETE FROM index_file_blocks")
    old = memory.indexes.live()
    assert old.files[0].block_size == 0
    assert memory.indexes.load()[1].ntotal == 3000 and memory.audit.verify().ok

    victim = memory.ledger.query("SELECT sample_id FROM samples ORDER BY vector_id LIMIT 1")["sample_id"][0]
    memory.forget(ForgetRequest(sample_ids=[victim], requested_by="alice", reason="asked"))
    erased = memory.indexes.live().files[0]
    assert erased.block_size == digests.BLOCK_SIZE and _blocks(memory, erased).sha256 == erased.sha256
    assert memory.indexes.load()[1].ntotal == 2999 and memory.audit.verify().ok


def test_a_mapped_reader_checks_only_the_blocks_a_forget_changed(tmp_path, monkeypatch):
    from benchmarks.synthetic import QueryVectors, build_memory, clustered_vectors

    monkeypatch.setattr(digests, "BLOCK_SIZE", 64 * 1024)
    memory = build_memory(tmp_path / "home", 4000, QueryVectors(64), index_policy=IndexPolicy(kind="ivf-flat", recall_floor=0.5))
    live = memory.indexes.live()
    assert len(live.files) == 1 and "IVF" in live.index_type
    queries = clustered_vectors(20, 64, seed=3)[0]
    found = memory.search(queries, 10)[1]
    held = memory.recall.live_files().files[live.files[0].path]
    assert held.mapped and len(held.hash_list.blocks) > 5

    read = []
    real = digests.hash_blocks
    monkeypatch.setattr(digests, "hash_blocks", lambda path, which, *a, **k: read.append(list(which)) or real(path, which, *a, **k))
    victim = memory.ledger.query("SELECT sample_id, vector_id FROM samples WHERE vector_id = ?",
                                 [int(found[0, 0])]).row(0)
    memory.forget(ForgetRequest(sample_ids=[victim[0]], requested_by="alice", reason="asked"))
    read.clear()
    sims, ids = memory.search(queries, 10)
    switch = memory.recall.live_files()
    now_held = switch.files[live.files[0].path]
    assert switch.last.patched == 1 and not switch.last.loaded and now_held.mapped
    assert now_held.index is held.index                              # the same mapping, which shows the erasure
    assert now_held.held == len(held_ids(now_held.index)) == held.held - 1
    checked = [j for which in read for j in which]
    now = now_held.hash_list
    changed = now.differing(held.hash_list)
    lists_from = IVF_FLAT.lazy_from(memory.layout.absolute(live.files[0].path), switch.files[live.files[0].path].index)
    # the changed blocks read on opening (the direct map's), not the changed list's, which searches read
    assert checked == [j for j in changed if j * digests.BLOCK_SIZE < lists_from] and len(checked) == 1
    assert any(j * digests.BLOCK_SIZE >= lists_from for j in changed)
    assert victim[1] not in ids and ids[0, 0] != found[0, 0]       # the forgotten vector is searched past
    assert memory.audit.verify().ok

    # A list block changed behind the ledger's back: the audit checks every block and names it.
    path = memory.layout.absolute(live.files[0].path)
    at = path.stat().st_size - 100
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 4)
    problems = memory.audit.verify().problems
    assert any(f"in 1 of its {len(now.blocks)} blocks (the first at byte {at // digests.BLOCK_SIZE * digests.BLOCK_SIZE:,})" in p
               for p in problems), problems


def test_with_its_leaves_kept_an_erasure_hashes_only_the_pages_it_touches(tmp_path):
    block, leaf = 64 * 1024, 4096
    path = tmp_path / "file.faiss"
    data = bytearray(np.random.default_rng(2).bytes(10 * block + 100))
    path.write_bytes(bytes(data))
    known = digests.hash_list(path, block_size=block, leaf_size=leaf)
    digests.keep_leaves(path, known)
    assert digests.leaves_path(path).stat().st_size == (-(-len(data) // leaf)) * digests.LINE
    holes = Holes(np.array([1, 2]), (Patch(np.array([2 * block + 10, 7 * block - 4]), b"\0" * 12),))
    patched = bytearray(data)
    patched[2 * block + 10: 2 * block + 22] = b"\0" * 12
    patched[7 * block - 4: 7 * block + 8] = b"\0" * 12
    expected = digests.hash_list(_written(tmp_path / "patched.faiss", patched), block_size=block, leaf_size=leaf)

    # A page of block 2 that no patch touches is damaged on disk: it is not read (its digest
    # comes from the leaves file), so the new list says what the file should hold.
    data[2 * block + 5 * leaf] ^= 1
    # Block 6's slice of the leaves file is stale: it no longer hashes to the recorded digest, so
    # that block is hashed again from the file.
    with open(digests.leaves_path(path), "r+b") as f:
        f.seek((6 * block // leaf) * digests.LINE)
        f.write(b"f" * 64)
    path.write_bytes(bytes(data))
    again = digests.hash_list(path, holes, known=known)
    assert again == expected and known.differing(again) == [2, 6, 7]
    assert sorted(again.leaves) == [2, 6, 7]
    digests.keep_leaves(path, again)   # the leaves file now vouches for the erased file's blocks
    assert digests.leaves_path(path).read_bytes() == b"".join(expected.leaves[j] for j in range(len(expected.blocks)))
    # A check of every block, from the bytes, finds the damaged one.
    assert digests.hash_list(path, holes, block_size=block, leaf_size=leaf).differing(expected) == [2]


def test_the_pages_digests_live_and_go_with_their_index_file(exact_memory):
    memory = exact_memory
    folder = memory.layout.absolute(memory.indexes.live().files[0].path).parent
    old = [memory.layout.absolute(f.path) for f in memory.indexes.live().files]
    assert old and all(digests.leaves_path(p).is_file() for p in old)
    memory.rebuild()
    memory.indexes.retain(1)                      # the old version's files go, with their pages' digests
    assert not any(p.exists() or digests.leaves_path(p).exists() for p in old)
    stray = folder / "v000999.leaves"             # left by a crash between a file's deletion and its leaves'
    stray.write_bytes(b"0" * 65)
    memory.indexes.remove_unreferenced_files()
    assert not stray.exists()
    assert all(digests.leaves_path(memory.layout.absolute(f.path)).is_file() for f in memory.indexes.live().files)
    assert memory.audit.verify().ok


def test_a_link_where_the_leaves_go_is_never_followed(tmp_path):
    path = tmp_path / "file.faiss"
    path.write_bytes(np.random.default_rng(3).bytes(3 * 4096 + 7))
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"precious")
    digests.leaves_path(path).symlink_to(elsewhere)
    listed = digests.hash_list(path, block_size=8192, leaf_size=4096)
    digests.keep_leaves(path, listed)
    assert elsewhere.read_bytes() == b"precious" and not digests.leaves_path(path).is_symlink()
    assert digests.leaves_path(path).read_bytes() == b"".join(listed.leaves[j] for j in range(len(listed.blocks)))
