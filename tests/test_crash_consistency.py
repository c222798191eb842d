"""Crashes, kills and concurrent runs leave nothing half done that nobody sees (issue 15,
findings 4, 5, 6 and 14).

Everything is real: file names made of bytes that are not UTF-8, `vismem` processes killed
with SIGKILL at a chosen point (mid-embedding, between an ingest's moves into the image store
and its commit), three processes adding the same folder at once, and the `.<name>.tmp` file a
killed store write leaves holding an image's bytes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vismem_assets import store
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.ledger import Ledger
from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parent.parent
WHO = {"requested_by": "dpo@example.org", "reason": "erasure request"}


def vismem(home: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def copy_set(src: Path, dst: Path, labels: tuple[str, ...] | None = None, per_label: int | None = None) -> Path:
    for label_dir in sorted(d for d in src.iterdir() if d.is_dir()):
        if labels and label_dir.name not in labels:
            continue
        (dst / label_dir.name).mkdir(parents=True, exist_ok=True)
        for f in pngs(label_dir)[:per_label]:
            shutil.copy(f, dst / label_dir.name / f.name)
    return dst


def store_files(memory) -> list[Path]:
    """Every file under images/ and quarantine/, hidden and staged ones included."""
    return sorted(p for folder in (memory.layout.images, memory.layout.quarantine) for p in store.walk(folder))


def named_by_ledger(memory) -> set[str]:
    return set(memory.ledger.query("SELECT image_path AS p FROM samples WHERE image_path IS NOT NULL"
                                   " UNION SELECT stored_path FROM quarantine WHERE stored_path IS NOT NULL")["p"])


def assert_no_orphans(memory):
    orphans = [memory.layout.relative(p) for p in store_files(memory)
               if memory.layout.relative(p) not in named_by_ledger(memory)]
    assert not orphans, f"files in the store that no ledger row names: {orphans}"


def count(memory, sql: str, params=None) -> int:
    return int(memory.ledger.query(sql, params)[:, 0][0])


# ---- finding 4: names that are not UTF-8; a failed add leaves no file behind -----------------

@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_kept_byte_for_byte(tmp_path, fm_sets, encoder):
    src = tmp_path / "odd-names"
    (src / "Bag").mkdir(parents=True)
    image = pngs(fm_sets["train"] / "Bag")[0].read_bytes()
    good, bad, odd = b"\xff\xfe.png", b"notes\xff.txt", b"scan.\xe9"   # Latin-1 bytes, as an old camera or zip writes them
    for name, data in ((good, image), (bad, b"not an image"), (odd, b"nor is this")):
        with open(os.path.join(os.fsencode(src / "Bag"), name), "wb") as f:
            f.write(data)
    home = tmp_path / "home"

    added = vismem(home, "add", src)                         # the table for people prints the names too

    assert added.returncode == 0, added.stderr
    assert "notes\\xff.txt" in added.stdout                  # the quarantined file, shown with its byte escaped
    memory = Memory(home, encoder=encoder)
    names_bin = memory.ledger.names.path.read_bytes()
    assert b"Bag/" + good in names_bin and b"Bag/" + bad in names_bin   # the original bytes, not a re-encoding
    row = memory.ledger.query("SELECT name_pos, name_len, original_name(name_pos, name_len) AS name FROM samples"
                              " WHERE sample_id = ?", [sha(image)]).row(0, named=True)
    assert row["name"] == "Bag/\\xFF\\xFE.png"               # the SQL macro reads it (escaped), DuckDB's decode refused it
    assert memory.ledger.names.read(row["name_pos"], row["name_len"]) == "Bag/\\xff\\xfe.png"
    query = vismem(home, "audit", "query", "quarantined_files", "--json")
    assert query.returncode == 0, query.stderr
    rows = sorted(json.loads(query.stdout), key=lambda r: r["original_name"])
    assert [r["original_name"] for r in rows] == ["Bag/notes\\xFF.txt", "Bag/scan.\\xE9"]
    assert rows[1]["stored_path"] == f"quarantine/{sha(b'nor is this')}.bin"        # a plain suffix, or .bin
    table = vismem(home, "audit", "query", "quarantined_files")
    assert table.returncode == 0 and "notes\\xFF.txt" in table.stdout, table.stderr
    assert_no_orphans(memory)
    assert vismem(home, "audit", "verify").returncode == 0

    # Forgetting the set takes the names' bytes away, exactly (their lengths are in bytes).
    memory.forget(ForgetRequest(**WHO, image_set="odd-names"))
    names_bin = memory.ledger.names.path.read_bytes()
    assert good not in names_bin and bad not in names_bin and odd not in names_bin and not names_bin.strip(b"\0")
    assert memory.audit.verify().ok


def test_a_failed_add_leaves_no_file_behind(memory, fm_sets, tmp_path, monkeypatch):
    src = copy_set(fm_sets["train"], tmp_path / "failing", labels=("Bag", "Coat"), per_label=3)
    (src / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")       # a quarantine copy too
    move_in = store.Staging.move_in

    def move_in_then_fail(self):                 # the store's files are in place, the commit never comes
        move_in(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.Staging, "move_in", move_in_then_fail)
    with pytest.raises(OSError, match="No space left"):
        memory.ingest(src)

    assert store_files(memory) == []             # nor a staged copy, nor a moved one
    assert count(memory, "SELECT count(*) FROM samples") == count(memory, "SELECT count(*) FROM quarantine") == 0
    monkeypatch.setattr(store.Staging, "move_in", move_in)
    report = memory.ingest(src)                  # and the same set goes in afterwards
    assert report.added == 6 and len(report.quarantined) == 1
    assert_no_orphans(memory)


def test_the_same_bad_bytes_twice_in_a_set_are_quarantined_once(memory, fm_sets, tmp_path):
    """Two files with the same unusable bytes share one private copy (it was moved in twice)."""
    src = copy_set(fm_sets["train"], tmp_path / "twice", labels=("Bag",), per_label=2)
    for name in ("a.png", "b.png"):
        (src / "Bag" / name).write_bytes(b"not an image")
    report = memory.ingest(src)
    assert report.added == 2 and sorted(q["name"] for q in report.quarantined) == ["Bag/a.png", "Bag/b.png"]
    copies = [p for p in (memory.layout.quarantine).iterdir()]
    assert len(copies) == 1 and copies[0].read_bytes() == b"not an image"
    assert_no_orphans(memory)


KILL_AFTER_MOVES = """
import os, signal, sys
from vismem_assets import store
from vismem_assets.memory import Memory

move_in = store.Staging.move_in
def move_in_then_die(self):
    move_in(self)
    os.kill(os.getpid(), signal.SIGKILL)       # files moved into the store, the ledger rows not committed
store.Staging.move_in = move_in_then_die
Memory(sys.argv[1]).ingest(sys.argv[2])
"""


@pytest.mark.slow
def test_an_add_killed_before_its_commit_leaves_files_the_next_writer_removes(tmp_path, fm_sets, encoder):
    home = tmp_path / "home"
    first = copy_set(fm_sets["train"], tmp_path / "first", labels=("Bag", "Coat"), per_label=3)
    (first / "Coat" / "notes.txt").write_bytes(b"a text file")
    child = subprocess.run([sys.executable, "-c", KILL_AFTER_MOVES, str(home), str(first)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr
    memory = Memory(home, encoder=encoder)
    left = [p for p in store_files(memory) if not p.is_relative_to(store.staging_root(memory.layout))]
    assert len(left) == 7 and count(memory, "SELECT count(*) FROM samples") == 0   # 6 images, 1 quarantine copy

    verify = vismem(home, "audit", "verify")
    assert verify.returncode == 1
    assert verify.stderr.count("no ledger row names it") == 7 and "staging folder of an add that died" in verify.stderr

    second = copy_set(fm_sets["train"], tmp_path / "second", labels=("Sandal",), per_label=3)
    added = vismem(home, "add", second, "--json")            # the next writer
    assert added.returncode == 0, added.stderr
    assert not any(p.exists() for p in left)
    assert not list(store.staging_root(memory.layout).iterdir())
    assert len(store_files(memory)) == 3
    assert_no_orphans(memory)
    assert vismem(home, "audit", "verify").returncode == 0


HOLD_STAGING = """
import sys, time
from pathlib import Path
from vismem_assets.home import Layout
from vismem_assets.store import Staging

staging = Staging(Layout(Path(sys.argv[1])))
staging.stage("a-staged-image.png", b"bytes of an ingest still reading its set")
print(staging.folder, flush=True)
time.sleep(600)
"""


def test_a_live_ingest_keeps_its_staging_and_a_dead_one_loses_it(memory, fm_sets, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(memory.layout.root)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(child.stdout.readline().strip())
        assert (folder / "a-staged-image.png").exists()
        memory.ingest(copy_set(fm_sets["train"], tmp_path / "one", labels=("Bag",), per_label=2))
        assert (folder / "a-staged-image.png").exists()      # its lock is held: another writer leaves it alone
        assert not any("staging" in p for p in memory.audit.check_crash_leftovers())
    finally:
        child.kill()
        child.wait()
    assert any("staging folder of an add that died" in p for p in memory.audit.check_crash_leftovers())
    memory.ingest(copy_set(fm_sets["train"], tmp_path / "two", labels=("Coat",), per_label=2))
    assert not folder.exists()


# ---- finding 5: kill -9 during embedding -----------------------------------------------------

KILL_DURING_EMBEDDING = """
import sys, time
from vismem_assets import embedding
from vismem_assets.memory import Memory

embedding.EMBED_CHUNK = 10                      # many parts: the kill lands between two of them
mem = Memory(sys.argv[1], encoder="efficientnet-lite0")
embed = mem.encoder.embed
def slow(*args, **kwargs):                      # as slow as a big set, so the kill lands mid-way
    time.sleep(1.0)
    return embed(*args, **kwargs)
mem.encoder.embed = slow
mem.add(sys.argv[2], progress=False)
"""


def kill_mid_embedding(home: Path, src: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILL_DURING_EMBEDDING, str(home), str(src)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        ledger = Ledger(home / "ledger.duckdb")
        while not (glob.glob(str(home / "embeddings" / "*" / "*" / "part-*.parquet"))
                   and ledger.query("SELECT count(*) AS n FROM embeddings")["n"][0]):   # a part and its rows
            assert child.poll() is None, f"the add ended before embedding anything: {child.stderr.read()}"
            assert time.monotonic() < deadline, "no embedding part was recorded in 300 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("repair", ["rebuild", "add", "memory_index"])
def test_kill_during_embedding_is_reported_and_the_next_writer_finishes_it(tmp_path, fm_sets, encoder, monkeypatch,
                                                                           repair):
    home = tmp_path / "home"
    src = copy_set(fm_sets["train"], tmp_path / "big")      # 100 images: ten parts of ten
    kill_mid_embedding(home, src)

    memory = Memory(home, encoder=encoder)
    active = count(memory, "SELECT count(*) FROM samples WHERE status = 'active'")
    embedded = count(memory, "SELECT count(*) FROM embeddings")
    assert active == 100 and 0 < embedded < 100, embedded
    status = vismem(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"]["not_embedded"] == 100 - embedded
    text = vismem(home, "status").stdout
    assert f"pending:     {100 - embedded} not embedded" in text and "vismem rebuild" in text
    verify = vismem(home, "audit", "verify")
    assert verify.returncode == 1
    assert "missing from the live index" in verify.stderr and "run `vismem rebuild`" in verify.stderr

    if repair == "rebuild":
        done = vismem(home, "rebuild", "--json")
        assert done.returncode == 0, done.stderr
    elif repair == "add":
        done = vismem(home, "add", copy_set(fm_sets["more"], tmp_path / "more", labels=("Bag",)), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["embedded"] == 100 - embedded + json.loads(done.stdout)["ingest"]["added"]
    else:
        from dagster import materialize
        from dagster_project import resources as res
        from dagster_project.assets import memory_index
        from dagster_project.resources import VisualMemory

        monkeypatch.setenv("VISMEM_HOME", str(home))
        res._memory.cache_clear()
        res._memory(str(home.resolve()), None).encoder_choice.use(encoder)
        result = materialize([memory_index], resources={"visual_memory": VisualMemory()})
        assert result.success
        meta = result.asset_materializations_for_node("memory_index")[0].metadata
        assert meta["embedded_pending"].value == 100 - embedded

    memory = Memory(home, encoder=encoder)
    assert memory.pending(exact=True) == {"encoder_id": encoder.id, "not_embedded": 0, "not_indexed": 0}
    assert memory.index_consistency()["ok"]
    assert memory.status()["pending"] == {"encoder_id": encoder.id, "not_embedded": 0, "not_indexed": 0}
    assert memory.audit.verify().ok


# ---- finding 14: concurrent adds of the same images ------------------------------------------

@pytest.mark.slow
def test_three_concurrent_adds_of_the_same_folder_embed_each_image_once(tmp_path, fm_sets, encoder):
    home = tmp_path / "home"
    src = copy_set(fm_sets["train"], tmp_path / "same")
    procs = [subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), "add", str(src), "--json"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]

    reports = [json.loads(out) for out, _ in outs]
    assert sum(r["embedded"] for r in reports) == 100        # each image embedded by exactly one of them
    memory = Memory(home, encoder=encoder)
    active = set(memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active'")["sample_id"])
    rows = memory.ledger.query("SELECT sample_id, path FROM embeddings")
    assert len(active) == 100 and len(rows) == 100 and set(rows["sample_id"]) == active
    parts = sorted(memory.layout.root.glob("embeddings/*/*/part-*.parquet"))
    in_parts = pl.concat([pl.read_parquet(p, columns=["sample_id"]) for p in parts])["sample_id"]
    assert in_parts.len() == 100 and set(in_parts) == active  # each sample in exactly one part, once
    assert {memory.layout.relative(p) for p in parts} == set(rows["path"])   # no part the ledger does not name
    assert memory.index_consistency()["ok"]
    assert vismem(home, "audit", "verify").returncode == 0


# ---- finding 6: leftovers of a killed store write --------------------------------------------

def leave_killed_write(memory, sample_id: str, data: bytes, name: str | None = None) -> Path:
    """What atomic.py's mkstemp leaves when its writer is killed: `.<final name>.<random>.tmp`
    beside where the image goes, holding its bytes (or another name, as given)."""
    path = memory.layout.images / sample_id[:2] / (name or f".{sample_id}.png.k3j9x2.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_holding(root: Path, data: bytes) -> list[Path]:
    return [p for p in store.walk(root) if p.stat().st_size == len(data) and p.read_bytes() == data]


@pytest.mark.slow
def test_a_killed_write_leftover_is_a_trace_until_removed(memory, fm_sets, tmp_path):
    src = copy_set(fm_sets["train"], tmp_path / "shoes", labels=("Sandal", "Sneaker"), per_label=3)
    memory.add(src, progress=False)
    victim = pngs(src / "Sandal")[0].read_bytes()
    sid = sha(victim)

    # Forgotten, and then its bytes turn up where a killed write left them: under the store's
    # temp name (the id inside), and as `.x.tmp` (only its bytes say what it is).
    memory.forget(ForgetRequest(**WHO, sample_ids=[sid]))
    leftovers = [leave_killed_write(memory, sid, victim),
                 leave_killed_write(memory, sid, victim, name=".x.tmp")]

    report = memory.audit.verify()
    traces = [p for p in report.problems if f"image of a forgotten sample ({sid[:16]}" in p]
    assert len(traces) == 2 and all("`vismem rebuild` removes it" in p for p in traces), report.problems
    proof = memory.audit.proof(sid)
    assert not proof["present_nowhere"] and len(proof["traces"]) == 2
    cli = vismem(memory.layout.root, "audit", "proof", sid)
    assert cli.returncode == 1 and "NOT gone" in cli.stdout

    memory.rebuild()                              # the repair the message names removes them
    assert not any(p.exists() for p in leftovers)
    assert memory.audit.verify().ok and memory.audit.proof(sid)["present_nowhere"]


def test_forgetting_removes_leftovers_of_killed_writes_too(memory, fm_sets, tmp_path):
    src = copy_set(fm_sets["train"], tmp_path / "shoes", labels=("Sandal", "Sneaker"), per_label=3)
    memory.add(src, progress=False)
    victim = pngs(src / "Sneaker")[1].read_bytes()
    sid = sha(victim)
    # A killed store write's temp file, one with a name that does not say what it holds, and a
    # killed embedding write's temp part (a copy of the part that holds the sample's vector).
    leave_killed_write(memory, sid, victim)
    leave_killed_write(memory, sid, victim, name=".x.tmp")
    part = memory.layout.absolute(memory.ledger.query("SELECT path FROM embeddings WHERE sample_id = ?", [sid])["path"][0])
    temp_part = part.with_name(f".{part.name}.q81hz0.tmp")
    shutil.copy(part, temp_part)

    memory.forget(ForgetRequest(**WHO, sample_ids=[sid]))

    assert files_holding(memory.layout.root, victim) == []
    assert not temp_part.exists()
    assert not [p for p in store.walk(memory.layout.root) if sid in p.name]
    assert memory.audit.verify().ok and memory.audit.proof(sid)["present_nowhere"]


def test_leftovers_are_found_anywhere_in_the_store_by_name_or_bytes(memory, fm_sets, tmp_path):
    """The scan covers every file of images/ and quarantine/, staging folders included."""
    src = copy_set(fm_sets["train"], tmp_path / "bags", labels=("Bag",), per_label=3)
    memory.add(src, progress=False)
    data = pngs(src / "Bag")[2].read_bytes()
    sid = sha(data)
    memory.forget(ForgetRequest(**WHO, sample_ids=[sid]))
    dead = store.staging_root(memory.layout) / "4242-deadbeef0000"
    dead.mkdir(parents=True)
    (dead / "q-whatever.bin").write_bytes(data)                       # a dead ingest's staged copy
    (memory.layout.quarantine / f"old-{sid}.png").write_bytes(data)   # the id in the middle of a name

    traces = memory.audit.find_traces([sid], np.array([], np.int64))
    assert sorted(t.split(" ")[0] for t in traces) == sorted(
        [memory.layout.relative(dead / "q-whatever.bin"), f"quarantine/old-{sid}.png"])
    memory.rebuild()
    assert memory.audit.find_traces([sid], np.array([], np.int64)) == [] and memory.audit.verify().ok
