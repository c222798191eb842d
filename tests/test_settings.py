"""One settings object (settings.py): VISMEM_* parsed and validated in one place, flags
overriding, shown by `vismem status`, and no side effects when the package is imported."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vismem_assets.index_types import IndexPolicy
from vismem_assets.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
VISMEM = [sys.executable, "-m", "vismem_assets.cli"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("VISMEM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_are_the_documented_ones(clean_env):
    s = Settings.from_env()
    assert s == Settings.defaults()
    assert (s.home, s.lock_timeout, s.index_type, s.ivf_from, s.recall_floor, s.pq_bytes) == \
        (Path("vismem_home"), 600.0, "auto", 200_000, 0.95, None)
    assert (s.delta_fraction, s.max_deltas, s.shard_mib, s.query_set, s.blas_auto, s.faiss_blas_threshold) == \
        (0.10, 16, 64, None, True, 6144)
    assert IndexPolicy.from_settings(s) == IndexPolicy()
    assert all(description for _, _, description in s.table())


def test_variables_are_parsed(clean_env):
    for name, value in {"VISMEM_HOME": "/tmp/h", "VISMEM_LOCK_TIMEOUT": "5", "VISMEM_INDEX_TYPE": "ivf-flat",
                        "VISMEM_SHARD_MIB": "8", "VISMEM_BLAS_AUTO": "off", "VISMEM_QUERY_SET": "queries",
                        "VISMEM_CACHE": "/tmp/c", "VISMEM_RECALL_FLOOR": ""}.items():
        clean_env.setenv(name, value)
    s = Settings.from_env()
    assert (s.home, s.lock_timeout, s.index_type, s.shard_mib, s.blas_auto, s.query_set) == \
        (Path("/tmp/h"), 5.0, "ivf-flat", 8, False, "queries")
    assert s.recall_floor == 0.95  # empty: unset, as before
    assert s.cache_root() / "onnx" == Path("/tmp/c/onnx")


@pytest.mark.parametrize("name, value, says", [
    ("VISMEM_IVF_FROM", "many", "valid integer"),
    ("VISMEM_IVF_FROM", "0", "greater than or equal to 1"),
    ("VISMEM_RECALL_FLOOR", "1.5", "less than or equal to 1"),
    ("VISMEM_INDEX_TYPE", "hnsw", "'auto', 'flat'"),
    ("VISMEM_LOCK_TIMEOUT", "-1", "greater than 0"),
    ("VISMEM_BLAS_AUTO", "perhaps", "valid boolean"),
])
def test_a_bad_value_names_the_variable(clean_env, name, value, says):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=re.escape(f"{name}={value!r}") + ".*" + re.escape(says)):
        Settings.from_env()


def test_overrides_win_and_a_bad_one_is_named_as_given(clean_env):
    clean_env.setenv("VISMEM_INDEX_TYPE", "flat")
    clean_env.setenv("VISMEM_HOME", "/tmp/from-env")
    s = Settings.from_env(home="/tmp/from-flag", index_type=None, recall_floor=0.5)
    assert (s.home, s.index_type, s.recall_floor) == (Path("/tmp/from-flag"), "flat", 0.5)
    with pytest.raises(SettingsError, match=r"^recall_floor=7\.0: "):
        Settings.from_env(recall_floor=7.0)


def status(home, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISMEM_")}
    env.update(VISMEM_HOME=str(home / "env-home"), VISMEM_MAX_DELTAS="3", **(env_extra or {}))
    return subprocess.run([*VISMEM, *args], env=env, capture_output=True, text=True, timeout=300)


def test_status_shows_the_effective_settings_flags_overriding(tmp_path):
    proc = status(tmp_path, "--home", str(tmp_path / "flag-home"), "status", "--json")
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)["settings"]
    assert settings["home"] == str(tmp_path / "flag-home") and settings["max_deltas"] == 3
    assert settings["index_type"] == "auto" and settings["lock_timeout"] == 600.0
    assert json.loads(proc.stdout)["home"] == str((tmp_path / "flag-home").resolve())
    text = status(tmp_path, "status").stdout
    assert "settings (environment, then flags):" in text and "VISMEM_MAX_DELTAS" in text


def test_cli_refuses_a_bad_variable_with_its_name(tmp_path):
    proc = status(tmp_path, "status", env_extra={"VISMEM_SHARD_MIB": "big"})
    assert proc.returncode == 2 and "VISMEM_SHARD_MIB='big'" in proc.stderr and "Traceback" not in proc.stderr


def test_importing_the_package_has_no_side_effects():
    """Importing vismem_assets (and its modules) changes neither the environment nor the import
    machinery: the BLAS set-up waits for an entry point's settings.setup()."""
    code = """
import json, os, sys
env, hooks = dict(os.environ), list(sys.meta_path)
import vismem_assets
same_after_package = dict(os.environ) == env and sys.meta_path == hooks
import vismem_assets.cli, vismem_assets.memory, vismem_assets.settings
# polars sets its allocator's variable when it loads; ours would be OPENBLAS_CORETYPE or VISMEM_*
ours = {k for k in set(os.environ) ^ set(env) | {k for k in env if os.environ.get(k) != env[k]}
        if k.startswith(("VISMEM_", "OPENBLAS", "OMP_"))}
print(json.dumps([same_after_package, sorted(ours), sys.meta_path == hooks]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "VISMEM_BLAS_AUTO")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT).stdout
    assert json.loads(out) == [True, [], True]
    # ... and the entry point's setup() is what sets OPENBLAS_CORETYPE and the faiss hook
    code = ("import json, os, sys\nhooks = len(sys.meta_path)\nfrom vismem_assets.settings import setup\nsetup()\n"
            "print(json.dumps([len(sys.meta_path) - hooks, os.environ.get('OPENBLAS_CORETYPE')]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT).stdout
    from vismem_assets.blas import best_kernel, read_cpu_flags
    assert json.loads(out) == [1, best_kernel(read_cpu_flags())]


def test_the_core_reads_no_environment_outside_the_settings_module():
    reads = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "vismem_assets").rglob("*.py"))
             if path.name != "settings.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"os\.environ|os\.getenv|getenv\(", line)]
    assert reads == []
