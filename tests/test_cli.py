"""The `vismem` command as a user runs it: a real process, a real memory home."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VISMEM = [sys.executable, "-m", "vismem_assets.cli"]


def run(home, *args, check=True):
    env = {**os.environ, "VISMEM_HOME": str(home)}
    proc = subprocess.run([*VISMEM, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"vismem {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, fm_sets):
    home = tmp_path_factory.mktemp("cli") / "home"
    small = tmp_path_factory.mktemp("cli-set") / "small"
    for label in ("Trouser", "Bag", "Sneaker"):
        (small / label).mkdir(parents=True)
        for f in sorted((fm_sets["train"] / label).glob("*.png"))[:6]:
            (small / label / f.name).write_bytes(f.read_bytes())
    (small / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return home, small


@pytest.mark.slow
def test_add_reports_counts_and_quarantine_as_json(cli_home):
    home, small = cli_home
    out = json.loads(run(home, "add", small, "--json").stdout)
    assert out["ingest"]["added"] == 18
    assert out["embedded"] == 18
    assert out["index_version"] == 1 and out["n_vectors"] == 18
    assert [q["name"] for q in out["ingest"]["quarantined"]] == ["Bag/broken.png"]
    again = json.loads(run(home, "add", small, "--json").stdout)
    assert again["ingest"]["added"] == 0 and again["ingest"]["duplicates"] == 18
    assert again["index_version"] == 1  # nothing new, no new version


@pytest.mark.slow
def test_classify_prints_one_json_object_per_image(cli_home, fm_sets):
    home, _ = cli_home
    queries = sorted((fm_sets["test"] / "Trouser").glob("*.png"))[:2]
    lines = run(home, "classify", *queries, "--k", "5", "--json").stdout.strip().splitlines()
    assert len(lines) == 2
    for line, query in zip(lines, queries):
        obj = json.loads(line)
        assert obj["path"] == str(query)
        assert obj["label"] in {"Trouser", "Bag", "Sneaker"}
        assert 0 < obj["confidence"] <= 1
        assert len(obj["neighbors"]) == 5
        assert {"sample_id", "label", "similarity", "weight"} <= set(obj["neighbors"][0])


@pytest.mark.slow
def test_human_tables_and_status(cli_home, fm_sets):
    home, _ = cli_home
    text = run(home, "classify", fm_sets["test"] / "Bag", "--k", "3").stdout
    assert "-> " in text and "similarity" in text
    status = json.loads(run(home, "status", "--json").stdout)
    assert status["labels"] == {"Bag": 6, "Sneaker": 6, "Trouser": 6}
    assert status["samples"] == {"active": 18, "quarantined": 1}
    assert status["live_indexes"][0]["version"] == 1
    assert status["ivf_search"]["min_batch"] >= 1 and status["ivf_search"]["kernel"].startswith("numba ")
    text = run(home, "status").stdout
    assert "live index versions" in text and "IVF-Flat search: calls of" in text


@pytest.mark.slow
def test_eval_json_and_plot(cli_home, tmp_path, fm_sets):
    home, _ = cli_home
    plot = tmp_path / "acc.png"
    out = json.loads(run(home, "eval", fm_sets["test"], "--k-max", "10", "--plot", plot, "--json").stdout)
    assert out["n_queries"] == 40
    assert {(r["strategy"], r["k"]) for r in out["accuracy"]} == {
        (s, k) for s in ("rank", "softmax", "distance", "plurality") for k in range(1, 11)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_errors_are_one_clear_line(cli_home, tmp_path):
    home, _ = cli_home
    proc = run(home, "classify", tmp_path / "nope.png", check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tmp_path / "empty-home", "classify", Path(__file__), check=False)
    assert proc.returncode == 2 and "vismem add" in proc.stderr
    proc = run(home, "add", tmp_path / "missing-set", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
