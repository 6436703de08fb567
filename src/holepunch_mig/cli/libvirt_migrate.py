"""``holepunch-mig migrate DOMAIN DEST_URI``: a libvirt live migration through the link.

On the source host::

    holepunch-mig migrate vm1 qemu+tcp://dst-host/system --control dst-host:7070 \\
        [--parallel 4] [--copy-storage-all] [--postcopy] [--report r.json]
    holepunch-mig migrate vm1 qemu+ssh://dst-host/system \\
        --control-cmd "ssh dst-host holepunch-mig migrate-proxy destination --libvirt \\
                       --control-stdio"

with ``holepunch-mig migrate-proxy destination --libvirt`` on the destination host.
The command punches the link, asks libvirt (``--connect``, default qemu:///system) to
migrate DOMAIN to DEST_URI with the migration stream, every multifd connection and the
NBD storage copy on UNIX sockets the two proxies join, shows libvirt's job progress on
stderr and exits 0 once libvirt completed and every stream was carried intact; 1 on
any failure (libvirt's error and the link's verdict on stderr and in the report); 3 if
no direct path could be punched; 130 after Ctrl-C, which aborts the libvirt job (the
domain keeps running on the source, the destination keeps no domain).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.cli import common as cli
from holepunch_mig.errors import HolepunchError, LibvirtMissing, NoDirectPath
from holepunch_mig.migration.libvirt import (
    DEFAULT_LINK_TIMEOUT,
    DEFAULT_SOCKET_PARENT,
    DEFAULT_TIMEOUT,
    LibvirtProgress,
    LibvirtReport,
    migrate_domain,
)
from holepunch_mig.net.control import ControlChannel

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a libvirt domain through the link (source host)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("domain", metavar="DOMAIN", help="the domain's name or UUID")
    p.add_argument(
        "dest_uri",
        metavar="DEST_URI",
        help="the destination's libvirt URI, e.g. qemu+tcp://host/system, qemu+ssh://host/system",
    )
    p.add_argument(
        "--connect",
        default="qemu:///system",
        metavar="SRC_URI",
        help="this host's libvirt (default qemu:///system)",
    )
    ctl = p.add_mutually_exclusive_group(required=True)
    ctl.add_argument(
        "--control",
        type=cli.named_endpoint,
        metavar="HOST:PORT",
        help="the destination proxy's control port",
    )
    ctl.add_argument(
        "--control-cmd",
        metavar="CMD",
        help='run CMD as the control channel, e.g. "ssh host holepunch-mig migrate-proxy '
        'destination --libvirt --control-stdio"',
    )
    p.add_argument(
        "--control-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="keep trying the control port this long (default 10)",
    )
    p.add_argument(
        "--peer-host",
        default=None,
        metavar="HOST",
        help="the destination's address, when --control-cmd cannot show it",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="N",
        help="N multifd connections, each a stream of the link (default: one stream)",
    )
    storage = p.add_mutually_exclusive_group()
    storage.add_argument(
        "--copy-storage-all",
        action="store_const",
        const="all",
        dest="copy_storage",
        help="copy non-shared disks (NBD through the link); the destination images must exist",
    )
    storage.add_argument(
        "--copy-storage-inc",
        action="store_const",
        const="inc",
        dest="copy_storage",
        help="copy non-shared disks incrementally (shared backing images)",
    )
    p.add_argument("--bandwidth", type=int, default=None, metavar="MiB/s", help="libvirt's cap")
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy after the first pass over memory (the guest then runs on "
        "the destination and fetches the rest; a lost link after the switch leaves it paused)",
    )
    p.add_argument(
        "--postcopy-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --postcopy: switch this many seconds into the migration instead",
    )
    p.add_argument(
        "--p2p",
        action="store_true",
        help="peer to peer: this host's libvirtd connects to DEST_URI itself "
        "(default: this command connects to both daemons)",
    )
    p.add_argument("--persistent", action="store_true", help="define the domain on the destination")
    p.add_argument(
        "--undefinesource", action="store_true", help="undefine the domain on this host after"
    )
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="libvirt's --unsafe: migrate even where libvirt thinks it unsafe (a disk it "
        "cannot see is shared, not copied)",
    )
    p.add_argument(
        "--socket-dir",
        type=Path,
        default=DEFAULT_SOCKET_PARENT,
        metavar="DIR",
        help=f"where the per-migration socket directory is made (default {DEFAULT_SOCKET_PARENT}; "
        "the same path on both hosts)",
    )
    p.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="QEMU's group when it does not run as root (qemu.conf group)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on the link after this long (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--link-timeout",
        type=float,
        default=DEFAULT_LINK_TIMEOUT,
        metavar="SECONDS",
        help="declare the link dead after this long unacknowledged "
        f"(default {DEFAULT_LINK_TIMEOUT:g})",
    )
    cli.add_link_options(p)
    cli.add_auth_options(p, listening=False)
    p.set_defaults(run=run, usage_problem=_usage_problem)


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.parallel < 0 or args.parallel > 64:
        return "--parallel takes 0 (off) to 64 connections"
    if args.bandwidth is not None and args.bandwidth <= 0:
        return "--bandwidth must be a positive number of MiB/s"
    if args.postcopy and args.parallel:
        return (
            "--postcopy cannot be combined with --parallel: QEMU supports post-copy with "
            "multifd only from 10.0; drop --parallel to migrate with post-copy"
        )
    if args.postcopy_after is not None and (not args.postcopy or args.postcopy_after < 0):
        return "--postcopy-after SECONDS (>= 0) needs --postcopy"
    return cli.auth_usage_problem(args, tcp=not args.control_cmd)


class _ProgressLine:
    """libvirt's job info as a line on stderr (redrawn on a TTY, a second apart else)."""

    def __init__(self) -> None:
        self.inner = cli.Progress("migrating", None)
        self.inner.last = 0.0  # the first sample right away: small domains move in ~1 s

    def __call__(self, p: LibvirtProgress) -> None:
        text = (
            f"migrating: {p.processed / 2**20:,.0f} MiB done, {p.remaining / 2**20:,.0f} MiB "
            f"left, {p.rate / 1e6:,.1f} MB/s, dirty {p.dirty_rate / 1e6:,.1f} MB/s"
        )
        if p.eta is not None:
            text += f", ETA {p.eta:.0f} s"
        self.inner.line(text)

    def finish(self) -> None:
        self.inner.finish()


async def _main(args: argparse.Namespace) -> int:
    try:
        import libvirt
    except ModuleNotFoundError:
        cli.say(f"holepunch-mig migrate: {LibvirtMissing.__doc__} ({cli.LIBVIRT_HINT})")
        return cli.EXIT_FAILED
    # libvirt prints every error on stderr by default; ours say what matters
    libvirt.registerErrorHandler(_libvirt_log, None)
    auth = cli.control_auth(args)  # a bad key file is a usage error (exit 2), not a failure
    progress = None if args.quiet else _ProgressLine()
    channel: ControlChannel | None = None
    report: LibvirtReport | None = None
    interrupted = False
    try:
        src = await trio.to_thread.run_sync(libvirt.open, args.connect)
        domain = await trio.to_thread.run_sync(_lookup, src, args.domain)
        dest: Any = args.dest_uri
        if not args.p2p:
            dest = await trio.to_thread.run_sync(libvirt.open, args.dest_uri)
        channel = await cli.source_control(args, auth)
        link_options: dict[str, Any] = cli.connect_options(args)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        interrupted = True
                        cli.say("holepunch-mig migrate: interrupted, aborting the libvirt job")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                report = await migrate_domain(
                    domain,
                    dest,
                    channel,
                    parallel=args.parallel,
                    copy_storage=args.copy_storage,
                    bandwidth=args.bandwidth,
                    postcopy=args.postcopy,
                    postcopy_after=args.postcopy_after,
                    persistent=args.persistent,
                    undefine_source=args.undefinesource,
                    unsafe=args.unsafe,
                    progress=progress,
                    socket_parent=args.socket_dir,
                    socket_group=args.socket_group,
                    timeout=args.timeout,
                    link_timeout=args.link_timeout,
                    **link_options,
                )
                nursery.cancel_scope.cancel()
    except libvirt.libvirtError as exc:
        cli.say(f"holepunch-mig migrate: libvirt: {exc}")
        return cli.EXIT_FAILED
    except NoDirectPath as exc:
        cli.say(f"holepunch-mig migrate: {exc}")
        return cli.EXIT_NO_PATH
    except (HolepunchError, OSError) as exc:
        cli.say(f"holepunch-mig migrate: {exc}")
        return cli.EXIT_FAILED
    finally:
        if progress is not None:
            progress.finish()
        if channel is not None:
            with trio.CancelScope(shield=True):
                await channel.aclose()
    if interrupted or report is None:
        cli.say("holepunch-mig migrate: the libvirt job was aborted; the domain stays here")
        return cli.EXIT_INTERRUPTED
    if args.report:
        Path(args.report).write_text(report.to_json() + "\n")
    if not args.quiet or not report.ok:
        cli.say(report.summary())
    return cli.EXIT_OK if report.ok else cli.EXIT_FAILED


def _libvirt_log(_ctx: object, error: Any) -> None:
    log.debug("libvirt: %s", error)


def _lookup(conn: Any, name: str) -> Any:
    import libvirt

    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return conn.lookupByUUIDString(name)


def run(args: argparse.Namespace) -> int:
    try:
        code: int = trio.run(_main, args)
        return code
    except KeyboardInterrupt:
        cli.say("holepunch-mig migrate: interrupted")
        return cli.EXIT_INTERRUPTED
    finally:
        sys.stderr.flush()
