"""The installed package needs nothing from a checkout of the repository: no module
finds files relative to its own location, and the CLI runs from any directory."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import holepunch_mig

PACKAGE_DIR = Path(holepunch_mig.__file__).resolve().parent
SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
#: ways a module would reach files beside it, i.e. into the checkout
LOCATION = re.compile(r"__file__|\.parents\[|spec_from_file_location")


def _code_strings(tree: ast.Module) -> list[str]:
    """String constants that are not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_the_package_does_not_locate_files_of_a_checkout() -> None:
    assert len(SOURCES) > 20
    found = []
    for path in SOURCES:
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if LOCATION.search(line):
                found.append(f"{path.relative_to(PACKAGE_DIR)}:{number}: {line.strip()}")
        for value in _code_strings(ast.parse(text)):
            if re.search(r"(^|/)(examples|bench|fuzz|tests)/", value):
                found.append(f"{path.relative_to(PACKAGE_DIR)}: path string {value!r}")
    assert found == []


def test_the_finder_sees_a_checkout_path() -> None:
    """The check above must be able to fail."""
    source = 'import pathlib\nROOT = pathlib.Path(__file__).parents[2]\nP = "examples/x.py"\n'
    assert LOCATION.search(source)
    assert any("examples/" in s for s in _code_strings(ast.parse(source)))


def test_the_cli_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    script = shutil.which("holepunch-mig", path=str(Path(sys.executable).parent))
    assert script is not None, "the holepunch-mig console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (["bench", "--help"], ["lab", "matrix", "--help"]):
        proc = subprocess.run(
            [script, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "--png" in proc.stdout
    assert list(tmp_path.iterdir()) == []
