"""``holepunch-mig keygen``: a host identity for the authenticated control channel.

Writes the private key file (mode 0600, never over an existing file) and prints the public
key line on stdout, ready for the peer's ``--peer`` or ``--peers`` file.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from holepunch_mig.cli.common import EXIT_OK, EXIT_USAGE, say
from holepunch_mig.errors import CredentialError
from holepunch_mig.net.keyfiles import write_private_key
from holepunch_mig.wire.identity import Identity, check_name

__all__ = ["register", "run_keygen"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="make this host's control-channel key (prints the public key line)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="private key file to create"
    )
    p.add_argument(
        "--name",
        default=None,
        metavar="NAME",
        help="the name peers will see in reports and logs (default: this host's name)",
    )
    p.set_defaults(run=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    try:
        name = check_name(args.name or socket.gethostname().split(".")[0], "--name")
        identity = Identity.generate()
        write_private_key(args.out, identity)
    except CredentialError as exc:
        say(f"holepunch-mig keygen: {exc}")
        return EXIT_USAGE
    sys.stdout.write(identity.public_line(name) + "\n")
    sys.stdout.flush()
    return EXIT_OK
