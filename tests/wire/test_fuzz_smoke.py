"""CI exercise of the coverage-guided fuzz targets in fuzz/ (see fuzz/run.py).

Every committed seed is replayed in-process (fast, and a regression there is a plain
traceback), then each target runs under atheris for a short fixed budget.  Longer runs:
``make fuzz`` or ``python fuzz/run.py --seconds 600``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ["messages", "candidates", "records", "noise", "upnp"]
SECONDS_EACH = 5


def _target(name: str) -> Callable[[bytes], None]:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    fn: Callable[[bytes], None] = importlib.import_module(f"fuzz_{name}").test_one_input
    return fn


@pytest.mark.parametrize("name", TARGETS)
def test_seed_corpus_replays_clean(name: str) -> None:
    seeds = sorted((FUZZ / "corpus" / name).iterdir())
    assert 3 <= len(seeds) <= 64
    assert all(p.stat().st_size <= 4096 for p in seeds)
    fn = _target(name)
    for path in seeds:
        fn(path.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_committed_seeds_are_what_make_corpus_writes(name: str) -> None:
    """A wire change that leaves the seeds behind leaves the fuzzer starting from stale
    inputs: the committed corpus must be exactly what fuzz/make_corpus.py writes now."""
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    make = importlib.import_module("make_corpus")
    want = {make.seed_name(s): s for s in make.SEEDS[name]()}
    have = {p.name: p.read_bytes() for p in (FUZZ / "corpus" / name).iterdir()}
    assert sorted(have) == sorted(want), "run: python fuzz/make_corpus.py"
    assert have == want


@pytest.mark.parametrize("name", TARGETS)
def test_atheris_short_run(name: str) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--seconds", str(SECONDS_EACH), name],
        capture_output=True,
        text=True,
        timeout=SECONDS_EACH + 120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{name}: ok" in proc.stdout


def test_blind_engine_runs_without_atheris() -> None:
    sys.path.insert(0, str(FUZZ))
    run = importlib.import_module("run")
    for name in TARGETS:
        assert run.fallback(name, seconds=5, runs=300) == 300
