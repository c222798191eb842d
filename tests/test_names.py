"""File names live in names.bin beside the ledger, erased in place: a real DuckDB ledger, the real
name file, and a ledger from before the move (version 6), upgraded."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from vismem_assets.ledger import Ledger, migrations
from vismem_assets.names import NAMES_FILE


def names_of(ledger: Ledger, table: str) -> list:
    return ledger.query(f"SELECT original_name(name_pos, name_len) AS n FROM {table} ORDER BY rowid")["n"].to_list()


def add_sources(con, names: list[str], spans) -> None:
    con.execute("INSERT INTO sample_sources (sample_id, image_set, name_pos, name_len, ingest_id, arrived_at)"
                " SELECT 'x' || unnest(?::BIGINT[]), 's', unnest(?::BIGINT[]), unnest(?::INTEGER[]), 0, now()",
                [list(range(len(names))), *spans])


def test_names_round_trip_in_utf8_and_an_erased_one_reads_as_zeros_only_where_it_was(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    names = ["Bag/a.png", "Sandalen/größe-41 ü.png", "猫/ねこ.jpg", "Coat/z.png"]
    with ledger.transaction() as con:
        spans = ledger.names.append(con, names)
        add_sources(con, names, spans)
    assert names_of(ledger, "sample_sources") == names

    assert ledger.names.erase([spans[0][1]], [spans[1][1]]) == len(names[1].encode())
    raw = (tmp_path / NAMES_FILE).read_bytes()
    assert names[1].encode() not in raw and raw.count(b"\0") == len(names[1].encode())
    assert [n for i, n in enumerate(names_of(ledger, "sample_sources")) if i != 1] == [names[0], *names[2:]]


def test_names_of_a_transaction_that_never_committed_are_dropped_by_the_next_write(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with ledger.transaction() as con:
        add_sources(con, ["kept.png"], ledger.names.append(con, ["kept.png"]))
    with pytest.raises(RuntimeError):
        with ledger.transaction() as con:
            add_sources(con, ["secret-holiday.png"], ledger.names.append(con, ["secret-holiday.png"]))
            raise RuntimeError("the ingest fails after its names were written")
    with ledger.transaction() as con:
        add_sources(con, ["next.png"], ledger.names.append(con, ["next.png"]))
    assert (tmp_path / NAMES_FILE).read_bytes() == b"kept.pngnext.png"
    assert names_of(ledger, "sample_sources") == ["kept.png", "next.png"]


def test_a_truncated_name_file_is_a_clear_error_not_a_silent_erasure(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with ledger.transaction() as con:
        spans = ledger.names.append(con, ["a.png", "b.png"])
    (tmp_path / NAMES_FILE).write_bytes(b"a.p")
    with pytest.raises(ValueError, match="truncated or replaced"):
        ledger.names.erase(*spans)


def test_the_audit_catches_a_truncated_name_file(tmp_path):
    from benchmarks.synthetic import QueryVectors, build_memory
    memory = build_memory(tmp_path / "home", 300, QueryVectors(8))
    assert memory.audit.verify().ok
    names = tmp_path / "home" / NAMES_FILE
    names.write_bytes(names.read_bytes()[:-5])
    assert [p for p in memory.audit.verify().problems if "names.bin ends at byte" in p and "restore it" in p]


def test_the_cli_away_from_the_home_says_where_to_start_instead_of_showing_no_names(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "home" / "ledger.duckdb")
    with ledger.transaction() as con:
        add_sources(con, ["a.png"], ledger.names.append(con, ["a.png"]))
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect(str(ledger.path), read_only=True)
    try:
        with pytest.raises(duckdb.InvalidInputException, match="start the duckdb CLI in the memory home"):
            con.execute("SELECT original_name(name_pos, name_len) FROM sample_sources").fetchall()
        monkeypatch.chdir(tmp_path / "home")
        assert con.execute("SELECT original_name(name_pos, name_len) FROM sample_sources").fetchall() == [("a.png",)]
    finally:
        con.close()


# ---- a ledger from before names left DuckDB ----------------------------------------------------------

def version_6_ledger(path: Path) -> None:
    """A ledger as version 6 wrote it: names in `original_name` columns, one of them redacted by a
    forget, and the names' old bytes in the file (as the columns were updated once)."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
                " applied_at TIMESTAMP NOT NULL)")
    for version, name, sql in migrations():
        if version <= 6:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
    con.execute("INSERT INTO samples (sample_id, vector_id, label, image_set, status, added_at, original_name) VALUES"
                " ('s1', 0, 'Bag', 'one', 'active', now(), 'Bag/holiday-in-rome.png'),"
                " ('s2', 1, 'Coat', 'one', 'forgotten', now(), NULL),"
                " ('s3', NULL, NULL, 'one', 'quarantined', now(), 'Coat/unlabelled-ann.png')")
    con.execute("INSERT INTO sample_sources VALUES ('s1', 'one', 'Bag/holiday-in-rome.png', 'Bag', 1, now()),"
                " ('s1', 'two', 'copy-of-rome.png', 'Bag', 2, now()), ('s2', 'one', NULL, 'Coat', 1, now())")
    con.execute("INSERT INTO quarantine VALUES (1, 'one', 'Coat/unlabelled-ann.png', 's3', 'no label', NULL, now()),"
                " (1, 'one', '[redacted]', 's2', 'no label', NULL, now()), (1, 'one', 'broken.png', NULL, 'not an image',"
                " NULL, now())")
    con.execute("CHECKPOINT")
    con.close()


@pytest.mark.parametrize("crash_before_copy", [False, True])
def test_a_version_6_ledger_moves_its_names_out_and_keeps_no_old_bytes(tmp_path, crash_before_copy, monkeypatch):
    path = tmp_path / "ledger.duckdb"
    version_6_ledger(path)
    assert b"holiday-in-rome" in path.read_bytes()
    if crash_before_copy:  # the migration commits, then the process dies before the file is copied
        monkeypatch.setattr(Ledger, "_copy_to_fresh_file", lambda self: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit):
            with Ledger(path).connect():
                pass
        assert b"holiday-in-rome" in path.read_bytes() and path.with_name("ledger.duckdb.copy-pending").exists()
        monkeypatch.undo()

    ledger = Ledger(path)
    assert names_of(ledger, "samples") == ["Bag/holiday-in-rome.png", None, "Coat/unlabelled-ann.png"]
    assert names_of(ledger, "sample_sources") == ["Bag/holiday-in-rome.png", "copy-of-rome.png", None]
    assert names_of(ledger, "quarantine") == ["Coat/unlabelled-ann.png", None, "broken.png"]
    assert "original_name" not in ledger.query("SELECT column_name FROM duckdb_columns()")["column_name"].to_list()
    assert ledger.query("SELECT max(version) AS v FROM schema_migrations")["v"][0] == max(v for v, _, _ in migrations())
    raw = path.read_bytes()
    assert [n for n in (b"holiday-in-rome", b"copy-of-rome", b"unlabelled-ann", b"broken.png") if n in raw] == []
    assert not path.with_name("ledger.duckdb.copy-pending").exists()
