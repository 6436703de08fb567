"""``holepunch-mig``: the command-line parser and its subcommands.

Each subcommand module registers its parsers, whose defaults carry ``run(args) -> exit
code`` (and optionally ``usage_problem(args) -> str | None``, a usage error argparse
cannot express); the list below is fixed, so a broken module fails loudly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from holepunch_mig.cli import bench, keys, lab, libvirt_migrate, migrate, transfer
from holepunch_mig.cli.common import EXIT_INTERRUPTED, PROG, UsageError, say, setup_logging

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: in help order: recv, send, keygen, lab, doctor, migrate-proxy, migrate, bench
SUBCOMMANDS: tuple[Register, ...] = (
    transfer.register,
    keys.register,
    lab.register,
    migrate.register,
    libvirt_migrate.register,
    bench.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Move migration data through a TCP link punched between firewalled hosts.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def _version() -> str:
    try:
        return version("holepunch_mig")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "(not installed: version unknown)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    usage_problem: Callable[[argparse.Namespace], str | None] | None = getattr(
        args, "usage_problem", None
    )
    problem = usage_problem(args) if usage_problem is not None else None
    if problem:
        parser.error(problem)
    setup_logging(getattr(args, "verbose", 0))
    try:
        code: int = args.run(args)
    except UsageError as exc:  # found by a pre-flight check, before anything connected
        say(f"{PROG} {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    raise SystemExit(main())
