"""Holes in forgetting (issue 15, findings 7, 9 and 10), with real Fashion-MNIST images, the
real encoder, the real DuckDB ledger file, and `vismem` through its CLI entry point.

7. Un-forgetting by hand: a forgotten sample's `samples` row deleted (or its status flipped)
   with the duckdb module. Ingest still refuses the bytes (the blocklist also reads the chained
   `deletions`), and `audit verify` names the tampering.
9. `forget --set` of a set with label-less and unreadable files: no crash, and every file name
   the set brought (quarantine rows without a sample id too) leaves names.bin and the audit query.
10. Near-copies of a forgotten image (a byte appended, re-encoded, JPEG, a pixel changed) are
   refused by their perceptual hash; ~1,000 other Fashion-MNIST images are not.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from vismem_assets import fashion_mnist, near_copies
from vismem_assets.cli import main as cli_main
from vismem_assets.fashion_mnist import write_image_folders
from vismem_assets.forgetting import NO_LABEL, ForgetRequest
from vismem_assets.ingest import BLOCKED_EXACT
from vismem_assets.memory import Memory
from vismem_assets.names import NAMES_FILE

LABELS = ("Bag", "Trouser", "Sneaker", "Sandal")
WHO = dict(requested_by="alice", reason="asked to be removed", category="gdpr")
WHO_ARGS = ["--requested-by", "alice", "--reason", "asked to be removed", "--category", "gdpr"]


def sid(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(home: Path, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["--home", str(home), *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def hand_edit(memory: Memory, *statements) -> None:
    """What someone with the duckdb module does to the ledger file (no vismem connection is open)."""
    con = duckdb.connect(str(memory.layout.ledger))
    try:
        for s in statements:
            con.execute(s)
    finally:
        con.close()


# ---- one small memory, copied by every test ---------------------------------------------------------

@pytest.fixture(scope="module")
def set_a(tmp_path_factory, fm_sets) -> Path:
    """Set A: 3 Fashion-MNIST images of each of 4 labels."""
    root = tmp_path_factory.mktemp("holes") / "A"
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for f in sorted((fm_sets["train"] / label).glob("*.png"))[:3]:
            shutil.copy(f, root / label / f.name)
    return root


@pytest.fixture(scope="module")
def base_home(tmp_path_factory, set_a, encoder) -> Path:
    home = tmp_path_factory.mktemp("holes-base") / "home"
    report = Memory(home, encoder=encoder).add(set_a)
    assert (report.ingest.added, report.n_vectors) == (12, 12)
    return home


@pytest.fixture
def mem(base_home, tmp_path, encoder) -> Memory:
    shutil.copytree(base_home, tmp_path / "home")
    return Memory(tmp_path / "home", encoder=encoder)


def forget_two(mem: Memory, set_a: Path) -> list[Path]:
    gone = [sorted((set_a / "Trouser").glob("*.png"))[0], sorted((set_a / "Bag").glob("*.png"))[1]]
    mem.forget(ForgetRequest(**WHO, sample_ids=[sid(f) for f in gone]))
    assert mem.audit.verify().ok
    return gone


# ---- 7: un-forgetting by hand ------------------------------------------------------------------------

def test_deleting_forgotten_rows_by_hand_neither_lets_the_images_back_nor_passes_the_audit(mem, set_a):
    gone = forget_two(mem, set_a)
    ids = [sid(f) for f in gone]
    hand_edit(mem, f"DELETE FROM samples WHERE sample_id IN ({', '.join(repr(i) for i in ids)})")

    again = mem.add(set_a)

    assert (again.ingest.blocked, again.ingest.added, again.ingest.duplicates, again.embedded) == (2, 0, 10, 0)
    assert sorted(b["name"] for b in again.ingest.blocked_files) == sorted(f"{f.parent.name}/{f.name}" for f in gone)
    assert {b["reason"] for b in again.ingest.blocked_files} == {BLOCKED_EXACT}
    assert mem.ledger.query("SELECT count(*) AS n FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                            [ids])["n"][0] == 0
    assert not [p for p in mem.layout.images.rglob("*") if p.is_file() and sid(p) in ids]
    # The audit names each sample and what was done to it.
    report = mem.audit.verify()
    for i in ids:
        assert any(re.search(rf"forgot sample {i[:16]}….*`samples` has no row for it: the row was deleted by hand", p)
                   for p in report.problems), report.problems
    rc, _, err = cli(mem.layout.root, "audit", "verify")
    assert rc == 1 and "deleted by hand (un-forgetting)" in err


def test_a_forgotten_status_flipped_back_to_active_by_hand_is_caught(mem, set_a):
    gone = forget_two(mem, set_a)
    flipped = sid(gone[0])
    hand_edit(mem, f"UPDATE samples SET status = 'active' WHERE sample_id = '{flipped}'")

    report = mem.audit.verify()

    assert any(re.search(rf"forgot sample {flipped[:16]}…, but `samples` says its status is 'active': it was changed "
                         "by hand", p) for p in report.problems), report.problems
    # ... and its bytes are still refused.
    again = mem.ingest(set_a)
    assert again.blocked == 2 and again.added == 0


def test_forgotten_images_brought_back_past_every_blocklist_are_found_in_the_index_store_and_embeddings(mem, set_a):
    """The worst case: the rows deleted, the blocklist view emptied and the perceptual hashes
    dropped by hand, so the set's re-add embeds and indexes the forgotten images again (as a
    vismem without these checks did). The audit finds them by the chained deletions."""
    gone = forget_two(mem, set_a)
    ids = [sid(f) for f in gone]
    hand_edit(mem, f"DELETE FROM samples WHERE sample_id IN ({', '.join(repr(i) for i in ids)})",
              "DELETE FROM blocklist_phashes", "CREATE OR REPLACE VIEW blocklist AS SELECT * FROM"
              " (SELECT NULL::VARCHAR AS sample_id, NULL AS label, NULL AS request_id, NULL AS applied_at, NULL AS phash)"
              " WHERE false")
    again = mem.add(set_a)
    assert (again.ingest.added, again.embedded) == (2, 2)                     # back, as before the fix

    problems = mem.audit.verify().problems

    new_vids = mem.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                [ids])["vector_id"].to_list()
    for i in ids:
        assert any(re.search(rf"forgot sample {i[:16]}….*status is 'active'", p) for p in problems), problems
        assert any(re.search(rf"images/.*{i}.* is the image of a forgotten sample", p) for p in problems), problems
        assert any(re.search(rf"forgotten sample {i[:16]}… has no blocklist_phashes row", p) for p in problems)
    live = mem.ledger.query("SELECT path FROM index_versions WHERE status = 'live'")["path"][0]
    assert any(p.startswith(live) and "forgotten vector(s)" in p and any(f"id {v}" in p for v in new_vids)
               for p in problems), problems
    assert any(p.startswith("embeddings/") and "forgotten embedding" in p for p in problems), problems


def test_the_audit_cross_checks_requests_deletions_and_perceptual_hashes(mem, set_a):
    gone = forget_two(mem, set_a)
    ids = sorted(sid(f) for f in gone)
    report = mem.audit.verify()
    assert report.blocklist == {"sample_ids": 2, "perceptual_hashes": 2, "without_perceptual_hash": 0}
    rc, out, _ = cli(mem.layout.root, "audit", "verify")
    assert rc == 0 and "kept by design (the blocklist): 2 forgotten sha256, 2 perceptual hashes" in out

    hand_edit(mem, f"DELETE FROM deletions WHERE sample_id = '{ids[1]}'",
              f"DELETE FROM blocklist_phashes WHERE sample_id = '{ids[0]}'",
              "INSERT INTO blocklist_phashes VALUES ('" + "ab" * 32 + "', NULL, 'x', NULL, 'planted', now())")
    problems = mem.audit.verify().problems

    assert any(re.search(rf"was applied to sample {ids[1][:16]}…, but no deletions row proves it", p) for p in problems)
    assert any(re.search(rf"forgotten sample {ids[0][:16]}… has no blocklist_phashes row", p) for p in problems)
    assert any("blocklist_phashes holds a perceptual hash of sample abababab" in p for p in problems), problems


# ---- 9: forgetting a set with label-less and unreadable files ----------------------------------------

SECRET_NAMES = ("alice-passport-scan.png", "bob-no-label.png", "carol-notes.txt", "dave-broken.png")


@pytest.fixture
def set_m(tmp_path, fm_sets) -> Path:
    """Manifest set M: 4 labelled images, one image with an empty label, a text file, a broken
    PNG without a label, and a row naming a file that is not there (no bytes: no sample id)."""
    folder = tmp_path / "m-files"
    folder.mkdir()
    rows = []
    for label in ("Coat", "Dress"):
        for f in sorted((fm_sets["test"] / label).glob("*.png"))[:2]:
            shutil.copy(f, folder / f.name)
            rows.append((f.name, label))
    shutil.copy(sorted((fm_sets["test"] / "Shirt").glob("*.png"))[0], folder / "bob-no-label.png")
    (folder / "carol-notes.txt").write_text("not an image at all\n")
    (folder / "dave-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows += [("alice-passport-scan.png", "Coat"), ("bob-no-label.png", ""), ("carol-notes.txt", "Dress"),
             ("dave-broken.png", "")]
    manifest = folder / "M.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return manifest


@pytest.mark.parametrize("as_json", [False, True])
def test_forget_set_with_label_less_and_unreadable_files(mem, set_m, as_json):
    home = mem.layout.root
    added = mem.add(set_m)
    assert added.ingest.added == 4 and len(added.ingest.quarantined) == 4
    assert mem.ledger.query("SELECT count(*) AS n FROM quarantine WHERE image_set = 'M' AND sample_id IS NULL")["n"][0] == 1
    names = (home / NAMES_FILE).read_bytes()
    assert all(n.encode() in names for n in SECRET_NAMES)
    kept_names = [r for (r,) in mem.ledger.query(
        "SELECT original_name(name_pos, name_len) FROM sample_sources WHERE image_set = 'A'").rows()]

    rc, out, err = cli(home, "forget", "--set", "M", *WHO_ARGS, "--dry-run")
    assert rc == 0, err
    assert "would forget 7 sample(s)" in out and NO_LABEL in out   # 4 images, the text file, 2 label-less
    rc, out, err = cli(home, "forget", "--set", "M", *WHO_ARGS, "--dry-run", "--json")
    assert rc == 0, err
    assert json.loads(out)["per_label"] == {NO_LABEL: 2, "Coat": 2, "Dress": 3}

    rc, out, err = cli(home, "forget", "--set", "M", *WHO_ARGS, *(["--json"] if as_json else []))

    assert rc == 0, err
    if as_json:
        report = json.loads(out)
        assert report["n_samples"] == 7 and report["per_label"][NO_LABEL] == 2 and not report["dry_run"]
    else:
        assert "forgot 7 sample(s)" in out and NO_LABEL in out
    # No name the set brought is left: not in names.bin, not in the audit query, no copy in quarantine/.
    names = (home / NAMES_FILE).read_bytes()
    assert [n for n in SECRET_NAMES if n.encode() in names] == []
    rc, out, _ = cli(home, "audit", "query", "quarantined_files", "--json")
    rows = [r for r in json.loads(out) if r["image_set"] == "M"]
    assert len(rows) == 4 and {r["original_name"] for r in rows} == {"[redacted]"}
    assert {r["stored_path"] for r in rows} == {None}
    assert not [p for p in mem.layout.quarantine.rglob("*") if p.is_file()]
    # The other set keeps its names; the audit passes.
    assert kept_names and all(n.encode() in names for n in kept_names)
    assert mem.audit.verify().ok, mem.audit.verify().problems


def test_file_names_a_set_forget_left_are_found_and_erased_by_resume(mem, set_m):
    """A set forgotten before forgetting took its quarantined files' names (or whose row was put
    back by hand): the audit says so, and `forget --resume` erases them."""
    mem.add(set_m)
    mem.forget(ForgetRequest(**WHO, image_set="M"))
    requested_at = mem.ledger.query("SELECT requested_at FROM forget_requests")["requested_at"][0]
    with mem.ledger.transaction() as con:
        (pos,), (n,) = mem.ledger.names.append(con, ["erin-left-behind.png"])
        con.execute("INSERT INTO quarantine (ingest_id, image_set, sample_id, reason, stored_path, quarantined_at,"
                    " name_pos, name_len) VALUES (1, 'M', NULL, 'unreadable: gone', NULL, ?, ?, ?)",
                    [requested_at, pos, n])

    problems = mem.audit.verify().problems
    assert any(re.search(r"1 quarantine row\(s\) of image set 'M', forgotten by request .* still name a file", p)
               for p in problems), problems

    rc, _, err = cli(mem.layout.root, "forget", "--resume")
    assert rc == 0, err
    assert b"erin-left-behind.png" not in (mem.layout.root / NAMES_FILE).read_bytes()
    assert mem.audit.verify().ok


# ---- 10: near-copies of forgotten images ---------------------------------------------------------------

def near_copy_variants(original: Path, out: Path) -> dict[str, Path]:
    """The same photo four ways, none with the original's bytes."""
    data = original.read_bytes()
    pixels = np.asarray(Image.open(original))
    out.mkdir(parents=True, exist_ok=True)
    stem = original.stem
    (out / f"{stem}-appended.png").write_bytes(data + b"\0")
    Image.fromarray(pixels).save(out / f"{stem}-reencoded.png", compress_level=1)
    Image.fromarray(pixels).save(out / f"{stem}-q90.jpg", quality=90)
    changed = pixels.astype(int)
    # One pixel, in the middle, 64 levels brighter (darker where that would clip); a pixel
    # inverted at full contrast is caught less often on 28x28 images: measured in the next test.
    changed[14, 14] += 64 if changed[14, 14] + 64 <= 255 else -64
    Image.fromarray(changed.astype(np.uint8)).save(out / f"{stem}-pixel.png")
    variants = {v: out / f"{stem}-{v}.{'jpg' if v == 'q90' else 'png'}" for v in ("appended", "reencoded", "q90", "pixel")}
    assert len({sid(p) for p in variants.values()} | {sid(original)}) == 5
    return variants


@pytest.mark.slow
def test_near_copies_of_forgotten_images_stay_out_and_a_thousand_other_images_go_in(mem, set_a, fm_sets, tmp_path):
    gone = [sorted((set_a / label).glob("*.png"))[0] for label in ("Trouser", "Sneaker", "Bag")]
    report = mem.forget(ForgetRequest(**WHO, sample_ids=[sid(f) for f in gone]))
    # The perceptual hashes were kept, and the audit and the proof count them (kept by design).
    kept = mem.ledger.query("SELECT sample_id, phash, algorithm FROM blocklist_phashes ORDER BY sample_id").rows()
    assert [k[0] for k in kept] == sorted(sid(f) for f in gone)
    assert all(len(k[1]) == 64 and k[2] == near_copies.ALGORITHM for k in kept)
    assert {k[0]: k[1] for k in kept} == {sid(f): near_copies.hash_bytes(f.read_bytes()) for f in gone}  # each its own
    assert mem.audit.verify().ok and mem.audit.verify().blocklist["perceptual_hashes"] == 3
    proof = mem.audit.proof(sid(gone[0]))
    assert proof["present_nowhere"] and proof["blocklist"]["perceptual_hash"] == dict((k[0], k[1]) for k in kept)[sid(gone[0])]
    rc, out, _ = cli(mem.layout.root, "audit", "proof", gone[0])
    assert rc == 0 and "kept on the blocklist (by design): its sha256 and perceptual hash" in out
    assert report.n_samples == 3

    # The set again, the near-copies, and 1,000 Fashion-MNIST images the memory never saw.
    arriving = tmp_path / "again"
    shutil.copytree(set_a, arriving)
    variants = {}
    for f in gone:
        variants.update({(f.name, v): p for v, p in near_copy_variants(f, arriving / f.parent.name).items()})
    # ... one under a name that would have it quarantined (and copied into quarantine/) ...
    disguised = arriving / gone[0].parent.name / "not-a-photo.txt"
    disguised.write_bytes(gone[0].read_bytes() + b"\0\0")
    held = [int(p.stem.split("-")[1]) for p in fm_sets["train"].rglob("*.png")]
    write_image_folders(tmp_path / "others", "train", 1000, seed=15, exclude=np.array(held))
    for folder in (tmp_path / "others").iterdir():
        shutil.copytree(folder, arriving / folder.name, dirs_exist_ok=True)

    ingest = mem.ingest(arriving, name="again")

    blocked = {b["name"]: b["reason"] for b in ingest.blocked_files}
    assert ingest.blocked == 3 + 12 + 1 == len(blocked)
    assert blocked.pop(f"{disguised.parent.name}/{disguised.name}").startswith("near-copy of a forgotten image")
    for f in gone:
        assert blocked.pop(f"{f.parent.name}/{f.name}") == BLOCKED_EXACT
    for (_, kind), path in variants.items():
        reason = blocked[f"{path.parent.name}/{path.name}"]
        d = int(re.fullmatch(r"near-copy of a forgotten image \(perceptual hash distance (\d+) <= 20 of 256 bits\)",
                             reason).group(1))
        assert d == 0 if kind in ("appended", "reencoded") else d <= near_copies.MAX_DISTANCE
    # No false positive: every one of the 1,000 others went in, the 9 kept images of A are duplicates.
    assert (ingest.added, ingest.duplicates, ingest.quarantined) == (1000, 9, [])
    assert not [p for p in mem.layout.quarantine.rglob("*") if p.is_file()]


def test_the_distance_separates_near_copies_from_other_fashion_mnist_images():
    """The measurement behind MAX_DISTANCE (near_copies.py), smaller: 200 'forgotten' training
    images against 2,000 others (400,000 pairs: no false match), and their near-copies."""
    images, _ = fashion_mnist.load("train")
    idx = np.random.default_rng(7).permutation(len(images))
    forgotten, others = idx[:200], idx[200:2200]

    def png(pixels, **options) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", **options)
        return buf.getvalue()

    def jpeg(pixels) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    def inverted(pixels, rng) -> bytes:
        changed = pixels.copy()
        y, x = rng.integers(0, 28, 2)
        changed[y, x] = 255 - changed[y, x]
        return png(changed)

    blocklist = near_copies.NearCopyBlocklist([str(i) for i in forgotten],
                                              [near_copies.hash_bytes(png(images[i])) for i in forgotten])
    assert [i for i in others if blocklist.match(near_copies.hash_bytes(png(images[i])))] == []
    rng = np.random.default_rng(8)
    caught = {kind: [] for kind in ("appended", "reencoded", "jpeg90", "inverted")}
    for i in forgotten:
        for kind, data in (("appended", png(images[i]) + b"\0"), ("reencoded", png(images[i], compress_level=1)),
                           ("jpeg90", jpeg(images[i])), ("inverted", inverted(images[i], rng))):
            found = blocklist.match(near_copies.hash_bytes(data))
            caught[kind].append(found is not None and found[0] == str(i))
    rates = {kind: float(np.mean(v)) for kind, v in caught.items()}
    assert rates["appended"] == rates["reencoded"] == 1.0
    assert rates["jpeg90"] >= 0.97 and rates["inverted"] >= 0.95, rates


def test_a_memory_forgotten_before_perceptual_hashes_migrates_and_passes_the_audit(mem, set_a, encoder):
    """Migration 008 on a ledger whose forgotten images are erased already: a row saying no hash
    could be kept (exact bytes only), so the audit has nothing to report."""
    gone = forget_two(mem, set_a)
    hand_edit(mem, "DROP VIEW blocklist", "DROP TABLE blocklist_phashes", "DELETE FROM schema_migrations WHERE version = 8",
              "CREATE VIEW blocklist AS SELECT sample_id, label, NULL AS request_id, NULL AS applied_at FROM samples"
              " WHERE status = 'forgotten'")

    migrated = Memory(mem.layout.root, encoder=encoder)
    report = migrated.audit.verify()

    assert report.ok, report.problems
    assert report.blocklist == {"sample_ids": 2, "perceptual_hashes": 0, "without_perceptual_hash": 2}
    notes = migrated.ledger.query("SELECT note FROM blocklist_phashes")["note"].to_list()
    assert len(notes) == 2 and all("before perceptual hashes were kept" in n for n in notes)
    assert migrated.ingest(set_a).blocked == len(gone)


# ---- embeddings rows: one per (encoder, sample), kept by their writer, checked by the audit -------

def test_an_embeddings_row_written_twice_by_hand_is_named_by_the_audit(mem, encoder):
    encoder_id, sample_id, path = mem.ledger.query(
        "SELECT encoder_id, sample_id, path FROM embeddings ORDER BY sample_id LIMIT 1").row(0)
    hand_edit(mem, f"INSERT INTO embeddings VALUES ('{encoder_id}', '{sample_id}', 'embeddings/elsewhere.parquet', now())")

    problems = Memory(mem.layout.root, encoder=encoder).audit.verify().problems

    (twice,) = [p for p in problems if "embeddings rows" in p]
    assert twice.startswith(f"sample {sample_id[:16]}… has 2 embeddings rows for encoder {encoder_id}")
    assert f"({path}, embeddings/elsewhere.parquet)" in twice and "then run `vismem rebuild`" in twice


def test_a_ledger_whose_embeddings_had_a_key_migrates_with_every_row_and_forgets(mem, set_a, encoder):
    """Migration 015 rebuilds `embeddings` without its key: nothing lost, and the memory works on."""
    before = mem.ledger.query("SELECT * FROM embeddings ORDER BY sample_id")
    hand_edit(mem, "CREATE TABLE old AS SELECT * FROM embeddings", "DROP TABLE embeddings",
              "CREATE TABLE embeddings (encoder_id VARCHAR NOT NULL, sample_id VARCHAR NOT NULL, path VARCHAR NOT NULL,"
              " embedded_at TIMESTAMP NOT NULL, PRIMARY KEY (encoder_id, sample_id))",
              "INSERT INTO embeddings SELECT * FROM old", "DROP TABLE old",
              "DELETE FROM schema_migrations WHERE version = 15")

    migrated = Memory(mem.layout.root, encoder=encoder)
    assert migrated.ledger.query("SELECT * FROM embeddings ORDER BY sample_id").equals(before)
    assert migrated.ledger.query("SELECT max(version) AS v FROM schema_migrations")["v"][0] == 15
    gone = forget_two(migrated, set_a)  # (the audit passes after it)
    left = migrated.ledger.query("SELECT sample_id FROM embeddings")["sample_id"].to_list()
    assert len(left) == len(before) - 2 and not {sid(f) for f in gone} & set(left)
