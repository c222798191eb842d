"""The layers hold: the core never imports Dagster, and SQL lives behind the ledger repository.

These are the seams issue 16 built; a change that crosses one fails here with the line to move.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "vismem_assets"
LEDGER = CORE / "ledger"
DAGSTER_LAYER = ROOT / "dagster_project"

# A string that starts like a statement, or reads like one: what a query written inline looks like.
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH|COPY|ATTACH|PRAGMA|SET VARIABLE)\b"
                 r"|\b(FROM|INTO|WHERE|JOIN)\s+[a-z_]+\b.*\b(WHERE|VALUES|ORDER BY|GROUP BY|SELECT|SET)\b")


def _modules(*folders: Path, exclude: Path | None = None) -> list[Path]:
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if exclude is not None and exclude in path.parents:
                continue
            found.append(path)
    return found


def sql_sites(path: Path) -> list[str]:
    """`file:line what` for each SQL string and each `.execute(` call in a module."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if SQL.search(node.value):
                sites.append(f"{path.relative_to(ROOT)}:{node.lineno} SQL {node.value[:60]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "execute":
            sites.append(f"{path.relative_to(ROOT)}:{node.lineno} .execute(...)")
    return sites


def test_the_detector_finds_sql_strings_and_raw_execute_calls(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Says SELECT things in a docstring, which is fine."""\n'
                      'def f(con):\n'
                      '    con.execute("SELECT sample_id FROM samples WHERE status = ?", ["active"])\n'
                      '    q = "UPDATE samples SET label = ? WHERE sample_id = ?"\n'
                      '    return "select a label from the menu"\n')
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        sites = sql_sites(sample)
    finally:
        ROOT = root
    assert [s.split(" ", 1)[0] for s in sites].count("sample.py:3") == 2   # the call and its string
    assert any(s.startswith("sample.py:4 SQL") for s in sites)
    assert not any(s.startswith(("sample.py:1", "sample.py:5")) for s in sites)


def test_sql_lives_behind_the_ledger_repository():
    """Outside vismem_assets/ledger/ (and sql/), no module of the core or of the Dagster layer
    writes SQL or runs it on a connection: it calls a ledger group's method."""
    sites = [site for path in _modules(CORE, DAGSTER_LAYER, exclude=LEDGER) for site in sql_sites(path)]
    assert not sites, "move these into a group of vismem_assets/ledger/:\n" + "\n".join(sites)


def test_the_core_never_imports_dagster():
    offenders = []
    for path in _modules(CORE):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("dagster", "dagster_project")]
    assert not offenders, offenders


def test_every_package_says_what_belongs_in_it():
    for init in [CORE / "__init__.py", DAGSTER_LAYER / "__init__.py",
                 *(p / "__init__.py" for p in CORE.iterdir() if (p / "__init__.py").exists())]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 20, f"{init.relative_to(ROOT)} needs a paragraph saying what belongs in it"
