"""What the ``holepunch-mig`` subcommands share: exit codes, endpoint argument types,
the link options every punching subcommand takes, logging, messages and progress on
stderr, accepting the control connection, and writing a chart when matplotlib is there.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.errors import CandidateError, ChannelClosed, CredentialError
from holepunch_mig.net.control import ControlChannel, open_process_channel
from holepunch_mig.net.keyfiles import load_auth
from holepunch_mig.net.secure_control import (
    SecureChannel,
    accept_authenticated,
    connect_authenticated,
    secure,
)
from holepunch_mig.roles import POLICIES
from holepunch_mig.wire.birthday import BirthdayBudget
from holepunch_mig.wire.candidates import parse_endpoint
from holepunch_mig.wire.control_auth import ControlAuth, PairingCode
from holepunch_mig.wire.text import printable

__all__ = [
    "AUTH_OPTIONS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NO_PATH",
    "EXIT_OK",
    "EXIT_USAGE",
    "LIBVIRT_HINT",
    "PLOT_HINT",
    "PROG",
    "Progress",
    "UsageError",
    "add_auth_options",
    "add_link_options",
    "amount",
    "auth_usage_problem",
    "bind_control",
    "check_input",
    "check_output_path",
    "colour",
    "command_status",
    "connect_options",
    "control_auth",
    "describe",
    "dial_control",
    "endpoint",
    "interrupted",
    "listen_control",
    "listen_endpoint",
    "named_endpoint",
    "say",
    "secure_existing",
    "setup_logging",
    "source_control",
    "warn",
    "write_chart",
]

PROG = "holepunch-mig"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_PATH = 3
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line found before anything is connected (exit 2)."""


def describe(exc: BaseException) -> str:
    """One line for a person: the message without a Python class name.  An OSError is
    its strerror and the file it concerns ("No such file or directory: 'x'")."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    text = str(exc)
    return text or type(exc).__name__.lower()


def interrupted(exc: BaseException) -> bool:
    """True for a KeyboardInterrupt, bare or inside exception groups (trio nurseries
    wrap it when Ctrl-C lands while several tasks run)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(interrupted(e) for e in exc.exceptions)
    return False


def colour(text: str, code: str, stream: object = None) -> str:
    """``text`` in an ANSI colour when ``stream`` (stderr) is a terminal and NO_COLOR is
    unset (https://no-color.org)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if os.environ.get("NO_COLOR") or not (isatty and isatty()):
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def warn(text: str) -> None:
    """A warning line that stands out: ``holepunch-mig: WARNING: ...`` (yellow on a TTY).
    Only the text is escaped (it may carry peer text); the colour is ours."""
    sys.stderr.write(f"{PROG}: " + colour("WARNING:", "1;33") + f" {printable(text)}\n")
    sys.stderr.flush()


def check_output_path(path: str, what: str) -> None:
    """Raise UsageError unless ``path`` can be created: its directory exists and is
    writable, and it is not a directory itself."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: directory {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{what} {path} exists and is not writable")


def check_input(path: str, what: str) -> None:
    """Raise UsageError unless ``path`` is a readable file (or a pipe, a device)."""
    target = Path(path)
    if not target.exists():
        raise UsageError(f"{what} {path} does not exist")
    if target.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file")
    if not os.access(target, os.R_OK):
        raise UsageError(f"{what} {path} is not readable")


def amount(n: int, seconds: float) -> str:
    """ "268.4 MB in 1.52 s, 176.6 MB/s": bytes, time and rate for a final line."""
    rate = f", {n / seconds / 1e6:,.1f} MB/s" if seconds > 0 else ""
    return f"{n / 1e6:,.1f} MB in {seconds:.2f} s{rate}"


class Progress:
    """Bytes, rate and ETA on stderr: a redrawn line on a TTY, a line a second otherwise.

    The ETA is shown only while the total is not yet reached (an expected size is an
    estimate: a migration may move more or less).  :meth:`finish` erases the redrawn
    line, so what follows (the final line, or "interrupted") starts on a clean line."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.start = time.monotonic()
        self.last = self.start  # first line after one interval, not at byte 0
        self.printed = False
        self.done = 0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int) -> None:
        self.done = done
        if not self._due():
            return
        elapsed = max(self.last - self.start, 1e-9)
        rate = done / elapsed
        text = f"{self.label}: {done / 1e6:,.1f} MB, {rate / 1e6:,.1f} MB/s"
        if self.total and done < self.total:
            eta = (self.total - done) / rate if rate else 0.0
            text += f", {100 * done / self.total:.0f} %, ETA {eta:.0f} s"
        self._write(text)

    def line(self, text: str) -> None:
        """Show a caller-made progress line, at the same pace."""
        if self._due():
            self._write(text)

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0):
            return False
        self.last = now
        return True

    def _write(self, text: str) -> None:
        self.printed = True
        if self.tty:
            sys.stderr.write("\r" + text.ljust(78))
        else:
            sys.stderr.write(printable(text, keep_newlines=True) + "\n")
        sys.stderr.flush()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def finish(self) -> None:
        """Erase the redrawn line (idempotent)."""
        if self.tty and self.printed:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()
            self.printed = False


def endpoint(text: str) -> tuple[str, int]:
    """An IP-literal endpoint (candidates)."""
    try:
        return parse_endpoint(text)
    except CandidateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def named_endpoint(text: str) -> tuple[str, int]:
    """An endpoint whose host may be a name (control port, STUN servers)."""
    try:
        return parse_endpoint(text, allow_hostname=True)
    except CandidateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_endpoint(text: str) -> tuple[str, int]:
    """Where to listen: like a named endpoint, but the wildcard addresses are allowed
    (``:PORT`` is every IPv4 address, as ``0.0.0.0:PORT``)."""
    if text.startswith(":") and text[1:].isdigit():
        text = "0.0.0.0" + text
    for wildcard, host in (("0.0.0.0:", "0.0.0.0"), ("[::]:", "::")):
        if text.startswith(wildcard):
            _, port = named_endpoint("127.0.0.1:" + text[len(wildcard) :])
            return host, port
    return named_endpoint(text)


def add_link_options(p: argparse.ArgumentParser) -> None:
    """The options of every subcommand that punches a link (send, recv, migrate-proxy)."""
    p.add_argument(
        "--stun",
        type=named_endpoint,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="STUN server (TCP) for a server-reflexive candidate; repeatable",
    )
    p.add_argument(
        "--candidate",
        type=endpoint,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="extra candidate to announce; repeatable",
    )
    p.add_argument("--port", type=int, default=0, help="local punch port (default: any)")
    p.add_argument("--bind", default=None, metavar="HOST", help="local address to punch from")
    p.add_argument("--report", default=None, metavar="PATH", help="write the JSON report here")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="direct",
        help="path policy: 'direct' (default) a punched link or exit 3; 'auto' direct "
        "first, then the tunnel over the control channel (with a warning); 'tunnel' the "
        "tunnel only.  The sender's policy counts; a receiver's 'direct' forbids the tunnel",
    )
    p.add_argument("--rounds", type=int, default=3, help="punch rounds before giving up")
    p.add_argument(
        "--port-mapping",
        choices=("auto", "on", "off"),
        default="auto",
        help="ask the gateway (PCP, then NAT-PMP, then UPnP-IGD) to forward a public port "
        "to the punch port while it is open: 'auto' (default) when --stun is given, 'on', 'off'",
    )
    hard = BirthdayBudget()
    p.add_argument(
        "--hard-nat",
        choices=("off", "birthday"),
        default="birthday",
        help="one side behind a symmetric (endpoint-dependent) NAT, the other not: "
        "'birthday' (default) lets the first round open many sockets / dial guessed ports "
        "within the budget below (both sides must allow it); 'off' never does",
    )
    p.add_argument(
        "--birthday-sockets",
        type=int,
        default=hard.sockets,
        metavar="N",
        help=f"sockets this side opens as the hard side (default {hard.sockets})",
    )
    p.add_argument(
        "--birthday-probes",
        type=int,
        default=hard.probes,
        metavar="N",
        help=f"guessed ports this side dials as the easy side (default {hard.probes})",
    )
    p.add_argument(
        "--birthday-rate",
        type=int,
        default=hard.rate,
        metavar="SYNS",
        help=f"birthday SYNs per second, at most (default {hard.rate})",
    )
    p.add_argument(
        "--birthday-seconds",
        type=float,
        default=hard.seconds,
        metavar="S",
        help=f"seconds birthday dialing may last (default {hard.seconds:g})",
    )
    p.add_argument("--dial-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


#: log messages that are news the command does not print itself (a stranger refused on
#: the control port): shown without -v too, as one plain line each
_SHOWN_WITHOUT_V = ("control listener:",)


class _Escaped(logging.Formatter):
    """Log text may carry peer text (a refusal's reason): escaped for the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _OnlyNews(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and str(record.msg).startswith(_SHOWN_WITHOUT_V)


def setup_logging(verbose: int) -> None:
    """Log lines only with -v (INFO) or -vv (DEBUG): without, the command's own lines say
    everything once, and the library's warnings would repeat them (except the few that
    are news only the log carries, see _SHOWN_WITHOUT_V)."""
    if verbose == 0:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Escaped(f"{PROG}: %(message)s"))
        handler.addFilter(_OnlyNews())
        lib = logging.getLogger("holepunch_mig")
        lib.addHandler(handler)
        lib.setLevel(logging.WARNING)
        lib.propagate = False
        return
    level = logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_link_options` as ``api.connect`` keywords."""
    return {
        "port": args.port,
        "bind_host": args.bind,
        "stun": tuple(args.stun),
        "candidates": tuple(args.candidate),
        "policy": args.policy,
        "rounds": args.rounds,
        "dial_delay": args.dial_delay,
        "hard_nat": args.hard_nat,
        "port_mapping": args.port_mapping,
        "birthday": BirthdayBudget(
            sockets=args.birthday_sockets,
            probes=args.birthday_probes,
            rate=args.birthday_rate,
            seconds=args.birthday_seconds,
        ),
    }


def say(text: str) -> None:
    sys.stderr.write(printable(text, keep_newlines=True) + "\n")
    sys.stderr.flush()


class ControlListenError(OSError):
    """The control port could not be bound (in use, not this host's address)."""


def bind_control(host: str, port: int) -> trio.socket.SocketType:
    """Bind and listen on the control port now, so a busy port fails before anything
    says "waiting"; raises ControlListenError with the reason in words."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1)
    except OSError as exc:
        listener.close()
        hint = {
            errno.EADDRINUSE: " (another holepunch-mig recv or another program is using "
            "it; pick another port or stop that one)",
            errno.EADDRNOTAVAIL: " (not an address of this host)",
            errno.EACCES: " (ports below 1024 need root)",
        }.get(exc.errno or 0, "")
        raise ControlListenError(
            exc.errno or 0, f"cannot listen on {host}:{port}: {exc.strerror}{hint}"
        ) from None
    return trio.socket.from_stdlib_socket(listener)


AUTH_OPTIONS = (
    "--identity PATH with --peer KEY or --peers FILE (pinned keys), --psk-file PATH "
    "(a secret from the manager), or --pair on the receiver and --code CODE on the sender"
)


def add_auth_options(p: argparse.ArgumentParser, *, listening: bool) -> None:
    """Control channel authentication: every subcommand that opens a TCP control channel
    (and, optionally, one over SSH) takes these."""
    g = p.add_argument_group(
        "control channel authentication",
        "A TCP control channel must be authenticated with one of these (over SSH, with "
        "--control-cmd/--control-stdio, SSH already did it and they are optional).",
    )
    g.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="PATH",
        help="this host's private key file (holepunch-mig keygen); with --peer/--peers",
    )
    g.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="KEY",
        help="a pinned peer: its public key line 'hpm-x25519 KEY [name]' as keygen printed "
        "it (quote it); repeatable",
    )
    g.add_argument(
        "--peers",
        type=Path,
        default=None,
        metavar="FILE",
        help="pinned peers: one 'hpm-x25519 KEY [name]' line each, # comments",
    )
    g.add_argument(
        "--psk-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="a secret shared with the peer (>= 32 random bytes, mode 0600), mixed into "
        "the control handshake; may be combined with pinned keys",
    )
    if listening:
        g.add_argument(
            "--pair",
            action="store_true",
            help="no key files: print a one-time pairing code (stderr) for the sender's "
            "--code; it serves one session, expires, and 3 wrong attempts end it",
        )
        g.add_argument(
            "--pair-timeout",
            type=float,
            default=600.0,
            metavar="SECONDS",
            help="how long the pairing code is valid (default 600)",
        )
    else:
        g.add_argument(
            "--code",
            default=None,
            metavar="CODE",
            help="the receiver's one-time pairing code (xxxxx-xxxxx, from its --pair); "
            "'-' asks for it on the terminal (or reads one line of standard input), so "
            "it does not show in the process list",
        )


def _has_auth(args: argparse.Namespace) -> bool:
    return bool(
        args.identity
        or args.peer
        or args.peers
        or args.psk_file
        or getattr(args, "pair", False)
        or getattr(args, "code", None)
    )


def auth_usage_problem(args: argparse.Namespace, *, tcp: bool) -> str | None:
    """The usage error for the authentication options, or None; ``tcp``: the control
    channel is a TCP connection this command opens (it must be authenticated)."""
    pairing = getattr(args, "pair", False) or getattr(args, "code", None)
    if pairing and (args.identity or args.peer or args.peers or args.psk_file):
        flag = "--pair" if getattr(args, "pair", False) else "--code"
        return f"{flag} replaces --identity/--peer/--peers/--psk-file: give one or the other"
    if getattr(args, "code", None) == "-" and getattr(args, "input", None) == "-":
        return "--code - and --input - both read standard input: give --input PATH"
    if (args.peer or args.peers) and not args.identity:
        return "--peer/--peers need this host's key too: --identity PATH (holepunch-mig keygen)"
    if args.identity and not (args.peer or args.peers or args.psk_file):
        return "--identity needs the peer's key: --peer 'hpm-x25519 KEY [name]' or --peers FILE"
    if tcp and not _has_auth(args):
        return (
            "a TCP control channel must be authenticated; give "
            + AUTH_OPTIONS
            + " (or run the control channel over SSH with --control-cmd/--control-stdio)"
        )
    return None


def control_auth(args: argparse.Namespace) -> ControlAuth | None:
    """The credentials the options name, read from their files (CredentialError names a
    bad file); a pairing receiver's code is made when it starts listening."""
    if getattr(args, "pair", False):
        return None
    code = getattr(args, "code", None)
    if code == "-":
        code = read_code()
    return load_auth(args.identity, args.peer, args.peers, args.psk_file, code)


def read_code() -> str:
    """The pairing code for ``--code -``: typed at the terminal without echo, or one line
    of standard input when it is not a terminal (a script's pipe)."""
    tty = sys.stdin.isatty()
    code = (getpass.getpass("pairing code: ") if tty else sys.stdin.readline()).strip()
    if not code:
        raise CredentialError("--code -: no pairing code was given on standard input")
    return code


def _pairing(args: argparse.Namespace) -> ControlAuth:
    code = PairingCode.generate(trio.current_time(), args.pair_timeout)
    # the code is printed even with --quiet: without it the sender cannot connect
    say(
        f"pairing code: {code.text}  (sender: holepunch-mig ... --code {code.text}; one "
        f"session, valid {args.pair_timeout:g} s, 3 wrong attempts end it)"
    )
    return ControlAuth(code=code)


async def listen_control(
    args: argparse.Namespace, host: str, port: int, auth: ControlAuth | None
) -> SecureChannel:
    """Accept the authenticated control connection: keeps listening through strangers."""
    listener = bind_control(host, port)  # a busy port fails here, before "waiting"
    if getattr(args, "pair", False):
        auth = _pairing(args)
    assert auth is not None  # auth_usage_problem refused the rest
    if not args.quiet:
        say(f"waiting for the control connection on {host}:{port} ({auth.describe()})")
    return await accept_authenticated(host, port, auth, listener=listener)


async def dial_control(
    host: str, port: int, auth: ControlAuth | None, wait: float
) -> SecureChannel:
    assert auth is not None
    return await connect_authenticated(host, port, auth, wait=wait)  # deadline-bound


async def secure_existing(
    args: argparse.Namespace, channel: ControlChannel, auth: ControlAuth | None, *, initiator: bool
) -> ControlChannel:
    """An SSH channel: authenticated as well when credentials were given."""
    if getattr(args, "pair", False):
        auth = _pairing(args)
    if auth is None:
        return channel
    return await secure(channel, auth, initiator=initiator)


async def source_control(args: argparse.Namespace, auth: ControlAuth | None) -> ControlChannel:
    """The source's control channel: ``--control-cmd`` (a process, e.g. ssh; secured as
    well when credentials were given) or ``--control`` (an authenticated TCP dial).  One
    helper for every source-side command, so each says "connecting to" and explains a
    control command that died during the handshake the same way."""
    if getattr(args, "control_cmd", None):
        process = await open_process_channel(shlex.split(args.control_cmd), args.peer_host)
        try:
            return await secure_existing(args, process, auth, initiator=True)
        except ChannelClosed:
            # the command ended during the control handshake: its status says why
            status = await process.exit_status()
            await process.aclose()
            if status:
                raise ChannelClosed(command_status(status)) from None
            raise
        except BaseException:
            await process.aclose()
            raise
    host, port = args.control
    if not getattr(args, "quiet", False):
        say(f"connecting to the control port {host}:{port} (up to {args.control_wait:g} s)")
    return await dial_control(host, port, auth, args.control_wait)


def command_status(status: int) -> str:
    """What a control command's exit status means, for the error that ends the session."""
    if status == 127:
        return (
            "control command exited with status 127: the command was not found (is "
            "holepunch-mig on the remote PATH? give its full path, e.g. "
            '"ssh HOST /opt/holepunch/.venv/bin/holepunch-mig recv --control-stdio ...")'
        )
    if status < 0:
        return f"control command was killed by signal {-status}"
    return f"control command exited with status {status} (its messages are above)"


PLOT_HINT = "pip install 'holepunch_mig[plot]'"
LIBVIRT_HINT = "pip install 'holepunch_mig[libvirt]', or Debian's python3-libvirt"


def write_chart(path: Path, render: Callable[[], bytes], prog: str) -> bool:
    """Write the PNG ``render`` draws to ``path``; True if written.  Charts need the
    optional matplotlib: without it the command still succeeds and says how to get it."""
    try:
        png = render()
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        say(f"{prog}: no chart written to {path}: matplotlib is missing ({PLOT_HINT})")
        return False
    path.write_bytes(png)
    return True
