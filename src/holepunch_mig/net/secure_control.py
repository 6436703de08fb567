"""The authenticated control channel: the control handshake (``wire.control_auth``) run
over any :class:`~holepunch_mig.net.control.ControlChannel`, then every message sealed.

* :func:`secure` runs the handshake over a channel that exists (SSH stdio, a caller's
  socket) and returns a :class:`SecureChannel`;
* :func:`connect_authenticated` dials a TCP control port and retries, within its wait,
  when the listener closes on it before answering (a full listener, a restart);
* :func:`accept_authenticated` keeps the control port open until a peer completes the
  handshake: every connection gets a short deadline, at most ``max_pending`` (and
  ``per_source`` per address) handshakes run at once, and every connection that fails
  or is dropped is counted, logged and noted, so a stranger, a squatter's probe or a
  flood of silent connections cannot take the session's place.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass, field
from typing import Final

import trio

from holepunch_mig.errors import (
    ChannelClosed,
    ControlAuthError,
    ControlRejected,
    ControlTimeout,
    HolepunchError,
    PairingFailed,
    ProtocolError,
)
from holepunch_mig.net.control import ControlChannel, StreamChannel, open_tcp_channel
from holepunch_mig.wire.control_auth import (
    MAX_HANDSHAKE_FRAME,
    ControlAuth,
    ControlHandshake,
    ControlSession,
    PairingCode,
    Sealer,
    Unsealer,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "AcceptStats",
    "SecureChannel",
    "accept_authenticated",
    "connect_authenticated",
    "secure",
]

logger = logging.getLogger("holepunch_mig")

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_PENDING = 16
DEFAULT_PER_SOURCE = 4
SEALED_SEND_TIMEOUT = 30.0
MAX_DISTINCT_REASONS = 32
V4_PREFIX, V6_PREFIX = 24, 64
"""Pending handshakes are counted per network prefix, not per address: one host holds
many addresses of its /64 (or of 127/8)."""


@dataclass(eq=False)
class Pending:
    """A connection inside its control handshake, as the eviction rule sees it."""

    prefix: str
    started: float
    received: int = 0
    """Frames received from it so far: a real peer sends its first at once."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def source_prefix(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = V4_PREFIX if ip.version == 4 else V6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def choose_eviction(
    pending: list[Pending], newcomer_prefix: str, max_pending: int, per_prefix: int
) -> Pending | None:
    """Which pending handshake to drop so a new connection can start (None: room left).

    A full listener never refuses the newcomer (that let silent squatters keep the real
    peer out for as long as they reconnected); it drops the connection that has shown
    the least: fewest frames received, then from the most crowded prefix, then oldest.
    Over the per-prefix limit the victim comes from the newcomer's own prefix."""
    same = [p for p in pending if p.prefix == newcomer_prefix]
    if len(same) >= per_prefix:
        pool = same
    elif len(pending) >= max_pending:
        pool = pending
    else:
        return None
    crowd = collections.Counter(p.prefix for p in pending)
    return min(pool, key=lambda p: (p.received, -crowd[p.prefix], p.started))


class SecureChannel:
    """A control channel after the control handshake: messages sealed both ways, the
    authenticated peer in :attr:`session`, its handshake hash as :attr:`binding`."""

    def __init__(
        self,
        inner: ControlChannel,
        session: ControlSession,
        sealer: Sealer,
        unsealer: Unsealer,
        notes: list[str] | None = None,
        handshake_seconds: float | None = None,
    ) -> None:
        self.inner = inner
        self.handshake_seconds = handshake_seconds
        """How long the control handshake took on this side (for the report)."""
        self.session = session
        self.peer_host = inner.peer_host
        self.notes = notes or []
        """What the listener saw before the peer arrived (drops, failures), for reports."""
        self._sealer = sealer
        self._unsealer = unsealer
        self._send_lock = trio.Lock()
        self._send_broken: str | None = None

    @property
    def binding(self) -> bytes:
        """The control handshake hash: every per-link prologue ends with it."""
        return self.session.handshake_hash

    async def send_message(self, message: bytes) -> None:
        """Seal and send.  Once sealed, a message goes out whole even if the caller is
        cancelled meanwhile (the cancellation is delivered after it): a sealed message
        that never left would leave a hole in the sequence numbers, and the peer would
        refuse everything after it.  A send that cannot finish within
        :data:`SEALED_SEND_TIMEOUT` seconds breaks the channel."""
        async with self._send_lock:  # the sequence number is the order on the wire
            if self._send_broken is not None:
                raise ChannelClosed(f"control channel broke while sending: {self._send_broken}")
            frame = self._sealer.seal(message)
            # Once sealed, the frame must reach the wire even if this task is cancelled
            # (a racing task's nursery): a skipped sequence number would fail every later
            # message.  The shield is bounded so a stalled peer cannot hold it forever;
            # a send that failed or timed out may have left part of a frame, so the
            # channel's send side is broken from then on.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(SEALED_SEND_TIMEOUT):
                        await self.inner.send_message(frame)
                except trio.TooSlowError:
                    self._send_broken = (
                        f"a sealed message could not be written within {SEALED_SEND_TIMEOUT:.0f} s"
                    )
                    raise ChannelClosed(f"control channel stalled: {self._send_broken}") from None
                except BaseException as exc:
                    self._send_broken = f"a sealed message was not sent ({type(exc).__name__})"
                    raise
        await trio.lowlevel.checkpoint()  # a cancellation that came meanwhile lands here

    async def receive_message(self) -> bytes:
        return self._unsealer.open(await self.inner.receive_message())

    async def aclose(self) -> None:
        await self.inner.aclose()


async def secure(
    inner: ControlChannel,
    auth: ControlAuth,
    *,
    initiator: bool,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> SecureChannel:
    """Run the control handshake over ``inner`` (the source initiates).  On failure the
    peer is told why when there is something to tell, and the error is raised; the
    caller closes ``inner``."""
    started = trio.current_time()
    hs = ControlHandshake(auth, initiator, now=started)
    try:
        with trio.fail_after(timeout):
            if initiator:
                await inner.send_message(hs.start())
                reply = hs.receive(await inner.receive_message())
                assert reply is not None
                await inner.send_message(reply)
            else:
                reply = hs.receive(await inner.receive_message())
                assert reply is not None
                await inner.send_message(reply)
                hs.now = trio.current_time()
                hs.receive(await inner.receive_message())
    except trio.TooSlowError:
        raise ControlTimeout(
            f"the control handshake did not complete within {timeout:g} s"
        ) from None
    except (ControlAuthError, ProtocolError):
        if hs.reject is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(HolepunchError),
            ):
                await inner.send_message(hs.reject)
        raise
    assert hs.session is not None and hs.sealer is not None and hs.unsealer is not None
    logger.info("control channel authenticated: %s", hs.session.peer)
    return SecureChannel(
        inner, hs.session, hs.sealer, hs.unsealer, handshake_seconds=trio.current_time() - started
    )


async def connect_authenticated(
    host: str,
    port: int,
    auth: ControlAuth,
    *,
    wait: float = 0.0,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> SecureChannel:
    """Dial ``host:port`` and authenticate; within ``wait`` seconds, retry refused
    connections and listeners that closed before their handshake reply."""
    deadline = trio.current_time() + wait
    while True:
        # one deadline for everything: a connect whose SYNs are dropped is cut off at it
        # (open_tcp_channel says why, and hints at what to check)
        inner = await open_tcp_channel(host, port, wait=max(deadline - trio.current_time(), 0))
        try:
            return await secure(inner, auth, initiator=True, timeout=handshake_timeout)
        except ChannelClosed as exc:
            await inner.aclose()
            if trio.current_time() + 0.1 >= deadline:
                raise ChannelClosed(
                    f"the control port {host}:{port} closed the connection during the "
                    f"control handshake: {exc}"
                ) from None
            await trio.sleep(0.1)
        except BaseException:
            await inner.aclose()
            raise


LOGGED_REFUSALS: Final = 10
"""Refusals logged as warnings one by one; after them only every hundredth."""


@dataclass
class AcceptStats:
    """What the listener did with connections that were not the session."""

    dropped: int = 0
    """Evicted to make room: too many handshakes pending (overall or from one prefix)."""
    failed: int = 0
    """Closed after a failed or timed-out handshake."""
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def count(self, reason: str) -> None:
        """Count a refusal; distinct reasons are capped (an unknown key's text differs
        per stranger), the rest are counted together."""
        if reason not in self.reasons and len(self.reasons) >= MAX_DISTINCT_REASONS:
            reason = "other reasons"
        self.reasons[reason] += 1

    def notes(self) -> list[str]:
        out = []
        if self.dropped:
            out.append(
                f"control listener dropped {self.dropped} pending connection(s) "
                f"to make room (pending limit)"
            )
        for reason, count in self.reasons.most_common(8):
            out.append(f"control listener refused {count} connection(s): {reason}")
        return out


async def accept_authenticated(
    host: str,
    port: int,
    auth: ControlAuth,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_pending: int = DEFAULT_MAX_PENDING,
    per_source: int = DEFAULT_PER_SOURCE,
    listener: trio.socket.SocketType | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> SecureChannel:
    """Listen on ``host:port`` until one peer completes the control handshake; return
    its channel.  ``task_status.started`` gets the bound port.  A pairing code's expiry
    or its used-up failure budget ends the wait with :class:`PairingFailed`."""
    bound = listener is not None
    if listener is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = trio.socket.socket(family, socket.SOCK_STREAM)
    stats = AcceptStats()
    pending: list[Pending] = []
    won: list[SecureChannel] = []
    fatal: list[HolepunchError] = []
    code = auth.code if isinstance(auth.code, PairingCode) else None

    async def attempt(
        sock: trio.socket.SocketType, source: str, entry: Pending, scope: trio.CancelScope
    ) -> None:
        inner = _Counting(StreamChannel(trio.SocketStream(sock)), entry)
        keep = False
        try:
            with entry.scope:
                channel = await secure(inner, auth, initiator=False, timeout=handshake_timeout)
                inner.authenticated()
                if not won:
                    won.append(channel)
                    keep = True
                    scope.cancel()
        except (HolepunchError, OSError) as exc:
            stats.failed += 1
            reason = _reason(exc)
            stats.count(reason)
            if stats.failed <= LOGGED_REFUSALS or stats.failed % 100 == 0:
                # the first few, then every hundredth: a flood of strangers cannot flood
                # the log (the report's notes count them all)
                logger.warning(
                    "control listener: refused %s: %s (%d refused so far)",
                    source,
                    reason,
                    stats.failed,
                )
            else:
                logger.debug("control listener: refused %s: %s", source, reason)
            if code is not None and isinstance(exc, PairingFailed):
                try:
                    code.check_usable(trio.current_time())
                except PairingFailed as over:
                    if code.failures >= code.attempts:
                        fatal.append(over)
                        scope.cancel()
        finally:
            if entry in pending:  # else evicted: already taken out
                pending.remove(entry)
            if not keep:
                with trio.CancelScope(shield=True):
                    await inner.aclose()

    with listener:
        if not bound:  # else the caller bound it (to fail on a busy port before waiting)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind((host, port))
        listener.listen(64)
        task_status.started(int(listener.getsockname()[1]))
        until = code.expires if code is not None else math.inf
        with trio.move_on_at(until):
            async with trio.open_nursery() as nursery:
                while True:
                    sock, addr = await listener.accept()
                    source = str(addr[0]) if isinstance(addr, tuple) else "?"
                    entry = Pending(source_prefix(source), trio.current_time())
                    victim = choose_eviction(pending, entry.prefix, max_pending, per_source)
                    if victim is not None:
                        stats.dropped += 1
                        pending.remove(victim)  # its task closes it when cancelled
                        victim.scope.cancel()
                        if stats.dropped == 1 or stats.dropped % 100 == 0:
                            logger.warning(
                                "control listener: pending limit reached, dropped %d "
                                "connection(s) that showed the least so far",
                                stats.dropped,
                            )
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending.append(entry)
                    nursery.start_soon(attempt, sock, source, entry, nursery.cancel_scope)
    if won:
        won[0].notes.extend(stats.notes())
        return won[0]
    if fatal:
        raise fatal[0]
    raise PairingFailed(
        "the pairing code expired before a peer used it; start a new pairing for a new code"
    )


class _Counting:
    """A control channel that tells its Pending entry each frame received and, until
    :meth:`authenticated`, refuses any frame longer than a handshake frame as soon as its
    length arrives (a stranger cannot make the listener hold a maximal frame)."""

    def __init__(self, inner: StreamChannel, entry: Pending) -> None:
        self.inner = inner
        self.entry = entry
        self.peer_host = inner.peer_host
        self._limit: int | None = MAX_HANDSHAKE_FRAME

    def authenticated(self) -> None:
        self._limit = None

    async def send_message(self, message: bytes) -> None:
        await self.inner.send_message(message)

    async def receive_message(self) -> bytes:
        frame = await self.inner.receive_message(limit=self._limit)
        self.entry.received += 1
        return frame

    async def aclose(self) -> None:
        await self.inner.aclose()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ControlTimeout):
        return "no control handshake within the deadline"
    if isinstance(exc, ChannelClosed):
        return "closed before completing the control handshake"
    if isinstance(exc, ControlRejected):
        return "the peer gave up the handshake"
    return str(exc)[:200] or "handshake failed"
