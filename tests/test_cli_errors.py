"""User errors and hostile input at the command line (issue 15, findings 8 and 12): one clear
line and the right exit code, never a traceback; audit queries by name only, on a read-only
connection; a memory that can only be read still answers; a full disk leaves it consistent."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from vismem_assets.ledger import sql_files as ledger_mod
from vismem_assets.cli import main
from vismem_assets.ledger import AUDIT_DIR, Ledger
from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parent.parent
VISMEM = [sys.executable, "-m", "vismem_assets.cli"]
LABELS = ("Trouser", "Bag", "Sneaker")


def vismem(home, *args, preexec_fn=None, **kw) -> subprocess.CompletedProcess:
    """`vismem` as a user runs it: a real process (exit codes, pipes, limits)."""
    return subprocess.run([*VISMEM, "--home", str(home), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec_fn, **kw)


def cli(capsys, *args) -> tuple[int, str, str]:
    """The same entry point in this process: (exit code, stdout, stderr)."""
    rc = main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, says: str) -> None:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert says in err, err


def copy_set(src: Path, dst: Path, first: int, n: int) -> Path:
    for label in LABELS:
        (dst / label).mkdir(parents=True)
        for f in sorted((src / label).glob("*.png"))[first:first + n]:
            (dst / label / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def sets(tmp_path_factory, fm_sets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-errors-sets")
    small = copy_set(fm_sets["train"], root / "small", 0, 5)
    (small / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a quarantine row with a name
    return {"small": small, "more": copy_set(fm_sets["train"], root / "more", 5, 3)}


@pytest.fixture(scope="module")
def home(tmp_path_factory, sets, encoder) -> Path:
    """A small real memory: 15 samples of 3 labels, one quarantined file."""
    home = tmp_path_factory.mktemp("cli-errors") / "home"
    Memory(home, encoder=encoder).add(sets["small"], progress=False)
    return home


def counts(home: Path) -> dict:
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("samples", "schema_migrations", "image_sets", "index_versions")}
    finally:
        con.close()


# ---- finding 8: audit queries by name, read-only -------------------------------------------------

def test_audit_query_refuses_anything_but_the_names_in_sql_audit(home, tmp_path, capsys):
    hostile = tmp_path / "x.sql"
    hostile.write_text("DELETE FROM samples")
    before = counts(home)
    assert before["samples"] == 16
    for name in (os.path.relpath(hostile.with_suffix(""), AUDIT_DIR),  # ../../…/x: ran DELETE FROM samples
                 "../migrations/001_init",                             # re-ran part of a migration
                 str(hostile.with_suffix("")), "label_counts.sql", "./label_counts", ""):
        rc, out, err = cli(capsys, "--home", home, "audit", "query", name)
        assert rc == 2 and out == ""
        one_line_error(err, "no audit query")
        assert "known: deletions_by_category, deletions_by_requester" in err and "label_counts" in err
    assert counts(home) == before
    # The real names still run, with their parameters and the original_name() macro, read-only.
    rc, out, err = cli(capsys, "--home", home, "audit", "query", "quarantined_files", "--json")
    assert rc == 0, err
    assert [r["original_name"] for r in json.loads(out)] == ["Bag/broken.png"]
    rc, out, err = cli(capsys, "--home", home, "audit", "query", "label_counts", "--json")
    assert rc == 0 and {r["label"]: r["n"] for r in json.loads(out)} == {label: 5 for label in LABELS}
    rc, out, err = cli(capsys, "--home", home, "audit", "query", "deletions_by_requester", "--param", "to=2000-01-01",
                       "--json")
    assert rc == 0 and json.loads(out) == [], err


def test_run_named_cannot_write_even_from_a_file_in_sql_audit(home, tmp_path, monkeypatch):
    """A file placed in sql/audit still cannot change anything: the connection is read-only,
    and only one SELECT runs (read-only DuckDB would still COPY ... TO a file)."""
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    shutil.copy(AUDIT_DIR / "label_counts.sql", audit_dir)
    (audit_dir / "wipe.sql").write_text("DELETE FROM samples")
    (audit_dir / "two.sql").write_text("SELECT 1; DELETE FROM samples")
    (audit_dir / "copy.sql").write_text(f"COPY (SELECT * FROM samples) TO '{tmp_path / 'out.csv'}'")
    monkeypatch.setattr(ledger_mod, "AUDIT_DIR", audit_dir)
    ledger = Ledger(home / "ledger.duckdb")
    before = counts(home)

    # Each connection run_named opens is read-only: a write on it is refused by DuckDB itself.
    real_open, refused = Ledger._open, []

    def open_and_try_a_write(self, read_only=False):
        con = real_open(self, read_only=True) if read_only else real_open(self)
        if read_only:
            with pytest.raises(duckdb.Error, match="read-only"):
                con.execute("DELETE FROM samples")
            refused.append(True)
        return con

    monkeypatch.setattr(Ledger, "_open", open_and_try_a_write)
    assert ledger.run_named("label_counts")["n"].to_list() == [5, 5, 5]
    assert refused == [True]
    for name in ("wipe", "two", "copy"):
        with pytest.raises(ValueError, match="must be one SELECT statement"):
            ledger.run_named(name)
    assert counts(home) == before and not (tmp_path / "out.csv").exists()


# ---- finding 12: usage errors ----------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["classify", "x.png", "--k", "0"], "argument --k: must be 1 or more, got 0"),
    (["classify", "x.png", "--k", "-5"], "argument --k: must be 1 or more, got -5"),
    (["classify", "x.png", "--k", "many"], "argument --k: expected a whole number"),
    (["explain", "x.png", "--k", "0"], "argument --k: must be 1 or more"),
    (["eval", "set", "--k-max", "0"], "argument --k-max: must be 1 or more"),
    (["audit", "query", "label_counts", "--param", "novalue"], "argument --param: expected KEY=VALUE"),
    (["audit", "query", "label_counts", "--param", "not a name=1"], "argument --param: expected KEY=VALUE"),
])
def test_bad_option_values_are_usage_errors(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(["--home", str(tmp_path / "home"), *args])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert says in err and "Traceback" not in err and out == ""
    assert not (tmp_path / "home").exists()  # refused before anything was touched


def test_home_that_is_a_file(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    proc = vismem(not_a_folder, "status")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "is a file, not a folder: point --home or VISMEM_HOME at a folder")
    rc, out, err = cli(capsys, "--home", not_a_folder / "below", "audit", "verify")
    assert rc == 2 and out == ""
    one_line_error(err, "is a file, not a folder")


# ---- finding 12: classify one bad file among good ones -----------------------------------------------

def test_classify_reports_each_bad_input_and_classifies_the_rest(home, fm_sets, tmp_path, capsys):
    good = sorted((fm_sets["test"] / "Trouser").glob("*.png"))[:2]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image at all")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # used to hang the whole command
    aspect = tmp_path / "strip.png"
    Image.new("L", (33 * 8, 8)).save(aspect)  # past the 32:1 bound: what an aspect-ratio bomb looks like, harmless here
    pixels = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(pixels)  # 64 Mpx from a small file: over the pixel bound, refused from its header
    inputs = [not_image, good[0], fifo, aspect, pixels, good[1]]

    rc, out, err = cli(capsys, "--home", home, "classify", *inputs, "--k", "3", "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["path"] for r in rows] == list(map(str, inputs))  # one line per input, in order
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {str(not_image), str(fifo), str(aspect), str(pixels)}
    assert "not an image" in errors[str(not_image)] and "not a regular file" in errors[str(fifo)]
    assert "aspect ratio" in errors[str(aspect)] and "decompression bomb" in errors[str(pixels)]
    assert all(r["label"] in LABELS and len(r["neighbors"]) == 3 for r in rows if "error" not in r)

    rc, out, err = cli(capsys, "--home", home, "classify", not_image, good[0], "--k", "3")
    assert rc == 0 and "-> " in out
    assert err.strip().splitlines() == [f"vismem classify: skipped: {not_image} is not a readable image: "
                                        "not an image (unrecognised content)"]

    rc, out, err = cli(capsys, "--home", home, "classify", not_image, fifo, "--json")
    assert rc == 1 and "Traceback" not in err  # nothing could be classified
    assert [set(json.loads(line)) for line in out.strip().splitlines()] == [{"path", "error"}] * 2
    assert "none of the 2 input(s) is an image vismem can read" in err


# ---- finding 12: pipes, full disks -------------------------------------------------------------------

def test_closed_pipe_exits_quietly(home):
    """`vismem status | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen([*VISMEM, "--home", str(home), "status"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before a byte is read: every write to it fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert err == ""  # not even Python's "Exception ignored ... BrokenPipeError" at exit


@pytest.mark.slow
@pytest.mark.parametrize("limit", [4096, 65536])
def test_full_disk_mid_add_is_one_line_and_the_memory_stays_consistent(home, sets, tmp_path, limit):
    """A file size limit in the child (writes past it fail with EFBIG, as a full disk fails with
    ENOSPC): at 4 KiB the ledger's write-ahead log fails, at 64 KiB the embedding part."""
    mem = tmp_path / "home"
    shutil.copytree(home, mem)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = vismem(mem, "add", sets["more"], "--json", preexec_fn=limited)
    assert proc.returncode == 1 and proc.stdout == ""
    one_line_error(proc.stderr, "file size limit reached while writing")
    assert "free space or move VISMEM_HOME, then run it again" in proc.stderr

    again = vismem(mem, "add", sets["more"], "--json")
    assert again.returncode == 0, again.stderr
    status = json.loads(vismem(mem, "status", "--json").stdout)
    assert status["labels"] == {label: 8 for label in LABELS}
    assert status["live_indexes"][0]["n_vectors"] == 24
    verify = vismem(mem, "audit", "verify")
    assert verify.returncode == 0, verify.stderr


# ---- finding 12: a memory this user can only read ----------------------------------------------------

@pytest.fixture(scope="module")
def read_only_mount(tmp_path_factory):
    """Runs `vismem --home MOUNT ...` with a folder bind-mounted read-only at MOUNT, in a private
    mount namespace (root ignores file modes, not a read-only mount)."""
    mount = tmp_path_factory.mktemp("ro-mount")
    probe = tmp_path_factory.mktemp("ro-probe")
    mount_ro = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2"'
    script = mount_ro + ' && shift 2 && exec "$@"'

    def run(folder: Path, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder),
                               str(mount), *VISMEM, "--home", str(mount), *map(str, args)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    try:
        check = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                mount_ro + ' && ! touch "$2/x" 2>/dev/null', "sh", str(probe), str(mount)],
                               capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no `unshare` here: cannot make a read-only mount")
    if check.returncode != 0 or (probe / "x").exists():
        pytest.skip(f"a read-only bind mount is not allowed here (needs CAP_SYS_ADMIN): {check.stderr.strip()}")
    return run


@pytest.mark.slow
def test_read_only_memory_answers_and_refuses_changes_in_one_line(home, sets, fm_sets, tmp_path, read_only_mount):
    mem = tmp_path / "home"
    shutil.copytree(home, mem)
    files_before = {p: p.read_bytes() for p in sorted(mem.rglob("*")) if p.is_file()}

    status = read_only_mount(mem, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["labels"] == {label: 5 for label in LABELS}
    query = sorted((fm_sets["test"] / "Bag").glob("*.png"))[0]
    classify = read_only_mount(mem, "classify", query, "--k", "3", "--unknown", "--pruning", "soft", "--json")
    assert classify.returncode == 0, classify.stderr
    assert json.loads(classify.stdout)["label"] in LABELS + ("unknown",)
    verify = read_only_mount(mem, "audit", "verify")
    assert verify.returncode == 0 and "OK:" in verify.stdout, verify.stderr
    names = read_only_mount(mem, "audit", "query", "quarantined_files", "--json")
    assert names.returncode == 0 and json.loads(names.stdout)[0]["original_name"] == "Bag/broken.png", names.stderr

    add = read_only_mount(mem, "add", sets["more"])
    assert add.returncode == 1
    one_line_error(add.stderr, "not writable")
    assert {p: p.read_bytes() for p in sorted(mem.rglob("*")) if p.is_file()} == files_before

    # A read-only place with no memory in it: one line saying what to do, even for status.
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["status"], ["audit", "verify"]):
        proc = read_only_mount(empty, *args)
        assert proc.returncode == 1
        one_line_error(proc.stderr, "(read-only file system): point --home or VISMEM_HOME at a folder you can write to")
    assert not any(empty.iterdir())


def test_read_only_ledger_refuses_a_transaction(home):
    from vismem_assets.ledger import ReadOnlyLedger

    ledger = Ledger(home / "ledger.duckdb", read_only=True)
    assert ledger.query("SELECT count(*) AS n FROM samples")["n"][0] == 16
    with pytest.raises(ReadOnlyLedger, match="not writable"):
        with ledger.transaction():
            pass
