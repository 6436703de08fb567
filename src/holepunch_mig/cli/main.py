"""``holepunch-mig``: the command-line parser and its subcommands.

Each subcommand module registers its parsers, whose defaults carry ``run(args) -> exit
code`` (and optionally ``usage_problem(args) -> str | None``, a usage error argparse
cannot express); the list below is fixed, so a broken module fails loudly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from holepunch_mig.cli import bench, keys, lab, migrate, transfer
from holepunch_mig.cli.common import setup_logging

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: in help order: recv, send, keygen, lab, doctor, migrate-proxy, bench
SUBCOMMANDS: tuple[Register, ...] = (
    transfer.register,
    keys.register,
    lab.register,
    migrate.register,
    bench.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holepunch-mig",
        description="Move migration data through a TCP link punched between firewalled hosts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


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
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
