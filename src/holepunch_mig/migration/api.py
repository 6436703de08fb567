"""Carry a QEMU live migration through the punched, encrypted link (issue 5).

A migration manager that drives QEMU over QMP uses one of these per side::

    # source host
    async with migration_source(channel, listen_unix=None, progress=cb) as proxy:
        await qmp.execute("migrate", {"uri": proxy.uri})      # "unix:/…/migrate.sock"
        ...poll query-migrate until "completed"...
    print(proxy.report.verdict)                                # MigrationReport

    # destination host (QEMU started with -incoming defer, migrate-incoming unix:P)
    async with migration_destination(channel, connect_unix=P) as proxy:
        await proxy.wait()

The session (:func:`holepunch_mig.connect`) punches and authenticates the link; then
the source sends ``migrate-offer`` (how ends of streams are checked), the destination
starts its mux once its QEMU's incoming socket exists and answers ``migrate-ready``,
and only then does the source listen on its private UNIX socket.  Every connection
QEMU opens there (main channel, each multifd channel; the return path rides the main
channel backwards) becomes one :mod:`~holepunch_mig.migration.mux` stream, delivered to the
destination QEMU in the same order.  At the end both sides exchange ``migrate-result``
(per-side counts and error) over the control channel, so a failure is reported on both
sides even when the link itself is what broke.

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
import json
import logging
import math
import queue
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HolepunchError,
    PeerAbort,
    ProtocolError,
)
from holepunch_mig.migration import handoff
from holepunch_mig.migration.mux import Mux, MuxError
from holepunch_mig.migration.proxy import SourceProxy, unix_connector
from holepunch_mig.migration.qmp import QmpClient
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.report import Report
from holepunch_mig.roles import Role
from holepunch_mig.session import api
from holepunch_mig.session.link import Link
from holepunch_mig.session.negotiate import ControlReader
from holepunch_mig.session.resume import tune_link
from holepunch_mig.wire import messages

log = logging.getLogger(__name__)

Mode = Literal["mux", "handoff"]

DEFAULT_TIMEOUT = 3600.0
"""How long a migration's connections may stay open before the proxy gives up."""
DEFAULT_LINK_TIMEOUT = 15.0
"""A link with data unacknowledged (or keepalives unanswered) this long is dead."""
FINISH_TIMEOUT = 60.0
RESULT_TIMEOUT = 10.0
PROGRESS_INTERVAL = 0.25


class MigrationError(HolepunchError):
    """The migration's transport failed; ``migration`` is the MigrationReport."""

    def __init__(self, message: str, migration: MigrationReport) -> None:
        super().__init__(message)
        self.migration = migration
        self.report = migration.link


class ManagerAbort(HolepunchError):
    """Raised inside the proxy when the manager called ``abort()``."""


@dataclass(frozen=True)
class MigrationProgress:
    """One progress sample.  ``bytes`` counts the migration direction (source: read from
    QEMU and sent; destination: delivered to QEMU); ``back_bytes`` the other way."""

    role: Role
    streams: int
    bytes: int
    back_bytes: int
    seconds: float
    rate: float  # bytes per second since the first stream opened
    total: int | None = None
    eta: float | None = None


ProgressCallback = Callable[[MigrationProgress], None]


@dataclass
class StreamReport:
    """One QEMU connection as this side carried it.  ``sent``: local QEMU -> link;
    ``received``: link -> local QEMU.  Digests are SHA-256 hex, or None (count-only)."""

    stream: int
    sent: int
    received: int
    sent_sha256: str | None = None
    received_sha256: str | None = None


@dataclass
class MigrationReport:
    """What one proxy saw: the streams, the verdict and the session's link report."""

    role: Role
    ok: bool | None = None
    verdict: str | None = None
    socket: str | None = None
    """Mux: the QEMU-side UNIX socket.  Handoff: the ``fd:NAME`` URI QEMU was given."""
    digest: Literal["sha256", "count-only", "tls"] = "count-only"
    """How stream ends were checked; "tls": handoff mode, QEMU's TLS authenticates."""
    mode: Mode = "mux"
    streams: list[StreamReport] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    migration_seconds: float | None = None
    """From the first connection QEMU opened to the last one closing."""
    peer_ok: bool | None = None
    peer_error: str | None = None
    qemu_status: str | None = None
    """Handoff mode: source ``query-migrate`` status; destination VM run state."""
    qemu_error: str | None = None
    """Handoff mode: QEMU's ``error-desc`` (or the proxy's reason) after a failure."""
    notes: list[str] = field(default_factory=list)
    link: Report | None = None

    @property
    def path(self) -> str:
        return self.link.path if self.link is not None else "none"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("link")
        data["path"] = self.path
        data["link"] = self.link.to_dict() if self.link is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [
            f"migration ({self.role}, {self.mode} mode): {'OK' if self.ok else 'FAILED'}, "
            f"path {self.path}"
        ]
        if self.link is not None and self.link.local and self.link.remote:
            lines.append(f"  link {self.link.local} <-> {self.link.remote}")
        for s in self.streams:
            lines.append(
                f"  stream {s.stream}: sent {s.sent} received {s.received}"
                + (
                    f" sha256 {s.sent_sha256[:16]}…/{(s.received_sha256 or '')[:16]}…"
                    if s.sent_sha256
                    else ""
                )
            )
        if self.migration_seconds is not None:
            moved = max(self.bytes_sent, self.bytes_received)
            rate = moved / self.migration_seconds / 1e6 if self.migration_seconds > 0 else 0
            check = "QEMU's TLS records" if self.digest == "tls" else f"END check {self.digest}"
            lines.append(
                f"  {moved} bytes in {self.migration_seconds:.3f} s ({rate:.0f} MB/s), {check}"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.verdict:
            lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


class MigrationProxy:
    """One side of a migration carried over the link.  Made by :func:`migration_source`
    / :func:`migration_destination`; not constructed directly."""

    def __init__(
        self,
        role: Role,
        link: Link,
        *,
        digest: bool,
        listen_unix: Path | None,
        connect_unix: Path | None,
        progress: ProgressCallback | None,
        expected_bytes: int | None,
        ready_timeout: float,
        timeout: float,
        link_timeout: float,
    ) -> None:
        self.role: Role = role
        self.link = link
        self._digest = digest
        self._listen_unix = listen_unix
        self._connect_unix = connect_unix
        self._progress = progress
        self._expected = expected_bytes
        self._ready_timeout = ready_timeout
        self._timeout = timeout
        self._link_timeout = link_timeout
        self._mux: Mux | None = None
        self._listener: SourceProxy | None = None
        self._peer_result: messages.MigrateResult | None = None
        self._peer_seen = trio.Event()
        self._done = trio.Event()
        self.report = MigrationReport(role=role, link=link.report)

    # -- public ------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """Source: the UNIX socket to give QEMU (``migrate unix:PATH``)."""
        if self._listener is None:
            raise HolepunchError("only the source proxy has a socket for QEMU")
        return self._listener.path

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def abort(self, reason: str) -> None:
        """Fail the migration now: QEMU's sockets are shut down on both sides (the source
        VM keeps running) and the peer is told why."""
        mux = self._mux
        if mux is not None and mux.failed is None:
            # Mux.abort may wait up to 2 s for the link's writer lock (a pump stuck on a
            # dead link holds it): never block the trio thread on that.
            threading.Thread(
                target=mux.abort, args=(reason,), name="migration-abort", daemon=True
            ).start()

    async def wait(self, timeout: float | None = None) -> MigrationReport:
        """Wait until the migration's connections ended and both sides gave a verdict.
        Returns the report; raises MigrationError (report attached) on any failure."""
        if not self._done.is_set():
            ok, error = await self._run_to_end(self._timeout if timeout is None else timeout)
            await self._conclude(ok, error)
        if not self.report.ok:
            raise MigrationError(self.report.verdict or "migration failed", self.report)
        return self.report

    # -- setup -------------------------------------------------------------------------

    async def _setup(self) -> None:
        control = self.link.control
        tune_link(self.link.sock, self._link_timeout)
        self.report.digest = "sha256" if self._digest else "count-only"
        if self.role == "source":
            await control.send(messages.MigrateOffer(digest=self._digest))
            msg, _ = await control.receive(
                messages.MigrateReady,
                messages.MigrateResult,
                timeout=self._ready_timeout,
                step="waiting for the destination proxy to be ready",
            )
            if isinstance(msg, messages.MigrateResult):
                raise ProtocolError(f"destination proxy refused: {msg.error}")
            if (msg.mode or "mux") != "mux":
                raise ProtocolError("migrate-ready is not for mux mode")
            if msg.digest != self._digest:
                raise ProtocolError("migrate-ready does not echo the offered digest mode")
            mux = Mux(
                self.link.sock,
                self.link.writer,
                self.link.reader,
                digest=self._digest,
                name="src-mux",
            )
            self._mux = mux
            mux.start()
            self._listener = SourceProxy(mux, path=self._listen_unix)
            await trio.to_thread.run_sync(self._listener.start)
            self.report.socket = str(self._listener.path)
        else:
            offer = await receive_offer(control, "mux", self._ready_timeout, ProtocolError)
            self._digest = bool(offer.digest)
            self.report.digest = "sha256" if self._digest else "count-only"
            assert self._connect_unix is not None
            await _wait_socket(self._connect_unix, self._ready_timeout)
            self.report.socket = str(self._connect_unix)
            mux = Mux(
                self.link.sock,
                self.link.writer,
                self.link.reader,
                connect=unix_connector(self._connect_unix),
                digest=self._digest,
                name="dst-mux",
            )
            self._mux = mux
            mux.start()
            await control.send(messages.MigrateReady(digest=self._digest))

    # -- background tasks ----------------------------------------------------------------

    async def _watch_peer(self) -> None:
        """The peer's migrate-result may come early (it failed): then fail here too."""
        try:
            msg, _ = await self.link.control.receive(
                messages.MigrateResult, timeout=math.inf, step="waiting for the peer's result"
            )
            self._peer_result = msg
            if not msg.ok and not self._done.is_set():
                self.abort(f"peer reported failure: {msg.error}")
        except (PeerAbort, ChannelClosed, ControlTimeout, ProtocolError) as exc:
            self.report.notes.append(f"control channel: {exc}")
            if isinstance(exc, PeerAbort):
                self.abort(str(exc))
        finally:
            self._peer_seen.set()

    async def _progress_loop(self) -> None:
        if self._progress is None or self._mux is None:
            return
        while not self._done.is_set():
            self._emit_progress()
            with trio.move_on_after(PROGRESS_INTERVAL):
                await self._done.wait()
        self._emit_progress()

    def _emit_progress(self) -> None:
        mux = self._mux
        if mux is None or self._progress is None:
            return
        streams, sent, received = mux.progress()
        main, back = (sent, received) if self.role == "source" else (received, sent)
        start = mux.first_open
        seconds = time.perf_counter() - start if start is not None else 0.0
        end = mux.last_close
        if start is not None and end is not None and self._done.is_set():
            seconds = end - start
        rate = main / seconds if seconds > 0 else 0.0
        eta = None
        if self._expected and rate > 0:
            eta = max(0.0, (self._expected - main) / rate)
        try:
            self._progress(
                MigrationProgress(
                    self.role, streams, main, back, seconds, rate, self._expected, eta
                )
            )
        except Exception:
            log.exception("progress callback failed")

    # -- the end -------------------------------------------------------------------------

    def _finish_blocking(self, timeout: float) -> None:
        mux = self._mux
        assert mux is not None
        if self.role == "source":
            if not mux.wait_idle(timeout):
                mux.abort(f"QEMU's migration connections still open after {timeout} s")
            if self._listener is not None:
                self._listener.stop_accepting()
            mux.finish(FINISH_TIMEOUT)
        else:
            mux.finish(timeout)

    async def _run_to_end(self, timeout: float) -> tuple[bool, str | None]:
        mux = self._mux
        if mux is None:
            return False, "the migration path was never set up"
        try:
            await trio.to_thread.run_sync(self._finish_blocking, timeout, abandon_on_cancel=True)
        except trio.Cancelled:
            mux.abort("cancelled")
            raise
        except MuxError as exc:
            return False, str(exc)
        return True, None

    async def _conclude(self, ok: bool, error: str | None) -> None:
        """Fill the report, tell the peer our verdict, and combine it with theirs."""
        with trio.CancelScope(shield=True):
            mux = self._mux
            rep = self.report
            if mux is not None:
                stats = mux.stats()
                rep.streams = [
                    StreamReport(
                        s.stream,
                        s.sent,
                        s.received,
                        s.sent_digest.hex() or None,
                        s.received_digest.hex() or None,
                    )
                    for s in stats.streams
                ]
                rep.bytes_sent = stats.sent
                rep.bytes_received = stats.received
                rep.migration_seconds = stats.active_seconds
                if rep.migration_seconds is None and mux.first_open is not None:
                    rep.migration_seconds = time.perf_counter() - mux.first_open
            if ok and not rep.streams:
                ok, error = False, "QEMU opened no migration connection"
            peer = await exchange_results(self, ok, len(rep.streams), error)
            if not ok:
                rep.ok = False
                rep.verdict = error
                if peer is not None and not peer.ok and peer.error not in (None, error):
                    rep.verdict = f"{error}; peer: {peer.error}"
            elif peer is not None and not peer.ok:
                rep.ok = False
                rep.verdict = f"peer reported failure: {peer.error}"
            elif peer is not None and (
                peer.sent != rep.bytes_received or peer.received != rep.bytes_sent
            ):
                rep.ok = False
                rep.verdict = (
                    f"byte counts disagree: we sent {rep.bytes_sent} / received "
                    f"{rep.bytes_received}, peer received {peer.received} / sent "
                    f"{peer.sent}"
                )
            else:
                rep.ok = True
                check = "SHA-256" if self._digest else "byte count"
                rep.verdict = (
                    f"{len(rep.streams)} stream(s) delivered intact both ways "
                    f"({check} in authenticated END), {rep.bytes_sent} bytes sent, "
                    f"{rep.bytes_received} received"
                )
                if peer is None:
                    rep.notes.append("peer's migrate-result not received (its CLOSE was)")
            self._done.set()
            log.info("migration %s: %s", self.role, rep.verdict)

    def _lifecycle(self) -> AbstractAsyncContextManager[None]:
        async def finish_aborted(reason: str) -> None:
            with trio.CancelScope(shield=True):
                await self._run_to_end(FINISH_TIMEOUT)
            await self._conclude(False, reason)

        async def cleanup() -> None:
            if self._mux is not None:
                self._mux.close()
            if self._listener is not None:
                self._listener.close()

        return run_lifecycle(self, [self._watch_peer, self._progress_loop], finish_aborted, cleanup)


async def receive_offer(
    control: ControlReader, mode: str, timeout: float, error: type[HolepunchError]
) -> messages.MigrateOffer:
    """The destination's wait for migrate-offer; a source in the other mode is told why
    (migrate-result) and the session fails with ``error``."""
    msg, _ = await control.receive(
        messages.MigrateOffer, timeout=timeout, step="waiting for migrate-offer"
    )
    offered = msg.mode or "mux"
    if offered != mode:
        reason = f"the destination proxy runs --mode {mode}, the source offered {offered}"
        with contextlib.suppress(HolepunchError):
            await control.send(
                messages.MigrateResult(ok=False, streams=0, sent=0, received=0, error=reason)
            )
        raise error(reason)
    return msg


class _ResultParty(Protocol):
    @property
    def link(self) -> Link: ...
    @property
    def report(self) -> MigrationReport: ...
    @property
    def _peer_seen(self) -> trio.Event: ...
    @property
    def _peer_result(self) -> messages.MigrateResult | None: ...


async def exchange_results(
    proxy: _ResultParty, ok: bool, streams: int, error: str | None
) -> messages.MigrateResult | None:
    """Send this side's migrate-result and wait (bounded) for the peer's; both verdicts
    end up in the report.  Shared by the mux and handoff modes."""
    rep = proxy.report
    try:
        with trio.fail_after(RESULT_TIMEOUT):
            await proxy.link.control.send(
                messages.MigrateResult(
                    ok=ok,
                    streams=streams,
                    sent=rep.bytes_sent,
                    received=rep.bytes_received,
                    error=None if error is None else error[:4000],
                )
            )
    except (HolepunchError, trio.TooSlowError) as exc:
        rep.notes.append(f"could not send our result to the peer: {exc!r}")
    with trio.move_on_after(RESULT_TIMEOUT):
        await proxy._peer_seen.wait()
    peer = proxy._peer_result
    if peer is not None:
        rep.peer_ok = bool(peer.ok)
        rep.peer_error = peer.error
    return peer


class _Proxy(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def report(self) -> MigrationReport: ...
    @property
    def _done(self) -> trio.Event: ...

    async def _setup(self) -> None: ...
    async def wait(self) -> MigrationReport: ...
    def abort(self, reason: str) -> None: ...


@asynccontextmanager
async def run_lifecycle(
    proxy: _Proxy,
    background: Sequence[Callable[[], Awaitable[None]]],
    finish_aborted: Callable[[str], Awaitable[None]],
    cleanup: Callable[[], Awaitable[None]],
) -> AsyncIterator[None]:
    """The manager's ``async with`` around one migration, shared by both modes: set up,
    run the background tasks, and when the body ends either wait for the migration (a
    normal exit) or abort both sides with the body's reason; always clean up; raise
    MigrationError when the migration failed."""
    body_exc: BaseException | None = None
    try:
        await proxy._setup()
        async with trio.open_nursery() as nursery:
            for task in background:
                nursery.start_soon(task)
            try:
                yield
            except BaseException as exc:
                body_exc = exc
            if not proxy._done.is_set():
                if body_exc is None:
                    with contextlib.suppress(MigrationError):
                        await proxy.wait()
                else:
                    reason = (
                        str(body_exc)
                        if isinstance(body_exc, ManagerAbort)
                        else f"{proxy.role} manager failed: {body_exc!r}"
                    )
                    proxy.abort(reason)
                    await finish_aborted(reason)
            nursery.cancel_scope.cancel()
    finally:
        await cleanup()
    if body_exc is not None:
        raise body_exc
    if not proxy.report.ok:
        raise MigrationError(proxy.report.verdict or "migration failed", proxy.report)


async def _wait_socket(path: Path, timeout: float) -> None:
    """Wait until ``path`` is a UNIX socket (the destination QEMU listens there).  Never
    connects: QEMU would take a probe connection as its main channel."""
    try:
        with trio.fail_after(timeout):
            while True:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(path.stat().st_mode):
                        return
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise ControlTimeout(
            f"{path} is not a listening QEMU socket after {timeout} s "
            "(did the manager issue migrate-incoming unix:PATH?)"
        ) from None


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
    docs/architecture.md).  ``progress`` is called about 4 times a second from the trio
    thread; ``expected_bytes`` (about the guest RAM size) enables its ETA.  Other options
    are :class:`~holepunch_mig.ConnectOptions` fields.  After the block ``proxy.report``
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
    (``report.qemu_status`` is then the VM's run state)."""
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
