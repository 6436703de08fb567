"""Carry a QEMU live migration through the punched, encrypted link: the entry points.

A migration manager that drives QEMU over QMP uses one of these per side::

    # source host
    async with migration_source(channel, listen_unix=None, progress=cb) as proxy:
        await qmp.execute("migrate", {"uri": proxy.uri})      # "unix:/…/migrate.sock"
        ...poll query-migrate until "completed"...
    print(proxy.report.verdict)                                # MigrationReport

    # destination host (QEMU started with -incoming defer, migrate-incoming unix:P)
    async with migration_destination(channel, connect_unix=P) as proxy:
        await proxy.wait()

The session (:func:`holepunch_mig.connect`) punches and authenticates the link; the
default mux mode (:mod:`~holepunch_mig.migration.mux_mode`) then carries every
connection QEMU opens as one stream of the link, and both sides exchange
``migrate-result`` at the end, so a failure is reported on both sides even when the
link itself is what broke.

Failure semantics: any mismatch, truncation, peer ABORT, link failure (dead link
detected by ``TCP_USER_TIMEOUT`` + keepalive within ``link_timeout`` seconds) or a
failure reported by the peer shuts down every local QEMU socket at once.  The source
QEMU sees its migration fail and keeps running; the destination QEMU sees its stream
end before QEMU's own end-of-migration marker, so it never resumes on partial state.
``wait()`` then raises :class:`MigrationError` and ``report.verdict`` says why.

Exiting the ``async with`` block normally waits for the migration's connections to
end (source: all streams closed; destination: the peer's CLOSE); raising inside it
aborts the migration on both sides.  The synchronous twins
(:func:`migration_source_blocking`, :func:`migration_destination_blocking`) run the same
code in a background trio thread for threaded managers.

``mode="handoff"`` (with ``qmp=``) instead hands the punched socket to QEMU, which
encrypts with its own TLS-PSK keyed from the session: see :mod:`holepunch_mig.migration.handoff`.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.errors import ManagerAbort
from holepunch_mig.migration import handoff
from holepunch_mig.migration.common import (
    MigrationError,
    MigrationProgress,
    MigrationReport,
    Mode,
    ProgressCallback,
    StreamReport,
)
from holepunch_mig.migration.mux_mode import MigrationProxy
from holepunch_mig.migration.qmp import QmpClient
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.roles import Role
from holepunch_mig.session import api
from holepunch_mig.wire.messages import MAX_LINKS

__all__ = [
    "DEFAULT_LINK_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "BlockingMigrationProxy",
    "MigrationError",
    "MigrationProgress",
    "MigrationProxy",
    "MigrationReport",
    "Mode",
    "ProgressCallback",
    "Role",
    "StreamReport",
    "default_links",
    "migration_destination",
    "migration_destination_blocking",
    "migration_source",
    "migration_source_blocking",
]

DEFAULT_TIMEOUT = 3600.0
"""How long a migration's connections may stay open before the proxy gives up."""
DEFAULT_LINK_TIMEOUT = 15.0
"""A link with data unacknowledged (or keepalives unanswered) this long is dead."""
QEMU_DEFAULT_MULTIFD_CHANNELS = 2
"""QEMU's own default of ``multifd-channels``."""


def default_links(links: int | None, multifd_channels: int | None) -> int:
    """One link per QEMU connection: ``links`` when given, else the main channel plus
    ``multifd_channels`` (QEMU's default 2 when the caller does not say; a migration
    without multifd then leaves two links idle, which costs two punch rounds only)."""
    if links is not None:
        if not 1 <= links <= MAX_LINKS:
            raise ValueError(f"links must be 1-{MAX_LINKS}, not {links}")
        return links
    channels = QEMU_DEFAULT_MULTIFD_CHANNELS if multifd_channels is None else multifd_channels
    if channels < 0:
        raise ValueError(f"multifd_channels must be >= 0, not {channels}")
    return min(MAX_LINKS, 1 + channels)


@asynccontextmanager
async def migration_source(
    channel: ControlChannel,
    *,
    listen_unix: str | Path | None = None,
    digest: bool = False,
    progress: ProgressCallback | None = None,
    expected_bytes: int | None = None,
    ready_timeout: float = 60.0,
    timeout: float = DEFAULT_TIMEOUT,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    mode: Mode = "mux",
    qmp: str | Path | QmpClient | None = None,
    psk_dir: str | Path | None = None,
    links: int | None = None,
    multifd_channels: int | None = None,
    **options: Any,
) -> AsyncIterator[Any]:
    """Punch the link (role source), wait for the destination proxy, and yield a proxy
    whose ``path``/``uri`` the manager gives to the source QEMU's ``migrate``.

    ``mode="handoff"`` (``qmp=`` required: a QMP socket path of the source QEMU that no
    one else is connected to, or a connected QmpClient) hands the punched socket to
    QEMU instead: the proxy itself issues ``getfd`` + ``migrate fd:NAME`` with a TLS-PSK
    credential derived from the session, and the block is entered with the migration
    already running (``proxy.uri`` is ``fd:NAME``); ``wait()`` polls QEMU until it is
    over.  One channel only: a QEMU with multifd on raises HandoffRefused before the
    link is punched.  ``psk_dir``: parent of the private key directory (default
    /dev/shm).  See :mod:`holepunch_mig.migration.handoff`.

    ``listen_unix=None`` puts the socket in a private 0700 directory; a path is used
    exactly (see :class:`~holepunch_mig.migration.proxy.SourceProxy`).  ``digest=True``
    adds SHA-256 of every stream to its END record (default: count-only, see
    docs/migration.md).  ``progress`` is called about 4 times a second from the trio
    thread; ``expected_bytes`` (about the guest RAM size) enables its ETA.  Mux mode
    punches ``links`` parallel links (docs/protocol.md section 9; default
    :func:`default_links`: one per QEMU connection, from ``multifd_channels``, the value
    the manager gives QEMU) and carries QEMU connection k on link (k - 1) mod links; over
    the tunnel there is one.  Other options are :class:`~holepunch_mig.ConnectOptions`
    fields.  After the block ``proxy.report``
    holds the MigrationReport; a failure raises MigrationError.
    """
    if mode == "handoff":
        if qmp is None:
            raise ValueError("mode='handoff' needs qmp= (the source QEMU's QMP socket)")
        async with handoff.open_qmp(qmp) as client:
            await handoff.refuse_multifd(client)
            async with api.connect(channel, role="source", **options) as link:
                hproxy = handoff.HandoffProxy(
                    "source",
                    link,
                    client,
                    progress=progress,
                    expected_bytes=expected_bytes,
                    ready_timeout=ready_timeout,
                    timeout=timeout,
                    link_timeout=link_timeout,
                    psk_parent=Path(psk_dir) if psk_dir is not None else None,
                )
                async with hproxy._lifecycle():
                    yield hproxy
        return
    if mode != "mux":
        raise ValueError(f"mode must be 'mux' or 'handoff', not {mode!r}")
    wanted = default_links(links, multifd_channels)
    async with api.connect(channel, role="source", **options) as link:
        proxy = MigrationProxy(
            "source",
            link,
            digest=digest,
            listen_unix=Path(listen_unix) if listen_unix is not None else None,
            connect_unix=None,
            progress=progress,
            expected_bytes=expected_bytes,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
            links=wanted,
        )
        async with proxy._lifecycle():
            yield proxy


@asynccontextmanager
async def migration_destination(
    channel: ControlChannel,
    *,
    connect_unix: str | Path | None = None,
    progress: ProgressCallback | None = None,
    expected_bytes: int | None = None,
    ready_timeout: float = 60.0,
    timeout: float = DEFAULT_TIMEOUT,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    mode: Mode = "mux",
    qmp: str | Path | QmpClient | None = None,
    psk_dir: str | Path | None = None,
    **options: Any,
) -> AsyncIterator[Any]:
    """Punch the link (role destination); once ``connect_unix`` (the destination QEMU's
    ``migrate-incoming unix:PATH``) exists, tell the source it may go.  Each stream the
    source opens becomes one connection to ``connect_unix``, in order.  Use
    ``await proxy.wait()`` in the block (leaving it does the same).

    ``mode="handoff"``: no ``connect_unix``; ``qmp=`` names the destination QEMU's QMP
    socket (QEMU started with ``-incoming defer``, no ``migrate-incoming`` issued): the
    proxy gives it the punched socket (``getfd``), the TLS-PSK credential and
    ``migrate-incoming fd:NAME``, and ``wait()`` returns once QEMU completed the load
    (``report.qemu_status`` is then the VM's run state).  The number of parallel links
    is the source's (``migrate-offer.links``)."""
    if mode == "handoff":
        if qmp is None:
            raise ValueError("mode='handoff' needs qmp= (the destination QEMU's QMP socket)")
        async with handoff.open_qmp(qmp) as client:
            await handoff.refuse_multifd(client)
            await handoff.check_destination_qemu(client)
            async with api.connect(channel, role="destination", **options) as link:
                hproxy = handoff.HandoffProxy(
                    "destination",
                    link,
                    client,
                    progress=progress,
                    expected_bytes=expected_bytes,
                    ready_timeout=ready_timeout,
                    timeout=timeout,
                    link_timeout=link_timeout,
                    psk_parent=Path(psk_dir) if psk_dir is not None else None,
                )
                async with hproxy._lifecycle():
                    yield hproxy
        return
    if mode != "mux":
        raise ValueError(f"mode must be 'mux' or 'handoff', not {mode!r}")
    if connect_unix is None:
        raise ValueError("mux mode needs connect_unix= (the destination QEMU's socket)")
    async with api.connect(channel, role="destination", **options) as link:
        proxy = MigrationProxy(
            "destination",
            link,
            digest=False,
            listen_unix=None,
            connect_unix=Path(connect_unix),
            progress=progress,
            expected_bytes=expected_bytes,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
        )
        async with proxy._lifecycle():
            yield proxy


# -- synchronous twins -------------------------------------------------------------------


class BlockingMigrationProxy:
    """The threaded manager's handle: ``path``/``uri`` (source), ``wait()``, ``abort()``,
    ``report``.  A context manager: leaving it normally waits for the end, leaving it
    with an exception aborts the migration on both sides."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        proxy: MigrationProxy,
        commands: trio.MemorySendChannel[tuple[str, Any]],
        outcome: queue.Queue[tuple[str, Any]],
        thread: threading.Thread,
    ) -> None:
        self._token = token
        self._proxy = proxy
        self._commands = commands
        self._outcome = outcome
        self._thread = thread
        self._final: tuple[str, Any] | None = None
        self.role: Role = proxy.role

    @property
    def path(self) -> Path:
        return self._proxy.path

    @property
    def uri(self) -> str:
        return self._proxy.uri

    @property
    def report(self) -> MigrationReport:
        return self._proxy.report

    def _command(self, cmd: str, arg: Any) -> tuple[str, Any]:
        if self._final is None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, RuntimeError):
                trio.from_thread.run_sync(
                    self._commands.send_nowait, (cmd, arg), trio_token=self._token
                )
            self._final = self._outcome.get()
            self._thread.join(30)
        return self._final

    def wait(self, timeout: float | None = None) -> MigrationReport:
        """Block until the migration ended; raise MigrationError if it failed."""
        kind, value = self._command("finish", timeout)
        if kind == "error":
            raise value
        report: MigrationReport = value
        return report

    def abort(self, reason: str) -> MigrationReport:
        """Fail the migration on both sides; returns the (failed) report."""
        self._command("abort", reason)
        return self._proxy.report

    def __enter__(self) -> BlockingMigrationProxy:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            self.abort(f"{self.role} manager failed: {exc!r}")
        else:
            self.wait()


def _blocking(
    control: socket.socket,
    factory: Callable[..., Any],
    kwargs: dict[str, Any],
) -> BlockingMigrationProxy:
    ready: queue.Queue[tuple[str, Any]] = queue.Queue()
    outcome: queue.Queue[tuple[str, Any]] = queue.Queue()

    async def main() -> None:
        send, receive = trio.open_memory_channel[tuple[str, Any]](4)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(control))
        channel = StreamChannel(stream)
        entered = False
        try:
            async with factory(channel, **kwargs) as proxy:
                entered = True
                ready.put(("ok", (trio.lowlevel.current_trio_token(), proxy, send)))
                cmd, arg = await receive.receive()
                if cmd == "abort":
                    raise ManagerAbort(f"manager aborted: {arg}")
                await proxy.wait(arg)
            outcome.put(("ok", proxy.report))
        except BaseException as exc:
            (outcome if entered else ready).put(("error", exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    def run() -> None:
        with contextlib.suppress(BaseException):
            trio.run(main)

    thread = threading.Thread(target=run, name="holepunch-mig-migration", daemon=True)
    thread.start()
    kind, value = ready.get()
    if kind == "error":
        thread.join()
        raise value
    token, proxy, send = value
    return BlockingMigrationProxy(token, proxy, send, outcome, thread)


def migration_source_blocking(control: socket.socket, **kwargs: Any) -> BlockingMigrationProxy:
    """Threads: like :func:`migration_source`, from a connected control socket (owned by
    the proxy from here on).  Returns once the path is ready: give ``proxy.uri`` to
    QEMU, then ``proxy.wait()``.  Progress callbacks run in the proxy's thread."""
    return _blocking(control, migration_source, kwargs)


def migration_destination_blocking(control: socket.socket, **kwargs: Any) -> BlockingMigrationProxy:
    """Threads: like :func:`migration_destination` (``connect_unix=`` required)."""
    return _blocking(control, migration_destination, kwargs)
