"""The fallback path: the link's byte stream carried over the control channel itself.

When no direct link can be punched (and the policy allows it), the same encrypted record
stream that would have gone over the punched TCP link travels as ``TunnelData`` messages
(kind byte 0x02, at most 64 KiB each) interleaved with ordinary control messages.

Design (docs/tunnel.md):

* A ``socket.socketpair()``.  The Noise handshake, the record layer and :class:`Link` run
  on one end (:attr:`Tunnel.link_socket`) exactly as on a direct link, so the tunnel is
  encrypted end to end even when the control channel is not.  :class:`Tunnel` pumps the
  other end to and from the control channel.  With the worker-thread pump the record
  layer leaves the socketpair after the handshake: :meth:`Tunnel.link_transport` gives
  :class:`Link` a :class:`FrameTransport` that frames records straight onto the control
  socket and reads them from the pump's buffers (same frames, same credit rules).
* Credit-based flow control, in the style of HTTP/2 and SSH windows.  The receiver grants
  a window (default 16 MiB, more than the bandwidth-delay product of a 1 Gb/s, 100 ms
  path) with a ``credit`` message when the tunnel opens, and grants more in batches
  (default every 4 MiB it has handed on to the link), never a reply per chunk.  A sender
  never has more than the granted credit outstanding; a peer that sends beyond it breaks
  the protocol and the tunnel fails with :class:`~holepunch_mig.errors.ProtocolError`.
* While the tunnel runs, the pump owns the receive side of the control channel: it
  routes ``TunnelData`` and ``credit`` to the tunnel and every other message to a small
  bounded inbox that :class:`~holepunch_mig.session.negotiate.ControlReader` reads instead of the
  channel (``result``, ``abort`` ... keep working unchanged).
* Two pumps, one wire format: when the channel is a StreamChannel over a socket or
  pipes, a blocking worker thread borrows its descriptors (``lend_data_path``) and moves
  ~1 MiB per system call (:class:`_ThreadPump`); otherwise three trio tasks move one
  message at a time.  ``HOLEPUNCH_MIG_TUNNEL_PUMP=trio`` forces the trio pump.

Memory is bounded: bytes received but not yet handed to the link never exceed the window
granted (checked on every message), the inbox holds at most ``inbox_size`` control
messages, and when the local link stops reading, the socketpair fills (or the
FrameTransport stops consuming), no credit goes back, and the peer's sender stops after
the window.

The accounting is sans-IO (``wire.credit``); :class:`Tunnel` only moves bytes, and the
worker-thread pump with its :class:`FrameTransport` lives in ``net.tunnel_pump``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket

import trio

from holepunch_mig.errors import ChannelClosed, HolepunchError, TunnelClosed
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.net.tunnel_pump import FrameTransport, InboxItem, ThreadPump, TunnelStats
from holepunch_mig.wire import messages
from holepunch_mig.wire.credit import (
    DEFAULT_CREDIT_BATCH,
    DEFAULT_WINDOW,
    MAX_CHUNK,
    ReceiveWindow,
    SendCredit,
)

logger = logging.getLogger("holepunch_mig")

DEFAULT_INBOX = 64
"""Control messages (not tunnel data) buffered for ControlReader while the tunnel runs."""
SOCKETPAIR_BUFFER = 4 << 20
"""SO_SNDBUF/SO_RCVBUF of both socketpair ends (the link's end gets 4 MiB from Link too)."""
PUMP_ENV = "HOLEPUNCH_MIG_TUNNEL_PUMP"
"""Diagnostics: "trio" forces the trio pump even on a socket-backed channel (A/B runs)."""

_GATHER = 16
_TUNNEL_KIND = bytes([messages.KIND_TUNNEL])


# --------------------------------------------------------------------------- the pump


class Tunnel:
    """Pumps one end of a socketpair over ``channel`` with credit-based flow control and
    demultiplexes the channel's receive side (see the module docstring).

    Use: ``await nursery.start(tunnel.run)``; then the link runs on
    :meth:`link_stream` and control messages are read with :meth:`receive_control`
    (``ControlReader.attach(tunnel)`` does that).  :meth:`aclose` stops it.
    """

    def __init__(
        self,
        channel: ControlChannel,
        *,
        window: int = DEFAULT_WINDOW,
        credit_batch: int = DEFAULT_CREDIT_BATCH,
        chunk: int = MAX_CHUNK,
        inbox_size: int = DEFAULT_INBOX,
        socket_buffer: int = SOCKETPAIR_BUFFER,
        threads: bool | None = None,
    ) -> None:
        if not 0 < chunk <= MAX_CHUNK:
            raise ValueError(f"tunnel chunk {chunk} must be in 1..{MAX_CHUNK}")
        self.channel = channel
        self.chunk = chunk
        self.credit = SendCredit()
        self.rwindow = ReceiveWindow(window, credit_batch)
        self.stats = TunnelStats()
        self.error: HolepunchError | None = None
        link_end, pump_end = socket.socketpair()
        for sock in (link_end, pump_end):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, socket_buffer)
        self.link_socket: socket.socket | None = link_end
        pump_end.setblocking(False)
        self._pump_sock = pump_end
        self._pump = trio.SocketStream(trio.socket.from_stdlib_socket(pump_end))
        if threads is None:
            threads = os.environ.get(PUMP_ENV, "") != "trio"
        self._want_threads = threads
        self._threads: ThreadPump | None = None
        """The worker-thread pump while it runs (socket-backed channels)."""
        self.pump_kind = "trio"
        """ "thread" once the worker-thread pump took over the control socket."""
        self._inbound: collections.deque[memoryview] = collections.deque()
        self._inbound_ready = trio.Event()
        self._credit_ready = trio.Event()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[InboxItem](inbox_size)
        self._cancel = trio.CancelScope()
        self._closed = False

    # -- for the session --------------------------------------------------------------

    def link_stream(self) -> trio.SocketStream:
        """The link's end as a trio stream (for the Noise handshake; Link detaches it)."""
        if self.link_socket is None:
            raise RuntimeError("the tunnel's link end was already taken")
        sock, self.link_socket = self.link_socket, None
        sock.setblocking(False)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    def link_transport(self, sock: socket.socket) -> socket.socket | FrameTransport:
        """What the record layer should use after the handshake: ``sock`` (the link's
        socketpair end, blocking) with the trio pump; with the worker-thread pump a
        :class:`FrameTransport` that writes records straight into TunnelData frames on
        the control socket and reads them from the pump's buffers (no socketpair hop).
        The bytes still in the socketpair are drained first, so nothing is lost or
        reordered by the switch."""
        pump = self._threads
        if pump is None:
            return sock
        transport = pump.attach(sock)
        return sock if transport is None else transport

    @property
    def buffered(self) -> int:
        """Bytes received from the peer and not yet handed to the link."""
        return self.rwindow.buffered

    async def receive_control(self) -> bytes:
        """The next control message (not tunnel data, not credit) from the peer."""
        try:
            item = await self._inbox_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TunnelClosed(f"tunnel closed: {self.error or 'closed locally'}") from None
        if isinstance(item, HolepunchError):
            raise item
        return item

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the pump until :meth:`aclose` or a failure (recorded in :attr:`error`, handed
        to the next :meth:`receive_control`, and shown to the link as end of stream)."""
        with self._cancel:
            try:
                await self._send_credit(self.rwindow.initial_grant())
            except HolepunchError as exc:
                self._fail(exc)
                task_status.started()
                return
            lent = None
            if self._want_threads and isinstance(self.channel, StreamChannel):
                lent = await self.channel.lend_data_path(self._thread_send)
            async with trio.open_nursery() as nursery:
                if lent is not None:
                    self.pump_kind = "thread"
                    self._threads = ThreadPump(self, *lent)
                    nursery.start_soon(self._run_thread, self._threads)
                else:
                    nursery.start_soon(self._route, nursery.cancel_scope)
                    nursery.start_soon(self._uplink, nursery.cancel_scope)
                    nursery.start_soon(self._downlink, nursery.cancel_scope)
                task_status.started()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel.cancel()
        self._inbox_send.close()
        if self.link_socket is not None:
            self.link_socket.close()
        if self._threads is not None:
            # the worker owns the socketpair end until it stops (then _run_thread closes it)
            self._threads.stop()
            return
        with contextlib.suppress(OSError):
            self._pump.socket.close()

    # -- internals -------------------------------------------------------------------

    def _fail(self, exc: HolepunchError) -> None:
        if self.error is None:
            self.error = exc
            # the peer closing the channel after the transfer is the normal end
            level = logging.DEBUG if isinstance(exc, ChannelClosed) else logging.WARNING
            logger.log(level, "tunnel stopped: %s", exc)
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self._inbox_send.send_nowait(exc)
        self._inbox_send.close()
        # The link sees end of stream (a truncated record stream, reported as such).
        with contextlib.suppress(OSError):
            self._pump_sock.shutdown(socket.SHUT_RDWR)

    # -- the worker-thread pump (socket-backed channels) ----------------------------

    async def _run_thread(self, pump: ThreadPump) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel, pump)
                try:
                    await trio.to_thread.run_sync(pump.run, thread_name="holepunch-tunnel")
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # the thread has ended (or never started): give the channel back
            pump.finish()
            assert isinstance(self.channel, StreamChannel)
            self.channel.end_loan(pump.unread_out, send_intact=pump.send_intact)
            self._threads = None
            if pump.error is not None:
                self._fail(pump.error)
            if self._closed:
                with contextlib.suppress(OSError):
                    self._pump_sock.close()

    @staticmethod
    async def _stop_on_cancel(pump: ThreadPump) -> None:
        try:
            await trio.sleep_forever()
        finally:
            pump.stop()

    async def _thread_send(self, data: bytes) -> None:
        """StreamChannel.send_message while the worker owns the socket: the frame is
        queued to the worker and sent between its data batches."""
        pump = self._threads
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[BaseException | None] = []

        def complete(exc: BaseException | None) -> None:
            outcome.append(exc)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        if pump is None or not pump.submit(data, complete):
            raise ChannelClosed("control channel broke while sending: the tunnel stopped")
        await done.wait()
        if outcome[0] is not None:
            raise outcome[0]

    async def _send_credit(self, n: int) -> None:
        await self.channel.send_message(messages.encode(messages.Credit(bytes=n)))
        self.stats.credits_sent += 1

    async def _route(self, scope: trio.CancelScope) -> None:
        """Sole reader of the control channel while the tunnel runs."""
        try:
            while True:
                raw = await self.channel.receive_message()
                if raw[:1] == _TUNNEL_KIND:
                    n = len(raw) - 1
                    self.rwindow.on_data(n)
                    self._inbound.append(memoryview(raw)[1:])
                    self.stats.bytes_received += n
                    self.stats.messages_received += 1
                    self.stats.max_buffered = max(self.stats.max_buffered, self.buffered)
                    self._inbound_ready.set()
                    continue
                event = messages.decode(raw)
                if isinstance(event, messages.Credit):
                    self.credit.grant(event.bytes)
                    self.stats.credits_received += 1
                    self._credit_ready.set()
                    continue
                self.stats.control_routed += 1
                try:
                    await self._inbox_send.send(raw)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # nobody will read control messages any more
        except HolepunchError as exc:
            self._fail(exc)
            scope.cancel()

    async def _uplink(self, scope: trio.CancelScope) -> None:
        """Link -> peer: read the socketpair only as far as credit allows."""
        try:
            while True:
                n = self.credit.take(self.chunk)
                if n == 0:
                    self._credit_ready = trio.Event()
                    await self._credit_ready.wait()
                    continue
                data = await self._pump.receive_some(n)
                if not data:
                    return  # the link closed its end; nothing more to carry
                self.credit.spend(len(data))
                await self.channel.send_message(_TUNNEL_KIND + data)
                self.stats.bytes_sent += len(data)
                self.stats.messages_sent += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except HolepunchError as exc:
            self._fail(exc)
            scope.cancel()

    async def _downlink(self, scope: trio.CancelScope) -> None:
        """Peer -> link: hand buffered data to the socketpair (gathered, up to
        ``_GATHER`` messages per sendmsg), return credit in batches."""
        sock = self._pump.socket
        try:
            while True:
                if not self._inbound:
                    self._inbound_ready = trio.Event()
                    await self._inbound_ready.wait()
                    continue
                views = [self._inbound[i] for i in range(min(_GATHER, len(self._inbound)))]
                sent = await sock.sendmsg(views)
                consumed = sent
                while sent:
                    head = self._inbound[0]
                    if sent >= len(head):
                        sent -= len(head)
                        self._inbound.popleft()
                    else:
                        self._inbound[0] = head[sent:]
                        sent = 0
                grant = self.rwindow.on_consumed(consumed)
                if grant:
                    await self._send_credit(grant)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # the link closed its end: stop returning credit (the peer's sender stalls)
            return
        except HolepunchError as exc:
            self._fail(exc)
            scope.cancel()
