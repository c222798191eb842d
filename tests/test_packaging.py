"""The built wheel, installed into a clean virtual environment, is a working `vismem`: it carries
the SQL files as package data and holds the core only (dagster_project/ and benchmarks/ run
from a checkout)."""
import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a build must not see: another build's leftovers in build/ would go into the wheel.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "vismem_home", ".dagster_home", "test-artifacts")


def _sh(*cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "vismem"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools, so the test runs offline.
    _sh(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", out, cwd=src)
    (found,) = out.glob("vismem-*.whl")
    return found


@pytest.mark.slow
def test_wheel_holds_the_core_and_its_sql(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"vismem_assets"}  # no top-level benchmarks/ or dagster_project/
    for folder in ("migrations", "audit", "postgres/migrations", "postgres/audit"):
        shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"vismem_assets/sql/{folder}/"))
        assert shipped == sorted(p.name for p in (REPO / "sql" / folder).glob("*.sql")) and shipped
    # The package list in pyproject is written by hand: every module of the core must be in it.
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "vismem_assets").rglob("*.py")}
    assert modules <= set(names), f"missing from the wheel: {sorted(modules - set(names))}"


@pytest.mark.slow
def test_installed_wheel_adds_and_classifies_outside_the_checkout(wheel, tmp_path, fm_sets):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _sh(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    # The heavy dependencies come from this environment's site-packages, added as a plain path:
    # .pth files there (the editable install's finder among them) are not run from it.
    (new_site,) = (env_dir / "lib").glob("python3*/site-packages")
    (new_site / "shared_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"  # not the checkout: nothing may come from the working directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISMEM_", "PYTHON"))}
    where = _sh(python, "-c", "import vismem_assets.ledger as l; print(l.__file__); print(l.SQL_DIR)",
                cwd=work, env=env).stdout.split()
    assert where == [str(new_site / "vismem_assets" / "ledger" / "__init__.py"), str(new_site / "vismem_assets" / "sql")]

    home, small = tmp_path / "home", tmp_path / "set" / "small"
    for label in ("Trouser", "Bag"):
        (small / label).mkdir(parents=True)
        for f in sorted((fm_sets["train"] / label).glob("*.png"))[:4]:
            shutil.copy(f, small / label / f.name)
    vismem = env_dir / "bin" / "vismem"
    added = json.loads(_sh(vismem, "--home", home, "add", small, "--json", cwd=work, env=env).stdout)
    assert added["ingest"]["added"] == 8 and added["embedded"] == 8 and added["n_vectors"] == 8
    query = sorted((fm_sets["test"] / "Trouser").glob("*.png"))[0]
    (line,) = _sh(vismem, "--home", home, "classify", query, "--k", "3", "--json",
                  cwd=work, env=env).stdout.strip().splitlines()
    answer = json.loads(line)
    assert answer["path"] == str(query) and answer["label"] in {"Trouser", "Bag"}
    assert len(answer["neighbors"]) == 3

    bench = subprocess.run([vismem, "bench", "--quick"], capture_output=True, text=True, cwd=work, env=env)
    assert bench.returncode == 2 and bench.stdout == ""
    assert "checkout" in bench.stderr and "python -m benchmarks.suite" in bench.stderr
    assert len(bench.stderr.strip().splitlines()) == 1
