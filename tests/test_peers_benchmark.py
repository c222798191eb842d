"""The peer benchmark (benchmarks/peers.py) at a small size, as users run it: every system in its
own process, the figures issue 20 asks for, the byte scan that proves a delete, and the section
it writes into RESULTS.md without touching the rest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import pytest

from benchmarks import peers
from benchmarks.synthetic import clustered_vectors

ROOT = Path(__file__).resolve().parent.parent


def test_the_byte_scan_finds_a_vector_at_any_offset_and_only_the_ones_there(tmp_path):
    x, _ = clustered_vectors(300, 48, seed=1)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "odd").write_bytes(b"abc" + x[:100].tobytes() + b"z")     # 3 bytes off alignment
    index = faiss.IndexFlatIP(48)
    index.add(x[100:150])
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    half = x[150].copy()
    half[:24] = 0                                                               # only its second half kept
    (tmp_path / "half").write_bytes(half.tobytes())
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "odd")
    assert peers.vectors_on_disk(tmp_path, x[:150]) == 150
    assert peers.vectors_on_disk(tmp_path, x[150:151]) == 1
    assert peers.vectors_on_disk(tmp_path, x[151:]) == 0


def test_a_run_replaces_the_last_at_its_size_and_keeps_the_rest(tmp_path, monkeypatch):
    results, store = tmp_path / "RESULTS.md", tmp_path / "peers.json"
    begin, end = peers.markers(7)
    results.write_text(f"# Benchmark results\n\nabove\n\n{begin}\nold run\n{end}\n\nbelow\n")
    monkeypatch.setattr(peers, "render", lambda r: "{}\nrun of {} ({})\n{}\n".format(peers.markers(r["n"])[0], r["n"],
                                                                                    r["when"], peers.markers(r["n"])[1]))
    peers.write({"n": 7, "when": "now"}, results, store)
    peers.write({"n": 9, "when": "now"}, results, store)
    text = results.read_text()
    assert "run of 7 (now)" in text and "old run" not in text and text.count(begin) == 1
    assert text.startswith("# Benchmark results\n\nabove") and text.index("below") < text.index("run of 9")
    peers.write({"n": 7, "when": "later"}, results, store)
    assert "run of 7 (later)" in results.read_text() and "run of 7 (now)" not in results.read_text()
    assert peers.runs_of(store) == {"7": {"n": 7, "when": "later"}, "9": {"n": 9, "when": "now"}}


def test_the_erase_floor_zeroes_vectors_in_every_copy_and_leaves_no_file(tmp_path, monkeypatch):
    from vismem_assets import patches
    zeroed = []
    real_apply = patches.apply

    def watched(holes):
        for path, found in holes.items():
            assert path.stat().st_size in (4096 * 8, 4096 * 3)   # one file a copy, its size (the small one: every slot)
            offsets = found.patches[0].offsets
            assert len(offsets) == min(5, path.stat().st_size // 4096) and (offsets % 4096 == 0).all() and (offsets[1:] > offsets[:-1]).all()
        zeroed.append(len(holes))
        real_apply(holes)

    monkeypatch.setattr(patches, "apply", watched)
    took = peers.erase_floor(tmp_path / "floor", [4096 * 8, 4096 * 3], 5, 4096, repeats=3)
    assert len(took) == 2 and all(t > 0 for t in took)
    assert zeroed == [1, 1, 1, 2, 2, 2]   # the first copy alone, then both
    assert not (tmp_path / "floor").exists()


@pytest.fixture(scope="module")
def small_run():
    before = peers.RESULTS.read_text()
    done = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--n", "4000", "--json", "--no-write"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert peers.RESULTS.read_text() == before          # --no-write
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow   # three processes, one a system (about a minute)
def test_the_small_run_measures_every_system_on_the_same_vectors(small_run):
    r, log = small_run
    assert set(r["systems"]) == set(peers.SYSTEMS)
    assert all(f"peers: {s} done" in log for s in ("vismem", "faiss"))
    for key in ("single_query_ratio", "switch_after_add_s", "switch_after_forget_s", "forget_call_s", "disk_ratio_to_faiss"):
        assert isinstance(r[key], float) and r[key] > 0, key
    ran = {name: s for name, s in r["systems"].items() if "missing" not in s}
    assert {"vismem", "faiss"} <= set(ran)
    for name, s in ran.items():
        assert s["exact_recall"] > 0.99, name                       # exact is exact, whoever searches
        assert s["nlist"] == r["systems"]["vismem"]["nlist"], name
        assert s["ivf_recall"] >= r["systems"]["vismem"]["ivf_recall"] or s["nprobe"] == s["nlist"], name
        for figure in ("exact_single_searcher_qps", "exact_batch_qps", "ivf_single_searcher_qps", "ivf_batch_qps",
                       "add_index_s", "add_stored_s", "delete_call_s", "disk_bytes"):
            assert s[figure] > 0, (name, figure)
        assert s["delete_clean_s"] >= s["delete_call_s"]
    assert r["systems"]["lancedb"] == {"missing": "not installed: pip install -e '.[peers]'"} or \
        ran["lancedb"]["deleted_vectors_left"] == 0


@pytest.mark.slow   # three processes, one a system (about a minute)
def test_vismem_leaves_no_deleted_byte_when_its_forget_returns(small_run):
    r, _ = small_run
    vismem = r["systems"]["vismem"]
    assert r["no_deleted_byte_left"] and vismem["deleted_vectors_left"] == 0
    assert vismem["delete_clean_s"] == vismem["delete_call_s"] and round(vismem["delete_call_s"], 4) == r["forget_call_s"]
    assert r["disk_ratio_to_faiss"] == round(vismem["disk_bytes"] / r["systems"]["faiss"]["disk_bytes"], 3)
    assert set(vismem["disk_parts"]) == {"embeddings", "indexes", "ledger"}
    assert {"accept", "indexes", "embeddings", "proof"} <= set(vismem["forget_phases"])
    assert sum(vismem["forget_phases"].values()) <= vismem["delete_call_s"] * 1.5
    # the floor: the disk alone on files the size of the copies the forget reached (its kept versions among them)
    assert set(vismem["forget_copies"]) == {"live index", "retained versions", "embedding parts"}
    assert vismem["forget_copies"]["embedding parts"] >= r["n"] * r["d"] * 4
    assert 0 < r["forget_floor_s"] < r["forget_call_s"]
    assert f"took {peers._f(r['forget_floor_s'])} s" in peers.render(r)
    by_copies = vismem["erase_floor_by_copies_s"]   # the first copy alone, the first two, all three
    assert len(by_copies) == 3 and by_copies[-1] == vismem["erase_floor_s"] and min(by_copies) > 0
    assert f"fewer copies: live index {peers._f(by_copies[0])} s, live index and retained versions" in peers.render(r)


@pytest.mark.slow   # three processes, one a system (about a minute)
def test_the_table_has_a_row_an_operation_and_a_column_a_system(small_run):
    r, _ = small_run
    section = peers.render(r)
    assert section.startswith(peers.markers(r["n"])[0]) and section.rstrip().endswith(peers.markers(r["n"])[1])
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| operation | vismem | LanceDB 0.40.0 | FAISS (plain) |")
    assert len(table) == 10 and all(line.count("|") == table[0].count("|") for line in table)
    assert f"N = {r['n']:,}" in section
