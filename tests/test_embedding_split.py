"""Embedding in two steps: encode (no ledger, no lock) writes a part file; the recorder (the
single writer) inserts its rows, dropping samples forgotten or recorded meanwhile. And the
pending check of index_pending runs in the indexing connection, without the embedding lock."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vismem_assets.embedding import Recorder, encode, encode_task, split_pending
from vismem_assets.ledger import Ledger
from vismem_assets.memory import Memory


def small_set(src: Path, dst: Path, per_label: int = 3, labels: int = 2) -> Path:
    for folder in sorted(p for p in src.iterdir() if p.is_dir())[:labels]:
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_label]:
            shutil.copy(f, dst / folder.name / f.name)
    return dst


def encode_pending(memory, rows: pl.DataFrame):
    return encode(memory.encoder, memory.embeddings, "parts", [memory.layout.absolute(p) for p in rows["image_path"]],
                  rows["sample_id"].to_list(), rows["vector_id"].to_numpy(), progress=False)


def test_encode_writes_a_part_without_the_ledger_and_the_recorder_records_it(memory, fm_sets, tmp_path, monkeypatch):
    memory.ingest(small_set(fm_sets["train"], tmp_path / "six"))
    pending = memory.pending_embeddings()
    assert len(pending) == 6

    def no_ledger(*args, **kwargs):
        raise AssertionError("encode opened the ledger")
    monkeypatch.setattr(Ledger, "connect", no_ledger)
    part = encode_pending(memory, pending)
    monkeypatch.undo()
    assert memory.layout.absolute(part.path).is_file() and part.sample_ids == pending["sample_id"].to_list()
    assert memory.embedding_files() == [] and len(memory.pending_embeddings()) == 6   # written, not recorded

    assert Recorder(memory.ledger, memory.embeddings, memory.encoder.id).record(part) == 6
    assert memory.embedding_files() == [part.path] and memory.pending_embeddings().is_empty()


def test_the_recorder_drops_rows_recorded_meanwhile_and_keeps_every_part_whole(memory, fm_sets, tmp_path):
    memory.ingest(small_set(fm_sets["train"], tmp_path / "six"))
    pending = memory.pending_embeddings()
    recorder = Recorder(memory.ledger, memory.embeddings, memory.encoder.id)
    first = encode_pending(memory, pending.head(2))
    both = encode_pending(memory, pending)          # a second worker encoded all six meanwhile
    again = encode_pending(memory, pending.head(2))
    assert recorder.record(first) == 2
    assert recorder.record(both) == 4                # rewritten without the two recorded first
    assert pl.read_parquet(memory.layout.absolute(both.path))["sample_id"].to_list() == pending["sample_id"][2:].to_list()
    assert recorder.record(again) == 0 and not memory.layout.absolute(again.path).exists()
    rows = memory.ledger.query("SELECT path, count(*) AS n FROM embeddings GROUP BY path ORDER BY n")
    assert rows.rows() == [(first.path, 2), (both.path, 4)]
    parts = sorted(memory.layout.root.glob("embeddings/*/*/part-*.parquet"))
    assert {memory.layout.relative(p) for p in parts} == {first.path, both.path}   # no part the ledger does not name


def test_index_pending_with_nothing_to_embed_uses_one_connection_and_no_embedding_lock(memory, fm_sets, tmp_path,
                                                                                        monkeypatch):
    memory.add(small_set(fm_sets["train"], tmp_path / "six"), progress=False)
    opened = []
    real_open = Ledger._open
    monkeypatch.setattr(Ledger, "_open", lambda self, **kw: opened.append(1) or real_open(self, **kw))

    @contextmanager
    def no_lock():
        raise AssertionError("the embedding lock was taken with nothing pending")
        yield
    monkeypatch.setattr(memory.embeddings, "lock", no_lock)
    assert memory.index_pending() is None
    assert memory.embed_pending() == 0
    assert len(opened) == 2   # one each: the pending check shares the indexing connection


def test_split_pending_cuts_tasks_of_at_most_chunk_and_at_least_parts():
    pending = pl.DataFrame({"sample_id": [f"s{i}" for i in range(10)], "vector_id": list(range(10)),
                            "image_path": [f"images/{i}" for i in range(10)], "image_set": ["a"] * 6 + ["b"] * 4})
    assert split_pending(pending.head(0), "a", parts=4) == []
    two = split_pending(pending, None, parts=2)
    assert [len(t) for t in two] == [5, 5] and [t.folder for t in two] == ["a", "a"]   # the first row's set
    assert sum((t.sample_ids for t in two), []) == pending["sample_id"].to_list()       # every row once, in order
    assert [len(t) for t in split_pending(pending, "x", parts=1, chunk=4)] == [3, 4, 3]  # ceil(10 / 4) tasks
    assert [len(t) for t in split_pending(pending, "x", parts=20)] == [1] * 10          # never an empty task
    assert split_pending(pending, "x", parts=3)[1].vector_ids == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="at least 1"):
        split_pending(pending, "x", parts=0)


def test_tasks_encoded_apart_and_recorded_give_the_vectors_of_embed_pending(memory, encoder, fm_sets, tmp_path):
    """The cluster's path (split, encode each task anywhere, record every part) against the embedded
    default's embed_pending on the same images in another home: the same vectors per sample."""
    source = small_set(fm_sets["train"], tmp_path / "six")
    memory.ingest(source)
    tasks = split_pending(memory.pending_embeddings(), "six", parts=3)
    assert [len(t) for t in tasks] == [2, 2, 2]
    parts = [encode_task(encoder, memory.embeddings, t) for t in tasks]
    assert memory.embedding_files() == []                                   # encoded, nothing recorded yet
    recorder = Recorder(memory.ledger, memory.embeddings, memory.encoder.id)
    assert sum(recorder.record(p) for p in parts) == 6
    assert memory.pending_embeddings().is_empty() and len(memory.embedding_files()) == 3

    other = Memory(tmp_path / "other", encoder=encoder)
    other.ingest(source)
    assert other.embed_pending(progress=False) == 6

    def by_sample(m):
        frame = pl.concat([pl.read_parquet(m.layout.absolute(p)) for p in m.embedding_files()]).sort("sample_id")
        return frame["sample_id"].to_list(), np.stack(frame["vector"].to_numpy())
    (ids, vectors), (other_ids, other_vectors) = by_sample(memory), by_sample(other)
    assert ids == other_ids and np.allclose(vectors, other_vectors, atol=1e-6)
