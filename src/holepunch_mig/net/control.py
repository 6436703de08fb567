"""The control channel: whole messages over a connection the caller already trusts.

The library never opens the control connection itself unless asked (CLI); a migration
manager hands in whatever it has.  Adapters here turn a trio Stream, a subprocess's
stdio into a :class:`ControlChannel` (an in-memory pair for tests is in
:mod:`holepunch_mig.testing`).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from holepunch_mig.errors import ChannelClosed, ProtocolError
from holepunch_mig.wire.endpoints import unmap_ipv4
from holepunch_mig.wire.messages import MAX_FRAME, FrameDecoder, frame


@runtime_checkable
class ControlChannel(Protocol):
    """What the library needs from a control connection.

    ``peer_host`` is the peer's address as this side sees the control connection (or
    None when unknown); it lets two port-preserving NATs be crossed without STUN.
    """

    peer_host: str | None

    async def send_message(self, message: bytes) -> None: ...

    async def receive_message(self) -> bytes:
        """Next whole message; raises ChannelClosed at end of stream."""
        ...

    async def aclose(self) -> None: ...


class StreamChannel:
    """Length-prefixed frames (4-byte big-endian length) over any trio Stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer_host: str | None = None,
        max_message: int = MAX_FRAME,
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_message)
        self._send_lock = trio.Lock()
        self._max = max_message
        self.peer_host = peer_host if peer_host is not None else _socket_peer_host(stream)
        self._offload: Callable[[bytes], Awaitable[None]] | None = None
        self._send_broken: str | None = None
        self._receive_broken: str | None = None

    async def send_message(self, message: bytes) -> None:
        data = frame(message)
        async with self._send_lock:
            if self._send_broken is not None:
                raise ChannelClosed(f"control channel broke while sending: {self._send_broken}")
            if self._offload is not None:
                await self._offload(data)
                return
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(f"control channel broke while sending: {exc}") from None

    async def lend_data_path(
        self, send_frame: Callable[[bytes], Awaitable[None]]
    ) -> tuple[int, int, bytes] | None:
        """Hand the data path to a blocking pump (the tunnel's worker thread).

        Returns None unless the stream is a socket (trio.SocketStream) or a pair of file
        descriptors (a StapledStream of FdStreams: a subprocess's or this process's
        stdio).  Otherwise returns duplicates of the read and write descriptors (the same
        number for a socket; non-blocking; closed by the borrower) and the bytes already
        read but not yet returned as messages.  From then on ``send_message`` passes
        whole frames to ``send_frame`` (so they never interleave with the borrower's
        frames) and ``receive_message`` must not be called until :meth:`end_loan`.  The
        caller guarantees no receive is in progress.
        """
        fds = _stream_fds(self._stream)
        if fds is None or self._offload is not None:
            return None
        async with self._send_lock:
            try:
                read_fd = os.dup(fds[0])
            except OSError:
                return None
            try:
                write_fd = read_fd if fds[0] == fds[1] else os.dup(fds[1])
            except OSError:
                os.close(read_fd)
                return None
            for fd in {read_fd, write_fd}:
                os.set_blocking(fd, False)
            self._offload = send_frame
            return read_fd, write_fd, self._decoder.take_buffered()

    def end_loan(self, unread: bytes | None, *, send_intact: bool = True) -> None:
        """End :meth:`lend_data_path`: ``unread`` is what the borrower read but did not
        consume (None when it stopped inside a frame it cannot give back, which ends
        the receive side); ``send_intact`` False when it stopped inside a frame it was
        sending (which ends the send side)."""
        self._offload = None
        if unread is None:
            self._receive_broken = "the tunnel stopped inside a frame"
        elif unread:
            self._decoder.feed(unread)
        if not send_intact:
            self._send_broken = "the tunnel stopped inside a frame"

    async def receive_message(self, *, limit: int | None = None) -> bytes:
        """The next message.  ``limit`` (at most the channel's own) refuses a longer next
        frame as soon as its length prefix arrives, and reads no more than one such frame
        ahead: a listener in a handshake buffers a few hundred bytes per stranger, not a
        whole maximal frame."""
        if self._offload is not None:
            raise RuntimeError("the control channel's socket is lent to the tunnel")
        if self._receive_broken is not None:
            raise ChannelClosed(f"control channel broke while receiving: {self._receive_broken}")
        cap = self._max if limit is None else min(limit, self._max)
        while True:
            length = self._decoder.next_length()
            if limit is not None and length is not None and length > cap:
                raise ProtocolError(f"frame of {length} bytes exceeds the {cap}-byte limit here")
            msg = self._decoder.next_message()
            if msg is not None:
                return msg
            try:
                chunk = await self._stream.receive_some(cap + 4)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(f"control channel broke while receiving: {exc}") from None
            if not chunk:
                if self._decoder.pending:
                    raise ProtocolError(
                        f"control channel ended inside a frame ({self._decoder.pending} "
                        "bytes of an incomplete frame)"
                    )
                raise ChannelClosed("control channel closed by the peer")
            self._decoder.feed(chunk)

    async def aclose(self) -> None:
        await self._stream.aclose()


def _stream_fds(stream: trio.abc.Stream) -> tuple[int, int] | None:
    """(read fd, write fd) of a socket stream or of a stapled pair of fd streams."""
    if isinstance(stream, trio.SocketStream):
        fd = stream.socket.fileno()
        return (fd, fd) if fd >= 0 else None
    if isinstance(stream, trio.StapledStream):
        send, receive = stream.send_stream, stream.receive_stream
        if isinstance(send, trio.lowlevel.FdStream) and isinstance(receive, trio.lowlevel.FdStream):
            try:
                return receive.fileno(), send.fileno()
            except (OSError, trio.ClosedResourceError):
                return None
    return None


def _socket_peer_host(stream: trio.abc.Stream) -> str | None:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return unmap_ipv4(peer[0])
    return None


def ssh_client_host() -> str | None:
    """The SSH client's address when we run under sshd (``SSH_CONNECTION``)."""
    value = os.environ.get("SSH_CONNECTION", "").split()
    return value[0] if len(value) == 4 else None


def stdio_channel(peer_host: str | None = None) -> StreamChannel:
    """The control channel on this process's stdin/stdout (``recv --control-stdio``)."""
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(0))
    return StreamChannel(stream, peer_host=peer_host or ssh_client_host())


class ProcessChannel(StreamChannel):
    """The control channel on a subprocess's stdin/stdout (``send --control-cmd``)."""

    def __init__(self, process: trio.Process, peer_host: str | None = None) -> None:
        assert process.stdin is not None and process.stdout is not None
        super().__init__(trio.StapledStream(process.stdin, process.stdout), peer_host=peer_host)
        self.process = process

    async def exit_status(self, wait: float = 2.0) -> int | None:
        """The command's exit status once it has ended (waiting up to ``wait`` s), or
        None while it still runs: when the channel closed, this says why (127: the
        command, e.g. holepunch-mig on the remote host, was not found)."""
        with trio.move_on_after(wait):
            await self.process.wait()
        return self.process.returncode

    async def aclose(self) -> None:
        await super().aclose()
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def open_process_channel(
    command: Sequence[str], peer_host: str | None = None
) -> ProcessChannel:
    """Start ``command`` (for example ``ssh host holepunch-mig recv --control-stdio``)."""
    process = await trio.lowlevel.open_process(
        list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    return ProcessChannel(process, peer_host=peer_host)


async def open_tcp_channel(host: str, port: int, wait: float = 0.0) -> StreamChannel:
    """Connect the control channel to ``host:port`` (the CLI's ``--control``), retrying
    refused connections for up to ``wait`` seconds (the receiver may start later).

    The deadline holds whatever the network does: a connect whose SYNs are dropped is
    cut off at it (at least 1 s is given to a single attempt), not left to the kernel's
    two-minute SYN retries."""
    start = trio.current_time()
    deadline = max(start + wait, start + 1.0)
    last: str = "no answer"
    while True:
        with trio.move_on_at(deadline):
            try:
                stream = await trio.open_tcp_stream(host, port)
                break
            except OSError as exc:
                last = _connect_failure(exc)
        if trio.current_time() + 0.1 >= deadline:
            if last == "no answer":
                last = (
                    f"no answer within {trio.current_time() - start:.1f} s (SYNs dropped by a "
                    "firewall, or the host is down)"
                )
            hint = (
                ""
                if last.startswith("cannot resolve")
                else "; is holepunch-mig running there, listening on that port, and the "
                "port open in its firewall?"
            )
            raise ChannelClosed(
                f"cannot reach the control port {host}:{port}: {last}{hint}"
            ) from None
        await trio.sleep(0.1)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return StreamChannel(stream)


def _connect_failure(exc: OSError) -> str:
    """An OSError of a connect in words, without a class name."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the name ({exc.strerror})"
    # trio's open_tcp_stream raises one OSError caused by a group of per-address errors
    group = exc.__cause__
    errs = (
        [e for e in group.exceptions if isinstance(e, OSError)]
        if isinstance(group, BaseExceptionGroup)
        else [exc]
    )
    codes = [e.errno for e in errs if e.errno]
    if codes:
        return os.strerror(codes[0]).lower()
    return str(exc) or "connection failed"
