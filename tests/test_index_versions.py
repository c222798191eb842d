"""Versioned FAISS indexes: every add writes an immutable version file (plain FAISS, ids =
samples.vector_id) recorded in the ledger with its sha256, parent and delta; rebuilds equal the
incremental result; damaged files are refused with advice; a crash mid-write (a real SIGKILL
in a real subprocess) leaves the previous version live; encoders never mix; two processes can
add at once.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from vismem_assets import digests
from vismem_assets.encoders import Encoder, EncoderMismatchError
from vismem_assets.index_store import IndexIntegrityError, IndexStore, index_ids
from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parent.parent


# ---- helpers ---------------------------------------------------------------------------------

def fm_files(fm_sets, split="train", labels=("Bag", "Trouser", "Sneaker"), per_label=2, offset=0):
    out = []
    for label in labels:
        files = sorted((fm_sets[split] / label).glob("*.png"))[offset:offset + per_label]
        assert len(files) == per_label
        out += [(label, f) for f in files]
    return out


def make_set(root: Path, items) -> Path:
    for label, src in items:
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / label / src.name)
    return root


def sha_file(path: Path) -> str:
    """The digest the ledger records for an index file: of its hash list (digests.py)."""
    return digests.hash_list(path).sha256


def vector_ids_of(memory, items) -> set[int]:
    ids = [hashlib.sha256(p.read_bytes()).hexdigest() for _, p in items]
    return set(memory.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                   [ids])["vector_id"].to_list())


def active_vector_ids(memory) -> set[int]:
    return set(memory.ledger.query("SELECT vector_id FROM samples WHERE status = 'active'")["vector_id"].to_list())


def plain_ids(path: Path) -> tuple[faiss.Index, set[int]]:
    """Read a version file with nothing but FAISS, the way any user could."""
    index = faiss.read_index(str(path))
    return index, set(faiss.vector_to_array(index.id_map).tolist())


def versions(memory, encoder_id: str | None = None):
    return memory.ledger.query(
        "SELECT version, path, sha256, parent_version, operation, n_vectors, n_added, n_removed, status"
        " FROM index_versions WHERE encoder_id = ? ORDER BY version", [encoder_id or memory.encoder.id])


def assert_chain(rows) -> None:
    """Versions 1..n, each the child of the one before, exactly one live (the newest)."""
    rows = rows.to_dicts()
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["parent_version"] for r in rows] == [None] + list(range(1, len(rows)))
    assert [r["status"] for r in rows] == ["retained"] * (len(rows) - 1) + ["live"]


def run_script(script: str, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# ---- each add is a new version ------------------------------------------------------------------

def test_each_add_writes_a_new_plain_faiss_version(memory, fm_sets, tmp_path):
    a = fm_files(fm_sets, per_label=2)
    b = fm_files(fm_sets, "more", labels=("Bag", "Sneaker"), per_label=2)
    folder = memory.layout.root / "indexes" / memory.encoder.slug

    r1 = memory.add(make_set(tmp_path / "A", a))
    assert r1.index_version == 1 and r1.n_vectors == len(a)
    # The version, its manifest and its pages' digests (digests.py), no temp file left behind.
    assert sorted(p.name for p in folder.iterdir()) == ["v000001.faiss", "v000001.json", "v000001.leaves"]
    manifest = json.loads((folder / "v000001.json").read_text())
    assert manifest["sha256"] == sha_file(folder / "v000001.faiss") and manifest["n_vectors"] == len(a)
    assert manifest["chain_head"] == "0" * 64 and manifest["n_deletions"] == 0

    r2 = memory.add(make_set(tmp_path / "B", b))
    assert r2.index_version == 2 and r2.n_vectors == len(a) + len(b)
    assert sorted(p.name for p in folder.glob("v*.faiss")) == ["v000001.faiss", "v000002.faiss"]

    rows = versions(memory)
    assert_chain(rows)
    v1, v2 = rows.to_dicts()
    assert (v1["operation"], v1["n_added"], v1["n_vectors"], v1["n_removed"]) == ("add", len(a), len(a), 0)
    assert (v2["operation"], v2["n_added"], v2["n_vectors"], v2["n_removed"]) == ("add", len(b), len(a) + len(b), 0)
    assert memory.ledger.query("SELECT encoder_id, count(*) AS n FROM index_versions WHERE status = 'live'"
                               " GROUP BY encoder_id").rows() == [(memory.encoder.id, 1)]

    a_ids, b_ids = vector_ids_of(memory, a), vector_ids_of(memory, b)
    assert not a_ids & b_ids
    for row, expected in ((v1, a_ids), (v2, a_ids | b_ids)):
        path = memory.layout.absolute(row["path"])
        assert path.parent == folder
        assert row["sha256"] == sha_file(path)
        index, ids = plain_ids(path)
        assert ids == expected and index.ntotal == len(expected) and index.d == 1280
    assert plain_ids(memory.layout.absolute(v2["path"]))[1] == active_vector_ids(memory)

    deltas = memory.ledger.query("SELECT version, change, vector_id FROM index_deltas WHERE encoder_id = ?",
                                 [memory.encoder.id])
    assert sorted(deltas.rows()) == sorted([(1, "add", i) for i in a_ids] + [(2, "add", i) for i in b_ids])

    # The stored vectors are the embedding files' vectors: each one finds itself first.
    ids, vectors = memory.embeddings.read([p for p in memory.ledger.query("SELECT DISTINCT path FROM embeddings")["path"]])
    index = faiss.read_index(str(memory.layout.absolute(v2["path"])))
    sims, found = index.search(vectors, 1)
    assert np.array_equal(found[:, 0], ids) and np.allclose(sims[:, 0], 1.0, atol=1e-4)


def test_rebuild_equals_incremental(memory, fm_sets, tmp_path):
    memory.add(make_set(tmp_path / "A", fm_files(fm_sets, per_label=2)))
    memory.add(make_set(tmp_path / "B", fm_files(fm_sets, "more", per_label=2)))
    queries = memory.encoder.embed([p for _, p in fm_files(fm_sets, "test", per_label=1)])
    incremental = memory.live_index()[1]
    sims_inc, ids_inc = memory.search(queries, 100)

    rebuilt = memory.rebuild()

    assert (rebuilt.version, rebuilt.parent_version, rebuilt.operation) == (3, 2, "rebuild")
    assert (rebuilt.n_added, rebuilt.n_removed, rebuilt.n_vectors) == (0, 0, incremental.ntotal)
    rows = versions(memory)
    assert_chain(rows)
    path = memory.layout.absolute(rebuilt.path)
    assert rows["sha256"][-1] == sha_file(path) == rebuilt.sha256
    assert plain_ids(path)[1] == set(index_ids(incremental).tolist()) == active_vector_ids(memory)
    assert memory.ledger.query("SELECT count(*) AS n FROM index_deltas WHERE version = 3")["n"][0] == 0
    fresh = Memory(memory.layout.root, encoder=memory.encoder)
    assert fresh.live_index()[0].version == 3
    for searcher in (memory, fresh):
        sims_reb, ids_reb = searcher.search(queries, 100)
        assert np.array_equal(ids_reb, ids_inc)
        assert np.allclose(sims_reb, sims_inc, atol=1e-6)


def test_live_index_reports_the_new_version_after_a_rebuild(memory, fm_sets, tmp_path):
    src = make_set(tmp_path / "A", fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=2))
    memory.add(src)
    memory.add(make_set(tmp_path / "B", fm_files(fm_sets, "more", labels=("Bag", "Trouser"), per_label=1)))
    queries = make_set(tmp_path / "Q", fm_files(fm_sets, "test", labels=("Bag", "Trouser"), per_label=1))
    assert memory.evaluate(queries, k_max=3).index_version == 2

    memory.rebuild()

    assert memory.indexes.live().version == 3
    evaluation = memory.evaluate(queries, k_max=3)
    assert memory.ledger.query("SELECT DISTINCT index_version FROM evaluations ORDER BY 1")["index_version"].to_list() == [2, 3]
    assert (memory.live_index()[0].version, evaluation.index_version) == (3, 3)


# ---- damaged files -----------------------------------------------------------------------------

def test_tampered_index_is_refused_until_rebuilt(memory, fm_sets, encoder, tmp_path):
    items = fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=3)
    memory.add(make_set(tmp_path / "A", items))
    live = memory.indexes.live()
    path = memory.layout.absolute(live.path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                      # one flipped byte inside the vectors
    path.write_bytes(bytes(raw))
    probe = [items[0][1], items[-1][1]]

    fresh = Memory(memory.layout.root, encoder=encoder)   # no cached index
    with pytest.raises(IndexIntegrityError) as info:
        fresh.live_index()
    message = str(info.value)
    assert "rebuild" in message and str(path) in message and f"version {live.version}" in message
    with pytest.raises(IndexIntegrityError, match="rebuild"):
        Memory(memory.layout.root, encoder=encoder).classify(probe, k=3)

    version = Memory(memory.layout.root, encoder=encoder).rebuild()

    assert (version.version, version.parent_version, version.n_vectors) == (2, 1, len(items))
    after = Memory(memory.layout.root, encoder=encoder)
    assert after.live_index()[0].version == 2
    preds = after.classify(probe, k=3)
    assert [p.label for p in preds] == [items[0][0], items[-1][0]]
    assert preds[0].neighbors[0].similarity == pytest.approx(1.0, abs=1e-4)   # finds its own stored copy
    # The damaged version stays on record, retained, never live again.
    assert versions(after)["status"].to_list() == ["retained", "live"]


def test_missing_index_file_is_refused_with_advice(memory, fm_sets, encoder, tmp_path):
    memory.add(make_set(tmp_path / "A", fm_files(fm_sets, labels=("Bag",), per_label=2)))
    path = memory.layout.absolute(memory.indexes.live().path)
    path.unlink()
    with pytest.raises(IndexIntegrityError, match="missing its file.*rebuild"):
        Memory(memory.layout.root, encoder=encoder).live_index()
    assert Memory(memory.layout.root, encoder=encoder).rebuild().n_vectors == 2


# ---- crash mid-write -----------------------------------------------------------------------------

CRASH_SCRIPT = """
    import os, signal, sys, tempfile
    import vismem_assets.index_store as store
    from vismem_assets.memory import Memory

    real_write_index = store.faiss.write_index

    def write_half_then_die(index, path):
        with tempfile.TemporaryDirectory() as side:      # the complete bytes, written elsewhere
            real_write_index(index, os.path.join(side, "full"))
            data = open(os.path.join(side, "full"), "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print("PARTIAL", path, len(data) // 2, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    store.faiss.write_index = write_half_then_die
    Memory(sys.argv[1]).add(sys.argv[2])
    print("UNREACHED", flush=True)
"""


@pytest.mark.slow
def test_crash_while_writing_a_version_leaves_the_previous_one_live(memory, fm_sets, encoder, tmp_path):
    a = fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=2)
    b = fm_files(fm_sets, "more", labels=("Bag", "Trouser"), per_label=2)
    memory.add(make_set(tmp_path / "A", a))
    before = versions(memory)
    folder = memory.layout.indexes(memory.encoder.slug)

    proc = run_script(CRASH_SCRIPT, memory.layout.root, make_set(tmp_path / "B", b))

    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "UNREACHED" not in proc.stdout
    partial = [line.split() for line in proc.stdout.splitlines() if line.startswith("PARTIAL")]
    assert len(partial) == 1, proc.stdout
    tmp_written, half = Path(partial[0][1]), int(partial[0][2])

    parent = Memory(memory.layout.root, encoder=encoder)
    assert versions(parent).equals(before)                              # the ledger never heard of v2
    live, index = parent.live_index()                                   # sha256 still matches
    assert live.version == 1 and set(index_ids(index).tolist()) == vector_ids_of(parent, a)
    assert sorted(p.name for p in folder.glob("v*.faiss")) == ["v000001.faiss"]   # no half file under a final name
    # The half-written temp file is left behind (SIGKILL skips the cleanup), hidden and *.tmp:
    assert tmp_written.parent == folder and tmp_written.name.startswith(".v000002.faiss.")
    assert tmp_written.suffix == ".tmp" and tmp_written.stat().st_size == half
    # B's ingest and embeddings were committed before the crash; only the index lags behind.
    assert parent.ledger.query("SELECT count(*) AS n FROM samples WHERE status = 'active'")["n"][0] == len(a) + len(b)

    new = parent.index_pending()

    assert (new.version, new.parent_version, new.n_added) == (2, 1, len(b))
    assert not tmp_written.exists()                                     # the next writer cleared the leftover
    assert_chain(versions(parent))
    _, ids = plain_ids(memory.layout.absolute(new.path))
    assert ids == vector_ids_of(parent, a) | vector_ids_of(parent, b) == active_vector_ids(parent)
    assert new.sha256 == sha_file(memory.layout.absolute(new.path))
    assert parent.index_pending() is None                               # nothing left to fold in


# ---- encoders never mix ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("tiny-dinov2")
    transformers.Dinov2Model(cfg).save_pretrained(path)
    return f"dinov2:{path}"


def test_wrong_dimension_never_enters_an_index(memory, fm_sets, tmp_path):
    with pytest.raises(EncoderMismatchError, match="dimension 1280"):
        memory.indexes.add(np.array([1, 2]), np.zeros((2, 32), np.float32))
    assert len(versions(memory)) == 0
    memory.add(make_set(tmp_path / "A", fm_files(fm_sets, labels=("Bag",), per_label=2)))
    before = versions(memory)
    with pytest.raises(EncoderMismatchError):
        memory.indexes.add(np.array([100, 101]), np.ones((2, 1279), np.float32))
    with pytest.raises(EncoderMismatchError):
        memory.indexes.rebuild(np.array([100]), np.ones((1, 32), np.float32))
    with pytest.raises(EncoderMismatchError):
        memory.search(np.ones((1, 32), np.float32), 3)
    assert versions(memory).equals(before)
    assert len(list(memory.layout.indexes(memory.encoder.slug).glob("v*.faiss"))) == 1
    # A store that expects another dimension refuses the file instead of serving it.
    other = IndexStore(memory.layout, memory.ledger, memory.encoder.id, memory.encoder.slug, 32)
    with pytest.raises(EncoderMismatchError, match="dimension 1280"):
        other.load()


def test_second_encoder_gets_its_own_index_chain(memory, fm_sets, tiny_dinov2, tmp_path):
    items = fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=3)
    src = make_set(tmp_path / "A", items)
    memory.add(src)
    eff_before = versions(memory)

    dino = Memory(memory.layout.root, encoder=tiny_dinov2)
    assert dino.encoder.id != memory.encoder.id and dino.encoder.dim == 32
    with pytest.raises(FileNotFoundError) as info:
        dino.classify([items[0][1]], k=3)
    assert memory.encoder.id in str(info.value) and dino.encoder.id in str(info.value)

    report = dino.add(src)

    assert report.ingest.added == 0 and report.embedded == len(items) and report.index_version == 1
    eff_dir, dino_dir = memory.layout.indexes(memory.encoder.slug), dino.layout.indexes(dino.encoder.slug)
    assert eff_dir != dino_dir
    assert sorted(p.name for p in dino_dir.glob("v*.faiss")) == ["v000001.faiss"]
    assert sorted(p.name for p in eff_dir.glob("v*.faiss")) == ["v000001.faiss"]
    assert versions(memory).equals(eff_before)                          # the other chain is untouched
    dino_rows = versions(dino)
    assert_chain(dino_rows)
    (d_index, d_ids), (e_index, e_ids) = (plain_ids(dino.layout.absolute(dino_rows["path"][0])),
                                          plain_ids(memory.layout.absolute(eff_before["path"][0])))
    assert (d_index.d, e_index.d) == (32, 1280)
    assert d_ids == e_ids == active_vector_ids(memory)
    assert memory.ledger.query("SELECT encoder_id, count(*) FROM index_versions WHERE status = 'live'"
                               " GROUP BY ALL ORDER BY 1").rows() == sorted([(memory.encoder.id, 1), (dino.encoder.id, 1)])
    assert memory.ledger.query("SELECT encoder_id, count(*) FROM embeddings GROUP BY ALL ORDER BY 1").rows() == sorted(
        [(memory.encoder.id, len(items)), (dino.encoder.id, len(items))])
    assert dino.embeddings.root != memory.embeddings.root
    # Both memories answer, each from its own index.
    assert dino.classify([items[0][1]], k=1)[0].neighbors[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert Memory(memory.layout.root, encoder=memory.encoder).classify([items[0][1]], k=1)[0].label == items[0][0]


# ---- two writers at once ---------------------------------------------------------------------------

ADD_SCRIPT = """
    import json, pathlib, sys, time
    from vismem_assets.memory import Memory
    home, src, ready, go = sys.argv[1:5]
    memory = Memory(home)
    memory.encoder                                  # load the model (and touch the ledger) first
    pathlib.Path(ready).touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    r = memory.add(src)
    print(json.dumps({"added": r.ingest.added, "embedded": r.embedded, "version": r.index_version}))
"""


@pytest.mark.slow
def test_two_processes_add_at_once(fm_sets, encoder, tmp_path):
    home = tmp_path / "home"                          # fresh: both processes also race to create the ledger
    sets = {"A": fm_files(fm_sets, labels=("Bag", "Trouser", "Sneaker"), per_label=2),
            "B": fm_files(fm_sets, "more", labels=("Bag", "Trouser", "Sneaker"), per_label=2)}
    go = tmp_path / "go"
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(ADD_SCRIPT), str(home), str(make_set(tmp_path / name, items)),
         str(tmp_path / f"ready-{name}"), str(go)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, items in sets.items()}
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{n}").exists() for n in procs) and time.monotonic() < deadline:
            dead = {n: p for n, p in procs.items() if p.poll() is not None}
            if dead:
                pytest.fail(f"exited before the start: { {n: p.communicate()[1][-2000:] for n, p in dead.items()} }")
            time.sleep(0.02)
        go.touch()
        results = {name: p.communicate(timeout=180) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    embedded = {}
    for name, p in procs.items():
        out, err = results[name]
        assert p.returncode == 0, err[-3000:]
        assert "lock" not in err.lower()
        report = json.loads(out.strip().splitlines()[-1])
        assert report["added"] == len(sets[name]) and report["version"] is not None
        embedded[name] = report["embedded"]
    # An add embeds whatever is pending, the other set's samples too: each image is embedded once,
    # by whichever process took the embedding lock first.
    assert sum(embedded.values()) == len(sets["A"]) + len(sets["B"])

    memory = Memory(home, encoder=encoder)
    rows = versions(memory)
    assert_chain(rows)
    assert 1 <= len(rows) <= 2       # usually 2; 1 if one process folded in the other's vectors first
    assert rows["n_added"].sum() == len(sets["A"]) + len(sets["B"])
    live = memory.live_index()[1]
    assert set(index_ids(live).tolist()) == active_vector_ids(memory) == (
        vector_ids_of(memory, sets["A"]) | vector_ids_of(memory, sets["B"]))
    assert live.ntotal == len(sets["A"]) + len(sets["B"])
    assert memory.ledger.query("SELECT count(*) AS n FROM ingests")["n"][0] == 2


class GatedEncoder(Encoder):
    """The real encoder, but `embed` waits (up to a few seconds) until the other thread also
    embeds: forces the interleaving two processes can hit by chance."""

    def __init__(self, inner: Encoder, barrier: threading.Barrier):
        self.inner, self.barrier = inner, barrier
        self.name, self.dim = inner.name, inner.dim
        self.weights_sha256, self.preprocessing = inner.weights_sha256, inner.preprocessing
        self.spec = inner.spec

    def forward(self, batch):
        return self.inner.forward(batch)

    def embed(self, images, **kw):
        try:
            self.barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return super().embed(images, **kw)


@pytest.mark.slow
def test_concurrent_adds_of_overlapping_sets(fm_sets, encoder, tmp_path):
    shared = fm_files(fm_sets, labels=("Bag",), per_label=1)
    sets = {"A": shared + fm_files(fm_sets, labels=("Trouser",), per_label=1),
            "B": shared + fm_files(fm_sets, labels=("Sneaker",), per_label=1)}
    home = tmp_path / "home"
    Memory(home, encoder=encoder).ledger.schema_version()
    barrier, errors = threading.Barrier(2), {}

    def add(name):
        try:
            Memory(home, encoder=GatedEncoder(encoder, barrier)).add(make_set(tmp_path / name, sets[name]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors[name] = exc

    threads = [threading.Thread(target=add, args=(n,)) for n in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for exc in errors.values():
        raise exc
    memory = Memory(home, encoder=encoder)
    assert memory.ledger.query("SELECT count(*) AS n FROM embeddings")["n"][0] == 3
    assert set(index_ids(memory.live_index()[1]).tolist()) == active_vector_ids(memory)
