"""What an image set may make vismem read, and what it refuses (issue 15, findings 2 and 13).

- A folder set reads only regular files that resolve inside the set folder: symlinks to files
  outside it (/etc/passwd, a secret next to the set) and label folders linked elsewhere (/etc)
  are refused with a reason and never read or copied. A symlink to a file inside the set is read.
- A manifest's paths resolve relative to the manifest and must stay under its folder, or under
  `root=` / `vismem add --root DIR`.
- Quarantine copies are private: 0600 files in a 0700 folder.
- Labels are NFC-normalised and stripped of surrounding spaces; '.', '..', '/', '\\', control
  characters, a leading '-', empty or > 128 characters are refused (the file is quarantined).
- A set name taken from a folder or manifest name that already belongs to another source is
  refused unless the name is given explicitly; re-adding the same source stays idempotent.

Real files throughout: real symlinks, a real 0640 file, real CSV manifests, real PNGs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import polars as pl
import pytest

from vismem_assets import cli
from vismem_assets.imagesets import LABEL_RULE, OUTSIDE, ImageSetError, check_label
from vismem_assets.memory import Memory

ETC_PASSWD = Path("/etc/passwd")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pngs(fm_sets, n: int, label: str = "Bag", offset: int = 0) -> list[Path]:
    files = sorted((fm_sets["train"] / label).glob("*.png"))[offset:offset + n]
    assert len(files) == n, "fixture set too small"
    return files


def secret_file(folder: Path) -> tuple[Path, bytes]:
    """A file outside every set, 0640, with bytes that must never show up in the memory home."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b"SECRET-" + os.urandom(16).hex().encode() + b"-do-not-copy\n"
    path = folder / "secret.txt"
    path.write_bytes(data)
    os.chmod(path, 0o640)
    return path, data


def assert_home_holds_none_of(home: Path, outside: dict[str, bytes]) -> None:
    """Walk every file under the memory home (ledger, names.bin, images, quarantine, embeddings,
    indexes, temp files) and compare bytes: nothing read from outside the set may be there."""
    n_files = 0
    for folder, _, names in os.walk(home):
        for name in names:
            path = Path(folder) / name
            if not path.is_file():
                continue
            n_files += 1
            data = path.read_bytes()
            for what, secret in outside.items():
                assert data != secret, f"{path} is a copy of {what}"
                if len(secret) >= 16:   # long enough that a match cannot be chance
                    assert secret not in data, f"{path} holds the bytes of {what}"
    assert n_files, "the walk saw no file: wrong home?"


def quarantine_rows(memory: Memory) -> dict[str, dict]:
    rows = memory.ledger.query(
        "SELECT original_name(name_pos, name_len) AS name, sample_id, reason, stored_path FROM quarantine")
    return {r["name"]: r for r in rows.iter_rows(named=True)}


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=["path", "label"], orient="row").write_csv(path)
    return path


# ---- folder sets: symlinks -----------------------------------------------------------------------

def test_folder_set_refuses_symlinks_leaving_the_set_and_reads_one_inside(memory, fm_sets, tmp_path):
    secret, secret_bytes = secret_file(tmp_path / "outside")
    good = pngs(fm_sets, 3)
    src = tmp_path / "sets" / "linked"
    (src / "Bag" / "sub").mkdir(parents=True)
    for p in good[:2]:
        shutil.copy(p, src / "Bag" / p.name)
    shutil.copy(good[2], src / "extra.png")          # top level: not read as itself ...
    os.symlink("../extra.png", src / "Bag" / "alias.png")   # ... but a link to it, inside the set, is
    os.symlink(ETC_PASSWD, src / "Bag" / "passwd.png")
    os.symlink(secret, src / "Bag" / "secret.png")
    os.symlink("../../../../outside/secret.txt", src / "Bag" / "sub" / "deep.png")  # relative, escapes
    os.symlink(tmp_path / "outside", src / "Bag" / "outdir")   # a folder outside, inside a label
    os.symlink("/etc", src / "etc")                             # a label folder linked to /etc

    report = memory.add(src).ingest

    refused = {"Bag/passwd.png", "Bag/secret.png", "Bag/sub/deep.png", "Bag/outdir", "etc"}
    by_name = {q["name"]: q["reason"] for q in report.quarantined}
    assert set(by_name) == refused
    assert all(reason == OUTSIDE for reason in by_name.values()), by_name
    assert report.added == 3 and report.n_files == 3 + len(refused)
    # The link inside the set was read: stored under its own name and its label folder's label.
    alias = memory.ledger.query("SELECT sample_id, label FROM sample_sources"
                                " WHERE original_name(name_pos, name_len) = 'Bag/alias.png'")
    assert alias.rows() == [(sha(good[2].read_bytes()), "Bag")]
    assert memory.ledger.query("SELECT sample_id FROM samples WHERE label = 'Bag' AND status = 'active'"
                               )["sample_id"].sort().to_list() == sorted(sha(p.read_bytes()) for p in good)
    # Refused: in the ledger's quarantine with the reason, no sample id, no stored copy.
    rows = quarantine_rows(memory)
    assert set(rows) == refused
    for row in rows.values():
        assert row["reason"] == OUTSIDE and row["sample_id"] is None and row["stored_path"] is None
    assert not [p for p in memory.layout.quarantine.iterdir()]
    assert_home_holds_none_of(memory.layout.root, {"the secret": secret_bytes,
                                                   "/etc/passwd": ETC_PASSWD.read_bytes()})


def test_symlink_loops_and_broken_links_are_refused_without_hanging(memory, fm_sets, tmp_path):
    src = tmp_path / "loopy"
    (src / "Bag").mkdir(parents=True)
    shutil.copy(pngs(fm_sets, 1)[0], src / "Bag" / "ok.png")
    os.symlink("b.png", src / "Bag" / "a.png")
    os.symlink("a.png", src / "Bag" / "b.png")
    os.symlink(".", src / "Bag" / "self")              # a folder link to itself: never walked

    report = memory.ingest(src)

    by_name = {q["name"]: q["reason"] for q in report.quarantined}
    assert report.added == 1
    assert set(by_name) == {"Bag/a.png", "Bag/b.png", "Bag/self"}
    assert by_name["Bag/a.png"].startswith("unreadable: broken symlink")
    assert by_name["Bag/self"].startswith("a symlink to a folder: not followed")


def test_quarantine_copies_are_private_to_the_owner(memory, fm_sets, tmp_path):
    src = tmp_path / "private"
    (src / "Bag").mkdir(parents=True)
    shutil.copy(pngs(fm_sets, 1)[0], src / "Bag" / "ok.png")
    notes = src / "Bag" / "notes.txt"
    notes.write_bytes(b"payroll: not an image\n")
    os.chmod(notes, 0o640)
    os.chmod(memory.layout.quarantine, 0o755)        # as a home made before the rule had it

    report = memory.ingest(src)

    assert [q["name"] for q in report.quarantined] == ["Bag/notes.txt"]
    row = quarantine_rows(memory)["Bag/notes.txt"]
    copy = memory.layout.absolute(row["stored_path"])
    assert copy.read_bytes() == notes.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(memory.layout.quarantine.stat().st_mode) == 0o700
    assert [p.name for p in memory.layout.quarantine.iterdir()] == [copy.name]   # no temp file left
    # A fresh home's quarantine folder is private from the start; the image store is not.
    fresh = Memory(tmp_path / "fresh-home")
    assert stat.S_IMODE(fresh.layout.quarantine.stat().st_mode) == 0o700
    stored = next(p for p in memory.layout.images.rglob("*") if p.is_file())
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644


# ---- manifests and root ------------------------------------------------------------------------

def test_manifest_rows_outside_its_folder_are_refused_and_never_read(memory, fm_sets, tmp_path):
    secret, secret_bytes = secret_file(tmp_path / "outside")
    ok = pngs(fm_sets, 1)[0]
    mdir = tmp_path / "lists"
    (mdir / "pics").mkdir(parents=True)
    shutil.copy(ok, mdir / "pics" / "ok.png")
    os.symlink(secret, mdir / "pics" / "link.png")            # inside by name, outside by target
    deep_up = "../" * 40 + "etc/hostname"                      # certainly reaches / and /etc/hostname
    rows = [("/etc/passwd", "Bag"), ("/proc/self/environ", "Bag"), ("../../../etc/hostname", "Bag"),
            (deep_up, "Bag"), ("../outside/secret.txt", "Bag"), ("pics/link.png", "Bag"), ("pics/ok.png", "Bag")]
    manifest = write_manifest(mdir / "list.csv", rows)

    report = memory.add(manifest).ingest

    assert report.added == 1
    by_name = {q["name"]: q["reason"] for q in report.quarantined}
    assert set(by_name) == {p for p, _ in rows[:-1]}
    for reason in by_name.values():
        assert reason.startswith(OUTSIDE) and "--root" in reason, reason
    for row in quarantine_rows(memory).values():
        assert row["sample_id"] is None and row["stored_path"] is None
    outside = {"the secret": secret_bytes, "/etc/passwd": ETC_PASSWD.read_bytes(),
               "/proc/self/environ": Path("/proc/self/environ").read_bytes()}
    if Path("/etc/hostname").is_file():
        outside["/etc/hostname"] = Path("/etc/hostname").read_bytes()
    assert_home_holds_none_of(memory.layout.root, outside)


def test_root_widens_where_a_manifest_may_read(memory, fm_sets, tmp_path):
    a, b = pngs(fm_sets, 2, label="Trouser")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(a, photos / "a.png")
    shutil.copy(b, photos / "b.png")
    manifest = write_manifest(tmp_path / "lists" / "list.csv",
                              [("../photos/a.png", "Trouser"), (str(photos / "b.png"), "Trouser"),
                               ("/etc/passwd", "Trouser")])

    refused = memory.ingest(manifest, name="narrow")
    assert refused.added == 0 and len(refused.quarantined) == 3

    widened = memory.ingest(manifest, name="wide", root=tmp_path)
    assert widened.added == 2
    assert [(q["name"], q["reason"]) for q in widened.quarantined] == [
        ("/etc/passwd", OUTSIDE + " (a manifest's paths stay under --root)")]
    assert sorted(memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active'")["sample_id"]) == \
        sorted(sha(p.read_bytes()) for p in (a, b))

    with pytest.raises(ImageSetError, match="--root applies to manifests only"):
        memory.ingest(photos, root=tmp_path)
    with pytest.raises(ImageSetError, match="is not a folder"):
        memory.ingest(manifest, name="nowhere", root=tmp_path / "missing")


def test_cli_add_root_option(tmp_path, fm_sets, capsys):
    (a,) = pngs(fm_sets, 1, label="Sneaker")
    (tmp_path / "photos").mkdir()
    shutil.copy(a, tmp_path / "photos" / "a.png")
    manifest = write_manifest(tmp_path / "lists" / "shoes.csv", [("../photos/a.png", "Sneaker")])
    home = tmp_path / "home"

    assert cli.main(["--home", str(home), "add", str(manifest), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ingest"]["added"] == 0 and out["ingest"]["quarantined"][0]["reason"].startswith(OUTSIDE)

    assert cli.main(["--home", str(home), "add", str(manifest), "--root", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ingest"]["added"] == 1 and out["ingest"]["quarantined"] == [] and out["n_vectors"] == 1


# ---- labels ----------------------------------------------------------------------------------------

REFUSED_LABELS = {"..": "'.' and '..'", ".": "'.' and '..'", "a/b": "contains '/'", "a\\b": "contains '/'",
                  "   ": "empty",
                  "-rf": "starts with '-'", "Bag\nEvil": "control character", "\tBag": "control character",
                  "nul\x00x": "control character", "x" * 129: "longer than 128"}


@pytest.mark.parametrize("raw", list(REFUSED_LABELS), ids=lambda r: repr(r)[:20])
def test_check_label_refuses(raw):
    with pytest.raises(ValueError) as info:
        check_label(raw)
    assert REFUSED_LABELS[raw] in str(info.value) and LABEL_RULE in str(info.value)


def test_check_label_normalises():
    assert check_label("  Bag  ") == "Bag"
    assert check_label("\u00a0Bag\u3000") == "Bag"                      # Unicode spaces too
    assert check_label("Cafe\u0301") == "Caf\u00e9"                    # NFC
    assert check_label("x" * 128) == "x" * 128
    assert check_label("T-shirt/top".replace("/", " or ")) == "T-shirt or top"


def test_manifest_labels_are_normalised_or_refused(memory, fm_sets, tmp_path):
    bad = ["..", "a/b", "-rf", "Bag\nEvil", "x" * 129, "a\\b"]
    images = pngs(fm_sets, len(bad) + 2)
    mdir = tmp_path / "labels"
    mdir.mkdir()
    for i, p in enumerate(images):
        shutil.copy(p, mdir / f"{i}.png")
    rows = [(f"{i}.png", label) for i, label in enumerate(bad)]
    rows += [(f"{len(bad)}.png", "  Bag  "), (f"{len(bad) + 1}.png", "Cafe\u0301")]
    manifest = write_manifest(mdir / "labels.csv", rows)

    report = memory.ingest(manifest)

    assert report.added == 2
    reasons = {q["name"]: q["reason"] for q in report.quarantined}
    assert set(reasons) == {f"{i}.png" for i in range(len(bad))}
    for i, label in enumerate(bad):
        assert reasons[f"{i}.png"].startswith(f"label {label[:40]!r}") and LABEL_RULE in reasons[f"{i}.png"]
    # Refused for its label: never read, so nothing is kept of it.
    assert all(r["sample_id"] is None and r["stored_path"] is None for r in quarantine_rows(memory).values())
    labels = memory.ledger.query("SELECT label FROM samples WHERE status = 'active' ORDER BY label")["label"]
    assert labels.to_list() == ["Bag", "Caf\u00e9"]
    assert memory.ledger.query("SELECT DISTINCT label FROM label_history ORDER BY 1")["label"].to_list() == \
        ["Bag", "Caf\u00e9"]


def test_folder_labels_are_normalised_or_refused(memory, fm_sets, tmp_path):
    folders = {"-rf": False, "new\nline": False, "a\\b": False, "tab\there": False, " Spaced ": True, "Bag": True}
    images = pngs(fm_sets, len(folders))
    src = tmp_path / "folders"
    for (folder, _), image in zip(folders.items(), images):
        (src / folder).mkdir(parents=True)
        shutil.copy(image, src / folder / "x.png")

    report = memory.ingest(src)

    assert report.added == 2
    reasons = {q["name"].split("/x.png")[0]: q["reason"] for q in report.quarantined}
    assert set(reasons) == {f for f, ok in folders.items() if not ok}
    assert all(r.startswith("label ") and LABEL_RULE in r for r in reasons.values())
    labels = memory.ledger.query("SELECT label FROM samples WHERE status = 'active' ORDER BY label")["label"]
    assert labels.to_list() == ["Bag", "Spaced"]


def test_cli_add_reports_refused_labels(tmp_path, fm_sets, capsys):
    images = pngs(fm_sets, 2, label="Sneaker")
    mdir = tmp_path / "m"
    mdir.mkdir()
    for i, p in enumerate(images):
        shutil.copy(p, mdir / f"{i}.png")
    manifest = write_manifest(mdir / "shoes.csv", [("0.png", "-rf"), ("1.png", " Sneaker ")])

    assert cli.main(["--home", str(tmp_path / "home"), "add", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "1 file(s) quarantined" in text and "starts with '-'" in text


# ---- set names ---------------------------------------------------------------------------------------

def two_folders_named_photos(tmp_path, fm_sets) -> tuple[Path, Path]:
    a_img, b_img = pngs(fm_sets, 2, label="Bag", offset=4)
    a, b = tmp_path / "alice" / "photos", tmp_path / "bob" / "photos"
    for folder, image in ((a, a_img), (b, b_img)):
        (folder / "Bag").mkdir(parents=True)
        shutil.copy(image, folder / "Bag" / image.name)
    return a, b


def test_same_name_from_another_folder_is_refused_unless_named(memory, fm_sets, tmp_path, monkeypatch):
    a, b = two_folders_named_photos(tmp_path, fm_sets)
    assert memory.ingest(a).added == 1

    with pytest.raises(ImageSetError) as info:
        memory.ingest(b)
    message = str(info.value)
    assert "'photos' already exists" in message and str(a) in message
    assert "--name OTHER" in message and "--name photos" in message
    # Refused before anything was read or recorded: the first set's record is untouched.
    assert memory.ledger.query("SELECT name, source FROM image_sets").rows() == [("photos", str(a))]
    assert memory.ledger.query("SELECT count(*) AS n FROM ingests")["n"][0] == 1
    assert memory.ledger.query("SELECT count(*) AS n FROM samples")["n"][0] == 1

    # Re-adding the same source stays idempotent, also given relative to the working folder.
    monkeypatch.chdir(a.parent)
    again = memory.ingest(Path("photos"))
    assert (again.added, again.duplicates) == (0, 1)

    # Chosen on purpose: merged into 'photos', whose recorded source stays the first one ...
    assert memory.ingest(b, name="photos").added == 1
    assert memory.ledger.query("SELECT name, source FROM image_sets").rows() == [("photos", str(a))]
    # ... after which that folder is one of the set's sources and may be re-added by default.
    assert memory.ingest(b).duplicates == 1
    # Or a set of its own.
    assert memory.ingest(b, name="photos_bob").duplicates == 1
    assert sorted(memory.ledger.query("SELECT name FROM image_sets")["name"]) == ["photos", "photos_bob"]


def test_same_name_manifest_from_another_folder_is_refused(memory, fm_sets, tmp_path):
    img = pngs(fm_sets, 1, label="Bag", offset=6)[0]
    manifests = []
    for who in ("alice", "bob"):
        (tmp_path / who).mkdir()
        shutil.copy(img, tmp_path / who / "a.png")
        manifests.append(write_manifest(tmp_path / who / "list.csv", [("a.png", "Bag")]))
    memory.ingest(manifests[0])
    with pytest.raises(ImageSetError, match="'list' already exists"):
        memory.ingest(manifests[1])


def test_cli_same_name_from_another_folder(tmp_path, fm_sets, capsys, encoder):
    a, b = two_folders_named_photos(tmp_path, fm_sets)
    home = tmp_path / "home"
    Memory(home, encoder=encoder).add(a)

    assert cli.main(["--home", str(home), "add", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("vismem add: error: image set 'photos' already exists") and "--name" in err

    assert cli.main(["--home", str(home), "add", str(b), "--name", "photos_bob", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ingest"]["image_set"] == "photos_bob" and out["ingest"]["added"] == 1
