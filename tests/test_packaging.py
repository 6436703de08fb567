"""`make demo` installs the package alone and the demo needs nothing else; the project
metadata uses the current forms (SPDX license string), so building warns about nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_ONLY = {"pytest", "hypothesis", "mypy", "ruff", "atheris", "noise", "matplotlib"}


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    assert project["project"]["license"] == "MIT"
    requires = project["build-system"]["requires"]
    # a license string needs setuptools 77 or later
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires)


def test_make_demo_installs_no_test_tools() -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "-e" in line]
    assert installs == [line for line in installs if "[" not in line], installs
    assert any(line.rstrip().endswith("-e .") for line in installs), plan
    assert "holepunch-mig --help" in plan  # it says how to run what it installed


def test_the_demo_imports_no_test_tool() -> None:
    code = (
        "import json, runpy, sys\n"
        f"runpy.run_path({str(REPO / 'examples' / 'demo.py')!r}, run_name='imported')\n"
        "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert "holepunch_mig" in loaded
    assert not loaded & TEST_ONLY, loaded & TEST_ONLY
