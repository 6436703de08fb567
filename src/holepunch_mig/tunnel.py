"""The fallback path: the link's byte stream carried over the control channel itself.

When no direct link can be punched (and the policy allows it), the same encrypted record
stream that would have gone over the punched TCP link travels as ``TunnelData`` messages
(kind byte 0x02, at most 64 KiB each) interleaved with ordinary control messages.

Design (docs/tunnel.md):

* A ``socket.socketpair()``.  The Noise handshake, the record layer and :class:`Link` run
  on one end (:attr:`Tunnel.link_socket`) exactly as on a direct link, so the tunnel is
  encrypted end to end even when the control channel is not.  :class:`Tunnel` pumps the
  other end to and from the control channel.
* Credit-based flow control, in the style of HTTP/2 and SSH windows.  The receiver grants
  a window (default 16 MiB, more than the bandwidth-delay product of a 1 Gb/s, 100 ms
  path) with a ``credit`` message when the tunnel opens, and grants more in batches
  (default every 4 MiB it has handed on to the link), never a reply per chunk.  A sender
  never has more than the granted credit outstanding; a peer that sends beyond it breaks
  the protocol and the tunnel fails with :class:`~holepunch_mig.errors.ProtocolError`.
* While the tunnel runs, one task owns the receive side of the control channel: it
  routes ``TunnelData`` and ``credit`` to the tunnel and every other message to a small
  bounded inbox that :class:`~holepunch_mig.session.ControlReader` reads instead of the
  channel (``result``, ``abort`` ... keep working unchanged).

Memory is bounded: bytes received but not yet handed to the link never exceed the window
granted (checked on every message), the inbox holds at most ``inbox_size`` control
messages, and when the local link stops reading, the socketpair fills, no credit goes
back, and the peer's sender stops after the window.

The accounting is sans-IO (:class:`SendCredit`, :class:`ReceiveWindow`); :class:`Tunnel`
only moves bytes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
from dataclasses import dataclass

import trio

from . import messages
from .control import ControlChannel
from .errors import ChannelClosed, HolepunchError, NoDirectPath, ProtocolError

logger = logging.getLogger("holepunch_mig")

DEFAULT_WINDOW = 16 << 20
"""Bytes a receiver lets the sender have in flight; >= the bandwidth-delay product."""
DEFAULT_CREDIT_BATCH = 4 << 20
"""The receiver returns credit once this many bytes have been handed to the link."""
MAX_CHUNK = messages.MAX_MESSAGE - 1
"""Payload bytes of one TunnelData message (the kind byte takes the 65536th)."""
DEFAULT_INBOX = 64
"""Control messages (not tunnel data) buffered for ControlReader while the tunnel runs."""
SOCKETPAIR_BUFFER = 1 << 20

_CREDIT_MAX = 2**63 - 1
_GATHER = 16
_TUNNEL_KIND = bytes([messages.KIND_TUNNEL])


class TunnelRefused(NoDirectPath):
    """The policies of the two sides do not allow the tunnel (for example the source asked
    for ``auto`` or ``tunnel`` and the destination's policy is ``direct``)."""


class TunnelClosed(ChannelClosed):
    """The tunnel stopped (closed locally, or its control channel ended)."""


# --------------------------------------------------------------------------- sans-IO


class SendCredit:
    """The sender's side of the window: how many bytes it may still send."""

    def __init__(self) -> None:
        self.available = 0
        self.granted_total = 0
        self.sent_total = 0

    def grant(self, n: int) -> None:
        if n <= 0:
            raise ProtocolError(f"credit message grants {n} bytes; a grant must be positive")
        if self.available + n > _CREDIT_MAX:
            raise ProtocolError(f"credit grant of {n} bytes overflows the window")
        self.available += n
        self.granted_total += n

    def take(self, limit: int) -> int:
        """How many bytes (at most ``limit``) may be sent now; 0 means wait for credit."""
        return min(limit, self.available)

    def spend(self, n: int) -> None:
        if n > self.available:
            raise ValueError(f"spending {n} bytes with only {self.available} of credit")
        self.available -= n
        self.sent_total += n


class ReceiveWindow:
    """The receiver's side: checks the peer stays inside the window, decides when to
    return credit (in batches of ``batch`` bytes, never per message)."""

    def __init__(self, window: int = DEFAULT_WINDOW, batch: int = DEFAULT_CREDIT_BATCH) -> None:
        if window < MAX_CHUNK:
            raise ValueError(f"tunnel window {window} is smaller than one chunk ({MAX_CHUNK})")
        if not 0 < batch <= window:
            raise ValueError(f"credit batch {batch} must be in 1..window ({window})")
        self.window = window
        self.batch = batch
        self.outstanding = 0
        """Bytes the peer may still send before it needs more credit."""
        self.buffered = 0
        """Bytes received and not yet handed to the link."""
        self.unreturned = 0
        """Bytes handed to the link whose credit has not been returned yet."""
        self.received_total = 0

    def initial_grant(self) -> int:
        """The first ``credit`` message's value: the whole window."""
        self.outstanding = self.window
        return self.window

    def on_data(self, n: int) -> None:
        """``n`` bytes of tunnel data arrived; raises if the peer overran its credit."""
        if n == 0:
            raise ProtocolError("empty tunnel data message")
        if n > self.outstanding:
            raise ProtocolError(
                f"peer sent {n} tunnel bytes with only {self.outstanding} bytes of credit "
                f"left (window {self.window}): it ignores flow control"
            )
        self.outstanding -= n
        self.buffered += n
        self.received_total += n

    def on_consumed(self, n: int) -> int:
        """``n`` buffered bytes were handed to the link; returns the credit to send now
        (0 = not yet)."""
        if n > self.buffered:
            raise ValueError(f"consumed {n} bytes but only {self.buffered} are buffered")
        self.buffered -= n
        self.unreturned += n
        if self.unreturned < self.batch:
            return 0
        grant, self.unreturned = self.unreturned, 0
        self.outstanding += grant
        return grant


# --------------------------------------------------------------------------- the pump


@dataclass
class TunnelStats:
    """Counters for reports and tests (no payload, no keys)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    credits_sent: int = 0
    credits_received: int = 0
    max_buffered: int = 0
    control_routed: int = 0


InboxItem = bytes | HolepunchError


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
        self._pump = trio.SocketStream(trio.socket.from_stdlib_socket(pump_end))
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
            async with trio.open_nursery() as nursery:
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
            self._pump.socket.shutdown(socket.SHUT_RDWR)

    async def _send_credit(self, n: int) -> None:
        await self.channel.send_message(messages.encode(messages.make("credit", bytes=n)))
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
                if isinstance(event, messages.Message) and event.type == "credit":
                    self.credit.grant(event["bytes"])
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
