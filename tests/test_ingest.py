"""Ingest: image sets (folders and manifests) go into the ledger and the content-addressed
image store; duplicates are stored once; bad files are quarantined with a reason while the
rest of their set goes in; only new images are embedded.

Everything here is real: a DuckDB ledger file, FAISS indexes, PNG/JPEG files written with PIL
or copied out of the session's Fashion-MNIST folders, and the real default encoder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from vismem_assets import imagesets
from vismem_assets.imagesets import ImageSetError, SourceFile, check_image
from vismem_assets.index_store import index_ids

LABELS = ("Bag", "Trouser", "Sneaker")


# ---- helpers ---------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fm_files(fm_sets, split="train", labels=LABELS, per_label=2, offset=0) -> list[tuple[str, Path]]:
    """(label, path) of real Fashion-MNIST PNGs from the session folders."""
    out = []
    for label in labels:
        files = sorted((fm_sets[split] / label).glob("*.png"))[offset:offset + per_label]
        assert len(files) == per_label, f"fixture set {split}/{label} is too small"
        out += [(label, f) for f in files]
    return out


def make_set(root: Path, items) -> Path:
    """A folder set root/<label>/<name>: items are (label, source path) or (label, name, bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        if len(item) == 2:
            label, src = item
            name, data = src.name, src.read_bytes()
        else:
            label, name, data = item
        (root / label).mkdir(exist_ok=True)
        (root / label / name).write_bytes(data)
    return root


def count(memory, table: str, where: str = "TRUE", params=None) -> int:
    return int(memory.ledger.query(f"SELECT count(*) AS n FROM {table} WHERE {where}", params)["n"][0])


def active_vector_ids(memory) -> set[int]:
    return set(memory.ledger.query("SELECT vector_id FROM samples WHERE status = 'active'")["vector_id"].to_list())


def live_ids(memory) -> set[int]:
    return set(index_ids(memory.live_index()[1]).tolist())


def assert_ledger_empty(memory):
    for table in ("image_sets", "ingests", "samples", "sample_sources", "quarantine", "label_history"):
        assert count(memory, table) == 0, f"{table} was written to"
    assert not any(p.is_file() for p in memory.layout.images.rglob("*")), "an image was stored"


# ---- folder layout ---------------------------------------------------------------------------

def test_folder_set_is_registered_content_addressed(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, per_label=2)
    src = make_set(tmp_path / "shoes_and_bags", items)

    report = memory.ingest(src)

    n = len(items)
    assert (report.image_set, report.n_files, report.added, report.duplicates) == ("shoes_and_bags", n, n, 0)
    assert report.quarantined == [] and report.label_conflicts == [] and report.blocked == 0

    samples = memory.ledger.query(
        "SELECT sample_id, vector_id, label, image_set, status, image_path, original_name(name_pos, name_len) AS original_name, format, width, height"
        " FROM samples ORDER BY original_name")
    assert len(samples) == n
    expected = sorted((f"{label}/{path.name}", label, path.read_bytes()) for label, path in items)
    for row, (name, label, data) in zip(samples.iter_rows(named=True), expected):
        assert row["original_name"] == name
        assert row["sample_id"] == sha(data)                      # identity = content
        assert row["label"] == label and row["image_set"] == "shoes_and_bags"
        assert row["status"] == "active"
        assert (row["format"], row["width"], row["height"]) == ("png", 28, 28)
        stored = memory.layout.absolute(row["image_path"])
        assert stored == memory.layout.images / row["sample_id"][:2] / f"{row['sample_id']}.png"
        assert stored.read_bytes() == data                         # byte-identical copy
    vids = samples["vector_id"].to_list()
    assert None not in vids and len(set(vids)) == n

    history = memory.ledger.query("SELECT sample_id, label, reason FROM label_history ORDER BY sample_id")
    assert sorted(history.rows()) == sorted((sha(d), lab, "ingest") for _, lab, d in expected)
    assert count(memory, "sample_sources", "image_set = 'shoes_and_bags' AND ingest_id = ?", [report.ingest_id]) == n

    ingest = memory.ledger.query("SELECT * FROM ingests")
    assert ingest.select("ingest_id", "image_set", "source", "n_files", "n_added", "n_duplicates", "n_quarantined"
                         ).row(0) == (report.ingest_id, "shoes_and_bags", str(src), n, n, 0, 0)
    assert ingest["finished_at"][0] is not None
    assert memory.ledger.query("SELECT name, source FROM image_sets").rows() == [("shoes_and_bags", str(src))]
    # Ingest alone neither embeds nor indexes.
    assert count(memory, "embeddings") == 0 and count(memory, "index_versions") == 0


def test_samples_record_their_size_in_bytes(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, labels=("Bag",), per_label=2)
    memory.ingest(make_set(tmp_path / "sized", items))
    got = dict(memory.ledger.query("SELECT sample_id, n_bytes FROM samples").iter_rows())
    assert got == {sha(p.read_bytes()): p.stat().st_size for _, p in items}


def test_default_name_of_a_folder_set_is_the_whole_folder_name(memory, fm_sets, tmp_path):
    (label, a), (_, b) = fm_files(fm_sets, labels=("Bag",), per_label=2)
    r1 = memory.ingest(make_set(tmp_path / "batch.1", [(label, a)]))
    r2 = memory.ingest(make_set(tmp_path / "batch.2", [(label, b)]))
    assert (r1.image_set, r2.image_set) == ("batch.1", "batch.2")
    assert count(memory, "image_sets") == 2


# ---- duplicates --------------------------------------------------------------------------------

def test_readding_the_same_set_adds_nothing_and_writes_no_version(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, per_label=2)
    src = make_set(tmp_path / "first", items)
    first = memory.add(src)
    assert first.ingest.added == len(items) and first.embedded == len(items) and first.index_version == 1

    again = memory.add(src)

    assert again.ingest.added == 0 and again.ingest.duplicates == len(items)
    assert again.ingest.label_conflicts == [] and again.ingest.quarantined == []
    assert again.embedded == 0
    assert again.index_version == 1 and again.n_vectors == len(items)
    assert count(memory, "index_versions") == 1
    assert count(memory, "samples") == len(items)
    assert count(memory, "embeddings") == len(items)
    assert count(memory, "ingests") == 2
    assert count(memory, "sample_sources") == 2 * len(items)   # every arrival is remembered
    assert memory.ledger.query("SELECT n_added, n_duplicates FROM ingests ORDER BY ingest_id").rows() == [
        (len(items), 0), (0, len(items))]
    assert sorted(p.name for p in (memory.layout.indexes(memory.encoder.slug)).glob("v*.faiss")) == ["v000001.faiss"]


def test_same_bytes_under_other_names_and_sets_are_stored_once(memory, fm_sets, tmp_path):
    (label, path), *_ = fm_files(fm_sets, labels=("Bag",), per_label=1)
    data = path.read_bytes()
    memory.ingest(make_set(tmp_path / "one", [(label, path)]))

    # The same bytes twice within one set under other names, and again in another set.
    report = memory.ingest(make_set(tmp_path / "two", [(label, "copy-a.png", data), (label, "copy-b.png", data)]))

    assert report.added == 0 and report.duplicates == 2 and report.label_conflicts == []
    assert count(memory, "samples") == 1
    sources = memory.ledger.query("SELECT image_set, original_name(name_pos, name_len) AS original_name, label FROM sample_sources"
                                  " WHERE sample_id = ? ORDER BY image_set, original_name", [sha(data)])
    assert sources.rows() == [("one", f"{label}/{path.name}", label),
                              ("two", f"{label}/copy-a.png", label), ("two", f"{label}/copy-b.png", label)]
    stored = [p for p in memory.layout.images.rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [f"{sha(data)}.png"]
    assert memory.ledger.query("SELECT image_set, original_name(name_pos, name_len) AS original_name FROM samples").row(0) == ("one", f"{label}/{path.name}")

    # Within one fresh set: two names, same bytes -> one sample, two sources.
    (_, other), = fm_files(fm_sets, labels=("Trouser",), per_label=1)
    odata = other.read_bytes()
    r3 = memory.ingest(make_set(tmp_path / "three", [("Trouser", "x.png", odata), ("Trouser", "y.png", odata)]))
    assert (r3.added, r3.duplicates) == (1, 1)
    assert count(memory, "samples", "sample_id = ?", [sha(odata)]) == 1
    assert count(memory, "sample_sources", "sample_id = ?", [sha(odata)]) == 2


def test_duplicate_with_another_label_is_a_reported_conflict(memory, fm_sets, tmp_path):
    (label, path), *_ = fm_files(fm_sets, labels=("Bag",), per_label=1)
    data = path.read_bytes()
    memory.ingest(make_set(tmp_path / "orig", [(label, path)]))

    report = memory.ingest(make_set(tmp_path / "relabelled", [("Trouser", "same.png", data)]))

    assert report.added == 0 and report.duplicates == 1
    assert report.label_conflicts == [{"name": "Trouser/same.png", "label": "Trouser", "stored_label": "Bag"}]
    assert memory.ledger.query("SELECT label FROM samples WHERE sample_id = ?", [sha(data)])["label"].to_list() == ["Bag"]
    assert memory.ledger.query("SELECT label FROM label_history WHERE sample_id = ?", [sha(data)])["label"].to_list() == ["Bag"]
    # The conflicting arrival itself is still on record, with the label it came with.
    assert count(memory, "sample_sources", "sample_id = ? AND label = 'Trouser' AND image_set = 'relabelled'",
                 [sha(data)]) == 1

    # A conflict inside one new set: the first arrival's label wins and the second is reported.
    (_, other), = fm_files(fm_sets, labels=("Sneaker",), per_label=1)
    odata = other.read_bytes()
    r2 = memory.ingest(make_set(tmp_path / "inner", [("Sneaker", "a.png", odata), ("Trouser", "b.png", odata)]))
    assert r2.added == 1 and r2.duplicates == 1
    assert r2.label_conflicts == [{"name": "Trouser/b.png", "label": "Trouser", "stored_label": "Sneaker"}]
    assert memory.ledger.query("SELECT label FROM samples WHERE sample_id = ?", [sha(odata)])["label"].to_list() == ["Sneaker"]


# ---- bad files -----------------------------------------------------------------------------------

def test_check_image_bomb_guard(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80), (10, 20, 30)).save(path)
    source = SourceFile(path=path, name="x/big.png", label="x")

    small = check_image(source, max_pixels=100 * 80 - 1)
    assert not small.ok and small.reason.startswith("decompression bomb")
    assert "100x80" in small.reason and str(100 * 80 - 1) in small.reason
    assert small.sample_id == sha(path.read_bytes())          # still identified, so it can be quarantined

    fits = check_image(source, max_pixels=100 * 80)
    assert fits.ok and (fits.width, fits.height, fits.format) == (100, 80, "png")
    assert check_image(source).ok                               # the default limit is far above 8000 px
    assert imagesets.MAX_PIXELS == 50_000_000


def write_bad_files(folder: Path, real_png: bytes) -> dict[str, tuple[bytes | None, tuple[str, ...]]]:
    """Bad files in one label folder: name -> (bytes on disk or None if unreadable, words expected in the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "empty.png": (b"", ("empty", "0 bytes")),
        "truncated.png": (real_png[: len(real_png) // 2], ("truncated",)),
        "notes.jpg": (b"this is a shopping list, not a photo\n", ("not an image",)),
        "readme.txt": (b"plain text\n", ("unsupported file type", ".txt")),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    # 8000 x 8000 = 64 Mpx > MAX_PIXELS (50 M), yet the file is ~60 KB: a real decompression bomb.
    Image.new("L", (8000, 8000), 0).save(folder / "bomb.png")
    bad["bomb.png"] = ((folder / "bomb.png").read_bytes(), ("decompression bomb", "8000x8000"))
    # Unreadable: tests may run as root, where chmod 000 does not stop a read; a dangling symlink
    # really cannot be read (stat fails with ENOENT) whoever runs it.
    os.symlink(folder / "does-not-exist.png", folder / "gone.png")
    bad["gone.png"] = (None, ("unreadable",))
    return bad


def test_bad_files_are_quarantined_and_the_rest_goes_in(memory, fm_sets, tmp_path):
    good = fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=2)
    src = make_set(tmp_path / "mixed", good)
    (_, spare), = fm_files(fm_sets, labels=("Sneaker",), per_label=1)
    bad = write_bad_files(src / "Bag", spare.read_bytes())

    result = memory.add(src)
    report = result.ingest

    assert report.n_files == len(good) + len(bad)
    assert report.added == len(good) and result.embedded == len(good)
    by_name = {q["name"]: q["reason"] for q in report.quarantined}
    assert set(by_name) == {f"Bag/{n}" for n in bad}
    for name, (_, words) in bad.items():
        for word in words:
            assert word in by_name[f"Bag/{name}"], (name, by_name[f"Bag/{name}"])

    rows = memory.ledger.query(
        "SELECT original_name(name_pos, name_len) AS original_name, sample_id, reason, stored_path, ingest_id, image_set FROM quarantine")
    assert len(rows) == len(bad)
    for row in rows.iter_rows(named=True):
        name = row["original_name"].split("/", 1)[1]
        data, words = bad[name]
        assert row["reason"] == by_name[row["original_name"]]
        assert row["ingest_id"] == report.ingest_id and row["image_set"] == "mixed"
        if data is None:                                   # nothing could be read: nothing to keep
            assert row["sample_id"] is None and row["stored_path"] is None
        else:                                              # the bad bytes are kept for a person to look at
            assert row["sample_id"] == sha(data)
            kept = memory.layout.absolute(row["stored_path"])
            assert kept.parent == memory.layout.quarantine and kept.read_bytes() == data
    assert memory.ledger.query("SELECT n_quarantined, n_added FROM ingests").row(0) == (len(bad), len(good))

    # Nothing bad is active, has a vector id, an embedding or a place in the index.
    bad_ids = [sha(d) for d, _ in bad.values() if d is not None]
    assert count(memory, "samples", "status = 'active'") == len(good)
    assert count(memory, "samples", "sample_id IN (SELECT unnest(?::VARCHAR[])) AND"
                 " (vector_id IS NOT NULL OR status <> 'quarantined' OR image_path IS NOT NULL)", [bad_ids]) == 0
    assert count(memory, "embeddings", "sample_id IN (SELECT unnest(?::VARCHAR[]))", [bad_ids]) == 0
    good_vids = set(memory.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                        [[sha(p.read_bytes()) for _, p in good]])["vector_id"].to_list())
    assert live_ids(memory) == good_vids == active_vector_ids(memory)
    stored = {p.name.split(".")[0] for p in memory.layout.images.rglob("*") if p.is_file()}
    assert stored == {sha(p.read_bytes()) for _, p in good}


def test_same_bytes_good_and_bad_in_one_set_keeps_the_good_one(memory, fm_sets, tmp_path):
    (label, path), (_, other) = fm_files(fm_sets, labels=("Bag",), per_label=2)
    data = path.read_bytes()
    src = make_set(tmp_path / "twice", [(label, path), (label, other), (label, "also.txt", data)])

    report = memory.ingest(src)

    assert report.added == 2
    assert [q["name"] for q in report.quarantined] == [f"{label}/also.txt"]
    assert memory.ledger.query("SELECT status FROM samples WHERE sample_id = ?", [sha(data)])["status"].to_list() == ["active"]


# ---- manifests -------------------------------------------------------------------------------------

def test_csv_manifest_with_relative_and_absolute_paths(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, labels=("Bag", "Trouser"), per_label=2)
    mdir = tmp_path / "mani"
    (mdir / "pics").mkdir(parents=True)
    rows = []
    for i, (label, path) in enumerate(items):
        if i % 2:   # relative to the manifest's folder
            shutil.copy(path, mdir / "pics" / path.name)
            rows.append((f"pics/{path.name}", label))
        else:       # absolute
            rows.append((str(path), label))
    (_, unlabelled), = fm_files(fm_sets, labels=("Sneaker",), per_label=1)
    rows.append((str(unlabelled), ""))
    manifest = mdir / "catalogue.csv"
    pl.DataFrame(rows, schema=["path", "label"], orient="row").write_csv(manifest)

    # The absolute rows lie outside the manifest's folder: allowed by widening the root.
    report = memory.ingest(manifest, root=os.path.commonpath([mdir, fm_sets["train"]]))

    assert report.image_set == "catalogue" and report.n_files == len(items) + 1
    assert report.added == len(items)
    assert report.quarantined == [{"name": str(unlabelled), "reason": "no label"}]
    got = memory.ledger.query("SELECT sample_id, label, original_name(name_pos, name_len) AS original_name FROM samples WHERE status = 'active'")
    assert sorted(got.rows()) == sorted((sha(p.read_bytes()), lab, name)
                                        for (lab, p), (name, _) in zip(items, rows))
    q = memory.ledger.query("SELECT original_name(name_pos, name_len) AS original_name, sample_id, reason FROM quarantine")
    assert q.rows() == [(str(unlabelled), sha(unlabelled.read_bytes()), "no label")]
    assert count(memory, "samples", "status = 'quarantined' AND vector_id IS NULL") == 1


def test_parquet_manifest(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, labels=("Sneaker", "Bag"), per_label=2, offset=3)
    manifest = tmp_path / "parq" / "shop.parquet"
    manifest.parent.mkdir()
    for _, p in items:
        shutil.copy(p, manifest.parent / p.name)
    pl.DataFrame({"path": [p.name for _, p in items], "label": [lab for lab, _ in items],
                  "extra": list(range(len(items)))}).write_parquet(manifest)

    report = memory.ingest(manifest)

    assert (report.image_set, report.added, report.quarantined) == ("shop", len(items), [])
    got = memory.ledger.query("SELECT sample_id, label, image_set FROM samples")
    assert sorted(got.rows()) == sorted((sha(p.read_bytes()), lab, "shop") for lab, p in items)


def test_manifest_without_label_column_is_refused_and_writes_nothing(memory, fm_sets, tmp_path):
    (_, path), = fm_files(fm_sets, labels=("Bag",), per_label=1)
    manifest = tmp_path / "nolabel.csv"
    pl.DataFrame({"path": [str(path)], "class": ["Bag"]}).write_csv(manifest)

    with pytest.raises(ImageSetError) as info:
        memory.ingest(manifest)

    message = str(info.value)
    assert "'label'" in message and "lacks column" in message and "class" in message
    assert_ledger_empty(memory)


# ---- refused sets ----------------------------------------------------------------------------------

def test_invalid_set_name_is_refused_with_advice(memory, fm_sets, tmp_path):
    items = fm_files(fm_sets, labels=("Bag",), per_label=1)
    src = make_set(tmp_path / "summer sale!", items)

    with pytest.raises(ImageSetError, match=r"pass --name") as info:
        memory.ingest(src)
    assert "summer sale!" in str(info.value) and "letters, digits" in str(info.value)
    for bad in ("../escape", "", "-dash-first", "x" * 129):
        with pytest.raises(ImageSetError):
            memory.ingest(src, name=bad)
    assert_ledger_empty(memory)

    assert memory.ingest(src, name="summer_sale").added == 1   # the advice works


def test_missing_or_malformed_set_path(memory, tmp_path):
    with pytest.raises(ImageSetError, match="does not exist"):
        memory.ingest(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(ImageSetError, match="no label folders"):
        memory.ingest(flat)
    other = tmp_path / "list.json"
    other.write_text("[]")
    with pytest.raises(ImageSetError, match=r"\.csv or \.parquet"):
        memory.ingest(other)
    assert_ledger_empty(memory)


# ---- embed only what is new ------------------------------------------------------------------------

def test_second_set_embeds_only_its_new_images(memory, fm_sets, tmp_path):
    a_items = fm_files(fm_sets, labels=("Bag", "Trouser", "Sneaker"), per_label=2)
    b_new = fm_files(fm_sets, "more", labels=("Bag", "Trouser", "Sneaker"), per_label=1)
    b_items = a_items[::2] + b_new        # 3 shared with A, 3 new
    first = memory.add(make_set(tmp_path / "A", a_items))
    assert first.embedded == len(a_items)

    second = memory.add(make_set(tmp_path / "B", b_items))

    assert second.ingest.added == len(b_new) and second.ingest.duplicates == len(a_items[::2])
    assert second.embedded == len(b_new)
    enc = memory.encoder.id
    emb = memory.ledger.query("SELECT sample_id FROM embeddings WHERE encoder_id = ?", [enc])["sample_id"].to_list()
    active = memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active'")["sample_id"].to_list()
    assert len(emb) == len(set(emb)) == len(a_items) + len(b_new)
    assert set(emb) == set(active)
    # On disk too: each sample's vector was written once, in the part file the ledger names.
    parts = pl.concat([pl.read_parquet(p) for p in memory.embeddings.files()])
    assert parts.height == len(active) and parts["sample_id"].n_unique() == len(active)
    vectors = np.stack(parts["vector"].to_numpy())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    versions = memory.ledger.query("SELECT version, n_added, n_vectors FROM index_versions ORDER BY version")
    assert versions.rows() == [(1, len(a_items), len(a_items)), (2, len(b_new), len(a_items) + len(b_new))]
    assert live_ids(memory) == active_vector_ids(memory)
