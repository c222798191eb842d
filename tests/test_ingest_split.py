"""Ingest split in two (issue 18): `read_part` reads, hashes and decodes files on any worker and
keeps no bytes; `Ingest.register_read` (the single writer) reads the bytes again, checks their
hash and registers them as `ingest` does. Real files, a real DuckDB ledger, two real memories."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vismem_assets.imagesets import read_image_set
from vismem_assets.ingest import read_part
from vismem_assets.memory import Memory
from vismem_assets.slices import even_slices

SAMPLES = "SELECT sample_id, label, status, image_path, format, width, height, n_bytes FROM samples ORDER BY sample_id"
QUARANTINE = "SELECT sample_id, reason FROM quarantine ORDER BY sample_id, reason"


def mixed_set(fm_sets, root: Path) -> Path:
    """Two labels of real images, the same bytes twice, a truncated PNG and a text file."""
    for label in ("Bag", "Coat"):
        (root / label).mkdir(parents=True)
        for f in sorted((fm_sets["train"] / label).glob("*.png"))[:4]:
            shutil.copy(f, root / label / f.name)
    first = sorted((root / "Bag").glob("*.png"))[0]
    shutil.copy(first, root / "Coat" / "same-bytes-again.png")
    (root / "Coat" / "truncated.png").write_bytes(first.read_bytes()[:60])
    (root / "Bag" / "notes.txt").write_text("not an image")
    return root


def read_in_parts(source: Path, parts: int) -> list:
    files = read_image_set(source)
    return [c for start, stop in even_slices(len(files), parts) for c in read_part(files[start:stop])]


def test_even_slices():
    assert even_slices(0, 3) == [] and even_slices(5) == [(0, 5)]
    assert even_slices(10, 3) == [(0, 3), (3, 7), (7, 10)] and even_slices(10, 1, chunk=4) == [(0, 3), (3, 7), (7, 10)]
    assert even_slices(2, 5) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="at least 1"):
        even_slices(3, 0)


def test_read_part_keeps_no_bytes_and_register_read_equals_ingest(fm_sets, encoder, tmp_path):
    source = mixed_set(fm_sets, tmp_path / "mixed")
    checked = read_in_parts(source, 3)
    assert all(c.data in (None, b"") for c in checked)      # what a worker hands over: no image bytes
    split = Memory(tmp_path / "split", encoder=encoder)
    whole = Memory(tmp_path / "whole", encoder=encoder)
    a = split.ingestion.register_read(source, "mixed", checked).to_dict()
    b = whole.ingest(source, name="mixed").to_dict()
    assert a.pop("ingest_id") == b.pop("ingest_id") == 1
    assert a == b and a["added"] == 8 and a["duplicates"] == 1 and len(a["quarantined"]) == 2
    for sql in (SAMPLES, QUARANTINE):
        assert split.ledger.query(sql).rows() == whole.ledger.query(sql).rows()
    stored = lambda m: sorted(p.relative_to(m.layout.root).as_posix() for p in m.layout.images.rglob("*")
                              if p.is_file() and ".staging" not in p.parts)
    assert stored(split) == stored(whole) and len(stored(split)) == 8


def test_a_file_changed_or_gone_between_read_and_register_is_taken_as_it_is_now(fm_sets, encoder, tmp_path):
    source = mixed_set(fm_sets, tmp_path / "mixed")
    checked = read_in_parts(source, 2)
    bag = sorted((source / "Bag").glob("*.png"))
    other = sorted((fm_sets["more"] / "Bag").glob("*.png"))[0]
    old_id = next(c.sample_id for c in checked if c.source.path == bag[1])
    shutil.copy(other, bag[1])                              # replaced by another image after it was read
    bag[2].unlink()                                        # removed after it was read
    memory = Memory(tmp_path / "home", encoder=encoder)
    report = memory.ingestion.register_read(source, "mixed", checked)
    ids = {r[0] for r in memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active'").rows()}
    whole = Memory(tmp_path / "whole", encoder=encoder)
    whole.ingest(source, name="mixed")
    assert old_id not in ids
    assert ids == {r[0] for r in whole.ledger.query("SELECT sample_id FROM samples WHERE status = 'active'").rows()}
    gone = [q for q in report.quarantined if q["name"].endswith(bag[2].name)]
    assert gone and gone[0]["reason"].startswith("unreadable"), report.quarantined
