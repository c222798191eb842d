"""The ledger on PostgreSQL (issue 18): the same schema, groups, hash chain and audit queries as
the DuckDB file, on a real server (tests/postgres_server.py, one per session).

The life cycle runs twice on the same images, once per backend, and the two memories must
agree: vector ids, index contents, predictions, proofs, audit queries.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import numpy as np
import pytest

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.ledger import SQL_DIR, LedgerLockTimeout, audit_queries, migrations, open_ledger
from vismem_assets.ledger.postgres import LedgerUnavailable, PostgresLedger, translate
from vismem_assets.memory import Memory
from vismem_assets.names import NAMES_FILE
from vismem_assets.settings import Settings, SettingsError

from postgres_server import PostgresServer, binaries

REPO = Path(__file__).resolve().parent.parent
WHO = dict(requested_by="alice", reason="asked to be removed", category="gdpr")


# ---- the adapter ---------------------------------------------------------------------------------

def test_translate_leaves_quoted_text_and_comments_alone():
    sql = "SELECT ?, 'it''s ? 50%', \"odd?col\" FROM t -- why? 100%\nWHERE x LIKE '%a' AND y = ? AND z % 2 = 0"
    assert translate(sql, True) == ("SELECT %s, 'it''s ? 50%', \"odd?col\" FROM t -- why? 100%\n"
                                    "WHERE x LIKE '%a' AND y = %s AND z %% 2 = 0")
    assert translate("CREATE TABLE t (a DOUBLE, b DOUBLE PRECISION, c double)", False) == \
        "CREATE TABLE t (a DOUBLE PRECISION, b DOUBLE PRECISION, c DOUBLE PRECISION)"
    assert translate("SELECT 'DOUBLE' -- DOUBLE", False) == "SELECT 'DOUBLE' -- DOUBLE"


# ---- schema and migrations -----------------------------------------------------------------------

def columns(ledger) -> dict[str, list[str]]:
    """{table: its column names in order}, from the backend's own catalog."""
    frame = ledger.query("SELECT table_name, column_name FROM information_schema.columns"
                         " WHERE table_schema IN ('main', 'public') ORDER BY table_name, ordinal_position")
    out: dict[str, list[str]] = {}
    for table, column in frame.iter_rows():
        out.setdefault(table, []).append(column)
    return out


def test_a_new_postgres_ledger_has_the_duckdb_schema(pg_url, postgres_server, tmp_path):
    pg = open_ledger(postgres_server.home_dir() / "h" / "ledger.duckdb", pg_url)
    duck = open_ledger(tmp_path / "ledger.duckdb")
    assert isinstance(pg, PostgresLedger) and pg.dialect == "postgres"
    assert pg.schema_version() == duck.schema_version() == migrations()[-1][0]
    assert columns(pg) == columns(duck)   # tables, views and every column, in order
    assert "original_name" not in {c for cols in columns(pg).values() for c in cols}


def test_the_deletions_chain_cannot_fork(pg_url, postgres_server, tmp_path):
    for ledger in (open_ledger(postgres_server.home_dir() / "f" / "ledger.duckdb", pg_url),
                   open_ledger(tmp_path / "ledger.duckdb")):
        row = ("r", "s{}", "l", "alice", "why", None, None, "2026-01-01", "2026-01-01", "[]", "0" * 64, "h{}")
        with ledger.transaction() as s:
            s.execute("INSERT INTO deletions VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      [v.format(1) if isinstance(v, str) else v for v in row])
        with pytest.raises(ledger.driver_error, match="(?i)unique|duplicate"):
            with ledger.transaction() as s:   # a second row after the same one: a fork
                s.execute("INSERT INTO deletions VALUES (2, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [v.format(2) if isinstance(v, str) else v for v in row])
        assert ledger.query("SELECT count(*) AS n FROM deletions")["n"][0] == 1


# ---- one writer at a time --------------------------------------------------------------------------

def test_a_second_writer_waits_for_the_first_then_times_out_clearly(pg_url, postgres_server):
    home = postgres_server.home_dir() / "w"
    first = PostgresLedger(pg_url, home)
    second = PostgresLedger(pg_url, home, lock_timeout=0.5)
    with first.transaction():
        t0 = time.monotonic()
        with pytest.raises(LedgerLockTimeout, match=r"stayed locked for 0 s .*VISMEM_LOCK_TIMEOUT"):
            with second.connect():
                pass
        assert time.monotonic() - t0 >= 0.45
    order: list[str] = []

    def later():
        with PostgresLedger(pg_url, home).transaction():
            order.append("second")

    with first.transaction():
        thread = threading.Thread(target=later)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_readers_of_a_read_only_home_do_not_wait_for_the_writer(pg_url, postgres_server):
    home = postgres_server.home_dir() / "r"
    writer = PostgresLedger(pg_url, home)
    writer.schema_version()   # created and migrated
    reader = PostgresLedger(pg_url, home, read_only=True, lock_timeout=0.5)
    with writer.transaction():
        assert reader.schema_version() == migrations()[-1][0]


def test_an_unreachable_server_is_a_clear_error(postgres_server, tmp_path):
    url = "postgresql://nobody:secret@127.0.0.1:1/x"   # nothing listens on port 1
    with pytest.raises(LedgerUnavailable, match=r"cannot reach the PostgreSQL ledger postgresql://nobody:\*\*\*@"
                                                r".*VISMEM_LEDGER_URL") as e:
        PostgresLedger(url, tmp_path).schema_version()
    assert "secret" not in str(e.value)


# ---- the life cycle on both backends ------------------------------------------------------------

@pytest.fixture
def twins(pg_url, postgres_server, encoder, tmp_path) -> tuple[Memory, Memory]:
    """Two empty memories with the same encoder: one on the DuckDB file, one on PostgreSQL."""
    duck = Memory(tmp_path / "duck", encoder=encoder, settings=Settings.from_env())
    home = postgres_server.home_dir() / tmp_path.name
    pg = Memory(home, encoder=encoder, settings=Settings.from_env(ledger_url=pg_url))
    yield duck, pg
    shutil.rmtree(home, ignore_errors=True)


def small_sets(fm_sets, root: Path) -> dict[str, Path]:
    """Set A: 4 labels x 5 images plus a broken file (quarantined); set B: the same labels x 2."""
    labels = ("Bag", "Trouser", "Sneaker", "Sandal")
    sets = {}
    for name, take in (("A", slice(0, 5)), ("B", slice(5, 7))):
        for label in labels:
            dest = root / name / label
            dest.mkdir(parents=True)
            for p in sorted((fm_sets["train"] / label).glob("*.png"))[take]:
                shutil.copy(p, dest / p.name)
        sets[name] = root / name
    (sets["A"] / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return sets


def database_text(url: str) -> str:
    """Every row of every table, as text."""
    with psycopg2.connect(url) as con, con.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                    " AND table_type = 'BASE TABLE'")
        text = []
        for (table,) in cur.fetchall():
            cur.execute(f'SELECT coalesce(string_agg(t::text, chr(10)), \'\') FROM "{table}" t')
            text.append(cur.fetchone()[0])
    return "\n".join(text)


@pytest.mark.slow
def test_the_life_cycle_agrees_on_duckdb_and_postgres(twins, fm_sets, tmp_path):
    duck, pg = twins
    sets = small_sets(fm_sets, tmp_path / "sets")
    queries = sorted((fm_sets["test"]).rglob("*.png"))[:20]
    for memory in (duck, pg):
        for name in ("A", "B"):
            memory.add(sets[name], name=name, progress=False)

    # The same samples with the same vector ids (arrival order), the same live index.
    same = "SELECT sample_id, vector_id, label, status, image_set FROM samples ORDER BY sample_id"
    a, b = pg.ledger.query(same), duck.ledger.query(same)
    assert a.to_dicts() == b.to_dicts(), [(x[1], x[2], x[4], y[1], y[2], y[4]) for x, y in zip(a.rows(), b.rows()) if x[4] == "B"]
    assert pg.status()["pending"] == duck.status()["pending"]
    assert pg.indexes.live().n_vectors == duck.indexes.live().n_vectors == 28
    assert pg.index_consistency() == duck.index_consistency()
    assert [p.label for p in pg.classify(queries, progress=False)] == \
        [p.label for p in duck.classify(queries, progress=False)]

    # File names are in names.bin in the home, never in the database.
    assert (pg.layout.root / NAMES_FILE).stat().st_size > 0
    text = database_text(pg.ledger.url)
    names = [p.name for p in (tmp_path / "sets").rglob("*.png")]
    assert names and not [n for n in names if n in text]

    # Forget the same samples in both: the same proofs (up to times), verify passes.
    victims = sorted(duck.ledger.query("SELECT sample_id FROM samples WHERE label = 'Sandal' AND status = 'active'"
                                       " ORDER BY sample_id LIMIT 3")["sample_id"].to_list())
    for memory in (duck, pg):
        memory.forget(ForgetRequest(sample_ids=victims, **WHO))
        memory.forget(ForgetRequest(image_set="B", **WHO))
        assert memory.audit.verify().ok, memory.audit.verify().problems
    chain = "SELECT seq, request_id, sample_id, label, requested_by, reason, category FROM deletions ORDER BY seq"
    assert len(pg.ledger.query(chain)) == 3 + 8 and pg.ledger.query(chain).equals(duck.ledger.query(chain))
    assert pg.indexes.live().n_vectors == duck.indexes.live().n_vectors == 28 - 3 - 8
    assert [p.label for p in pg.classify(queries, progress=False)] == \
        [p.label for p in duck.classify(queries, progress=False)]
    proof = pg.audit.proof(victims[0])
    assert proof["status"] == "forgotten" and proof["present_nowhere"] and proof["requests"][0]["requested_by"] == "alice"

    # Every audit query runs on both and says the same (times and the names' escaping aside).
    for name in audit_queries():
        params = {"sample_id": victims[0]} if name == "proof_of_forgetting" else {}
        a, b = duck.ledger.run_named(name, params), pg.ledger.run_named(name, params)
        assert a.columns == b.columns, name
        # what, not when (the chain's hashes hash the times too)
        kept = [c for c, dtype in a.schema.items() if not dtype.is_temporal() and not c.endswith("_hash")]
        assert a.select(kept).to_dicts() == b.select(kept).to_dicts(), name
    # The server reads set A's refused file's name from names.bin (original_name() in SQL).
    assert pg.ledger.run_named("quarantined_files")["original_name"].to_list() == ["Bag/broken.png"]


@pytest.mark.slow
def test_a_sharded_memory_on_postgres_agrees_with_one_piece_on_duckdb(pg_url, postgres_server, encoder, fm_sets,
                                                                     tmp_path):
    """3 shards, ledger on the server: the same neighbours as one piece on a DuckDB file, before and
    after a forget whose shards all report; `audit verify` passes."""
    duck = Memory(tmp_path / "duck", encoder=encoder, settings=Settings.from_env())
    home = postgres_server.home_dir() / tmp_path.name
    pg = Memory(home, encoder=encoder, settings=Settings.from_env(ledger_url=pg_url, shards=3))
    sets = small_sets(fm_sets, tmp_path / "sets")
    queries = encoder.embed(sorted(fm_sets["test"].rglob("*.png"))[:20], progress=False)
    for memory in (duck, pg):
        for name in ("A", "B"):
            memory.add(sets[name], name=name, progress=False)
    assert pg.indexes.live().n_shards == 3
    np.testing.assert_array_equal(pg.search(queries, 10)[1], duck.search(queries, 10)[1])
    for memory in (duck, pg):
        memory.forget(ForgetRequest(image_set="B", **WHO))
        assert memory.audit.verify().ok, memory.audit.verify().problems
    reports = pg.ledger.query("SELECT n_shards, shard FROM forget_shard_reports ORDER BY shard")
    assert reports.rows() == [(3, 0), (3, 1), (3, 2)]
    np.testing.assert_array_equal(pg.search(queries, 10)[1], duck.search(queries, 10)[1])
    shutil.rmtree(home, ignore_errors=True)


# ---- the command line, psql, and tampering on the server ---------------------------------------

def vismem(home: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISMEM_LEDGER_URL": url}
    return subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def pg_home(pg_url, postgres_server, fm_sets, tmp_path) -> tuple[Path, str, dict[str, Path]]:
    """A memory on PostgreSQL with sets A and B added, and 3 Sandals then set B forgotten, by `vismem`."""
    home = postgres_server.home_dir() / f"cli-{tmp_path.name}"
    sets = small_sets(fm_sets, tmp_path / "sets")
    for name in ("A", "B"):
        done = vismem(home, pg_url, "add", str(sets[name]), "--name", name)
        assert done.returncode == 0, done.stderr
    sandals = sorted(str(p) for p in (sets["A"] / "Sandal").glob("*.png"))[:3]
    for target in (["--image", *sandals], ["--set", "B"]):
        done = vismem(home, pg_url, "forget", *target, "--requested-by", "alice", "--reason", "asked")
        assert done.returncode == 0, done.stderr
    yield home, pg_url, sets
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_vismem_commands_on_a_postgres_ledger(pg_home, fm_sets):
    home, url, _ = pg_home
    status = vismem(home, url, "status")
    assert status.returncode == 0 and f"ledger:      {url}" in status.stdout, status.stdout
    assert not (home / "ledger.duckdb").exists()              # the server is the ledger, not a file here
    assert json.loads(vismem(home, url, "status", "--json").stdout)["samples"] == {"active": 17, "forgotten": 11,
                                                                                  "quarantined": 1}
    queries = sorted(str(p) for p in (fm_sets["test"] / "Bag").glob("*.png"))[:3]
    classified = vismem(home, url, "classify", *queries, "--json")
    labels = [json.loads(line)["label"] for line in classified.stdout.splitlines()]   # JSON lines
    assert classified.returncode == 0 and len(labels) == 3 and set(labels) <= {"Bag", "Trouser", "Sneaker", "Sandal"}
    verify = vismem(home, url, "audit", "verify")
    assert verify.returncode == 0, verify.stderr


def test_settings_print_the_ledger_url_without_its_password(monkeypatch):
    settings = Settings.from_env(ledger_url="postgresql://vismem:s3cret@db.example:5432/vismem")
    shown = dict((name, value) for name, value, _ in settings.table())
    assert shown["VISMEM_LEDGER_URL"] == "postgresql://vismem:***@db.example:5432/vismem"
    monkeypatch.setenv("VISMEM_LEDGER_URL", "mysql://x@y/z")
    with pytest.raises(SettingsError, match=r"VISMEM_LEDGER_URL='mysql://x@y/z': .*postgresql://user:password@host"):
        Settings.from_env()


@pytest.mark.slow
def test_a_tampered_chain_on_the_server_fails_verify(pg_home):
    home, url, _ = pg_home
    with psycopg2.connect(url) as con, con.cursor() as cur:
        cur.execute("UPDATE deletions SET requested_by = 'mallory' WHERE seq = 2")
    verify = vismem(home, url, "audit", "verify")
    assert verify.returncode == 1 and re.search(r"seq=2 .*row_hash does not match its content", verify.stderr), \
        verify.stderr


@pytest.mark.slow
def test_every_audit_query_runs_in_psql(pg_home):
    """The files in sql/audit/ (or their twins in sql/postgres/audit/) as a person runs them in psql,
    parameters set with SET vismem.<name>."""
    home, url, _ = pg_home
    psql = shutil.which("psql") or str(binaries() / "psql")
    for name in audit_queries():
        sql = SQL_DIR / "postgres" / "audit" / f"{name}.sql"
        sql = sql if sql.is_file() else SQL_DIR / "audit" / f"{name}.sql"
        done = subprocess.run([psql, url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--csv",
                               "-c", f"SET vismem.names_file = '{home / NAMES_FILE}'",
                               "-c", "SET vismem.requested_by = 'alice'", "-f", str(sql)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout.splitlines()[0].split(",") == \
            PostgresLedger(url, home).run_named(name, {"requested_by": "alice"}).columns, name
    quarantined = subprocess.run([psql, url, "-X", "-q", "-t", "-A", "-c",
                                  f"SET vismem.names_file = '{home / NAMES_FILE}'", "-f",
                                  str(SQL_DIR / "audit" / "quarantined_files.sql")], capture_output=True, text=True)
    assert "Bag/broken.png" in quarantined.stdout, quarantined.stderr


@pytest.mark.slow
def test_two_adds_at_once_on_one_postgres_ledger_both_land(pg_url, postgres_server, fm_sets, tmp_path):
    """Two `vismem add` processes at once: the advisory lock makes them take turns, nothing fails."""
    home = postgres_server.home_dir() / f"two-{tmp_path.name}"
    sets = small_sets(fm_sets, tmp_path / "sets")
    env = {**os.environ, "VISMEM_LEDGER_URL": pg_url}
    runs = [subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), "add", str(sets[n]),
                              "--name", n], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for n in ("A", "B")]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    memory = Memory(home, settings=Settings.from_env(ledger_url=pg_url))
    assert memory.ledger.query("SELECT count(*) AS n FROM samples WHERE status = 'active'")["n"][0] == 28
    assert memory.indexes.live().n_vectors == 28 and memory.audit.verify().ok
    ids = memory.ledger.query("SELECT vector_id FROM samples WHERE status = 'active' ORDER BY 1")["vector_id"]
    assert ids.to_list() == list(range(1, 29))          # each id given once, none skipped
    shutil.rmtree(home, ignore_errors=True)


def test_a_server_that_goes_away_is_a_clear_error_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(tmp_path / "h"), "status"],
                          cwd=REPO, env={**os.environ, "VISMEM_LEDGER_URL": "postgresql://v:pw@127.0.0.1:1/vismem"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"cannot reach the PostgreSQL ledger postgresql://v:\*\*\*@127\.0\.0\.1:1/vismem: .*"
                     r"scripts/cluster\.sh up", done.stderr), done.stderr


@pytest.mark.slow
def test_the_server_going_down_mid_transaction_loses_nothing_committed(fm_sets, encoder, tmp_path):
    """PostgreSQL stopped (immediate: as a crash) while a writer's transaction is open: the write
    fails with the driver's error, nothing of it is there after the restart, and the same add
    then succeeds; the memory, its index and its chain stay consistent throughout."""
    server = PostgresServer().start()
    try:
        url = server.create_database("crash")
        home = server.home_dir() / "crash"
        sets = small_sets(fm_sets, tmp_path / "sets")
        memory = Memory(home, encoder=encoder, settings=Settings.from_env(ledger_url=url))
        memory.add(sets["A"], name="A", progress=False)
        with pytest.raises(psycopg2.Error):
            with memory.ledger.transaction() as s:
                s.execute("UPDATE samples SET label = 'Coat' WHERE label = 'Bag'")
                server.crash()
        server.start()
        again = Memory(home, encoder=encoder, settings=Settings.from_env(ledger_url=url))
        assert again.ledger.query("SELECT count(*) AS n FROM samples WHERE label = 'Coat'")["n"][0] == 0
        again.add(sets["B"], name="B", progress=False)
        assert again.indexes.live().n_vectors == 28 and again.index_consistency()["ok"]
        assert again.audit.verify().ok
    finally:
        server.stop()
