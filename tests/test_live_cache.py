"""The live version cached in a long-lived reader (issue 20): a search on an unchanged memory
does not open the ledger (the change token, a few bytes in the home, says nothing committed);
any committed transaction, from this process or another, makes the next search look again."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.ledger.base import CHANGES_FILE
from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parent.parent


def sessions_opened(memory: Memory, monkeypatch) -> list:
    opened = []
    real = type(memory.ledger)._session

    def counting(self):
        opened.append(1)
        return real(self)

    monkeypatch.setattr(type(memory.ledger), "_session", counting)
    return opened


def test_an_unchanged_memory_is_searched_without_opening_the_ledger(tmp_path, encoder, fm_sets, monkeypatch):
    memory = Memory(tmp_path / "home", encoder=encoder)
    memory.add(fm_sets["train"], progress=False)
    assert (memory.layout.root / CHANGES_FILE).is_file()
    queries = encoder.embed(sorted(fm_sets["test"].rglob("*.png"))[:5], progress=False)
    first, catalog = memory.search(queries, 10), memory.catalog()
    opened = sessions_opened(memory, monkeypatch)
    for _ in range(20):
        again = memory.search(queries, 10)
    np.testing.assert_array_equal(again[1], first[1])
    assert memory.catalog() is catalog
    assert opened == []                                   # neither the live version nor the catalog re-read

    # Another process adds a set: the token changes, the next search sees the new version.
    before = memory.live_index()[0].version
    done = subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(memory.layout.root), "add",
                           str(fm_sets["more"])], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stored = sorted((fm_sets["more"] / "Bag").glob("*.png"))[0]
    sims, ids = memory.search(encoder.embed([stored], progress=False), 1)
    assert memory.live_index()[0].version > before and sims[0, 0] > 0.999
    assert opened                                          # it asked the ledger, once something had changed

    # A forget accepted in this process: its samples are gone from the next search.
    victim = memory.catalog().sample_ids[memory.catalog().rows(ids)[0, 0]]
    memory.forget(ForgetRequest(sample_ids=[victim], requested_by="alice", reason="asked"))
    assert memory.search(encoder.embed([stored], progress=False), 1)[1][0, 0] != ids[0, 0]
    assert victim not in set(memory.catalog().sample_ids[memory.catalog().rows(memory.search(queries, 50)[1]).ravel()])
