"""Several partitions launched at once: real processes, one Dagster instance, one memory."""
import os
import shutil
import subprocess
import sys

import pytest
from dagster import DagsterInstance

from vismem_assets.memory import Memory

SETS = {"set-a": ["Bag", "Coat"], "set-b": ["Trouser", "Sneaker"], "set-c": ["Bag", "Dress"]}


@pytest.mark.slow
def test_partitions_materialized_concurrently_all_succeed(tmp_path, fm_sets, encoder):
    home, dagster_home = tmp_path / "home", tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy("dagster_project/dagster.yaml", dagster_home / "dagster.yaml")
    for i, (name, labels) in enumerate(SETS.items()):
        for label in labels:
            target = home / "inbox" / "sets" / name / label
            target.mkdir(parents=True)
            source = fm_sets["train"] if i != 2 else fm_sets["more"]  # set-c overlaps nobody
            for f in sorted((source / label).glob("*.png"))[:4]:
                shutil.copy(f, target / f.name)
    env = {**os.environ, "VISMEM_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    instance = DagsterInstance.from_config(str(dagster_home))
    instance.add_dynamic_partitions("image_sets", list(SETS))

    procs = [subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dagster_project.definitions",
         "--select", "image_sets,embeddings", "--partition", name],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in SETS]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for name, proc, out in zip(SETS, procs, outputs):
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
        assert "RUN_SUCCESS" in out
        assert "lock" not in out.lower() or "Could not set lock" not in out

    refresh = subprocess.run(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "dagster_project.definitions", "-j", "refresh_memory"],
        env=env, capture_output=True, text=True, timeout=600)
    assert refresh.returncode == 0, refresh.stdout[-3000:] + refresh.stderr[-3000:]

    memory = Memory(home, encoder=encoder)
    consistency = memory.index_consistency()
    assert consistency["ok"], consistency
    assert consistency["n_index"] == 4 * 6  # 6 label folders x 4 images, all distinct
    runs = instance.get_runs()
    assert sum(r.is_success for r in runs) == 4
