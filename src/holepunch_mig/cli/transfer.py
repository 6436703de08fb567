"""``holepunch-mig send`` and ``recv``: a payload through a punched, encrypted link.

Human progress and the summary go to stderr; stdout carries data only when asked to
(``--output -``).  The JSON report (``--report PATH``) is for machines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import trio

from holepunch_mig.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_PATH,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Progress,
    UsageError,
    add_auth_options,
    add_link_options,
    amount,
    auth_usage_problem,
    check_input,
    check_output_path,
    command_status,
    connect_options,
    control_auth,
    describe,
    interrupted,
    listen_control,
    listen_endpoint,
    named_endpoint,
    say,
    secure_existing,
    source_control,
    warn,
)
from holepunch_mig.errors import (
    ChannelClosed,
    CredentialError,
    HolepunchError,
    NoDirectPath,
    PeerAbort,
    TransferError,
)
from holepunch_mig.net.control import ControlChannel, ProcessChannel
from holepunch_mig.net.control import stdio_channel as open_stdio_channel
from holepunch_mig.report import Report, write_file_atomically
from holepunch_mig.roles import Role
from holepunch_mig.session import api
from holepunch_mig.session.link import Link, TransferResult
from holepunch_mig.wire.digests import PREFERENCES

__all__ = ["register", "run_recv", "run_send"]


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


def _digest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--digest",
        choices=PREFERENCES,
        default="auto",
        help="end-to-end check of the whole payload: auto (default: BLAKE3 when both sides "
        "have it, about 4x cheaper than SHA-256, else SHA-256), blake3 (fail without it), "
        "sha256 (to compare with sha256sum)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    recv = sub.add_parser("recv", help="receive a payload (the migration destination)")
    ctl = recv.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control-listen",
        type=listen_endpoint,
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
        help="where to write the payload (default: stdout, never a terminal)",
    )
    add_link_options(recv)
    _resume_args(recv)
    _digest_args(recv)
    add_auth_options(recv, listening=True)

    send = sub.add_parser("send", help="send a payload (the migration source)")
    ctl = send.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control",
        type=named_endpoint,
        metavar="HOST:PORT",
        help="connect the control channel to the receiver here",
    )
    ctl.add_argument(
        "--control-cmd",
        metavar="CMD",
        help='run CMD as the control channel, e.g. "ssh host /path/to/holepunch-mig recv '
        '--control-stdio --output f" (the remote command must be on the remote PATH or '
        "given by its full path)",
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
    add_link_options(send)
    _resume_args(send)
    _digest_args(send)
    add_auth_options(send, listening=False)
    recv.set_defaults(run=run_recv, usage_problem=_recv_usage_problem)
    send.set_defaults(run=run_send, usage_problem=_send_usage_problem)


def _recv_usage_problem(args: argparse.Namespace) -> str | None:
    if args.control_stdio and args.output == "-":
        return "--control-stdio uses stdout for the control channel; give --output PATH"
    return auth_usage_problem(args, tcp=not args.control_stdio)


def _send_usage_problem(args: argparse.Namespace) -> str | None:
    return auth_usage_problem(args, tcp=not args.control_cmd)


def _preflight(args: argparse.Namespace) -> None:
    """Every path checked before anything connects: a mistake is a usage error (exit 2)
    naming the path, not a failure after the link was punched."""
    if args.command == "send":
        if args.input != "-":
            check_input(args.input, "--input")
    elif args.output == "-":
        if sys.stdout.isatty():
            raise UsageError(
                "refusing to write the payload (binary data) to a terminal: give --output "
                "PATH, or redirect stdout (--output - > FILE)"
            )
    else:
        check_output_path(args.output, "--output")
    if args.report is not None:
        check_output_path(args.report, "--report")


def _write_report(path: str | None, report: Report | None, **extra: object) -> None:
    if path is None or report is None:
        return
    report.extra.update(extra)
    try:
        write_file_atomically(path, report.to_json() + "\n")
    except OSError as exc:  # checked before connecting; the disk may still fill up
        say(f"{PROG}: cannot write the report {path}: {describe(exc)}")


class _Output:
    """The receiver's output: a temporary file beside ``path`` that :meth:`commit` makes
    durable and renames into place (stdout for ``-``).  Commit runs before the source is
    told ``ok``; whatever is not committed is removed on the way out."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp: str | None = None
        self.committed = False
        if path == "-":
            self.fh: BinaryIO = sys.stdout.buffer
            return
        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"--output {path} is a directory; name a file")
        try:
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".part", dir=target.parent
            )
        except OSError as exc:  # named as the user named it, not the temporary file
            raise OSError(exc.errno, f"cannot write the output: {exc.strerror}", path) from None
        self.fh = os.fdopen(fd, "wb")

    def commit(self, result: TransferResult) -> None:
        """flush, fsync, rename into place, fsync the directory -- or raise."""
        if not result.verified:
            raise TransferError("the sender's SHA-256 was not compared: not verified")
        self.fh.flush()
        if self.tmp is None:
            return
        os.fsync(self.fh.fileno())
        self.fh.close()
        target = Path(self.path)
        if target.is_dir():
            raise IsADirectoryError(f"--output {self.path} is a directory; name a file")
        os.replace(self.tmp, target)
        self.tmp = None
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        self.committed = True

    def discard(self) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
        self.tmp = None


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


async def _run_recv(args: argparse.Namespace) -> int:
    auth = control_auth(args)
    channel: ControlChannel
    if args.control_stdio:
        channel = open_stdio_channel()
        try:
            channel = await secure_existing(args, channel, auth, initiator=False)
        except BaseException:
            await channel.aclose()
            raise
    else:
        host, port = args.control_listen
        channel = await listen_control(args, host, port, auth)
    progress = None if args.quiet else Progress("received", None)

    async def receive(link: Link) -> str:
        out = _Output(args.output)
        try:
            result = await link.receive_file(out.fh, progress=progress, commit=out.commit)
        finally:
            out.discard()
        return (
            f"received {amount(result.bytes, result.seconds)}{_cpu(link.report)}, "
            f"{result.digest} {result.sha256}, verified" + _resumed(link)
        )

    return await _session(args, channel, "destination", receive, progress)


async def _run_send(args: argparse.Namespace) -> int:
    with _input(args.input) as (src, total):
        auth = control_auth(args)
        channel = await source_control(args, auth)
        progress = None if args.quiet else Progress("sent", total)

        async def send(link: Link) -> str:
            data = _RateLimited(src, args.rate_limit) if args.rate_limit > 0 else src
            result = await link.send_file(data, progress=progress)  # type: ignore[arg-type]
            if not result.verified:  # send_file hashes: a peer's missing digest raised
                raise TransferError("the receiver's SHA-256 was not compared: not verified")
            return (
                f"sent {amount(result.bytes, result.seconds)}{_cpu(link.report)}, "
                f"{result.digest} {result.sha256}, verified by the receiver" + _resumed(link)
            )

        return await _session(args, channel, "source", send, progress)


async def _session(
    args: argparse.Namespace,
    channel: ControlChannel,
    role: Role,
    transfer: Callable[[Link], Awaitable[str]],
    progress: Progress | None,
) -> int:
    """Connect, announce the path, run ``transfer``, write the report; map errors to exit
    codes; tell the peer why when this side gives up.  Shared by ``send`` and ``recv``."""
    report: Report | None = None
    shown = [False]
    try:
        options = connect_options(args)
        options.update(
            resume_attempts=args.resume_attempts,
            link_timeout=args.link_timeout,
            digest=args.digest,
        )
        async with api.connect(channel, role=role, **options) as link:
            report = link.report
            if not args.quiet:
                say(report.summary(verdict=not link.fell_back))
                shown[0] = True
            _warn_fallback(link)
            done = await transfer(link)
        if progress is not None:
            progress.finish()
        say(done)
        _write_report(args.report, report)
        return EXIT_OK
    except PeerAbort as exc:  # the peer said why: nothing to tell it back
        return await _fail(args, exc, exc.report or report, EXIT_FAILED, progress, shown)
    except NoDirectPath as exc:
        return await _fail(args, exc, exc.report or report, EXIT_NO_PATH, progress, shown)
    except HolepunchError as exc:
        process = _process_of(channel)
        if isinstance(exc, ChannelClosed) and process is not None:
            status = await process.exit_status()
            if status is not None and status != 0:
                exc = ChannelClosed(command_status(status))
        else:
            await api.abort(channel, describe(exc))
        return await _fail(args, exc, exc.report or report, EXIT_FAILED, progress, shown)
    except OSError as exc:  # the input or output file, not the network
        await api.abort(channel, f"the {_peer_word(role)} stopped: {describe(exc)}")
        return await _fail(args, exc, report, EXIT_FAILED, progress, shown)
    except BaseException as exc:
        if interrupted(exc):
            if progress is not None:
                progress.finish()
            await api.abort(channel, f"the {_peer_word(role)} was interrupted (Ctrl-C)")
            _write_interrupted(args, report)
            args.report = None  # written
            raise KeyboardInterrupt from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()


def _process_of(channel: ControlChannel) -> ProcessChannel | None:
    """The ssh (or other) command under ``channel``, also when it was secured on top."""
    while channel is not None:
        if isinstance(channel, ProcessChannel):
            return channel
        channel = getattr(channel, "inner", None)  # type: ignore[assignment]
    return None


def _peer_word(role: Role) -> str:
    """How the peer names this side: the sender / the receiver."""
    return "sender" if role == "source" else "receiver"


def _write_interrupted(args: argparse.Namespace, report: Report | None) -> None:
    if args.report is None:
        return
    if report is None:
        report = Report(session="", role="source" if args.command == "send" else "destination")
    report.ok = False
    report.verdict = "interrupted"
    _write_report(args.report, report)


def _cpu(report: Report) -> str:
    """ ", CPU 0.52 s (0.49 s/GiB)": what the transfer cost this host."""
    if report.cpu_seconds is None or not report.bytes:
        return ""
    per_gib = report.cpu_seconds / (report.bytes / (1 << 30))
    return f", CPU {report.cpu_seconds:.2f} s ({per_gib:.2f} s/GiB)"


def _resumed(link: Link) -> str:
    cuts = link.report.interruptions
    if not cuts:
        return ""
    times = ", ".join(f"{c.resume_seconds or 0:.2f} s" for c in cuts)
    return f" (link lost {len(cuts)} time(s), resumed in {times})"


def _warn_fallback(link: Link) -> None:
    """Fallback is never silent: one warning on stderr, even with --quiet, with why the
    direct path failed (the summary leaves that out when it falls back)."""
    if not link.fell_back:
        return
    why = link.report.verdict or link.report.path_reason
    warn(f"no direct path; the data goes through the slower tunnel over the control channel: {why}")


async def _fail(
    args: argparse.Namespace,
    exc: Exception,
    report: Report | None,
    code: int,
    progress: Progress | None = None,
    shown: list[bool] | None = None,
) -> int:
    """One summary (unless already shown or --quiet), then one line saying what failed
    and why: the verdict, if there is one, once."""
    if progress is not None:
        progress.finish()
    verdict = getattr(exc, "verdict", None) or describe(exc)
    if report is not None:
        report.ok = False
        report.verdict = verdict
        if not args.quiet and not (shown and shown[0]):
            say(report.summary(verdict=False))
    message = describe(exc)
    if isinstance(exc, NoDirectPath) and verdict != message:
        message = f"{message}: {verdict}"
    say(f"{PROG} {args.command}: {message}")
    if args.report:
        if report is None:
            report = Report(session="", role="source" if args.command == "send" else "destination")
            report.ok = False
            report.verdict = verdict
        _write_report(args.report, report)
    return code


def _run(runner: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    _preflight(args)
    try:
        return trio.run(runner, args)
    except CredentialError as exc:  # a key, peers or psk file, or a code, is unusable
        say(f"{PROG} {args.command}: {exc}")
        return EXIT_USAGE
    except HolepunchError as exc:  # failures before a session exists (control port, ssh)
        return trio.run(_fail, args, exc, None, EXIT_FAILED)
    except OSError as exc:
        return trio.run(_fail, args, exc, None, EXIT_FAILED)
    except BaseException as exc:
        if interrupted(exc):
            _write_interrupted(args, None)  # unless the session wrote its own
            say(f"{PROG}: interrupted")
            return EXIT_INTERRUPTED
        raise


def run_recv(args: argparse.Namespace) -> int:
    return _run(_run_recv, args)


def run_send(args: argparse.Namespace) -> int:
    return _run(_run_send, args)
