"""Run every fuzz target (or the named ones) for a fixed budget.

    python fuzz/run.py --seconds 60              # each target 60 s, atheris
    python fuzz/run.py --runs 2000 records noise # fixed iteration count
    python fuzz/run.py --engine blind            # no atheris: blind mutation of the seeds

With atheris, each target runs in its own process (libFuzzer exits the process when it
is done) with ``-max_len=4096 -timeout=10 -rss_limit_mb=1024``: a hang over 10 s on one
input or a process over 1 GiB is a finding, like an exception.  New inputs go to a
temporary working corpus; the committed seeds in ``fuzz/corpus/<target>/`` are only
read.  Crash reproducers are copied to ``fuzz/crashes/<target>/``.  Exit status 0 only
when every target finished clean.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("messages", "candidates", "records", "noise", "upnp")
MAX_LEN = 4096


def _atheris(target: str, seconds: float | None, runs: int | None) -> bool:
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        argv = [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            str(corpus),
            str(HERE / "corpus" / target),
            f"-max_len={MAX_LEN}",
            "-timeout=10",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={work}/",
            "-print_final_stats=1",
        ]
        if seconds is not None:
            argv.append(f"-max_total_time={max(1, round(seconds))}")
        if runs is not None:
            argv.append(f"-runs={runs}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
        limit = (seconds or 0) + (runs or 0) / 50 + 120
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env)
        stats = [ln for ln in proc.stderr.splitlines() if ln.startswith(("#", "stat::", "Done"))]
        crashes = [p for p in work.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
        if proc.returncode != 0 or crashes:
            keep = HERE / "crashes" / target
            keep.mkdir(parents=True, exist_ok=True)
            for p in crashes:
                shutil.copy(p, keep / p.name)
            print(f"{target}: FAILED (exit {proc.returncode}); reproducers in {keep}")
            print(proc.stderr[-4000:])
            return False
        summary = next((ln for ln in reversed(stats) if "DONE" in ln), stats[-1] if stats else "")
        print(f"{target}: ok  {summary}")
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            pos = rng.randint(0, len(data))
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return bytes(data[:MAX_LEN])


def fallback(target: str, seconds: float | None, runs: int | None, seed: int = 0) -> int:
    """Blind mutation of the seed corpus plus random bytes, without coverage feedback.
    Raises whatever the target raises (a finding).  Returns the number of inputs run."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))
    fn = importlib.import_module(f"fuzz_{target}").test_one_input
    seeds = [p.read_bytes() for p in sorted((HERE / "corpus" / target).iterdir())]
    rng = random.Random(seed)
    deadline = time.monotonic() + (seconds if seconds is not None else 3600)
    done = 0
    while time.monotonic() < deadline and (runs is None or done < runs):
        if seeds and rng.random() < 0.8:
            data = _mutate(rng, rng.choice(seeds))
        else:
            data = rng.randbytes(rng.randint(0, 512))
        fn(data)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    p.add_argument("--seconds", type=float, default=None, help="budget per target")
    p.add_argument("--runs", type=int, default=None, help="inputs per target")
    p.add_argument("--engine", choices=["atheris", "blind"], default=None)
    args = p.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}")
    if args.seconds is None and args.runs is None:
        args.seconds = 60.0
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "blind"
            print("atheris is not installed: using the blind-mutation fallback")
        else:
            engine = "atheris"
    ok = True
    for target in args.targets or TARGETS:
        if engine == "atheris":
            ok = _atheris(target, args.seconds, args.runs) and ok
        else:
            n = fallback(target, args.seconds, args.runs)
            print(f"{target}: ok  {n} inputs (blind engine)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
