"""CLI tables that fit the terminal (issue 17, item 7): `vismem audit query index_lineage` has 18
columns; at COLUMNS=80 it prints one block per row, no line over 80 characters and no value cut
short, while a narrow table still prints as a grid. A real memory, the real `vismem` process."""
import json
import os
import subprocess
import sys

import polars as pl
import pytest

from vismem_assets.cli import _cell, _table
from vismem_assets.forgetting import ForgetRequest

VISMEM = [sys.executable, "-m", "vismem_assets.cli"]


def vismem(home, *args, columns: int | None = 80) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(VISMEM_HOME=str(home), **({"COLUMNS": str(columns)} if columns else {}))
    proc = subprocess.run([*VISMEM, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_records(text: str) -> list[dict]:
    """Blocks of "name │ value" lines back into rows; a value continues on lines with no name."""
    rows, name = [], None
    for line in text.splitlines():
        if line.startswith("-["):
            rows.append({})
        elif " │ " in line or line.endswith(" │"):
            key, _, value = line.partition(" │")
            value = value[1:] if value.startswith(" ") else value
            if key.strip():
                name = key.strip()
                rows[-1][name] = value
            else:
                rows[-1][name] += value
    return rows


@pytest.fixture(scope="module")
def home(tmp_path_factory, fm_sets, encoder):
    """A memory with a lineage of four versions: two adds, a forget, a compaction."""
    from vismem_assets.memory import Memory

    memory = Memory(tmp_path_factory.mktemp("tables") / "home", encoder=encoder)
    memory.add(fm_sets["train"], name="train", progress=False)
    memory.add(fm_sets["more"], name="more", progress=False)
    memory.forget(ForgetRequest(requested_by="alice", reason="asked to be removed", label="Bag"))
    memory.compact()
    return memory.layout.root


@pytest.mark.slow
def test_index_lineage_at_80_columns_is_one_block_per_row_with_every_value(home):
    out = vismem(home, "audit", "query", "index_lineage")
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    expected = json.loads(vismem(home, "audit", "query", "index_lineage", "--json"))
    assert len(expected) >= 4 and len(expected[0]) == 18
    # Every value whole: each block, its continuation lines joined, is the row --json prints.
    assert parse_records(out) == [{k: _cell(v) for k, v in row.items()} for row in expected]
    assert any(len(_cell(v)) > 60 for v in expected[0].values())  # a sha256 or path had to continue
    assert "18 columns, too wide for 80 characters as a table: one block per row" in out
    # Machines still get CSV, one line per version.
    csv = vismem(home, "audit", "query", "index_lineage", "--csv")
    assert len(csv.strip().splitlines()) == len(expected) + 1


@pytest.mark.slow
def test_a_narrow_table_still_prints_as_a_grid(home):
    out = vismem(home, "audit", "query", "label_counts")
    lines = out.splitlines()
    assert lines[0].startswith("┌") and lines[-1].startswith("└") and "-[" not in out
    assert max(len(line) for line in lines) <= 80
    counts = json.loads(vismem(home, "audit", "query", "label_counts", "--json"))
    for row in counts:
        assert any(all(_cell(v) in line for v in row.values()) for line in lines), row


@pytest.mark.slow
def test_a_wider_terminal_shows_the_lineage_as_a_grid_whole(home):
    expected = json.loads(vismem(home, "audit", "query", "index_lineage", "--json"))
    out = vismem(home, "audit", "query", "index_lineage", columns=1000)
    assert out.startswith("┌") and "-[" not in out
    for row in expected:  # no cell squeezed or cut with "…"
        assert row["sha256"] in out and row["path"] in out and row["encoder_id"] in out


def test_records_fit_any_width_and_long_values_wrap_without_loss(capsys):
    frame = pl.DataFrame({"n": [1, None], "reason": ["asked to be removed " * 5, "x"],
                          "files": [["a.faiss", "b.faiss"], []], "recall": [0.987654321, 1.0]})
    for width in (24, 40, 60):
        _table(frame, width)
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= width, (width, out)
        rows = parse_records(out)
        assert [r["n"] for r in rows] == ["1", "null"]
        assert [r["reason"] for r in rows] == ["asked to be removed " * 5, "x"]
        assert [r["files"] for r in rows] == ['["a.faiss", "b.faiss"]', "[]"]
        assert [r["recall"] for r in rows] == ["0.987654", "1"]
    _table(frame.select("recall"), 24)  # fits: a grid, not blocks
    assert capsys.readouterr().out.startswith("┌")
    # A column name longer than a third of the width continues in its own column.
    name = "a_column_name_longer_than_the_key_column"
    _table(pl.DataFrame({name: ["v" * 50], "b": [2]}), 30)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 30
    keys = [line.partition(" │")[0].strip() for line in out.splitlines() if " │" in line]
    assert "".join(keys) == name + "b"
