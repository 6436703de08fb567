"""Mux mode: every connection QEMU opens is one stream of the link's multiplexer.

The session (:func:`holepunch_mig.connect`) punches and authenticates the link; then
the source sends ``migrate-offer`` (how ends of streams are checked), the destination
starts its mux once its QEMU's incoming socket exists and answers ``migrate-ready``,
and only then does the source listen on its private UNIX socket.  Every connection
QEMU opens there (main channel, each multifd channel; the return path rides the main
channel backwards) becomes one :mod:`~holepunch_mig.migration.mux` stream, delivered to the
destination QEMU in the same order.  At the end both sides exchange ``migrate-result``
(per-side counts and error) over the control channel, so a failure is reported on both
sides even when the link itself is what broke.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import stat
import threading
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HolepunchError,
    MuxError,
    PeerAbort,
    ProtocolError,
)
from holepunch_mig.migration.common import (
    MigrationError,
    MigrationProgress,
    MigrationReport,
    ProgressCallback,
    ProxyBase,
    StreamReport,
    receive_offer,
)
from holepunch_mig.migration.mux import QEMU_COALESCE_WAIT, LinkReader, LinkWriter, Mux
from holepunch_mig.migration.mux_group import MuxGroup
from holepunch_mig.migration.proxy import SourceProxy, unix_connector
from holepunch_mig.roles import Role
from holepunch_mig.session.link import Link
from holepunch_mig.session.links import DataLink
from holepunch_mig.session.resume import tune_link
from holepunch_mig.wire import messages
from holepunch_mig.wire.text import printable

log = logging.getLogger(__name__)

FINISH_TIMEOUT = 60.0
PROGRESS_INTERVAL = 0.25


class MigrationProxy(ProxyBase):
    """One side of a mux-mode migration.  Made by :func:`migration_source`
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
        links: int = 1,
    ) -> None:
        super().__init__(role, link, MigrationReport(role=role, link=link.report))
        if not 1 <= links <= messages.MAX_LINKS:
            raise ValueError(f"links must be 1-{messages.MAX_LINKS}, not {links}")
        self._links_wanted = links
        self._extra: list[DataLink] = []
        self._digest = digest
        self._listen_unix = listen_unix
        self._connect_unix = connect_unix
        self._progress = progress
        self._expected = expected_bytes
        self._ready_timeout = ready_timeout
        self._timeout = timeout
        self._link_timeout = link_timeout
        self._mux: MuxGroup | Mux | None = None
        """One mux per link (a group); a subclass carrying one link may set a Mux."""
        self._cpu0: float | None = None
        self._listener: SourceProxy | None = None

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
        self.report.digest = self.link.digest if self._digest else "count-only"
        if self.role == "source":
            # over the tunnel, or with a peer that does not announce parallel links: one
            wanted = min(self._links_wanted, self.link.max_links)
            if wanted < self._links_wanted:
                self.report.notes.append(
                    f"{self._links_wanted} links wanted, the session allows {wanted}"
                )
            await control.send(
                messages.MigrateOffer(digest=self._digest, links=wanted if wanted > 1 else None)
            )
            self._extra = await self.link.open_links(wanted - 1)
            msg, _ = await control.receive(
                messages.MigrateReady,
                messages.MigrateResult,
                timeout=self._ready_timeout,
                step="waiting for the destination proxy to be ready",
            )
            if isinstance(msg, messages.MigrateResult):
                raise ProtocolError(f"destination proxy refused: {printable(msg.error or '')}")
            if (msg.mode or "mux") != "mux":
                raise ProtocolError("migrate-ready is not for mux mode")
            if msg.digest != self._digest:
                raise ProtocolError("migrate-ready does not echo the offered digest mode")
            if (msg.links or 1) != 1 + len(self._extra):
                raise ProtocolError(
                    f"migrate-ready says {msg.links or 1} links, this side holds "
                    f"{1 + len(self._extra)}"
                )
            mux = MuxGroup(
                self._triples(),
                digest=self._digest,
                algorithm=self.link.digest,
                name="src-mux",
                coalesce_wait=QEMU_COALESCE_WAIT,  # QEMU's RAM streams: records fill
            )
            self._mux = mux
            mux.start()
            self._listener = SourceProxy(mux, path=self._listen_unix)
            await trio.to_thread.run_sync(self._listener.start)
            self.report.socket = str(self._listener.path)
        else:
            offer = await receive_offer(control, "mux", self._ready_timeout, ProtocolError)
            self._digest = bool(offer.digest)
            self.report.digest = self.link.digest if self._digest else "count-only"
            self._extra = await self.link.open_links((offer.links or 1) - 1)
            assert self._connect_unix is not None
            await _wait_socket(self._connect_unix, self._ready_timeout)
            self.report.socket = str(self._connect_unix)
            mux = MuxGroup(
                self._triples(),
                connect=unix_connector(self._connect_unix),
                digest=self._digest,
                algorithm=self.link.digest,
                name="dst-mux",
            )
            self._mux = mux
            mux.start()
            links = 1 + len(self._extra)
            await control.send(
                messages.MigrateReady(digest=self._digest, links=links if links > 1 else None)
            )
        self.report.links = 1 + len(self._extra)
        self._cpu0 = time.process_time()

    def _triples(self) -> list[tuple[socket.socket, LinkWriter, LinkReader]]:
        out: list[tuple[socket.socket, LinkWriter, LinkReader]] = [
            (self.link.sock, self.link.writer, self.link.reader)
        ]
        out.extend((d.sock, d.writer, d.reader) for d in self._extra)
        return out

    # -- background tasks ----------------------------------------------------------------

    async def _watch_peer(self) -> None:
        """The peer's migrate-result may come early (it failed): then fail here too."""
        try:
            msg, _ = await self.link.control.receive(
                messages.MigrateResult, timeout=math.inf, step="waiting for the peer's result"
            )
            self._peer_result = msg
            if not msg.ok and not self._done.is_set():
                self.abort(f"peer reported failure: {printable(msg.error or '')}")
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
            if self._cpu0 is not None:
                rep.cpu_seconds = time.process_time() - self._cpu0
            if mux is not None:
                n_links = len(mux.muxes) if isinstance(mux, MuxGroup) else 1
                stats = mux.stats()
                rep.streams = [
                    StreamReport(
                        s.stream,
                        s.sent,
                        s.received,
                        s.sent_digest.hex() or None,
                        s.received_digest.hex() or None,
                        s.label,
                        link=(s.stream - 1) % n_links,
                        records_sent=s.records_sent,
                        records_received=s.records_received,
                        records_direct=s.records_direct,
                    )
                    for s in stats.streams
                ]
                rep.link_bytes = [self.link.writer.wire_bytes_sent] + [
                    d.writer.wire_bytes_sent for d in self._extra
                ]
                rep.bytes_sent = stats.sent
                rep.bytes_received = stats.received
                rep.migration_seconds = stats.active_seconds
                if rep.migration_seconds is None and mux.first_open is not None:
                    rep.migration_seconds = time.perf_counter() - mux.first_open
            if ok and not rep.streams:
                ok, error = False, "QEMU opened no migration connection"
            peer = await self._exchange_results(ok, len(rep.streams), error)
            if not ok:
                rep.ok = False
                rep.verdict = error
                if peer is not None and not peer.ok and peer.error not in (None, error):
                    rep.verdict = f"{error}; peer: {printable(peer.error or '')}"
            elif peer is not None and not peer.ok:
                rep.ok = False
                rep.verdict = f"peer reported failure: {printable(peer.error or '')}"
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
                    f"({check} in authenticated END) over {rep.links} link(s), "
                    f"{rep.bytes_sent} bytes sent, {rep.bytes_received} received"
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
            for extra in self._extra:
                extra.close()

        return self._run_lifecycle([self._watch_peer, self._progress_loop], finish_aborted, cleanup)


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
