"""What the mux and handoff modes share: the report, progress samples, the errors, the
offer/result messages on the control channel and the proxy's lifecycle.

Both modes' proxies derive from :class:`ProxyBase`, so neither mode imports the other;
only :mod:`holepunch_mig.migration.api` knows both, to pick one.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import trio

from holepunch_mig.errors import HolepunchError, ManagerAbort
from holepunch_mig.report import Report
from holepunch_mig.roles import Role
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.session.link import Link
from holepunch_mig.wire import messages

Mode = Literal["mux", "handoff", "libvirt"]

RESULT_TIMEOUT = 10.0


class MigrationError(HolepunchError):
    """The migration's transport failed; ``migration`` is the MigrationReport."""

    def __init__(self, message: str, migration: MigrationReport) -> None:
        super().__init__(message)
        self.migration = migration
        self.report = migration.link


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
    channel: str = ""
    """libvirt mode: which endpoint ("migration" or "nbd"); "" otherwise."""
    link: int = 0
    """Index of the parallel link that carried it (0: the session's first link)."""
    records_sent: int = 0
    records_received: int = 0
    """DATA records each way (``sent / records_sent`` is the mean record size: QEMU's
    writes coalesced up to 1 MiB)."""
    records_direct: int = 0
    """Of ``records_received``, those written to QEMU's socket at once by the link's
    reader; the others waited in the stream's queue (QEMU's socket was full)."""


@dataclass
class MigrationReport:
    """What one proxy saw: the streams, the verdict and the session's link report."""

    role: Role
    ok: bool | None = None
    verdict: str | None = None
    socket: str | None = None
    """Mux: the QEMU-side UNIX socket.  Handoff: the ``fd:NAME`` URI QEMU was given."""
    digest: Literal["sha256", "blake3", "count-only", "tls"] = "count-only"
    """How stream ends were checked; "tls": handoff mode, QEMU's TLS authenticates."""
    mode: Mode = "mux"
    links: int = 1
    """Parallel links that carried the streams (mux mode; stream k rode link (k-1) % links)."""
    cpu_seconds: float | None = None
    """CPU (user + system, every thread of this process) from the path being ready to the
    verdict: the proxy's cost when the process is a migrate-proxy command."""
    link_bytes: list[int] = field(default_factory=list)
    """Per link, the bytes this side put on it (record headers, ciphertext and tags)."""
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
        if self.links > 1:
            lines.append(f"  {self.links} parallel links (stream k on link (k - 1) mod links)")
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


class ProxyBase(ABC):
    """One side of a migration, either mode: the role, the link, the report, the peer's
    migrate-result (filled by the subclass's peer watcher) and the end of the migration.

    Subclasses set the migration up in ``_setup``, watch it, fill the report, call
    :meth:`_exchange_results` and set ``_done``; :meth:`_run_lifecycle` is the manager's
    ``async with`` around all of it."""

    def __init__(self, role: Role, link: Link, report: MigrationReport) -> None:
        self.role: Role = role
        self.link = link
        self.report = report
        self._peer_result: messages.MigrateResult | None = None
        self._peer_seen = trio.Event()
        self._done = trio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Fail the migration now, on both sides."""

    @abstractmethod
    async def wait(self, timeout: float | None = None) -> MigrationReport:
        """Wait for the end; raise MigrationError on any failure."""

    @abstractmethod
    async def _setup(self) -> None:
        """Agree on the mode with the peer and start carrying the migration."""

    async def _exchange_results(
        self, ok: bool, streams: int, error: str | None
    ) -> messages.MigrateResult | None:
        """Send this side's migrate-result and wait (bounded) for the peer's; both verdicts
        end up in the report."""
        rep = self.report
        try:
            with trio.fail_after(RESULT_TIMEOUT):
                await self.link.control.send(
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
            await self._peer_seen.wait()
        peer = self._peer_result
        if peer is not None:
            rep.peer_ok = bool(peer.ok)
            rep.peer_error = peer.error
        return peer

    @asynccontextmanager
    async def _run_lifecycle(
        self,
        background: Sequence[Callable[[], Awaitable[None]]],
        finish_aborted: Callable[[str], Awaitable[None]],
        cleanup: Callable[[], Awaitable[None]],
    ) -> AsyncIterator[None]:
        """The manager's ``async with`` around one migration: set up, run the background
        tasks, and when the body ends either wait for the migration (a normal exit) or
        abort both sides with the body's reason; always clean up; raise MigrationError
        when the migration failed."""
        body_exc: BaseException | None = None
        try:
            await self._setup()
            async with trio.open_nursery() as nursery:
                for task in background:
                    nursery.start_soon(task)
                try:
                    yield
                except BaseException as exc:
                    body_exc = exc
                if not self._done.is_set():
                    if body_exc is None:
                        with contextlib.suppress(MigrationError):
                            await self.wait()
                    else:
                        reason = (
                            str(body_exc)
                            if isinstance(body_exc, ManagerAbort)
                            else f"{self.role} manager failed: {body_exc!r}"
                        )
                        self.abort(reason)
                        await finish_aborted(reason)
                nursery.cancel_scope.cancel()
        finally:
            await cleanup()
        if body_exc is not None:
            raise body_exc
        if not self.report.ok:
            raise MigrationError(self.report.verdict or "migration failed", self.report)
