"""``holepunch-mig``: send and receive a payload through a punched, encrypted link.

Human progress and the summary go to stderr; stdout carries data only when asked to
(``--output -``).  The JSON report (``--report PATH``) is for machines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

from holepunch_mig.errors import CandidateError, HolepunchError, NoDirectPath
from holepunch_mig.net.control import (
    ControlChannel,
    StreamChannel,
    open_process_channel,
    open_tcp_channel,
)
from holepunch_mig.net.control import stdio_channel as open_stdio_channel
from holepunch_mig.report import Report
from holepunch_mig.roles import POLICIES, Role
from holepunch_mig.session import api
from holepunch_mig.session.link import Link
from holepunch_mig.wire.candidates import parse_endpoint

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_PATH = 3


class Progress:
    """Bytes, rate and ETA on stderr: a redrawn line on a TTY, a line a second otherwise."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.start = time.monotonic()
        self.last = self.start  # first line after one interval, not at byte 0
        self.printed = False
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0):
            return
        self.last = now
        self.printed = True
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        text = f"{self.label}: {done / 1e6:,.1f} MB, {rate / 1e6:,.1f} MB/s"
        if self.total:
            eta = (self.total - done) / rate if rate else 0.0
            text += f", {100 * done / self.total:.0f} %, ETA {eta:.0f} s"
        if self.tty:
            sys.stderr.write("\r" + text.ljust(78))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and self.printed:
            sys.stderr.write("\n")


def _endpoint(text: str) -> tuple[str, int]:
    """An IP-literal endpoint (candidates)."""
    try:
        return parse_endpoint(text)
    except CandidateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _named_endpoint(text: str) -> tuple[str, int]:
    """An endpoint whose host may be a name (control port, STUN servers)."""
    try:
        return parse_endpoint(text, allow_hostname=True)
    except CandidateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_endpoint(text: str) -> tuple[str, int]:
    """Where to listen: like a named endpoint, but the wildcard addresses are allowed."""
    for wildcard, host in (("0.0.0.0:", "0.0.0.0"), ("[::]:", "::")):
        if text.startswith(wildcard):
            _, port = _named_endpoint("127.0.0.1:" + text[len(wildcard) :])
            return host, port
    return _named_endpoint(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stun",
        type=_named_endpoint,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="STUN server (TCP) for a server-reflexive candidate; repeatable",
    )
    p.add_argument(
        "--candidate",
        type=_endpoint,
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
        choices=list(POLICIES),
        default="direct",
        help="path policy: 'direct' (default) a punched link or exit 3; 'auto' direct "
        "first, then the tunnel over the control channel (with a warning); 'tunnel' the "
        "tunnel only.  The sender's policy counts; a receiver's 'direct' forbids the tunnel",
    )
    p.add_argument("--rounds", type=int, default=3, help="punch rounds before giving up")
    p.add_argument("--dial-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _resume_args(p: argparse.ArgumentParser) -> None:
    """send/recv only (stream transfers resume; migrate-proxy streams cannot)."""
    p.add_argument(
        "--resume-attempts",
        type=int,
        default=3,
        metavar="N",
        help="re-punch a lost link (fresh keys) and go on from the last byte the receiver "
        "kept, at most N times per transfer (default 3; 0 = fail on the first loss)",
    )
    p.add_argument(
        "--link-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="declare the link dead when the path answers nothing this long (default 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holepunch-mig",
        description="Move migration data through a TCP link punched between firewalled hosts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    recv = sub.add_parser("recv", help="receive a payload (the migration destination)")
    ctl = recv.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control-listen",
        type=_listen_endpoint,
        metavar="HOST:PORT",
        help="accept the control connection here",
    )
    ctl.add_argument(
        "--control-stdio",
        action="store_true",
        help="the control channel is stdin/stdout (under ssh)",
    )
    recv.add_argument(
        "--output",
        default="-",
        metavar="PATH|-",
        help="where to write the payload (default: stdout)",
    )
    _common(recv)
    _resume_args(recv)

    send = sub.add_parser("send", help="send a payload (the migration source)")
    ctl = send.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control",
        type=_named_endpoint,
        metavar="HOST:PORT",
        help="connect the control channel to the receiver here",
    )
    ctl.add_argument(
        "--control-cmd",
        metavar="CMD",
        help='run CMD as the control channel, e.g. "ssh host holepunch-mig recv '
        '--control-stdio --output f"',
    )
    send.add_argument(
        "--control-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="keep trying the control port this long (default 10)",
    )
    send.add_argument(
        "--peer-host",
        default=None,
        metavar="HOST",
        help="the receiver's address, when --control-cmd cannot show it",
    )
    send.add_argument(
        "--input", default="-", metavar="PATH|-", help="payload to send (default: stdin)"
    )
    # test knob: read the input at most this many bytes per second (lab resume tests)
    send.add_argument("--rate-limit", type=float, default=0.0, help=argparse.SUPPRESS)
    _common(send)
    _resume_args(send)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
_SUBCOMMANDS: list[Register] = []
"""Other modules' subcommands (lab, doctor, migrate-proxy, bench): each registers a
parser whose defaults carry ``run=callable(args) -> exit code``."""


def _load_subcommands() -> None:
    import importlib

    for name in ("lab", "migrate", "bench"):
        module = importlib.import_module(f"holepunch_mig.cli.{name}")
        _SUBCOMMANDS.append(module.register)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _connect_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "port": args.port,
        "bind_host": args.bind,
        "stun": tuple(args.stun),
        "candidates": tuple(args.candidate),
        "policy": args.policy,
        "rounds": args.rounds,
        "dial_delay": args.dial_delay,
    }


def _write_report(path: str | None, report: Report | None, **extra: object) -> None:
    if path is None or report is None:
        return
    report.extra.update(extra)
    Path(path).write_text(report.to_json() + "\n")


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _output(path: str) -> Iterator[tuple[BinaryIO, list[bool]]]:
    """Write to a temporary name beside ``path``; rename only once verified."""
    if path == "-":
        yield sys.stdout.buffer, [False]
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    verified = [False]
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, verified
        if verified[0]:
            os.replace(tmp, target)
    finally:
        if not verified[0]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _RateLimited:
    """The input read at most ``rate`` bytes per second (a test knob: makes a lab
    transfer last long enough to be interrupted).  Seeks pass through."""

    def __init__(self, inner: BinaryIO, rate: float) -> None:
        self._inner = inner
        self._rate = rate
        self._start = time.monotonic()
        self._done = 0

    def readinto(self, view: memoryview) -> int:
        ahead = self._done / self._rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)  # pacing in the sender's worker thread, never in trio
        n: int = self._inner.readinto(view[: max(1, int(self._rate / 20))])  # type: ignore[attr-defined]
        self._done += n
        return n

    def seekable(self) -> bool:
        return self._inner.seekable()

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)


@contextlib.contextmanager
def _input(path: str) -> Iterator[tuple[BinaryIO, int | None]]:
    if path == "-":
        yield sys.stdin.buffer, None
        return
    with open(path, "rb") as fh:
        yield fh, os.fstat(fh.fileno()).st_size


async def _accept_control(host: str, port: int) -> StreamChannel:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(1)
        sock, _addr = await listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return StreamChannel(trio.SocketStream(sock))


async def _run_recv(args: argparse.Namespace) -> int:
    channel: ControlChannel
    if args.control_stdio:
        channel = open_stdio_channel()
    else:
        host, port = args.control_listen
        if not args.quiet:
            _say(f"waiting for the control connection on {host}:{port}")
        channel = await _accept_control(host, port)

    async def receive(link: Link) -> str:
        with _output(args.output) as (dst, verified):
            progress = None if args.quiet else Progress("received", None)
            result = await link.receive_file(dst, progress=progress)
            dst.flush()
            verified[0] = True
        if progress:
            progress.finish()
        return f"received {result.bytes} bytes, sha256 {result.sha256}, verified" + _resumed(link)

    return await _session(args, channel, "destination", receive)


async def _run_send(args: argparse.Namespace) -> int:
    # open the input first: a missing file fails before the peer is involved
    with _input(args.input) as (src, total):
        channel: ControlChannel
        if args.control_cmd:
            channel = await open_process_channel(shlex.split(args.control_cmd), args.peer_host)
        else:
            host, port = args.control
            channel = await open_tcp_channel(host, port, wait=args.control_wait)

        async def send(link: Link) -> str:
            progress = None if args.quiet else Progress("sent", total)
            data = _RateLimited(src, args.rate_limit) if args.rate_limit > 0 else src
            result = await link.send_file(data, progress=progress)  # type: ignore[arg-type]
            if progress:
                progress.finish()
            return (
                f"sent {result.bytes} bytes, sha256 {result.sha256}, verified by the receiver"
                + _resumed(link)
            )

        return await _session(args, channel, "source", send)


async def _session(
    args: argparse.Namespace,
    channel: ControlChannel,
    role: Role,
    transfer: Callable[[Link], Awaitable[str]],
) -> int:
    """Connect, announce the path, run ``transfer``, write the report; map errors to exit
    codes.  Shared by ``send`` and ``recv``."""
    report: Report | None = None
    try:
        options = _connect_options(args)
        options.update(resume_attempts=args.resume_attempts, link_timeout=args.link_timeout)
        async with api.connect(channel, role=role, **options) as link:
            report = link.report
            if not args.quiet:
                _say(report.summary())
            _warn_fallback(link)
            done = await transfer(link)
        _say(done)
        _write_report(args.report, report)
        return EXIT_OK
    except NoDirectPath as exc:
        return _fail(args, exc, exc.report or report, EXIT_NO_PATH)
    except HolepunchError as exc:
        return _fail(args, exc, exc.report or report, EXIT_FAILED)
    except OSError as exc:  # the input or output file, not the network
        return _fail(args, exc, report, EXIT_FAILED)
    finally:
        await channel.aclose()


def _resumed(link: Link) -> str:
    cuts = link.report.interruptions
    if not cuts:
        return ""
    times = ", ".join(f"{c.resume_seconds or 0:.2f} s" for c in cuts)
    return f" (link lost {len(cuts)} time(s), resumed in {times})"


def _warn_fallback(link: Link) -> None:
    """Fallback is never silent: say so on stderr, even with --quiet."""
    if not link.fell_back:
        return
    _say(
        "holepunch-mig: WARNING: no direct path; the data goes through the tunnel over the "
        f"control channel (policy auto): {link.report.path_reason}"
    )
    if link.report.verdict:
        _say(f"holepunch-mig: why the direct path failed: {link.report.verdict}")


def _fail(args: argparse.Namespace, exc: Exception, report: Report | None, code: int) -> int:
    verdict = getattr(exc, "verdict", None) or str(exc)
    if report is not None:
        report.ok = False
        report.verdict = verdict
        _say(report.summary())
    _say(f"holepunch-mig: {type(exc).__name__}: {exc}")
    if isinstance(exc, NoDirectPath):
        _say(f"holepunch-mig: verdict: {verdict}")
    if args.report:
        if report is None:
            report = Report(session="", role="source" if args.command == "send" else "destination")
            report.ok = False
            report.verdict = verdict
        _write_report(args.report, report)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    if not _SUBCOMMANDS:
        _load_subcommands()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "recv" and args.control_stdio and args.output == "-":
        parser.error("--control-stdio uses stdout for the control channel; give --output PATH")
    _setup_logging(getattr(args, "verbose", 0))
    if args.command not in ("recv", "send"):
        code: int = args.run(args)
        return code
    runner = {"recv": _run_recv, "send": _run_send}[args.command]
    try:
        return trio.run(runner, args)
    except KeyboardInterrupt:
        _say("holepunch-mig: interrupted")
        return 130
    except HolepunchError as exc:  # failures before a session exists (control port, ssh)
        return _fail(args, exc, None, EXIT_FAILED)
    except OSError as exc:
        return _fail(args, exc, None, EXIT_FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
