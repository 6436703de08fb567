"""The nominated link: bulk records on a blocking socket in worker threads.

trio stays on the control plane; the bytes go socket -> AES-GCM -> socket in a worker
thread (OpenSSL and socket calls release the GIL), never through trio streams.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar, cast

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    CommitFailed,
    ControlTimeout,
    HolepunchError,
    InputFailed,
    Interrupted,
    NoDirectPath,
    OutputFailed,
    PeerAbort,
    ProtocolError,
    RecordError,
    ResumeFailed,
    TransferError,
    TruncatedStream,
    single_exception,
)
from holepunch_mig.net.punch import AuthenticatedLink
from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.net.tunnel import Tunnel
from holepunch_mig.report import Report
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.session.links import DataLink, blocking_socket, punch_links
from holepunch_mig.session.negotiate import Established, SessionLog, repunch
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.session.resume import AckPoster, Output, ResumableSource, abort_socket, tune_link
from holepunch_mig.session.resume_state import DetectedBy, ResumeMachine
from holepunch_mig.wire import messages
from holepunch_mig.wire.digests import Algorithm, new_hash
from holepunch_mig.wire.records import StreamPosition
from holepunch_mig.wire.resume_auth import resume_key
from holepunch_mig.wire.text import printable

logger = logging.getLogger("holepunch_mig")

T = TypeVar("T")
Progress = Callable[[int], None]

RESULT_TIMEOUT = 120.0
"""How long the source waits for the destination's verdict after end-of-stream."""

SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class TransferResult:
    """What was moved and how it was verified.  ``sha256`` is the hex digest of the
    algorithm ``digest`` names ("blake3" or "sha256", the session's; None when not
    hashed).  ``verified`` is True only when both sides' digests of the stream were
    compared and equal (a side that did not hash, a
    zero END digest or a ``result`` without ``sha256`` leave it False: only the byte
    count was checked)."""

    bytes: int
    sha256: str | None
    seconds: float
    verified: bool = False
    digest: str | None = None


Commit = Callable[[TransferResult], None]
"""The destination's last step before it tells the source ``ok``: make the output
durable and put it in place (called in a worker thread with the verified result; an
exception turns the verdict into ``ok: false`` with its text)."""


class Link:
    """An authenticated, encrypted link to the peer plus the control channel beside it.

    ``path`` is "direct" (a punched TCP link) or "tunnel" (the same records carried over
    the control channel); ``fell_back`` is True when policy "auto" wanted direct and got
    the tunnel, so a caller can check it got what it asked for without parsing text.
    """

    def __init__(self, established: Established) -> None:
        self.report: Report = established.report
        self.control: ControlReader = established.control
        self.tunnel: Tunnel | None = established.tunnel
        self.fell_back: bool = established.fell_back
        self.sock = blocking_socket(established.stream)
        if self.tunnel is not None:
            # with the worker-thread pump, records go straight into tunnel frames (a
            # socket-like FrameTransport: sendall/recv_into/shutdown/settimeout/close)
            self.sock = cast(socket.socket, self.tunnel.link_transport(self.sock))
        self.writer = RecordWriter(self.sock, established.send_key)
        self.reader = RecordReader(self.sock, established.recv_key)
        self._keys = (established.send_key, established.recv_key)
        self.log = SessionLog(logger, {"session": self.report.session[:12]})
        self._closed = False
        self._options = established.options or ConnectOptions()
        self._session_id = established.session_id
        self._mac_key = self._resume_key()
        self._resume = established.resume and self.tunnel is None
        self._pipeline = 3  # RecordWriter.send_file / RecordReader.receive_file tuning
        self._prefetch: int | None = None
        self.max_links: int = established.max_links if self.tunnel is None else 1
        """Most links (this one included) :meth:`open_links` may bring the session to."""
        self.digest: Algorithm = established.digest
        """The session's end-to-end digest of stream transfers."""
        self.epoch = 0
        """Generation of the current link: 0 for the first, +1 per resume negotiation."""
        self._cpu0: float | None = None  # process_time() at the transfer's start
        if self.tunnel is None:
            tune_link(self.sock, self._options.link_timeout)

    @property
    def resumable(self) -> bool:
        """Stream transfers on this link survive a lost link (both sides offered resume,
        the path is direct, and ``resume_attempts`` > 0)."""
        return self._resume and self._options.resume_attempts > 0

    @property
    def path(self) -> str:
        """ "direct" or "tunnel"."""
        return self.report.path

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking record I/O in a worker; on cancellation shut the socket so the
        worker returns promptly instead of blocking forever."""
        try:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except trio.Cancelled:
            self._shutdown()
            raise

    @property
    def data_link(self) -> DataLink:
        """The first link (index 0) as a bulk-data worker sees it."""
        return DataLink(
            0,
            self.sock,
            self.writer,
            self.reader,
            self.report.local or "",
            self.report.remote or "",
        )

    async def open_links(self, count: int) -> list[DataLink]:
        """Punch ``count`` more links beside this one (docs/protocol.md section 9); both
        sides call it with the same count at the same point of their control
        conversation.  Over the tunnel there are none (returns [] without a message).
        The caller owns and closes the links returned; they are never resumed."""
        if count <= 0 or self.tunnel is not None:
            return []
        if 1 + count > self.max_links:
            raise ProtocolError(
                f"{1 + count} links asked for, the session allows {self.max_links} "
                "(the peer announced fewer in its limits)"
            )
        extra = await punch_links(
            self.control,
            self.report.role,
            self._options,
            self._session_id,
            count,
            self.report,
            self.log,
        )
        self.report.links = 1 + len(extra)
        return extra

    def split_keys(self) -> tuple[bytes, bytes]:
        """This link's Noise split() keys as (source->destination, destination->source),
        for deriving an exporter secret (migration handoff's TLS-PSK).  Secret: never log
        them.  Only while the record layer has not used them (a rekey moves them on one
        side only), else ValueError."""
        if self.writer.records_sent or self.reader.records_received:
            raise ValueError("the link already carried records: its split keys have moved on")
        send, recv = self._keys
        return (send, recv) if self.report.role == "source" else (recv, send)

    def _arm_idle_timeout(self) -> None:
        """Blocking calls on the data link give up after ``idle_timeout`` s of silence
        (only for stream transfers: the migration multiplexer sets its own deadlines)."""
        self.sock.settimeout(self._options.idle_timeout)

    def _why(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and not isinstance(exc, HolepunchError):
            return f"link silent for {self._options.idle_timeout:.0f} s (peer stuck or gone)"
        return str(exc) or type(exc).__name__

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def send_file(
        self,
        src: BinaryIO,
        *,
        digest: bool = True,
        progress: Progress | None = None,
        pipeline: int = 3,
    ) -> TransferResult:
        """Send ``src`` as stream 0 and wait until the destination confirms it verified it.

        When :attr:`resumable`, a lost link is re-punched (fresh keys) and the stream goes
        on from the last byte the destination kept; ``link.report.interruptions`` lists
        each loss.  ``progress`` then counts stream bytes (it may step back on a resume),
        and the stream is always hashed (``digest`` is taken as True): with resume the
        whole-stream SHA-256 is mandatory.  ``pipeline``: the record writer's
        (:meth:`RecordWriter.send_file`) option."""
        self._pipeline = pipeline  # read by every epoch of a resumable transfer
        self._arm_idle_timeout()
        if self.resumable:
            with single_exception():
                return await self._send_resumable(src, True, progress)
        started = self._start_clock()
        got: dict[str, messages.Result | HolepunchError] = {}
        arrived = trio.Event()

        async def watch() -> None:
            """The verdict, or an abort, may come while the stream is still going out."""
            try:
                msg, _ = await self.control.receive(
                    messages.Result,
                    timeout=math.inf,
                    step="waiting for the destination's verdict",
                )
                got["msg"] = msg
                if not msg.ok:
                    self._shutdown()
            except ChannelClosed as exc:  # the link's own outcome says more, if any
                got["closed"] = exc
            except HolepunchError as exc:
                got["exc"] = exc
                self._shutdown()
            arrived.set()

        failure: OSError | RecordError | None = None
        count, hashed = -1, b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                count, hashed = await self._in_thread(
                    lambda: self.writer.send_file(
                        0,
                        src,
                        digest=digest,
                        progress=progress,
                        algorithm=self.digest,
                        pipeline=pipeline,
                    )
                )
            except (OSError, RecordError) as exc:
                failure = exc
            with trio.move_on_after(0 if failure is not None else RESULT_TIMEOUT):
                await arrived.wait()
            nursery.cancel_scope.cancel()
        peer = got.get("exc")
        if isinstance(peer, HolepunchError):
            raise peer
        msg = got.get("msg")
        if isinstance(msg, messages.Result) and not msg.ok:
            raise PeerAbort(f"destination rejected the transfer: {printable(msg.error or '')}")
        if failure is not None:
            reason = f"sending failed after {self.writer.bytes_sent} bytes: {self._why(failure)}"
            await self._tell_abort(reason)
            raise TransferError(reason) from failure
        closed = got.get("closed")
        if isinstance(closed, HolepunchError):
            raise closed
        if not isinstance(msg, messages.Result):
            raise ControlTimeout(
                f"no result message from the peer within {RESULT_TIMEOUT:.1f} s "
                "(waiting for the destination's verdict)"
            )
        return self._check_result(count, hashed, msg, started)

    async def receive_file(
        self,
        dst: BinaryIO,
        *,
        digest: bool = True,
        progress: Progress | None = None,
        commit: Commit | None = None,
        prefetch: int | None = None,
    ) -> TransferResult:
        """Receive stream 0 into ``dst``; returns only after end-of-stream verified and
        the output committed.

        The source is told ``ok`` only after ``dst`` was flushed and ``commit`` (when
        given) returned: a caller that renames a temporary file into place does that in
        ``commit``, so an ``ok`` never precedes a failure to keep the data.  A failure
        there is :class:`CommitFailed` here and ``ok: false`` at the source.

        When :attr:`resumable`, ``dst`` is only appended to: after a lost link the
        stream goes on from the bytes already written (``dst`` is flushed every
        ``ack_interval`` bytes, when it reports them to the source), and the stream's
        SHA-256 is mandatory (``digest`` is taken as True).  ``prefetch``: the record
        reader's (:meth:`RecordReader.receive_file`) option; None (default) prefetches
        when the stream is hashed."""
        self._prefetch = prefetch  # read by every epoch of a resumable transfer
        self._arm_idle_timeout()
        if self.resumable:
            with single_exception():
                return await self._receive_resumable(dst, progress, commit)
        started = self._start_clock()
        peer: list[HolepunchError] = []

        async def watch() -> None:
            """Nothing but abort may come from the source now; it stops the receive."""
            try:
                msg, _ = await self.control.receive(
                    messages.Abort, timeout=math.inf, step="transfer"
                )
                peer.append(PeerAbort(f"peer aborted (transfer): {printable(msg.reason)}"))
            except ChannelClosed:
                return  # the link's own outcome says more; no verdict can be sent anyway
            except HolepunchError as exc:
                peer.append(exc)
            self._shutdown()

        failure: OSError | HolepunchError | None = None
        count, hashed = -1, b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                count, hashed = await self._in_thread(
                    lambda: self.reader.receive_file(
                        0,
                        dst,
                        digest=digest,
                        progress=progress,
                        algorithm=self.digest,
                        prefetch=prefetch,
                    )
                )
            except (OSError, HolepunchError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            error: BaseException = peer[0] if peer else failure
            reason = self._why(error)
            if isinstance(error, TimeoutError):
                error = TruncatedStream(
                    f"link silent for {self._options.idle_timeout:.0f} s after "
                    f"{self.reader.bytes_received} bytes, before end-of-stream"
                )
                reason = str(error)
            await self._tell_result(False, 0, None, reason)
            self.report.ok = False
            self.report.verdict = reason
            raise error from None
        local_digest = hashed.hex() if hashed else None
        result = TransferResult(
            count,
            local_digest,
            time.monotonic() - started,
            self.reader.end_verified,
            digest=self.digest if local_digest else None,
        )
        return await self._commit_and_tell(dst, result, commit)

    async def _commit_and_tell(
        self, dst: BinaryIO, result: TransferResult, commit: Commit | None
    ) -> TransferResult:
        """Flush ``dst``, run the caller's commit, and only then say ``ok``; any failure
        there is ``ok: false`` with the reason on both sides."""

        def durable() -> None:
            Output(dst).flush()
            if commit is not None:
                commit(result)

        try:
            await self._in_thread(durable)
        except Exception as exc:
            error = exc.error if isinstance(exc, OutputFailed) else exc
            reason = f"output not committed: {error}"
            await self._tell_result(False, result.bytes, None, reason)
            self._fill(result.bytes, result.sha256, result.seconds)
            self.report.ok = False
            self.report.verdict = reason
            fail = CommitFailed(reason)
            fail.report = self.report
            raise fail from exc
        self._fill(result.bytes, result.sha256, result.seconds)
        self.report.ok = True
        await self._tell_result(True, result.bytes, result.sha256, None)
        return result

    # -- resume (docs/protocol.md section 7) ----------------------------------------------

    def _adopt(self, link: AuthenticatedLink) -> None:
        """Carry on over a freshly nominated link (fresh keys, counters from 0)."""
        self.sock = blocking_socket(link.stream)
        tune_link(self.sock, self._options.link_timeout)
        self._arm_idle_timeout()
        self.writer = RecordWriter(self.sock, link.send_key)
        self.reader = RecordReader(self.sock, link.recv_key)
        self._keys = (link.send_key, link.recv_key)
        self._mac_key = self._resume_key()
        self.report.local, self.report.remote = link.local, link.remote

    def _resume_key(self) -> bytes:
        """The MAC key of the resume messages after the current link (secret)."""
        if not self._session_id:  # the tunnel: never resumes
            return b""
        send, recv = self._keys
        k_sd, k_ds = (send, recv) if self.report.role == "source" else (recv, send)
        return resume_key(k_sd, k_ds, self._session_id)

    def _resume_machine(self) -> ResumeMachine:
        return ResumeMachine(
            self._options.resume_attempts, self.report.interruptions, epoch=self.epoch
        )

    def _exhausted(self, machine: ResumeMachine) -> ResumeFailed:
        reason = machine.give_up()
        exc = ResumeFailed(reason, machine.attempts)
        exc.report = self.report
        self.report.ok = False
        self.report.verdict = reason
        return exc

    async def _send_resumable(
        self, src: BinaryIO, digest: bool, progress: Progress | None
    ) -> TransferResult:
        started = self._start_clock()
        opts = self._options
        source = ResumableSource(
            src, digest=digest, limit=opts.resume_buffer, algorithm=self.digest
        )
        machine = self._resume_machine()
        while True:
            state = _Epoch()
            outcome = await self._source_epoch(source, digest, progress, state, machine)
            if outcome is not None:
                machine.finish()
                break
            cut = machine.lose(
                at=round(time.monotonic() - started, 3),
                acked=source.acked,
                sent=source.sent_upto,
            )
            self.log.warning(
                "link %d lost after %d bytes acknowledged: %s", self.epoch, cut.acked, cut.seen
            )
            t0 = time.monotonic()
            abort_socket(self.sock)
            while True:
                if machine.exhausted:
                    exc = self._exhausted(machine)
                    await self._tell_abort(str(exc))
                    raise exc
                self.epoch = machine.attempt()
                try:
                    link, kept, scratch = await repunch(
                        self.control,
                        "source",
                        opts,
                        self._session_id,
                        self.epoch,
                        self.log,
                        mac_key=self._mac_key,
                        reason=f"link {self.epoch - 1} lost: {machine.seen}",
                    )
                except NoDirectPath as exc:
                    machine.no_path(f"re-punch {self.epoch} found no path: {exc}")
                    self.log.warning("%s", machine.last)
                    continue
                except HolepunchError as exc:
                    machine.fail()
                    exc.report = self.report
                    self.report.ok = False
                    self.report.verdict = f"resume failed: {exc}"
                    if not isinstance(exc, PeerAbort | ChannelClosed):  # the peer knows those
                        await self._tell_abort(f"resume failed: {exc}")
                    raise
                break
            try:
                source.rewind(kept)
            except ValueError as exc:
                machine.fail()
                reason = f"cannot resume: {exc}"
                await self._tell_abort(reason)
                raise ResumeFailed(reason, machine.attempts) from exc
            self._adopt(link)
            machine.resumed(
                kept=kept,
                seconds=round(time.monotonic() - t0, 3),
                link=f"{scratch.local} <-> {scratch.remote}",
            )
            self.log.warning(
                "link %d up in %.3f s (%s); resuming from byte %d",
                self.epoch,
                cut.resume_seconds,
                cut.link,
                kept,
            )
        count, hashed, msg = outcome
        return self._check_result(count, hashed, msg, started)

    def _check_result(
        self, count: int, hashed: bytes, msg: messages.Result, started: float
    ) -> TransferResult:
        """The source succeeds only when the destination verified the same count and
        digest that were sent: a source that hashed needs the destination's SHA-256 (a
        ``result`` with ``sha256: null`` verified nothing)."""
        local_digest = hashed.hex() if hashed else None
        seconds = time.monotonic() - started
        self._fill(count, local_digest, seconds)
        if not msg.ok:
            raise PeerAbort(f"destination rejected the transfer: {printable(msg.error or '')}")
        if msg.bytes != count:
            raise TransferError(f"destination got {msg.bytes} bytes, {count} were sent")
        if local_digest and msg.sha256 is None:
            raise TransferError(
                "destination reported no sha256: the content was not verified "
                "(only the byte count matched)"
            )
        if local_digest and msg.sha256 != local_digest:
            raise TransferError(f"destination's {self.digest} differs from what was sent")
        self.report.ok = True
        return TransferResult(
            count,
            local_digest,
            seconds,
            verified=bool(local_digest),
            digest=self.digest if local_digest else None,
        )

    async def _source_epoch(
        self,
        source: ResumableSource,
        digest: bool,
        progress: Progress | None,
        state: _Epoch,
        machine: ResumeMachine,
    ) -> tuple[int, bytes, messages.Result] | None:
        """Send on the current link until the destination's result (returned) or until
        the link is lost (None; ``machine`` says how)."""
        writer, sock, epoch = self.writer, self.sock, self.epoch
        settled = trio.Event()

        def stop(seen: str, by: DetectedBy) -> None:
            machine.halt(seen, by)
            source.interrupt()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            settled.set()

        async def watch() -> None:
            try:
                while True:
                    msg, _ = await self.control.receive(
                        messages.Progress,
                        messages.LinkLost,
                        messages.Result,
                        timeout=math.inf,
                        step="transfer",
                    )
                    if isinstance(msg, messages.Progress):
                        source.ack(msg.bytes)
                    elif isinstance(msg, messages.LinkLost):
                        if msg.epoch == epoch:
                            stop(f"peer: {printable(msg.reason)}", "peer")
                    else:
                        state.result = msg
                        if not msg.ok:
                            stop(f"destination failed: {printable(msg.error or '')}", "peer")
                        settled.set()
                        return
            except HolepunchError as exc:
                state.fatal = exc
                stop(str(exc), "peer")

        # (errors are raised after the nursery: inside it they would come out grouped)
        input_failed: OSError | None = None
        timed_out = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                count, hashed = await self._in_thread(
                    lambda: writer.send_file(
                        0,
                        source,  # type: ignore[arg-type]  # has readinto, all send_file uses
                        digest=digest,
                        progress=progress,
                        position=source.position,
                        pipeline=self._pipeline,
                        algorithm=self.digest,
                    )
                )
            except InputFailed as exc:
                input_failed = exc.error
                count, hashed = -1, b""
            except (OSError, RecordError, Interrupted) as exc:
                stop(f"{type(exc).__name__}: {exc}", "local")
                count, hashed = -1, b""
            if input_failed is None:
                with trio.move_on_after(RESULT_TIMEOUT) as waited:
                    await settled.wait()
                timed_out = waited.cancelled_caught
            nursery.cancel_scope.cancel()
        if input_failed is not None:
            await self._tell_abort(f"the source's input failed: {input_failed}")
            raise input_failed
        if state.fatal is not None:
            raise state.fatal
        if timed_out:
            raise ControlTimeout(
                f"no result message from the peer within {RESULT_TIMEOUT:.1f} s "
                "(waiting for the destination's verdict)"
            )
        if state.result is not None and (count >= 0 or not state.result.ok):
            return count, hashed, state.result
        return None

    async def _receive_resumable(
        self, dst: BinaryIO, progress: Progress | None, commit: Commit | None
    ) -> TransferResult:
        started = self._start_clock()
        opts = self._options
        digest = True  # with resume the whole-stream digest is mandatory
        position = StreamPosition(0, new_hash(self.digest))
        machine = self._resume_machine()
        while True:
            state = _Epoch()
            acker = AckPoster(opts.ack_interval)
            try:
                outcome = await self._destination_epoch(
                    dst, digest, progress, position, acker, state, machine
                )
            except (OSError, HolepunchError) as exc:
                reason = str(exc) or type(exc).__name__
                await self._tell_result(False, position.offset, None, reason)
                self.report.ok = False
                self.report.verdict = reason
                raise
            if outcome is not None:
                machine.finish()
                break
            kept = position.offset
            cut = machine.lose(at=round(time.monotonic() - started, 3), acked=acker.sent, sent=kept)
            self.log.warning("link %d lost with %d bytes written: %s", self.epoch, kept, cut.seen)
            t0 = time.monotonic()
            abort_socket(self.sock)
            offer = state.offer
            if offer is None:
                await self.control.send(
                    messages.LinkLost(epoch=self.epoch, bytes=kept, reason=machine.seen[:4096])
                )
            while True:
                if offer is None:
                    try:
                        offer = await self.control.receive(
                            messages.ResumeOffer, step="waiting for the source to resume"
                        )
                    except PeerAbort as exc:
                        machine.fail()
                        fail = ResumeFailed(f"the source gave up resuming: {exc}", machine.attempts)
                        fail.report = self.report
                        self.report.ok = False
                        self.report.verdict = str(fail)
                        raise fail from None
                if machine.exhausted:
                    exc2 = self._exhausted(machine)
                    await self._tell_abort(str(exc2))
                    raise exc2
                self.epoch = machine.attempt(offer[0].epoch)
                try:
                    link, _, scratch = await repunch(
                        self.control,
                        "destination",
                        opts,
                        self._session_id,
                        self.epoch,
                        self.log,
                        mac_key=self._mac_key,
                        kept=kept,
                        offer=offer,
                    )
                except NoDirectPath as exc:
                    machine.no_path(f"re-punch {self.epoch} found no path: {exc}")
                    offer = None
                    continue
                except HolepunchError as exc:  # e.g. a resume-offer that is not authentic
                    machine.fail()
                    exc.report = self.report
                    self.report.ok = False
                    self.report.verdict = f"resume failed: {exc}"
                    await self._tell_abort(f"resume failed: {exc}")
                    raise
                break
            self._adopt(link)
            machine.resumed(
                kept=kept,
                seconds=round(time.monotonic() - t0, 3),
                link=f"{scratch.local} <-> {scratch.remote}",
            )
        count, hashed = outcome
        result = TransferResult(
            count, hashed.hex(), time.monotonic() - started, True, digest=self.digest
        )
        return await self._commit_and_tell(dst, result, commit)

    async def _destination_epoch(
        self,
        dst: BinaryIO,
        digest: bool,
        progress: Progress | None,
        position: StreamPosition,
        acker: AckPoster,
        state: _Epoch,
        machine: ResumeMachine,
    ) -> tuple[int, bytes] | None:
        """Receive on the current link until END verified (returned) or the link is lost
        (None; ``machine`` says how).  Other failures raise."""
        reader, sock = self.reader, self.sock
        out = Output(dst)

        def on_progress(total: int) -> None:
            if progress is not None:
                progress(total)
            if acker.due(total):
                out.flush()
                acker.post(total)

        async def report_progress(n: int) -> None:
            try:
                await self.control.send(messages.Progress(bytes=n))
            except HolepunchError as exc:  # the watcher sees the channel go, too
                self.log.warning("could not send progress: %s", exc)

        async def watch() -> None:
            try:
                msg, raw = await self.control.receive(
                    messages.ResumeOffer, timeout=math.inf, step="transfer"
                )
            except HolepunchError as exc:
                state.fatal = exc
            else:
                state.offer = (msg, raw)
                machine.halt(f"peer: {printable(msg.reason)}", "peer")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        # (errors are raised after the nursery: inside it they would come out grouped)
        failure: BaseException | None = None
        result: tuple[int, bytes] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(acker.run, report_progress)
            try:
                result = await self._in_thread(
                    lambda: reader.receive_file(
                        0,
                        out,  # type: ignore[arg-type]  # write() is all receive_file uses
                        digest=digest,
                        progress=on_progress,
                        position=position,
                        require_digest=True,
                        prefetch=self._prefetch,
                        algorithm=self.digest,
                    )
                )
            except OutputFailed as exc:
                failure = exc.error
                state.local_error = True
            except (OSError, HolepunchError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is None:
            return result
        if state.fatal is not None:
            raise state.fatal from None
        # the link's socket errors (ETIMEDOUT comes as a bare TimeoutError) and EOF resume;
        # failed authentication, END mismatches, ABORT and the output's errors do not
        link_failure = isinstance(failure, (TruncatedStream, OSError)) and not state.local_error
        if state.local_error or (state.offer is None and not link_failure):
            raise failure
        machine.halt(f"{type(failure).__name__}: {failure}", "local")  # unless halted already
        try:
            out.flush()  # what resume-answer will call kept must have reached the OS
        except OutputFailed as exc:
            raise exc.error from None
        return None

    def _start_clock(self) -> float:
        """The transfer's start: monotonic time, and this process's CPU time for the
        report's ``cpu_seconds``."""
        self._cpu0 = time.process_time()
        return time.monotonic()

    def _fill(self, count: int, digest: str | None, seconds: float) -> None:
        self.report.bytes = count
        self.report.sha256 = digest
        self.report.digest = self.digest if digest else None
        self.report.seconds = seconds
        if self._cpu0 is not None:
            self.report.cpu_seconds = round(time.process_time() - self._cpu0, 3)

    async def _tell_result(
        self, ok: bool, count: int, digest: str | None, error: str | None
    ) -> None:
        try:
            await self.control.send(messages.Result(ok=ok, bytes=count, sha256=digest, error=error))
        except HolepunchError as exc:
            self.log.warning("could not send the result to the peer: %s", exc)

    async def _tell_abort(self, reason: str) -> None:
        try:
            await self.control.send(messages.Abort(reason=reason[:4096]))
        except HolepunchError as exc:
            self.log.warning("could not send abort to the peer: %s", exc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        self.sock.close()
        if self.tunnel is not None:
            await self.tunnel.aclose()


class _Epoch:
    """What the control channel brought during one link generation of a resumable
    transfer (why the link stopped is the :class:`ResumeMachine`'s)."""

    def __init__(self) -> None:
        self.result: messages.Result | None = None
        self.offer: tuple[messages.ResumeOffer, bytes] | None = None
        self.fatal: HolepunchError | None = None
        self.local_error = False
