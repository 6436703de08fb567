"""``holepunch-mig bench``: the benchmark harness (:mod:`holepunch_mig.benchmark`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .benchmark import (
    GIB,
    REGISTRY,
    BenchConfig,
    BenchError,
    render_markdown,
    render_text,
    run_bench,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput of every transport row vs plain TCP, and time to link in the lab",
        description="Move --gib GiB between two processes over loopback through each "
        "registered row (plain TCP first), --runs times interleaved; print MB/s, CPU s/GiB "
        "per side and the ratio to plain TCP; then time to link of the real CLI in the "
        "namespace lab (root only).  Every payload is verified.",
    )
    p.add_argument("--quick", action="store_true", help="256 MiB, 3 runs, 5 lab runs")
    p.add_argument("--gib", type=float, default=None, help="GiB per run (default 2)")
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 3)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON here")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write a table")
    p.add_argument(
        "--rows",
        default=None,
        metavar="KEY,...",
        help=f"rows to run (default all: {','.join(REGISTRY)})",
    )
    p.add_argument(
        "--lab-runs", type=int, default=None, help="time-to-link runs (default 20; 0 = skip)"
    )
    p.add_argument(
        "--sockbuf",
        type=int,
        default=4 << 20,
        metavar="BYTES",
        help="SO_SNDBUF/SO_RCVBUF for every row (default 4 MiB, as the link; 0 = kernel)",
    )
    p.add_argument("--pipeline", type=int, default=3, help="RecordWriter.send_file pipeline")
    p.add_argument("--prefetch", type=int, default=3, help="RecordReader.receive_file prefetch")
    p.add_argument(
        "--full-verify", action="store_true", help="also SHA-256 everything the sink receives"
    )
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 2.0)
    runs = args.runs if args.runs is not None else 3
    lab_runs = args.lab_runs if args.lab_runs is not None else (5 if args.quick else 20)
    total = max(1 << 20, int(gib * GIB) // (1 << 20) * (1 << 20))
    rows = args.rows.split(",") if args.rows else None
    for key in rows or ():
        if key not in REGISTRY:
            print(
                f"holepunch-mig bench: unknown row {key!r} ({', '.join(REGISTRY)})", file=sys.stderr
            )
            return 2
    cfg = BenchConfig(
        total=total,
        runs=runs,
        sockbuf=args.sockbuf,
        pipeline=args.pipeline,
        prefetch=args.prefetch,
        full_verify=args.full_verify,
    )
    command = "holepunch-mig " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "holepunch-mig bench"
    try:
        res = run_bench(
            cfg,
            rows=rows,
            lab_runs=lab_runs,
            command=command,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except BenchError as exc:
        print(f"holepunch-mig bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(render_text(res))
    if args.json:
        args.json.write_text(res.to_json())
    if args.markdown:
        args.markdown.write_text(render_markdown(res))
    return 0
