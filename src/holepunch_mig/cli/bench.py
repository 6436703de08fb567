"""``holepunch-mig bench``: the benchmark suite (:mod:`holepunch_mig.bench`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from holepunch_mig.bench.chart import render_png
from holepunch_mig.bench.harness import run_bench
from holepunch_mig.bench.libvirt_cells import ROWS as LIBVIRT_ROWS
from holepunch_mig.bench.libvirt_cells import render_libvirt_table, run_libvirt_cells
from holepunch_mig.bench.model import GIB, REGISTRY, BenchConfig, BenchResult, default_rows
from holepunch_mig.bench.report import load_result, render_markdown, render_text
from holepunch_mig.cli.common import write_chart
from holepunch_mig.errors import BenchError
from holepunch_mig.net.record_io import HASHED_PREFETCH
from holepunch_mig.report import write_file_atomically

__all__ = ["register"]

DOC_MD = Path("docs/results/performance.md")
DOC_PNG = Path("docs/results/performance.png")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput of every transport row vs plain TCP in the namespace lab, per RTT",
        description="Move --gib GiB from the lab's left host to its right host (two "
        "firewalled network namespaces; root) through each row: 1 plain TCP, 2 TLS 1.3, "
        "3 RPC-style stop-and-wait tunnel, 4 holepunch_mig's tunnel, 5a/5b/5c holepunch_mig "
        "direct (no digest, SHA-256, BLAKE3); at each --rtts delay; --runs times "
        "interleaved; then QEMU migrations direct vs migrate-proxy.  CPU s/GiB per side "
        "and the floor of every row from the same run's rates.  Prints a table and writes "
        "docs/results/performance.md and "
        "docs/results/performance.png (when ./docs/results exists; see --markdown/--png).  "
        "Every payload is verified.  Without root: loopback rows only.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 GiB, 3 runs, RTT 0 and 20 ms, QEMU 1 run at 0 ms, 3 time-to-link runs",
    )
    p.add_argument("--gib", type=float, default=None, help="GiB per run (default 2)")
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 3)")
    p.add_argument(
        "--rtts", default=None, metavar="MS,...", help="lab round-trip delays (default 0,1,20)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON here")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write the performance page here (default {DOC_MD} if ./docs/results exists)",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write the chart here (default {DOC_PNG} if ./docs/results exists)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not write docs/results/ by default")
    p.add_argument(
        "--rows",
        default=None,
        metavar="KEY,...",
        help=f"rows to run (default {','.join(default_rows())}; also: "
        f"{','.join(k for k in REGISTRY if k not in default_rows())})",
    )
    p.add_argument(
        "--loopback", action="store_true", help="run the rows over loopback, not in the lab"
    )
    p.add_argument(
        "--qemu-runs", type=int, default=None, help="QEMU migrations per case (default 3; 0 = skip)"
    )
    p.add_argument("--qemu-mem", type=int, default=512, help="QEMU guest MiB (default 512)")
    p.add_argument(
        "--qemu-rtts", default=None, metavar="MS,...", help="RTTs for QEMU (default: 0 only)"
    )
    p.add_argument(
        "--lab-runs",
        type=int,
        default=None,
        help="time-to-link runs of the real CLI (default 20; 0 = skip)",
    )
    p.add_argument(
        "--sockbuf",
        type=int,
        default=4 << 20,
        metavar="BYTES",
        help="SO_SNDBUF/SO_RCVBUF for every row (default 4 MiB, as the link; 0 = kernel)",
    )
    p.add_argument("--pipeline", type=int, default=3, help="RecordWriter.send_file pipeline")
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="RecordReader.receive_file prefetch (default: the library's, "
        f"{HASHED_PREFETCH} when the stream is hashed, else 0)",
    )
    p.add_argument(
        "--full-verify", action="store_true", help="also SHA-256 everything the sink receives"
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="measure nothing: re-render the page and chart from an earlier --json",
    )
    lv = p.add_argument_group(
        "libvirt rows",
        "the same random-RAM domain migrated by libvirt between two libvirt daemons in the "
        "lab (fw-fw), interleaved, ratio to the first row: native direct over plain TCP, "
        "--tunnelled, native TLS, holepunch_mig.  They run after the other rows when they "
        "can (root; libvirtd, QEMU and the libvirt extra; the page says why not); "
        "--libvirt runs only them, --no-libvirt leaves them out",
    )
    only = lv.add_mutually_exclusive_group()
    only.add_argument("--libvirt", action="store_true", help="run the libvirt rows only")
    only.add_argument("--no-libvirt", action="store_true", help="leave the libvirt rows out")
    lv.add_argument("--libvirt-runs", type=int, default=3, help="migrations per row (default 3)")
    lv.add_argument("--libvirt-mem", type=int, default=256, help="guest MiB (default 256)")
    lv.add_argument(
        "--libvirt-rows",
        default=",".join(LIBVIRT_ROWS),
        metavar="ROW,...",
        help=f"rows, first is the baseline (default {','.join(LIBVIRT_ROWS)})",
    )
    lv.add_argument(
        "--libvirt-parallel",
        default="0",
        metavar="N,...",
        help="multifd connections per group (default 0; tunnelled is skipped with N > 0)",
    )
    p.set_defaults(run=_run)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _run_libvirt(args: argparse.Namespace) -> int:
    try:
        cells = run_libvirt_cells(
            mem=args.libvirt_mem,
            runs=args.libvirt_runs,
            rows=[r for r in args.libvirt_rows.split(",") if r],
            parallel=_ints(args.libvirt_parallel),
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except (BenchError, ModuleNotFoundError) as exc:
        print(f"holepunch-mig bench --libvirt: FAILED: {exc}", file=sys.stderr)
        return 1
    print(render_libvirt_table(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([c.to_dict() for c in cells], indent=2) + "\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.libvirt:
        return _run_libvirt(args)
    gib = args.gib if args.gib is not None else (1.0 if args.quick else 2.0)
    runs = args.runs if args.runs is not None else 3
    lab_runs = args.lab_runs if args.lab_runs is not None else (3 if args.quick else 20)
    rtts = _ints(args.rtts) if args.rtts else ([0, 20] if args.quick else [0, 1, 20])
    qemu_runs = args.qemu_runs if args.qemu_runs is not None else (1 if args.quick else 3)
    qemu_rtts = _ints(args.qemu_rtts) if args.qemu_rtts else [0]
    total = max(1 << 20, int(gib * GIB) // (1 << 20) * (1 << 20))
    rows = args.rows.split(",") if args.rows else None
    for key in rows or ():
        if key not in REGISTRY:
            print(
                f"holepunch-mig bench: unknown row {key!r} ({', '.join(REGISTRY)})", file=sys.stderr
            )
            return 2
    docs = Path("docs/results").is_dir() and not args.no_docs
    md = args.markdown or (DOC_MD if docs else None)
    png = args.png or (DOC_PNG if docs else None)
    cfg = BenchConfig(
        total=total,
        runs=runs,
        sockbuf=args.sockbuf,
        pipeline=args.pipeline,
        prefetch=args.prefetch,
        full_verify=args.full_verify,
    )
    command = "holepunch-mig " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "holepunch-mig bench"
    if args.from_json:
        res = load_result(args.from_json)
        return _write(res, args, md, png)
    try:
        res = run_bench(
            cfg,
            rows=rows,
            lab_runs=lab_runs,
            command=command,
            log=lambda s: print(s, file=sys.stderr, flush=True),
            rtts=rtts,
            where="loopback" if args.loopback else "auto",
            qemu_runs=qemu_runs,
            qemu_mem=args.qemu_mem,
            qemu_rtts=qemu_rtts,
            quick=args.quick,
            libvirt_runs=0 if args.no_libvirt else args.libvirt_runs,
            libvirt_mem=args.libvirt_mem,
            libvirt_rows=[r for r in args.libvirt_rows.split(",") if r],
            libvirt_parallel=_ints(args.libvirt_parallel),
        )
    except BenchError as exc:
        print(f"holepunch-mig bench: FAILED: {exc}", file=sys.stderr)
        return 1
    return _write(res, args, md, png)


def _write(res: BenchResult, args: argparse.Namespace, md: Path | None, png: Path | None) -> int:
    print(render_text(res))
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(args.json, res.to_json())
    if md:
        write_file_atomically(md, render_markdown(res))
        print(f"wrote {md}", file=sys.stderr)
    if png and write_chart(png, lambda: render_png(res), "holepunch-mig bench"):
        print(f"wrote {png}", file=sys.stderr)
    return 0
