"""The headless demo life cycle: sets arrive, the memory grows, a late set of new classes
is learned without training and without hurting the old classes."""
import polars as pl
import pytest

from dagster_project.demo import headless


@pytest.mark.slow
def test_late_new_classes_are_learned_and_old_ones_keep_their_accuracy(tmp_path, monkeypatch):
    monkeypatch.delenv("VISMEM_QUERY_SET", raising=False)
    summary = headless(tmp_path / "home", per_set=24, n_queries=60)
    assert summary["after set"].to_list() == ["fashion-01", "fashion-02", "fashion-03", "fashion-late-new-classes"]
    assert summary["index version"].to_list() == [1, 2, 3, 4]
    before, after = summary.row(2, named=True), summary.row(3, named=True)
    assert before["new classes"] == 0.0          # never seen: never predicted
    assert after["new classes"] >= 0.6           # learned from one set, no training
    assert abs(after["old classes"] - before["old classes"]) <= 0.05
    assert after["top-1 (rank, k=20)"] > before["top-1 (rank, k=20)"]
    assert isinstance(summary, pl.DataFrame)
