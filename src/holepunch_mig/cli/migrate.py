"""``holepunch-mig migrate-proxy source|destination``: QEMU migration through the link.

Source host (QEMU migrates to a UNIX socket of ours)::

    holepunch-mig migrate-proxy source --listen-unix /run/hpm/vm1.sock \\
        --control dst-host:7070 --identity /etc/hpm/host.key --peers /etc/hpm/peers \\
        [--stun HOST:PORT]... [--report r.json]

prints ``ready unix:/run/hpm/vm1.sock`` on stdout once the whole path is up (link
punched, destination proxy connected to its QEMU); the manager then issues QMP
``migrate {"uri": "unix:/run/hpm/vm1.sock"}``.  The proxy exits when every connection
QEMU opened has ended: 0 if every stream was delivered intact both ways, 1 otherwise
(the verdict is on stderr and in the report), 3 if no direct path could be punched.

Destination host (QEMU started with ``-incoming defer`` and told
``migrate-incoming unix:PATH``)::

    holepunch-mig migrate-proxy destination --connect-unix PATH \\
        --control-listen 0.0.0.0:7070 --identity /etc/hpm/host.key --peers /etc/hpm/peers \\
        [--report r.json]

The control channel is authenticated before anything else (pinned keys as above,
``--psk-file`` from the manager, or ``--pair`` here and ``--code`` on the source); the
destination keeps listening through connections that fail to authenticate.

``--listen-unix PATH`` is used exactly as given (socket 0600, created atomically,
never replacing an existing file; the caller owns the directory's permissions).

Handoff mode (``--mode handoff --qmp QMP``, one channel, no multifd): once the link is
authenticated the proxy gives the punched TCP socket itself to QEMU over QMP (``getfd``)
with a TLS-PSK credential derived from the session keys, and QEMU migrates over it with
its own TLS; no byte of the migration passes through Python.  QMP must be a monitor
socket no one else is connected to (e.g. a second ``-qmp`` of the VM).  Source: the
proxy issues ``migrate fd:NAME`` itself and prints ``ready fd:NAME`` once it has; the
manager then only watches ``query-migrate``.  Destination: QEMU started with
``-incoming defer`` and nothing else (the proxy issues ``migrate-incoming fd:NAME``).
Both proxies exit when QEMU says the migration is over (0: completed and, on the
destination, the VM resumed).  A QEMU with multifd on is refused (exit 1) before
anything is punched: use the default ``--mode mux`` for multifd.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.cli import common as cli
from holepunch_mig.errors import (
    ChannelClosed,
    CredentialError,
    HolepunchError,
    NoDirectPath,
    PeerAbort,
)
from holepunch_mig.migration.api import (
    DEFAULT_LINK_TIMEOUT,
    DEFAULT_TIMEOUT,
    MigrationError,
    MigrationProgress,
    MigrationProxy,
    MigrationReport,
    default_links,
    migration_destination,
    migration_source,
)
from holepunch_mig.migration.handoff import HandoffProxy
from holepunch_mig.migration.libvirt import DEFAULT_SOCKET_PARENT, libvirt_destination
from holepunch_mig.net.control import (
    ControlChannel,
    ProcessChannel,
    stdio_channel,
)
from holepunch_mig.report import write_file_atomically
from holepunch_mig.roles import Role
from holepunch_mig.session import api

#: ``--help`` text: plain words, no reStructuredText markup
DESCRIPTION = """\
Carry a QEMU live migration (every channel, multifd included) through a punched,
encrypted link.

source host:       holepunch-mig migrate-proxy source --listen-unix /run/hpm/vm1.sock \\
                       --control DST-HOST:7070
                   prints "ready unix:/run/hpm/vm1.sock"; then QMP migrate to that URI
destination host:  holepunch-mig migrate-proxy destination --connect-unix QEMU-IN.sock \\
                       --control-listen 0.0.0.0:7070
                   (QEMU started with -incoming defer, migrate-incoming unix:QEMU-IN.sock)
over ssh:          source --control-cmd "ssh DST /path/to/holepunch-mig migrate-proxy \\
                       destination --control-stdio --connect-unix QEMU-IN.sock" ...

Exit status: 0 every stream delivered intact, 1 failed, 2 usage, 3 no direct path."""

_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 536870912, 512M, 2G)")
    mult: int = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(m.group(1)) * mult


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=("mux", "handoff"),
        default="mux",
        help="mux (default, faster on QEMU 7.2): relay every QEMU connection through "
        "AES-GCM records in this process (multifd works); handoff: give the punched "
        "socket to QEMU, which encrypts with its own TLS-PSK, so no migration byte "
        "passes through this process (one channel, needs --qmp; ~3x slower than mux on "
        "QEMU 7.2, see docs/dev/qemu-notes.md)",
    )
    p.add_argument(
        "--qmp",
        type=Path,
        default=None,
        metavar="PATH",
        help="handoff mode: this host's QEMU QMP socket (a monitor no one else uses)",
    )
    p.add_argument(
        "--psk-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="handoff mode: where the private (0700) key directory is made "
        "(default /dev/shm; QEMU must be able to read it)",
    )
    p.add_argument(
        "--digest",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a digest of every stream in its END record, with the session's negotiated "
        "algorithm (BLAKE3 when both sides have it, else SHA-256) (default: count-only; "
        "AES-GCM already rejects altered, dropped or reordered records)",
    )
    p.add_argument(
        "--expected-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="about how much QEMU will send (guest RAM, e.g. 4G): enables the ETA",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up if the migration is not over after this long (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the other proxy / the destination QEMU socket (default 60)",
    )
    p.add_argument(
        "--link-timeout",
        type=float,
        default=DEFAULT_LINK_TIMEOUT,
        metavar="SECONDS",
        help="declare the link dead after this long without acknowledgement "
        f"(default {DEFAULT_LINK_TIMEOUT:g})",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate-proxy",
        help="carry a QEMU live migration (all its channels) through the link",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles = p.add_subparsers(dest="migrate_role", required=True)

    src = roles.add_parser("source", help="on the source host: QEMU migrates to --listen-unix")
    src.add_argument(
        "--listen-unix",
        type=Path,
        default=None,
        metavar="PATH",
        help="mux mode (required): UNIX socket to create for QEMU's `migrate unix:PATH` "
        "(0600, exactly PATH)",
    )
    ctl = src.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control",
        type=cli.named_endpoint,
        metavar="HOST:PORT",
        help="the destination proxy's control port",
    )
    ctl.add_argument(
        "--control-cmd",
        metavar="CMD",
        help='run CMD as the control channel, e.g. "ssh dst /path/to/holepunch-mig '
        'migrate-proxy destination --control-stdio --connect-unix PATH"',
    )
    src.add_argument(
        "--peer-host",
        default=None,
        metavar="HOST",
        help="the destination's address, when --control-cmd cannot show it",
    )
    src.add_argument(
        "--control-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="keep trying the control port this long (default 10)",
    )
    src.add_argument(
        "--links",
        type=int,
        default=None,
        metavar="N",
        help="mux mode: punch N parallel links and carry QEMU connection k on link "
        "(k - 1) mod N (default: one per QEMU connection, 1 + --multifd-channels)",
    )
    src.add_argument(
        "--multifd-channels",
        type=int,
        default=None,
        metavar="K",
        help="mux mode: the multifd-channels the manager gives QEMU (0 = multifd off); "
        "sets the default --links (default: QEMU's default, 2)",
    )
    _options(src)
    cli.add_link_options(src)
    cli.add_auth_options(src, listening=False)
    src.set_defaults(run=run_source)

    dst = roles.add_parser(
        "destination", help="on the destination host: feed QEMU's -incoming socket"
    )
    dst.add_argument(
        "--connect-unix",
        type=Path,
        default=None,
        metavar="PATH",
        help="mux mode (required): the destination QEMU's `migrate-incoming unix:PATH` socket",
    )
    dctl = dst.add_mutually_exclusive_group(required=True)
    dctl.add_argument(
        "--control-listen",
        type=cli.listen_endpoint,
        metavar="HOST:PORT",
        help="accept the source proxy's control connection here",
    )
    dctl.add_argument(
        "--control-stdio",
        action="store_true",
        help="the control channel is stdin/stdout (under ssh, from the source's --control-cmd)",
    )
    dst.add_argument(
        "--libvirt",
        action="store_true",
        help="the source runs `holepunch-mig migrate` (libvirt): serve the migration "
        "stream, its multifd connections and the NBD storage copy in a fresh socket "
        "directory under --socket-dir, where libvirt's QEMU listens",
    )
    dst.add_argument(
        "--socket-dir",
        type=Path,
        default=DEFAULT_SOCKET_PARENT,
        metavar="DIR",
        help=f"--libvirt: where the per-migration directory is made (default "
        f"{DEFAULT_SOCKET_PARENT}; the same path as on the source)",
    )
    dst.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="--libvirt: QEMU's group when it does not run as root (qemu.conf group)",
    )
    _options(dst)
    cli.add_link_options(dst)
    cli.add_auth_options(dst, listening=True)
    dst.set_defaults(run=run_destination)


def _progress(args: argparse.Namespace, label: str) -> Any:
    if args.quiet:
        return None
    printer = cli.Progress(label, args.expected_size)

    def report(p: MigrationProgress) -> None:
        if p.streams:
            printer(p.bytes)

    report.finish = printer.finish  # type: ignore[attr-defined]
    report.printer = printer  # type: ignore[attr-defined]
    return report


def _preflight(args: argparse.Namespace) -> None:
    """Paths checked before anything connects (usage errors, exit 2)."""
    if args.report is not None:
        cli.check_output_path(args.report, "--report")
    if args.migrate_role == "source" and args.listen_unix is not None:
        parent = args.listen_unix.parent
        if not parent.is_dir():
            raise cli.UsageError(
                f"--listen-unix {args.listen_unix}: directory {parent} does not exist"
            )
        if args.listen_unix.exists():
            raise cli.UsageError(
                f"--listen-unix {args.listen_unix} already exists (remove it first)"
            )
    if args.qmp is not None and not args.qmp.exists():
        raise cli.UsageError(f"--qmp {args.qmp} does not exist (QEMU's monitor socket)")


def _check_mode(args: argparse.Namespace) -> str | None:
    """The usage error for this mode's arguments, or None."""
    if getattr(args, "libvirt", False):
        if args.mode != "mux" or args.connect_unix is not None or args.qmp is not None:
            return "--libvirt takes no --mode/--connect-unix/--qmp (libvirt's QEMU listens)"
        if args.digest:
            return "--libvirt streams are count-checked (--digest is for --mode mux)"
        return cli.auth_usage_problem(args, tcp=not args.control_stdio)
    local = "--listen-unix" if args.migrate_role == "source" else "--connect-unix"
    value = args.listen_unix if args.migrate_role == "source" else args.connect_unix
    if args.mode == "handoff":
        if args.qmp is None:
            return "--mode handoff needs --qmp PATH (this host's QEMU monitor socket)"
        if value is not None:
            return f"--mode handoff takes no {local} (QEMU gets the link itself)"
        if args.digest:
            return "--digest is for mux mode (in handoff mode QEMU's TLS checks every record)"
    else:
        if value is None:
            return f"--mode mux needs {local} PATH"
        if args.qmp is not None or args.psk_dir is not None:
            return "--qmp/--psk-dir are for --mode handoff"
    if args.migrate_role == "source":
        if args.mode == "handoff" and (args.links is not None or args.multifd_channels):
            return "--links/--multifd-channels are for mux mode (handoff is one link)"
        try:
            default_links(args.links, args.multifd_channels)
        except ValueError as exc:
            return str(exc)
    over_ssh = bool(getattr(args, "control_cmd", None) or getattr(args, "control_stdio", False))
    return cli.auth_usage_problem(args, tcp=not over_ssh)


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    handoff = (
        {"mode": "handoff", "qmp": args.qmp, "psk_dir": args.psk_dir}
        if args.mode == "handoff"
        else {}
    )
    return {
        **handoff,
        "expected_bytes": args.expected_size,
        "timeout": args.timeout,
        "ready_timeout": args.ready_timeout,
        "link_timeout": args.link_timeout,
        **cli.connect_options(args),
    }


def _finish(
    args: argparse.Namespace,
    proxy: MigrationProxy | HandoffProxy | None,
    exc: BaseException | None,
    progress: Any,
) -> int:
    if progress is not None:
        progress.finish()
    role: Role = "source" if args.migrate_role == "source" else "destination"
    report: MigrationReport | None = proxy.report if proxy is not None else None
    if isinstance(exc, MigrationError):
        report = exc.migration
    if report is None:
        report = MigrationReport(
            role=role, mode="libvirt" if getattr(args, "libvirt", False) else args.mode
        )
        link = getattr(exc, "report", None)
        if link is not None:
            report.link = link
    if exc is not None and report.ok is not False:
        report.ok = False
        report.verdict = report.verdict or cli.describe(exc)
    if args.report:
        try:
            write_file_atomically(args.report, report.to_json() + "\n")
        except OSError as err:
            cli.say(f"{cli.PROG}: cannot write the report {args.report}: {cli.describe(err)}")
    if not args.quiet or not report.ok:
        cli.say(report.summary())
    if report.ok:
        printer = getattr(progress, "printer", None)
        if printer is not None:
            what = "migrated" if role == "source" else "delivered"
            cli.say(f"{what} {cli.amount(printer.done, printer.seconds)}, every stream intact")
        return cli.EXIT_OK
    if isinstance(exc, NoDirectPath):
        return cli.EXIT_NO_PATH
    return cli.EXIT_FAILED


async def _source_main(args: argparse.Namespace) -> int:
    auth = cli.control_auth(args)  # a bad key file is a usage error (exit 2), not a failure
    progress = _progress(args, "migrated")
    proxy: MigrationProxy | HandoffProxy | None = None
    channel: ControlChannel | None = None
    try:
        channel = await cli.source_control(args, auth)
        kwargs = _common_kwargs(args)
        if args.mode == "mux":
            kwargs.update(
                listen_unix=args.listen_unix,
                digest=args.digest,
                links=args.links,
                multifd_channels=args.multifd_channels,
            )
        async with migration_source(channel, progress=progress, **kwargs) as proxy:
            if not args.quiet:
                cli.say(proxy.link.report.summary())
                if args.mode == "mux":
                    cli.say(f"migration path ready: tell QEMU `migrate {proxy.uri}`")
                else:
                    cli.say(f"QEMU is migrating over the handed-off link ({proxy.uri})")
            sys.stdout.write(f"ready {proxy.uri}\n")
            sys.stdout.flush()
            await proxy.wait(args.timeout)
    except (HolepunchError, OSError) as exc:
        if channel is not None:
            exc = await _tell_peer(channel, exc)
        return _finish(args, proxy, exc, progress)
    except BaseException as exc:
        if cli.interrupted(exc):
            if progress is not None:
                progress.finish()
            if channel is not None:
                await api.abort(channel, f"the {args.migrate_role} proxy was interrupted (Ctrl-C)")
            raise KeyboardInterrupt from None
        raise
    finally:
        if channel is not None:
            with trio.CancelScope(shield=True):
                await channel.aclose()
    return _finish(args, proxy, None, progress)


async def _destination_main(args: argparse.Namespace) -> int:
    auth = cli.control_auth(args)
    progress = _progress(args, "delivered")
    proxy: MigrationProxy | HandoffProxy | None = None
    channel: ControlChannel | None = None
    try:
        if args.control_stdio:
            channel = stdio_channel()
            channel = await cli.secure_existing(args, channel, auth, initiator=False)
        else:
            host, port = args.control_listen
            channel = await cli.listen_control(args, host, port, auth)
        kwargs = _common_kwargs(args)
        if args.libvirt:
            return await _libvirt_destination(args, channel, kwargs)
        if args.mode == "mux":
            kwargs.update(connect_unix=args.connect_unix)
        async with migration_destination(channel, progress=progress, **kwargs) as proxy:
            if not args.quiet:
                cli.say(proxy.link.report.summary())
                if args.mode == "mux":
                    cli.say(f"delivering the migration to {args.connect_unix}")
                else:
                    cli.say(f"QEMU receives the migration on the handed-off link ({proxy.uri})")
            await proxy.wait(args.timeout)
    except (HolepunchError, OSError) as exc:
        if channel is not None:
            exc = await _tell_peer(channel, exc)
        return _finish(args, proxy, exc, progress)
    except BaseException as exc:
        if cli.interrupted(exc):
            if progress is not None:
                progress.finish()
            if channel is not None:
                await api.abort(channel, f"the {args.migrate_role} proxy was interrupted (Ctrl-C)")
            raise KeyboardInterrupt from None
        raise
    finally:
        if channel is not None:
            with trio.CancelScope(shield=True):
                await channel.aclose()
    return _finish(args, proxy, None, progress)


async def _libvirt_destination(
    args: argparse.Namespace, channel: ControlChannel, kwargs: dict[str, Any]
) -> int:
    kwargs.pop("expected_bytes", None)
    proxy = None
    try:
        async with libvirt_destination(
            channel, socket_parent=args.socket_dir, socket_group=args.socket_group, **kwargs
        ) as proxy:
            if not args.quiet:
                cli.say(proxy.link.report.summary())
                cli.say(f"serving libvirt's sockets in {proxy.socket_dir}")
            await proxy.wait(args.timeout)
    except (HolepunchError, OSError) as exc:
        return _finish(args, proxy, exc, None)
    return _finish(args, proxy, None, None)


async def _tell_peer(
    channel: ControlChannel, exc: HolepunchError | OSError
) -> HolepunchError | OSError:
    """Tell the other proxy why this one stops (unless it told us); a closed ssh control
    channel becomes the command's exit status."""
    if isinstance(exc, PeerAbort):
        return exc
    if isinstance(exc, ChannelClosed) and isinstance(channel, ProcessChannel):
        status = await channel.exit_status()
        if status is not None and status != 0:
            return ChannelClosed(
                f"control command exited with status {status}"
                + (
                    " (command not found: give the remote holepunch-mig's full path)"
                    if status == 127
                    else ""
                )
            )
        return exc
    await api.abort(channel, cli.describe(exc))
    return exc


def _run(main: Any, args: argparse.Namespace) -> int:
    problem = _check_mode(args)
    if problem is not None:
        cli.say(f"holepunch-mig migrate-proxy {args.migrate_role}: {problem}")
        return cli.EXIT_USAGE
    _preflight(args)
    try:
        code: int = trio.run(main, args)
        return code
    except CredentialError as exc:
        cli.say(f"holepunch-mig migrate-proxy {args.migrate_role}: {exc}")
        return cli.EXIT_USAGE
    except BaseException as exc:
        if cli.interrupted(exc):
            cli.say("holepunch-mig: interrupted")
            return cli.EXIT_INTERRUPTED
        raise


def run_source(args: argparse.Namespace) -> int:
    return _run(_source_main, args)


def run_destination(args: argparse.Namespace) -> int:
    return _run(_destination_main, args)
