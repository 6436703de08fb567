"""The nominated link: bulk records on a blocking socket in worker threads.

trio stays on the control plane; the bytes go socket -> AES-GCM -> socket in a worker
thread (OpenSSL and socket calls release the GIL), never through trio streams.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

import trio

from .errors import HolepunchError, PeerAbort, RecordError, TransferError
from .records import RecordReader, RecordWriter
from .report import Report
from .session import ControlReader, Established, SessionLog
from .tunnel import Tunnel

logger = logging.getLogger("holepunch_mig")

T = TypeVar("T")
Progress = Callable[[int], None]

RESULT_TIMEOUT = 120.0
"""How long the source waits for the destination's verdict after end-of-stream."""

SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class TransferResult:
    """What was moved and how it was verified."""

    bytes: int
    sha256: str | None
    seconds: float


def _blocking_socket(stream: trio.SocketStream) -> socket.socket:
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return sock


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
        self.sock = _blocking_socket(established.stream)
        self.writer = RecordWriter(self.sock, established.send_key)
        self.reader = RecordReader(self.sock, established.recv_key)
        self.log = SessionLog(logger, {"session": self.report.session[:12]})
        self._closed = False

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

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def send_file(
        self, src: BinaryIO, *, digest: bool = True, progress: Progress | None = None
    ) -> TransferResult:
        """Send ``src`` as stream 0 and wait until the destination confirms it verified it."""
        started = time.monotonic()
        try:
            count, hashed = await self._in_thread(
                lambda: self.writer.send_file(0, src, digest=digest, progress=progress)
            )
        except (OSError, RecordError) as exc:
            reason = f"sending failed after {self.writer.bytes_sent} bytes: {exc}"
            await self._tell_abort(reason)
            raise TransferError(reason) from exc
        local_digest = hashed.hex() if hashed else None
        msg, _ = await self.control.receive(
            "result", timeout=RESULT_TIMEOUT, step="waiting for the destination's verdict"
        )
        seconds = time.monotonic() - started
        self._fill(count, local_digest, seconds)
        if not msg["ok"]:
            raise PeerAbort(f"destination rejected the transfer: {msg['error']}")
        if msg["bytes"] != count:
            raise TransferError(f"destination got {msg['bytes']} bytes, {count} were sent")
        if local_digest and msg["sha256"] and msg["sha256"] != local_digest:
            raise TransferError("destination's sha256 differs from what was sent")
        self.report.ok = True
        return TransferResult(count, local_digest, seconds)

    async def receive_file(
        self, dst: BinaryIO, *, digest: bool = True, progress: Progress | None = None
    ) -> TransferResult:
        """Receive stream 0 into ``dst``; returns only after end-of-stream verified."""
        started = time.monotonic()
        try:
            count, hashed = await self._in_thread(
                lambda: self.reader.receive_file(0, dst, digest=digest, progress=progress)
            )
        except (OSError, HolepunchError) as exc:
            reason = str(exc) or type(exc).__name__
            await self._tell_result(False, 0, None, reason)
            self.report.ok = False
            self.report.verdict = reason
            raise
        seconds = time.monotonic() - started
        local_digest = hashed.hex() if hashed else None
        self._fill(count, local_digest, seconds)
        self.report.ok = True
        await self._tell_result(True, count, local_digest, None)
        return TransferResult(count, local_digest, seconds)

    def _fill(self, count: int, digest: str | None, seconds: float) -> None:
        self.report.bytes = count
        self.report.sha256 = digest
        self.report.seconds = seconds

    async def _tell_result(
        self, ok: bool, count: int, digest: str | None, error: str | None
    ) -> None:
        try:
            await self.control.send("result", ok=ok, bytes=count, sha256=digest, error=error)
        except HolepunchError as exc:
            self.log.warning("could not send the result to the peer: %s", exc)

    async def _tell_abort(self, reason: str) -> None:
        try:
            await self.control.send("abort", reason=reason[:4096])
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
