"""Forgetting with proof (issue 4), core and CLI, with real parts only: real Fashion-MNIST
images, the real encoder, the real DuckDB ledger file, FAISS files read back with plain
`faiss.read_index`, real `vismem` processes, real SIGKILLs.

One small memory is built once per module (set A: 4 labels x 4 images plus one broken file
that goes to quarantine; set B: the same labels x 2; so index v1 = A, v2 = A + B). Every test
works on its own copy of that home, so nothing is embedded twice.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import duckdb
import faiss
import numpy as np
import polars as pl
import pytest

from vismem_assets import digests, erasure
from vismem_assets.cli import main as cli_main
from vismem_assets.forgetting import HASHED_FIELDS, ForgetError, ForgetRequest, row_hash
from vismem_assets.index_store import GENESIS, index_ids, index_vectors
from vismem_assets.ledger import audit_queries
from vismem_assets.memory import Memory
from vismem_assets.names import NAMES_FILE

REPO = Path(__file__).resolve().parent.parent
LABELS = ("Bag", "Trouser", "Sneaker", "Sandal")
BROKEN = b"\x89PNG\r\n\x1a\n not really a png"
WHO = dict(requested_by="alice", reason="asked to be removed", category="gdpr", external_ref="T-123")
WHO_ARGS = ["--requested-by", "alice", "--reason", "asked to be removed", "--category", "gdpr", "--external-ref", "T-123"]


# ---- helpers ------------------------------------------------------------------------------------

def sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_digest(path: Path) -> str:
    """The digest the ledger records for an index file: of its hash list (digests.py)."""
    return digests.hash_list(path).sha256


def sid(path: Path) -> str:
    """A sample's id: the sha256 of its bytes."""
    return sha_bytes(Path(path).read_bytes())


def pngs(folder: Path) -> list[Path]:
    """The real images of a folder (not the broken file planted in set A's Bag)."""
    return sorted(p for p in folder.glob("*.png") if p.name != "broken.png")


def vismem(home: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`vismem` as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def cli(home: Path, *args) -> tuple[int, str, str]:
    """The same `vismem` entry point in this process (no interpreter start-up): (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["--home", str(home), *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def faiss_ids(path: Path) -> set[int]:
    """The vector ids of an index file, read with nothing but FAISS (its holes, id -1, aside)."""
    index = faiss.read_index(str(path))
    return set(faiss.vector_to_array(index.id_map).tolist()) - {-1}


def hole_vectors(path: Path) -> np.ndarray:
    """The vectors a (flat) index file keeps in its holes: what forgetting left where a vector was."""
    index = faiss.read_index(str(path))
    ids = faiss.vector_to_array(index.id_map)
    flat = faiss.downcast_index(index.index)
    return faiss.rev_swig_ptr(flat.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)[ids == -1]


def index_files(home: Path) -> list[Path]:
    return sorted(home.glob("indexes/*/*.faiss"))


def ledger_tables(memory: Memory) -> dict[str, list]:
    """Every table of the ledger, all rows, in a canonical order."""
    names = memory.ledger.query("SELECT table_name FROM duckdb_tables() ORDER BY 1")["table_name"].to_list()
    return {t: sorted(map(repr, memory.ledger.query(f'SELECT * FROM "{t}"').rows())) for t in names}


def home_files(home: Path) -> dict[str, str]:
    return {p.relative_to(home).as_posix(): sha_bytes(p.read_bytes())
            for p in sorted(home.rglob("*")) if p.is_file() and p.name != "ledger.duckdb.lock"}


def snapshot(memory: Memory) -> tuple[dict, dict]:
    return ledger_tables(memory), home_files(memory.layout.root)


def assert_unchanged(memory: Memory, before: tuple[dict, dict]) -> None:
    tables, files = snapshot(memory)
    assert {t: len(r) for t, r in tables.items()} == {t: len(r) for t, r in before[0].items()}
    assert tables == before[0]
    assert files == before[1]


def ledger_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.glob("ledger.duckdb*")) if not p.name.endswith(".lock"))


def names_bytes(home: Path) -> bytes:
    return (home / NAMES_FILE).read_bytes()


def stored_bytes(home: Path) -> bytes:
    """Every byte the ledger and its name file hold, stale ones included."""
    return ledger_bytes(home) + names_bytes(home)


def capture(memory: Memory) -> dict:
    """What the memory holds before a forget: every version's file sha and ids, every sample's names."""
    versions = memory.ledger.query("SELECT version, path, sha256, status FROM index_versions ORDER BY version").to_dicts()
    for v in versions:
        path = memory.layout.absolute(v["path"])
        v["ids"] = faiss_ids(path)
        assert v["sha256"] == index_digest(path)
    samples = memory.ledger.query("SELECT sample_id, vector_id, label, status, original_name(name_pos, name_len) AS original_name FROM samples")
    names: dict[str, set[str]] = {}
    for sample_id, name in memory.ledger.query(
            "SELECT sample_id, original_name(name_pos, name_len) AS original_name FROM sample_sources UNION ALL SELECT sample_id, original_name(name_pos, name_len) AS original_name FROM samples"
            " UNION ALL SELECT sample_id, original_name(name_pos, name_len) AS original_name FROM quarantine").rows():
        if sample_id and name:
            names.setdefault(sample_id, set()).add(name.split("/")[-1])
    return {"versions": versions, "live": next(v for v in versions if v["status"] == "live"),
            "vector_id": dict(samples.select("sample_id", "vector_id").rows()),
            "label": dict(samples.select("sample_id", "label").rows()),
            "status": dict(samples.select("sample_id", "status").rows()),
            "names": names, "file_shas": {index_digest(p) for p in index_files(memory.layout.root)}}


def assert_forgotten(memory: Memory, pre: dict, sample_ids: list[str], request_id: str, who: dict = WHO) -> None:
    """Everything issue 4 says forgetting does, checked on disk and in the ledger."""
    q, root = memory.ledger.query, memory.layout.root
    sample_ids = sorted(set(sample_ids))
    gone_vids = {pre["vector_id"][s] for s in sample_ids if pre["vector_id"][s] is not None}
    assert gone_vids, "the test must forget something that was indexed"

    # The request: recorded and applied.
    req = q("SELECT * FROM forget_requests WHERE request_id = ?", [request_id]).to_dicts()
    assert len(req) == 1 and req[0]["state"] == "applied" and req[0]["applied_at"] is not None
    assert req[0]["n_samples"] == len(sample_ids)
    assert {k: req[0][k] for k in who} == who
    # One deletions row per sample, carrying the request.
    rows = q("SELECT * FROM deletions WHERE request_id = ? ORDER BY sample_id", [request_id]).to_dicts()
    assert [r["sample_id"] for r in rows] == sample_ids
    assert all({k: r[k] for k in who} == who for r in rows)
    assert [r["label"] for r in rows] == [pre["label"][s] for s in sample_ids]
    assert q("SELECT count(*) - count(DISTINCT seq) AS dup FROM deletions")["dup"][0] == 0

    # The live index: a new version, operation 'forget', without the vectors.
    live = q("SELECT * FROM index_versions WHERE status = 'live'").to_dicts()
    assert len(live) == 1
    live = live[0]
    assert live["operation"] == "forget" and live["version"] > pre["live"]["version"]
    live_ids = faiss_ids(root / live["path"])
    assert live_ids == pre["live"]["ids"] - gone_vids
    assert live["n_vectors"] == len(live_ids)
    removed = set(q("SELECT vector_id FROM index_deltas WHERE change = 'remove'")["vector_id"])
    assert gone_vids & pre["live"]["ids"] <= removed

    # Every retained version file, read with plain FAISS, holds none of them.
    now = {v["version"]: v for v in q("SELECT * FROM index_versions").to_dicts()}
    kept = {f["path"] for v in now.values() if v["status"] != "purged" for f in json.loads(v["files"])}
    for v in now.values():
        path = root / v["path"]
        if v["status"] == "purged":  # its files go, but those a kept version names (erased in place)
            assert path.exists() == (v["path"] in kept)
            continue
        assert index_digest(path) == v["sha256"]
        assert not faiss_ids(path) & gone_vids, f"version {v['version']} still holds forgotten vectors"
    for path in index_files(root):  # and no other index file lying around does either,
        assert not faiss_ids(path) & gone_vids, path
        assert not hole_vectors(path).any(), path  # nor any of their bytes, where they were
    # No index file is byte-identical to a pre-forget version that held them ...
    held = {v["version"]: v for v in pre["versions"] if v["ids"] & gone_vids}
    held_shas = {v["sha256"] for v in held.values()}
    assert held_shas and not {index_digest(p) for p in index_files(root)} & held_shas
    # ... each such version was either rewritten (old and new sha on record) or purged.
    rewrites = {r["version"]: r for r in q("SELECT * FROM index_rewrites WHERE request_id = ?", [request_id]).to_dicts()}
    for version, v in held.items():
        if version == pre["live"]["version"] or now[version]["status"] == "purged":
            continue
        assert now[version]["status"] == "retained"
        r = rewrites.get(version)
        assert r is not None, f"retained version {version} held forgotten vectors but has no index_rewrites row"
        assert r["old_sha256"] == v["sha256"] and r["new_sha256"] == now[version]["sha256"] != v["sha256"]
        assert r["n_removed"] == len(v["ids"] & gone_vids)
        assert faiss_ids(root / now[version]["path"]) == v["ids"] - gone_vids
    # Versions that never held them are untouched.
    for v in pre["versions"]:
        if v["version"] not in held and v["status"] == "retained":
            assert now[v["version"]]["sha256"] == v["sha256"] and now[v["version"]]["path"] == v["path"]

    # Embedding files: no row of theirs, in the ledger or in any parquet file.
    assert q("SELECT count(*) AS n FROM embeddings WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
             [sample_ids])["n"][0] == 0
    parquet = sorted(root.glob("embeddings/**/*.parquet"))
    assert parquet
    for path in parquet:
        part = pl.read_parquet(path)
        assert not set(part["sample_id"]) & set(sample_ids), path
        if "vector_id" in part.columns:  # (not the cache of query embeddings)
            assert not set(part["vector_id"]) & gone_vids, path
            assert not part.filter(pl.col("vector_id") == -1)["vector"].to_numpy().any(), path
    # Images and quarantine copies: gone.
    for folder in (memory.layout.images, memory.layout.quarantine):
        left = [p for p in folder.rglob("*") if p.is_file() and p.name.split(".")[0] in sample_ids]
        assert not left, left

    # The ledger keeps the hash and the label, nothing that names the file.
    got = q("SELECT sample_id, status, label, name_pos, image_path FROM samples"
            " WHERE sample_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY sample_id", [sample_ids]).rows()
    assert got == [(s, "forgotten", pre["label"][s], None, None) for s in sample_ids]
    assert q("SELECT count(*) AS n FROM sample_sources WHERE name_pos IS NOT NULL AND sample_id IN"
             " (SELECT unnest(?::VARCHAR[]))", [sample_ids])["n"][0] == 0
    assert q("SELECT count(*) AS n FROM quarantine WHERE (name_pos IS NOT NULL OR stored_path IS NOT NULL)"
             " AND sample_id IN (SELECT unnest(?::VARCHAR[]))", [sample_ids])["n"][0] == 0
    # ... nor in the name file, while the names of kept samples are there (and never in the DuckDB file).
    forgotten_names = set().union(*(pre["names"].get(s, set()) for s in sample_ids))
    kept_names = set().union(*(n for s, n in pre["names"].items() if s not in sample_ids)) - forgotten_names
    assert forgotten_names and kept_names
    assert [n for n in sorted(forgotten_names) if n.encode() in stored_bytes(root)] == []
    assert [n for n in sorted(kept_names) if n.encode() not in names_bytes(root)] == []
    assert [n for n in sorted(kept_names | forgotten_names) if n.encode() in ledger_bytes(root)] == []

    report = memory.audit.verify()
    assert report.ok, report.problems
    assert report.files_checked["index_files"] == len(index_files(root))


# ---- the memory every test copies ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory, fm_sets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forget-sets")
    for label in LABELS:
        files = pngs(fm_sets["train"] / label)
        for name, part in (("A", files[:4]), ("B", files[4:6])):
            (root / name / label).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, root / name / label / f.name)
    (root / "A" / "Bag" / "broken.png").write_bytes(BROKEN)       # quarantined, with a copy
    for label in LABELS[:3]:                                        # queries without Sandal
        shutil.copytree(fm_sets["test"] / label, root / "Q" / label)
    return {"A": root / "A", "B": root / "B", "Q": root / "Q", "test": fm_sets["test"]}


@pytest.fixture(scope="module")
def base_home(tmp_path_factory, sources, encoder) -> Path:
    home = tmp_path_factory.mktemp("forget-base") / "home"
    memory = Memory(home, encoder=encoder)
    a = memory.add(sources["A"])
    b = memory.add(sources["B"])
    assert (a.ingest.added, len(a.ingest.quarantined), a.index_version) == (16, 1, 1)
    assert (b.ingest.added, b.index_version, b.n_vectors) == (8, 2, 24)
    assert list(memory.layout.quarantine.iterdir())                # the broken file's copy
    return home


def copy_home(src: Path, dst: Path, encoder) -> Memory:
    shutil.copytree(src, dst)
    return Memory(dst, encoder=encoder)


@pytest.fixture
def mem(base_home, tmp_path, encoder) -> Memory:
    return copy_home(base_home, tmp_path / "home", encoder)


def case(kind: str, sources: dict, tmp_path: Path) -> tuple[dict, list[str], list]:
    """(ForgetRequest target fields, the sample ids it must forget, the same target as CLI arguments)."""
    a, b = sources["A"], sources["B"]
    if kind == "sample":
        files = [pngs(a / "Trouser")[0], pngs(b / "Sneaker")[1]]
        ids = [sid(f) for f in files]
        return {"sample_ids": ids}, ids, ["--sample", *ids]
    if kind == "image":
        # The same bytes under another name, somewhere else, are the same image.
        renamed = tmp_path / "elsewhere" / "holiday-photo.png"
        renamed.parent.mkdir(parents=True)
        renamed.write_bytes(pngs(a / "Sneaker")[2].read_bytes())
        files = [renamed, pngs(b / "Trouser")[0]]
        return {"images": [str(f) for f in files]}, [sid(f) for f in files], ["--image", *files]
    if kind == "label":   # Bag: includes the quarantined broken file of set A
        ids = [sid(f) for f in sorted((a / "Bag").iterdir())] + [sid(f) for f in pngs(b / "Bag")]
        assert sid(a / "Bag" / "broken.png") in ids
        return {"label": "Bag"}, ids, ["--label", "Bag"]
    assert kind == "image_set"
    return {"image_set": "B"}, [sid(f) for f in sorted(b.rglob("*.png"))], ["--set", "B"]


KINDS = ("sample", "image", "label", "image_set")


# ---- each kind of target, core and CLI -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_forget_each_kind_of_target(mem, sources, tmp_path, kind):
    target, ids, _ = case(kind, sources, tmp_path)
    if kind == "sample":   # evaluated as queries once: their vectors sit in the query-embedding cache too
        probe = tmp_path / "probe" / "any"
        probe.mkdir(parents=True)
        for s in ids:
            shutil.copy(mem.layout.absolute(mem.ledger.query("SELECT image_path FROM samples WHERE sample_id = ?",
                                                             [s])["image_path"][0]), probe / f"{s[:8]}.png")
        assert mem.evaluate(probe.parent, k_max=3, record=False).n_in_memory == 2
        cache = mem.embeddings.root / "_queries.parquet"
        assert set(ids) <= set(pl.read_parquet(cache)["sample_id"])
    pre = capture(mem)
    request = ForgetRequest(**WHO, **target)

    report = mem.forget(request)

    assert not report.dry_run and not report.already_applied
    assert sorted(s["sample_id"] for s in report.samples) == sorted(ids)
    assert report.per_label() == {label: sum(pre["label"][s] == label for s in ids) for label in {pre["label"][s] for s in ids}}
    live = mem.ledger.query("SELECT encoder_id, version FROM index_versions WHERE status = 'live'").row(0)
    slug = mem.ledger.query("SELECT slug FROM encoders WHERE encoder_id = ?", [live[0]])["slug"][0]
    assert report.index_versions == [f"{slug}:{live[1]}"]
    rewritten = mem.ledger.query("SELECT version FROM index_rewrites WHERE request_id = ? ORDER BY 1",
                                 [report.request_id])["version"].to_list()
    assert report.versions_rewritten == [f"{slug}:{v}" for v in rewritten]
    # The proof rows name the versions rewritten for them.
    assert set(mem.ledger.query("SELECT versions_rewritten FROM deletions WHERE request_id = ?",
                                [report.request_id])["versions_rewritten"]) == {json.dumps(report.versions_rewritten)}
    assert_forgotten(mem, pre, ids, request.request_id)
    if kind == "sample":
        assert cache.exists() and not set(ids) & set(pl.read_parquet(cache)["sample_id"])
    if kind in ("sample", "image", "label"):   # these held vectors in v1 too: a retained version was rewritten
        assert rewritten == [1]
    if kind == "label":
        assert not list(mem.layout.quarantine.iterdir())           # the quarantine copy went with its label
        assert mem.ledger.query("SELECT name_pos, stored_path FROM quarantine").rows() == [(None, None)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_forget_each_kind_from_the_command_line(mem, sources, tmp_path, kind):
    target, ids, args = case(kind, sources, tmp_path)
    pre = capture(mem)

    proc = vismem(mem.layout.root, "forget", *args, *WHO_ARGS, "--json")

    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    request_id = ForgetRequest(**WHO, **target).request_id     # the CLI builds the same request
    assert out["request_id"] == request_id and out["n_samples"] == len(ids)
    assert sorted(s["sample_id"] for s in out["samples"]) == sorted(ids)
    assert_forgotten(mem, pre, ids, request_id)


def test_forget_prints_a_table_for_people(mem):
    rc, out, err = cli(mem.layout.root, "forget", "--label", "Sandal", *WHO_ARGS)
    assert rc == 0, err
    assert "forgot 6 sample(s)" in out and "Sandal" in out
    assert "new live index version(s):" in out and ":3" in out
    assert "retained versions erased in place too:" in out and "vismem audit verify" in out
    # Where the time went, step by step: the steps add up to (nearly) all of it.
    steps = re.search(r"took ([\d.]+) s \((.*)\)", out)
    seconds = {name.strip(): float(value) for name, value in re.findall(r"([a-z ]+) ([\d.]+) s", steps.group(2))}
    assert list(seconds) == ["accept", "indexes", "statistics", "embeddings", "image files", "names", "proof", "finish"]
    rounding = 0.005 * len(seconds)   # (each printed to 0.01 s)
    assert 0.8 * float(steps.group(1)) - rounding <= sum(seconds.values()) <= float(steps.group(1)) + rounding


def test_forgetting_a_set_also_removes_its_quarantined_files(mem, sources):
    broken = sid(sources["A"] / "Bag" / "broken.png")
    assert [p.name.split(".")[0] for p in mem.layout.quarantine.iterdir()] == [broken]

    report = mem.forget(ForgetRequest(**WHO, image_set="A"))

    assert report.n_samples == 16 + 1          # the 16 images and the broken file that came with set A
    assert not list(mem.layout.quarantine.iterdir())
    assert mem.ledger.query("SELECT name_pos, stored_path FROM quarantine").rows() == [(None, None)]
    assert b"broken.png" not in stored_bytes(mem.layout.root)


# ---- dry run ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_lists_and_changes_nothing(mem, sources):
    before = snapshot(mem)
    report = mem.forget(ForgetRequest(**WHO, label="Sandal"), dry_run=True)
    assert report.dry_run and report.n_samples == 6 and report.per_label() == {"Sandal": 6}
    assert {s["image_set"] for s in report.samples} == {"A", "B"}
    assert_unchanged(mem, before)

    proc = vismem(mem.layout.root, "forget", "--set", "B", *WHO_ARGS, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dry_run"] is True and out["n_samples"] == 8
    assert sorted(s["sample_id"] for s in out["samples"]) == sorted(sid(f) for f in sources["B"].rglob("*.png"))
    assert out["index_versions"] == [] and out["versions_rewritten"] == []
    rc, out, _ = cli(mem.layout.root, "forget", "--image", pngs(sources["A"] / "Bag")[0], *WHO_ARGS, "--dry-run")
    assert rc == 0 and "would forget 1 sample(s)" in out
    assert_unchanged(mem, before)
    assert mem.ledger.query("SELECT count(*) AS n FROM forget_requests")["n"][0] == 0


# ---- the blocklist ------------------------------------------------------------------------------------------

def test_reingesting_a_set_after_forgetting_part_of_it(mem, sources, tmp_path):
    gone = [pngs(sources["A"] / "Trouser")[1], pngs(sources["A"] / "Sandal")[0]]
    gone_ids = [sid(f) for f in gone]
    report = mem.forget(ForgetRequest(**WHO, sample_ids=gone_ids))
    vids = set(mem.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                [gone_ids])["vector_id"])
    version = mem.indexes.live().version
    n_vectors = mem.ledger.query("SELECT max(vector_id) AS m FROM samples")["m"][0]

    again = mem.add(sources["A"])

    assert again.ingest.blocked == 2 and again.ingest.added == 0
    assert again.ingest.duplicates == 14 and again.embedded == 0
    assert again.index_version == version                         # no new version: nothing came back
    # The same image under another name (and another label) in a new set: blocked too; the rest goes in.
    renamed = tmp_path / "C"
    (renamed / "Coat").mkdir(parents=True)
    (renamed / "Coat" / "not-a-trouser.png").write_bytes(gone[0].read_bytes())
    fresh = pngs(sources["test"] / "Coat")[0]
    shutil.copy(fresh, renamed / "Coat" / fresh.name)
    other = mem.add(renamed, name="C")
    assert (other.ingest.blocked, other.ingest.added, other.embedded) == (1, 1, 1)

    q = mem.ledger.query
    assert set(q("SELECT status FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                 [gone_ids])["status"]) == {"forgotten"}
    assert q("SELECT label FROM samples WHERE sample_id = ?", [gone_ids[0]])["label"][0] == "Trouser"
    assert q("SELECT count(*) AS n FROM samples")["n"][0] == 26                  # 25 + the one new Coat
    assert q("SELECT max(vector_id) AS m FROM samples")["m"][0] == n_vectors + 1  # one new vector, the Coat's
    assert q("SELECT count(*) AS n FROM sample_sources WHERE original_name(name_pos, name_len) = 'Coat/not-a-trouser.png'")["n"][0] == 0
    assert q("SELECT count(*) AS n FROM embeddings WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
             [gone_ids])["n"][0] == 0
    for path in index_files(mem.layout.root):
        assert not faiss_ids(path) & vids
    assert not [p for p in mem.layout.images.rglob("*") if p.name.split(".")[0] in gone_ids]
    assert set(q("SELECT sample_id FROM blocklist")["sample_id"]) == set(gone_ids)
    assert set(q("SELECT request_id FROM blocklist")["request_id"]) == {report.request_id}
    assert mem.audit.verify().ok
    # Classifying the forgotten image itself: it is not found (its neighbours are other samples).
    prediction = mem.classify([gone[0]], k=30)[0]
    assert not {n.sample_id for n in prediction.neighbors} & set(gone_ids)
    assert prediction.neighbors[0].similarity < 0.9999


# ---- forgetting a whole class ----------------------------------------------------------------------------------

def test_forgetting_a_class_it_is_never_predicted_and_the_others_keep_their_accuracy(mem, sources):
    queries = sorted(sources["Q"].rglob("*.png"))                 # Bag, Trouser, Sneaker: no Sandal
    before = {p.path: p for p in mem.classify(queries, k=5)}
    eval_before = mem.evaluate(sources["Q"], k_max=5, record=False)
    sandal_ids = set(mem.ledger.query("SELECT sample_id FROM samples WHERE label = 'Sandal'")["sample_id"])

    mem.forget(ForgetRequest(**WHO, label="Sandal"))

    # Its own test images: never Sandal, not even one Sandal neighbour among all that remain.
    sandal_tests = pngs(sources["test"] / "Sandal")
    n_left = mem.indexes.live().n_vectors
    for p in mem.classify(sandal_tests, k=100):
        assert p.label != "Sandal" and p.label in LABELS
        assert len(p.neighbors) == n_left == 18
        assert "Sandal" not in {n.label for n in p.neighbors} and "Sandal" not in p.scores
        assert not {n.sample_id for n in p.neighbors} & sandal_ids
    after = {p.path: p for p in mem.classify(queries, k=5)}
    eval_after = mem.evaluate(sources["Q"], k_max=5, record=False)

    # Why these assertions are exact rather than "within a margin": removing samples only deletes
    # entries from each query's ranked neighbour list. So (1) a query none of whose top-5
    # neighbours was a Sandal keeps exactly the same top-5 (ids, similarities) and the same vote;
    # (2) at k = 1 a query whose nearest neighbour was not a Sandal keeps it, and one whose nearest
    # was a Sandal was wrong before (no Sandal queries here): k=1 accuracy cannot drop, for any strategy.
    untouched = 0
    for path, b in before.items():
        a = after[path]
        assert a.label != "Sandal" and "Sandal" not in {n.label for n in a.neighbors}
        if "Sandal" not in {n.label for n in b.neighbors}:
            untouched += 1
            assert [(n.sample_id, round(n.similarity, 5)) for n in a.neighbors] == \
                   [(n.sample_id, round(n.similarity, 5)) for n in b.neighbors]
            assert a.label == b.label
    assert untouched >= 4
    k1 = lambda ev: dict(ev.accuracy.filter(pl.col("k") == 1).select("strategy", "accuracy").rows())
    assert all(k1(eval_after)[s] >= k1(eval_before)[s] for s in k1(eval_before))
    # Per-label accuracy (k=5) is identical for every class none of whose queries had a Sandal in its top 5.
    clean = {lab for lab in ("Bag", "Trouser", "Sneaker")
             if all("Sandal" not in {n.label for n in b.neighbors} for p, b in before.items() if f"/{lab}/" in p)}
    assert clean
    per = lambda ev: {r["label"]: r["accuracy"] for r in ev.per_label.to_dicts() if r["label"] in clean}
    assert per(eval_after) == per(eval_before)


# ---- a crash mid-forget, then a retry ------------------------------------------------------------------------

CRASH_SCRIPT = """
    import os, signal, sys
    import vismem_assets.erasure as erasure
    import vismem_assets.forgetting as forgetting

    def die(*args, **kwargs):
        print("KILLED", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    point = sys.argv[1]
    apply = erasure.apply
    def half(erasures):
        path, holes = next(iter(erasures.items()))
        patch = holes.patches[0]
        apply({path: erasure.Holes(holes.vector_ids, (erasure.Patch(patch.offsets[:len(patch) // 2 + 1], patch.data),))})
        die()
    def ids_only(erasures):   # (a part's patches: vectors, sample ids, vector ids)
        apply({path: erasure.Holes(holes.vector_ids, holes.patches[1:]) for path, holes in erasures.items()})
        die()
    def in_indexes(crash):
        # The embedding parts are erased beside the indexes, in a thread of their own: they go on.
        return lambda erasures: crash(erasures) if any("indexes" in p.parts for p in erasures) else apply(erasures)
    if point == "erase":               # the erasure recorded (new digests, new live version); no byte changed yet
        erasure.apply = in_indexes(die)
    elif point == "erase_half":        # ... and some of the first file's vectors zeroed, their ids not yet
        erasure.apply = in_indexes(half)
    elif point == "parts_ids_only":    # every embedding part's rows marked erased (ids zeroed), their vectors not
        erasure.apply = lambda erasures: (ids_only if any("embeddings" in p.parts for p in erasures) else apply)(erasures)
    elif point == "purge_embeddings":  # indexes and embedding parts erased; the ledger's rows, images, proof not yet
        forgetting.Forgetting._purge_embeddings = die
    elif point == "prove":             # names zeroed in the name file; the ledger still points at them
        forgetting.Forgetting._prove = die
    elif point == "statistics":        # the pruning statistics' ledger rows without the forgotten, their file not yet
        import vismem_assets.reliability as reliability
        reliability.save = die
    from vismem_assets.cli import main
    main(sys.argv[2:])
    print("UNREACHED", flush=True)
"""

SANDAL_ARGS = ["forget", "--label", "Sandal", *WHO_ARGS]
SANDAL = ForgetRequest(**WHO, label="Sandal")


def crash(home: Path, point: str, *args) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT), point, "--home", str(home),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "KILLED" in proc.stdout and "UNREACHED" not in proc.stdout


def assert_pending_and_blocked(memory: Memory, request_id: str, ids: list[str]) -> None:
    q = memory.ledger.query
    assert q("SELECT state FROM forget_requests WHERE request_id = ?", [request_id])["state"].to_list() == ["pending"]
    assert q("SELECT count(*) AS n FROM deletions")["n"][0] == 0
    assert set(q("SELECT status FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [ids])["status"]) == {"forgotten"}
    report = memory.audit.verify()
    assert not report.ok
    assert any(request_id in p and "pending" in p for p in report.problems), report.problems


def sandal_ids(sources) -> list[str]:
    return [sid(f) for s in ("A", "B") for f in pngs(sources[s] / "Sandal")]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["erase", "erase_half"])
def test_killed_mid_erasure_the_memory_still_searches_then_resumed(mem, sources, encoder, point):
    pre = capture(mem)
    ids = sandal_ids(sources)
    gone = {pre["vector_id"][s] for s in ids}

    crash(mem.layout.root, point, *SANDAL_ARGS)

    after = Memory(mem.layout.root, encoder=encoder)
    assert_pending_and_blocked(after, SANDAL.request_id, ids)
    live = after.indexes.live()                                   # the new live version is recorded ...
    assert live.operation == "forget" and live.version == 3
    v1 = after.layout.absolute(after.ledger.query("SELECT path FROM index_versions WHERE version = 1")["path"][0])
    assert faiss_ids(v1) & gone                                   # ... its bytes not (all) erased yet
    assert any("v000001" in p and "forgotten vector" in p for p in after.audit.verify().problems)
    # Searching still works (each file checked as it will be once erased) and finds none of them.
    _, index = after.live_index()
    assert not set(index_ids(index).tolist()) & gone and index.ntotal == len(pre["live"]["ids"] - gone)
    sims, found = after.search(index_vectors(index)[:5], k=index.ntotal)
    assert not set(found.ravel().tolist()) & gone
    # Already blocked: re-ingesting the set does not bring them back.
    again = after.add(sources["A"])
    assert again.ingest.blocked == 4 and again.ingest.added == 0 and again.index_version == 3
    assert set(after.ledger.query("SELECT status FROM samples WHERE label = 'Sandal'")["status"]) == {"forgotten"}

    assert after.resume_forgetting() == [SANDAL.request_id]

    assert_forgotten(after, pre, ids, SANDAL.request_id)
    assert after.resume_forgetting() == []
    rc, out, _ = cli(after.layout.root, "forget", "--resume")
    assert rc == 0 and "finished 0 pending forget request(s)" in out


@pytest.mark.slow
def test_killed_with_the_parts_rows_marked_but_not_zeroed_then_resumed(mem, sources, encoder):
    pre = capture(mem)
    ids = sandal_ids(sources)

    crash(mem.layout.root, "parts_ids_only", *SANDAL_ARGS)

    after = Memory(mem.layout.root, encoder=encoder)
    assert_pending_and_blocked(after, SANDAL.request_id, ids)
    problems = after.audit.verify().problems
    assert any("embeddings/" in p and "erased rows that still hold a vector" in p for p in problems), problems
    assert after.resume_forgetting() == [SANDAL.request_id]     # every hole in those parts patched again
    assert_forgotten(after, pre, ids, SANDAL.request_id)


@pytest.fixture(scope="module")
def crashed_after_index_purge(base_home, tmp_path_factory, encoder, sources) -> tuple[Path, dict]:
    """A home where `vismem forget --label Sandal` was killed after the indexes were purged."""
    home = tmp_path_factory.mktemp("crashed") / "home"
    pre = capture(copy_home(base_home, home, encoder))
    crash(home, "purge_embeddings", *SANDAL_ARGS)
    return home, pre


@pytest.mark.slow
def test_killed_after_the_index_purge_then_the_same_command_again(crashed_after_index_purge, tmp_path, encoder, sources):
    home, pre = crashed_after_index_purge
    after = copy_home(home, tmp_path / "home", encoder)
    ids = sandal_ids(sources)
    assert_pending_and_blocked(after, SANDAL.request_id, ids)
    problems = after.audit.verify().problems
    assert not any("embeddings/" in p for p in problems), problems   # (erased beside the indexes)
    assert any("images/" in p and "image of a forgotten sample" in p for p in problems), problems

    proc = vismem(after.layout.root, *SANDAL_ARGS, "--json")       # the same request, run again

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["request_id"] == SANDAL.request_id
    assert_forgotten(after, pre, ids, SANDAL.request_id)
    assert after.ledger.query("SELECT count(*) AS n FROM forget_requests")["n"][0] == 1


def test_retry_after_a_crash_keeps_the_rewritten_versions_in_the_proof(crashed_after_index_purge, tmp_path, encoder):
    home, _ = crashed_after_index_purge
    after = copy_home(home, tmp_path / "home", encoder)
    rewritten = after.ledger.query("SELECT version FROM index_rewrites WHERE request_id = ?",
                                   [SANDAL.request_id])["version"].to_list()
    assert rewritten == [1]                                       # done before the crash
    after.resume_forgetting()
    slug = after.ledger.query("SELECT slug FROM encoders")["slug"][0]
    proof_versions = set(after.ledger.query("SELECT versions_rewritten FROM deletions")["versions_rewritten"])
    assert proof_versions == {json.dumps([f"{slug}:1"])}


def test_retry_after_a_crash_reports_what_the_request_forgot(crashed_after_index_purge, tmp_path, encoder):
    home, _ = crashed_after_index_purge
    after = copy_home(home, tmp_path / "home", encoder)
    report = after.forget(SANDAL)
    assert after.ledger.query("SELECT state FROM forget_requests")["state"].to_list() == ["applied"]
    assert report.n_samples == 6 and report.per_label() == {"Sandal": 6}


@pytest.mark.slow
def test_killed_between_erasing_names_and_the_proof_a_retry_finishes(mem, sources, encoder):
    names = [f.name for s in ("A", "B") for f in pngs(sources[s] / "Sandal")]
    assert all(n.encode() in names_bytes(mem.layout.root) for n in names)

    crash(mem.layout.root, "prove", *SANDAL_ARGS)

    after = Memory(mem.layout.root, encoder=encoder)
    assert [n for n in names if n.encode() in stored_bytes(after.layout.root)] == []  # zeroed before the crash
    assert not after.audit.verify().ok                             # ... but the ledger still points at them
    after.resume_forgetting()
    assert vismem(after.layout.root, *SANDAL_ARGS).returncode == 0
    report = after.audit.verify()
    assert report.ok, report.problems
    kept = after.ledger.query("SELECT original_name(name_pos, name_len) AS n FROM sample_sources"
                              " WHERE name_pos IS NOT NULL")["n"].to_list()
    assert kept and all(n and "\0" not in n for n in kept)        # the other names read back whole


@pytest.mark.slow
def test_killed_between_the_statistics_rows_and_their_file_a_retry_finishes(mem, sources, encoder):
    from vismem_assets import pruning, reliability
    pre = capture(mem)
    ids = sandal_ids(sources)
    gone = np.array(sorted(pre["vector_id"][s] for s in ids))
    mem.pruning.reliability(5)

    crash(mem.layout.root, "statistics", *SANDAL_ARGS)

    after = Memory(mem.layout.root, encoder=encoder)
    assert_pending_and_blocked(after, SANDAL.request_id, ids)
    after.resume_forgetting()
    assert_forgotten(after, pre, ids, SANDAL.request_id)
    run = after.ledger.query("SELECT index_version, mode, path FROM reliability_runs WHERE k = 5")
    assert run["mode"].to_list() == ["forget"]
    kept = reliability.load(after.layout.absolute(run["path"][0]))   # the file, and the rows the crash left: the same
    assert not np.isin(kept.vector_ids, gone).any() and not np.isin(kept.neighbors, gone).any()
    rows = after.ledger.query("SELECT vector_id, v FROM reliability WHERE k = 5 ORDER BY vector_id")
    assert rows["vector_id"].to_list() == kept.vector_ids.tolist() and rows["v"].to_list() == kept.v.tolist()
    refilled, _ = after.pruning.reliability(5)
    _, index = after.live_index()
    catalog = after.catalog()
    codes = dict(zip(catalog.vector_ids.tolist(), (pruning.label_code(catalog.label_names[c]) for c in catalog.label_codes)))
    held = index_ids(index)
    assert reliability.equal(refilled, reliability.compute(held, index_vectors(index), [codes[i] for i in held.tolist()], 5))


# ---- requests that name nothing, or are incomplete -------------------------------------------------------------

UNKNOWN = {
    "sample": lambda s, t: ({"sample_ids": ["ab" * 32]}, ["--sample", "ab" * 32], "unknown sample id"),
    "image": lambda s, t: ({"images": [str(pngs(s["test"] / "Coat")[0])]}, ["--image", pngs(s["test"] / "Coat")[0]],
                           "unknown image"),
    "label": lambda s, t: ({"label": "Unicorn"}, ["--label", "Unicorn"], "Unicorn"),
    "image_set": lambda s, t: ({"image_set": "nope"}, ["--set", "nope"], "unknown image set 'nope'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_unknown_target_is_a_clear_error_and_changes_nothing(mem, sources, tmp_path, kind):
    target, args, says = UNKNOWN[kind](sources, tmp_path)
    before = snapshot(mem)

    with pytest.raises(ForgetError, match=says):
        mem.forget(ForgetRequest(**WHO, **target))
    assert_unchanged(mem, before)

    if kind == "sample":   # a real process once; the same entry point in-process for the others
        proc = vismem(mem.layout.root, "forget", *args, *WHO_ARGS)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        rc, out, err = cli(mem.layout.root, "forget", *args, *WHO_ARGS)
    assert rc == 2
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vismem forget: error:")
    assert says in err
    assert_unchanged(mem, before)
    assert mem.ledger.query("SELECT count(*) AS n FROM forget_requests")["n"][0] == 0
    assert mem.ledger.query("SELECT count(*) AS n FROM deletions")["n"][0] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_target_error_says_nothing_was_changed(mem, sources, tmp_path, kind):
    target, _, _ = UNKNOWN[kind](sources, tmp_path)
    with pytest.raises(ForgetError, match="nothing was changed"):
        mem.forget(ForgetRequest(**WHO, **target))


def test_unreadable_image_file_is_a_clear_error(mem, tmp_path):
    before = snapshot(mem)
    with pytest.raises(ForgetError, match="cannot read .*missing.png"):
        mem.forget(ForgetRequest(**WHO, images=[str(tmp_path / "missing.png")]))
    rc, out, err = cli(mem.layout.root, "forget", "--image", tmp_path / "missing.png", *WHO_ARGS)
    assert rc == 2 and out == "" and "cannot read" in err
    assert_unchanged(mem, before)


@pytest.mark.slow
def test_who_and_why_are_required(mem):
    before = snapshot(mem)
    for fields, says in (({"requested_by": "", "reason": "x"}, "requested_by"),
                         ({"requested_by": "  ", "reason": "x"}, "requested_by"),
                         ({"requested_by": "alice", "reason": ""}, "reason"),
                         ({"requested_by": "alice", "reason": "x", "category": "whim"}, "unknown category")):
        with pytest.raises(ForgetError, match=says):
            mem.forget(ForgetRequest(label="Sandal", **fields))
    with pytest.raises(ForgetError, match="exactly one"):
        mem.forget(ForgetRequest(**WHO, label="Sandal", image_set="B"))
    proc = vismem(mem.layout.root, "forget", "--label", "Sandal", "--reason", "x")
    assert proc.returncode == 2 and "requested_by" in proc.stderr and "Traceback" not in proc.stderr
    rc, _, err = cli(mem.layout.root, "forget", "--label", "Sandal", "--requested-by", "alice")
    assert rc == 2 and "reason" in err
    assert_unchanged(mem, before)


# ---- exactly once -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_same_request_twice_is_applied_once(mem):
    first = mem.forget(SANDAL)
    state = snapshot(mem)

    second = mem.forget(SANDAL)

    assert first.n_samples == 6 and not first.already_applied
    assert second.already_applied and second.request_id == first.request_id and second.index_versions == []
    rc, out, _ = cli(mem.layout.root, *SANDAL_ARGS)
    assert rc == 0 and "already applied" in out
    assert_unchanged(mem, state)
    assert mem.ledger.query("SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM deletions").row(0) == (6, 6)
    # Another request naming only forgotten samples has nothing to do, and says so.
    with pytest.raises(ForgetError, match="already forgotten"):
        mem.forget(ForgetRequest(requested_by="bob", reason="again", label="Sandal"))
    assert_unchanged(mem, state)


# ---- tampering is detected ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forgotten_home(base_home, tmp_path_factory, encoder, sources) -> Path:
    """Two applied requests: alice forgets Sandal (gdpr, seq 1-6), bob two samples (license, seq 7-8)."""
    home = tmp_path_factory.mktemp("forgotten") / "home"
    memory = copy_home(base_home, home, encoder)
    memory.forget(SANDAL)
    memory.forget(ForgetRequest(requested_by="bob", reason="licence withdrawn", category="license",
                                sample_ids=[sid(pngs(sources["A"] / "Bag")[0]), sid(pngs(sources["B"] / "Trouser")[0])]))
    assert memory.ledger.query("SELECT count(*) AS n FROM deletions")["n"][0] == 8
    assert memory.audit.verify().ok
    return home


@pytest.fixture
def fmem(forgotten_home, tmp_path, encoder) -> Memory:
    return copy_home(forgotten_home, tmp_path / "home", encoder)


def tamper_sql(memory: Memory, *statements) -> None:
    con = duckdb.connect(str(memory.layout.ledger))       # no vismem connection is open
    try:
        for s in statements:
            con.execute(s)
    finally:
        con.close()


def test_a_row_hash_is_the_sha256_of_its_compact_json_whichever_values_were_encoded_before():
    import datetime
    at = datetime.datetime(2026, 12, 6, 3, 0, 1, 123456)
    rows = [{"seq": seq, "request_id": "r" * 64, "sample_id": f"{seq:064x}", "label": label, "requested_by": "dpo@example.com",
             "reason": "licence \u2014 withdrawn", "category": None, "external_ref": 'T-"1"', "requested_at": at,
             "applied_at": at + datetime.timedelta(seconds=seq), "versions_rewritten": json.dumps(["a:1", "b:2"])}
            for seq, label in enumerate(["Bag", 'a "quoted"\n label', "\u00dcn\u00efc\u00f8d\u00e9 \u2713", None, "Bag"], 1)]
    shared = {}   # (kept across rows, as a request's proof keeps it)
    for row in rows:
        canonical = json.dumps([row[k] for k in HASHED_FIELDS], default=str, separators=(",", ":"))
        want = hashlib.sha256(("prev" + canonical).encode()).hexdigest()
        assert row_hash("prev", row) == row_hash("prev", row, shared) == want


def recompute_chain(memory: Memory) -> None:
    """What a careful forger does: fix every prev_hash/row_hash so the chain itself checks out."""
    con = duckdb.connect(str(memory.layout.ledger))
    try:
        rows = con.execute(f"SELECT {', '.join(HASHED_FIELDS)} FROM deletions ORDER BY seq").fetchall()
        prev = GENESIS
        for values in rows:
            fields = dict(zip(HASHED_FIELDS, values))
            digest = row_hash(prev, fields)
            con.execute("UPDATE deletions SET prev_hash = ?, row_hash = ? WHERE seq = ?", [prev, digest, fields["seq"]])
            prev = digest
    finally:
        con.close()


TAMPERING = {
    "changed": (lambda m: tamper_sql(m, "UPDATE deletions SET requested_by = 'mallory' WHERE seq = 3"),
                r"seq=3 .*row_hash does not match its content"),
    "deleted": (lambda m: tamper_sql(m, "DELETE FROM deletions WHERE seq = 4"),
                r"seq=5 .*follows seq=3"),
    "reordered": (lambda m: tamper_sql(m, "UPDATE deletions SET seq = 100 WHERE seq = 2",
                                       "UPDATE deletions SET seq = 2 WHERE seq = 3",
                                       "UPDATE deletions SET seq = 3 WHERE seq = 100"),
                  r"seq=2 .*(prev_hash|row_hash) does not match"),
    "truncated": (lambda m: tamper_sql(m, "DELETE FROM deletions WHERE seq >= 7"),
                  r"v\d{6}\.json records 8 deletions .*ledger holds 6: the chain was truncated"),
    "rechained": (lambda m: (tamper_sql(m, "UPDATE deletions SET reason = 'routine cleanup' WHERE seq = 2"),
                             recompute_chain(m)),
                  r"v\d{6}\.json: chain head .* is not deletions row seq=8: the chain was rewritten"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_deletions_are_detected(fmem, how):
    tamper, says = TAMPERING[how]
    tamper(fmem)

    report = fmem.audit.verify()

    assert not report.ok
    assert any(re.search(says, p) for p in report.problems), report.problems
    if how in ("truncated", "rechained"):   # the chain alone checks out: only the manifests catch it
        assert not [p for p in report.problems if p.startswith("deletions row")], report.problems
    rc, out, err = cli(fmem.layout.root, "audit", "verify")
    assert rc == 1 and "FAILED" in err and re.search(says, err), err


@pytest.mark.slow
def test_tampered_row_fails_verify_in_a_real_process(fmem):
    assert vismem(fmem.layout.root, "audit", "verify").returncode == 0
    tamper_sql(fmem, "UPDATE deletions SET label = 'Coat' WHERE seq = 5")
    proc = vismem(fmem.layout.root, "audit", "verify")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "deletions row seq=5" in proc.stderr and "changed" in proc.stderr
    rc, out, _ = cli(fmem.layout.root, "audit", "verify", "--json")
    assert rc == 1 and json.loads(out)["ok"] is False
    assert any("seq=5" in p for p in json.loads(out)["problems"])


def test_a_forgotten_vector_put_back_into_a_retained_file_is_found(fmem, base_home, sources):
    sandal = sid(pngs(sources["A"] / "Sandal")[0])
    vid = fmem.ledger.query("SELECT vector_id FROM samples WHERE sample_id = ?", [sandal])["vector_id"][0]
    retained = fmem.layout.absolute(fmem.ledger.query("SELECT path FROM index_versions WHERE version = 1")["path"][0])
    before = base_home / "indexes" / retained.parent.name / retained.name
    assert sha_bytes(retained.read_bytes()) != sha_bytes(before.read_bytes())   # the Sandals erased in place
    assert len(hole_vectors(retained)) and vid not in faiss_ids(retained)
    pristine = faiss.read_index(str(before))
    vector = pristine.reconstruct(int(vid))                      # the vector as it was before forgetting
    index = faiss.read_index(str(retained))
    index.add_with_ids(vector[None, :].astype(np.float32), np.array([vid], dtype=np.int64))
    faiss.write_index(index, str(retained))

    report = fmem.audit.verify()

    rel = fmem.layout.relative(retained)
    assert any(p.startswith(rel) and f"id {vid}" in p for p in report.problems), report.problems
    rc, _, err = cli(fmem.layout.root, "audit", "verify")
    assert rc == 1 and rel in err


def test_a_forgotten_vector_written_back_into_its_hole_is_found(fmem, base_home):
    retained = fmem.layout.absolute(fmem.ledger.query("SELECT path FROM index_versions WHERE version = 1")["path"][0])
    holes = erasure.index_holes(retained, [], holes_too=True)
    assert len(holes)
    before = faiss.read_index(str(base_home / "indexes" / retained.parent.name / retained.name))
    with open(retained, "r+b") as f:                             # the bytes only, the id stays -1
        f.seek(int(holes.patches[0].offsets[0]))
        f.write(index_vectors(before)[0].tobytes())

    report = fmem.audit.verify()

    assert report.problems == [f"{fmem.layout.relative(retained)} has holes whose bytes were not erased"]


@pytest.mark.slow
def test_a_forgotten_image_dropped_back_into_the_store_is_found(fmem, sources):
    src = pngs(sources["B"] / "Sandal")[0]
    target = fmem.layout.images / sid(src)[:2] / f"{sid(src)}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(src.read_bytes())

    report = fmem.audit.verify()

    rel = fmem.layout.relative(target)
    assert report.problems == [f"{rel} is the image of a forgotten sample"]
    rc, _, err = cli(fmem.layout.root, "audit", "verify")
    assert rc == 1 and rel in err
    proc = vismem(fmem.layout.root, "audit", "proof", src)
    assert proc.returncode == 1 and "NOT gone" in proc.stdout and rel in proc.stdout


# ---- audit queries ----------------------------------------------------------------------------------------------

def test_audit_queries_from_the_command_line(fmem, sources):
    home = fmem.layout.root
    rc, out, err = cli(home, "audit", "query", "deletions_by_requester", "--param", "requested_by=alice", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [(r["requested_by"], r["requests"], r["samples_forgotten"]) for r in rows] == [("alice", 1, 6)]
    assert rows[0]["first_applied"] == rows[0]["last_applied"]
    rc, out, _ = cli(home, "audit", "query", "deletions_by_requester", "--json")
    assert [(r["requested_by"], r["samples_forgotten"]) for r in json.loads(out)] == [("alice", 6), ("bob", 2)]

    rc, out, _ = cli(home, "audit", "query", "deletions_by_category", "--csv")
    assert rc == 0
    assert list(csv.reader(io.StringIO(out))) == [["category", "requests", "samples_forgotten", "labels_touched"],
                                                  ["gdpr", "1", "6", "1"], ["license", "1", "2", "2"]]

    sandal = sid(pngs(sources["A"] / "Sandal")[1])
    rc, out, _ = cli(home, "audit", "query", "proof_of_forgetting", "--param", f"sample_id={sandal}", "--json")
    (row,) = json.loads(out)
    assert (row["sample_id"], row["label"], row["status"], row["requested_by"], row["category"]) == \
           (sandal, "Sandal", "forgotten", "alice", "gdpr")
    assert row["arrived_with"] == "A" and row["arrived_at"] and row["applied_at"]
    assert row["name_and_path_redacted"] is True
    slug = fmem.ledger.query("SELECT slug FROM encoders")["slug"][0]
    assert json.loads(row["versions_rewritten"]) == [f"{slug}:1"]
    assert row["row_hash"] == fmem.ledger.query("SELECT row_hash FROM deletions WHERE sample_id = ?", [sandal])["row_hash"][0]

    # Size over time: v1 = A (16), v2 = A + B (24), v3 = alice's forget (18), v4 = bob's (16); the
    # retained ones lost their forgotten vectors later (v2, superseded by v3, was purged).
    rc, out, _ = cli(home, "audit", "query", "memory_size_over_time", "--json")
    sizes = {r["version"]: r for r in json.loads(out)}
    assert [(v, sizes[v]["operation"], sizes[v]["n_vectors_when_written"]) for v in sorted(sizes)] == \
           [(1, "add", 16), (2, "add", 24), (3, "forget", 18), (4, "forget", 16)]
    assert sizes[1]["n_vectors_now"] == 16 - 4 - 1 and sizes[4]["n_vectors_now"] == 16
    assert [sizes[v]["status"] for v in sorted(sizes)][-1] == "live"
    for v, r in sizes.items():
        if r["status"] != "purged":
            assert r["n_vectors_now"] == len(faiss_ids(home / fmem.ledger.query(
                "SELECT path FROM index_versions WHERE version = ?", [v])["path"][0]))

    rc, out, _ = cli(home, "audit", "query", "index_lineage", "--json")
    lineage = json.loads(out)
    assert [(r["version"], r["parent_version"], r["operation"]) for r in lineage] == \
           [(1, None, "add"), (2, 1, "add"), (3, 2, "forget"), (4, 3, "forget")]
    assert [(r["n_added"], r["n_removed"]) for r in lineage] == [(16, 0), (8, 0), (0, 6), (0, 2)]
    for r in lineage:
        if r["status"] != "purged":
            assert r["sha256"] == index_digest(home / r["path"])

    rc, out, err = cli(home, "audit", "query", "no_such_query")
    assert rc == 2 and "no audit query" in err


def test_every_audit_sql_file_runs_in_plain_duckdb(fmem, sources, monkeypatch):
    """As a user runs them in the duckdb CLI started in the memory home: SET VARIABLE, then the
    file's text, read-only."""
    sandal = sid(pngs(sources["B"] / "Sandal")[0])
    params = {"proof_of_forgetting": {"sample_id": sandal}, "deletions_by_requester": {"requested_by": "bob"}}
    expected = {name: fmem.ledger.run_named(name, params.get(name)).rows() for name in audit_queries()}
    assert {"deletions_by_requester", "deletions_by_category", "proof_of_forgetting", "index_lineage",
            "memory_size_over_time", "forget_requests"} <= set(expected)

    monkeypatch.chdir(fmem.layout.root)  # where names.bin is found
    con = duckdb.connect(str(fmem.layout.ledger), read_only=True)
    try:
        for name in audit_queries():
            for key, value in params.get(name, {}).items():
                con.execute(f"SET VARIABLE {key} = '{value}'")
            rows = con.execute((REPO / "sql" / "audit" / f"{name}.sql").read_text()).fetchall()
            assert rows == expected[name], name
            for key in params.get(name, {}):
                con.execute(f"RESET VARIABLE {key}")
        assert expected["deletions_by_requester"][0][:3] == ("bob", 1, 2)
        assert expected["proof_of_forgetting"][0][:3] == (sandal, "Sandal", "forgotten")
        # The period parameters, as a duckdb CLI user sets them (`from` and `to` are SQL keywords: quoted).
        con.execute("SET VARIABLE \"to\" = '2000-01-01'")
        assert con.execute((REPO / "sql/audit/deletions_by_category.sql").read_text()).fetchall() == []
        con.execute("RESET VARIABLE \"to\"")
        con.execute("SET VARIABLE \"from\" = '2000-01-01'")
        assert [r[0] for r in con.execute((REPO / "sql/audit/deletions_by_category.sql").read_text()).fetchall()] == \
               ["gdpr", "license"]
    finally:
        con.close()


# ---- proof for one sample --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_audit_proof_for_a_file_and_for_a_sample_still_held(fmem, sources):
    home = fmem.layout.root
    src = pngs(sources["A"] / "Sandal")[2]
    proc = vismem(home, "audit", "proof", src)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"sample   {sid(src)}" in out and "status   forgotten" in out and "label    Sandal" in out
    assert "arrived  " in out and "with set(s) A" in out
    assert "by alice (gdpr): asked to be removed" in out
    assert "requested " in out and "applied " in out and "versions rewritten [" in out
    assert "present nowhere now" in out

    rc, out, _ = cli(home, "audit", "proof", sid(src), "--json")
    proof = json.loads(out)
    assert rc == 0 and proof["present_nowhere"] is True and proof["traces"] == []
    assert [r["requested_by"] for r in proof["requests"]] == ["alice"]

    kept = pngs(sources["A"] / "Sneaker")[0]
    rc, out, err = cli(home, "audit", "proof", sid(kept))
    assert rc == 1 and "not forgotten: it is still in the memory" in out and "present nowhere" not in out
    rc, out, err = cli(home, "audit", "proof", "cd" * 32)
    assert rc == 2 and "never held" in err


def test_period_parameters_of_the_audit_queries(fmem):
    rows = fmem.ledger.run_named("deletions_by_requester", {"from": "2000-01-01", "to": "2999-01-01"})
    assert rows["requested_by"].to_list() == ["alice", "bob"]
    assert fmem.ledger.run_named("deletions_by_category", {"from": "2999-01-01"}).is_empty()
    rc, out, err = cli(fmem.layout.root, "audit", "query", "deletions_by_requester", "--param", "to=2000-01-01", "--json")
    assert rc == 0 and json.loads(out) == [], err
