"""Simultaneous open: one local port that listens and dials every remote candidate at once.

Every connection that comes up on the port, whichever socket ends up holding it, is
handed to an authenticator (the Noise handshake); only authenticated links leave this
module.  What each pair did is recorded for the report.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import trio

from holepunch_mig.errors import HandshakeError, HolepunchError
from holepunch_mig.report import HardNatReport, Outcome, PairReport
from holepunch_mig.wire.endpoints import format_endpoint, unmap_ipv4

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class PunchTiming:
    """Deadlines for one round; defaults measured in the lab (docs/dev/lab-notes.md)."""

    connect_timeout: float = 5.0
    """How long one connect() stays open: the kernel retransmits the same SYN meanwhile,
    which conntrack needs (close-and-rebind makes it mark packets INVALID)."""
    round_timeout: float = 6.0
    handshake_timeout: float = 3.0
    refused_retry_delay: float = 0.25
    """Wait before dialing again after an RST (the peer's SYN may not have left yet)."""


@dataclass
class AuthenticatedLink:
    """A connected, authenticated candidate link (still a trio stream)."""

    stream: trio.SocketStream
    link_id: int
    send_key: bytes
    recv_key: bytes
    local: str
    remote: str
    pair: PairReport
    handshake_hash: bytes = b""
    """The Noise handshake hash h: the same on both ends of this link and on no other
    (the nomination names it).  Not secret, but never logged."""


@dataclass
class BirthdayDial:
    """This side's birthday dialing in one round (a :class:`wire.birthday.BirthdayPlan`
    made concrete): the hard side opens one socket per entry of ``remotes`` (the easy
    side's endpoints, repeated), each from its own ephemeral port, held for the round;
    the easy side dials every entry (the hard side's address, a guessed port) from the
    punch port, each held ``hold`` seconds, at most ``max_open`` at once.  Both start at
    most ``rate`` SYNs per second and stop starting new ones after ``seconds``."""

    role: Literal["hard", "easy"]
    remotes: list[Endpoint]
    rate: int
    seconds: float
    report: HardNatReport
    start_delay: float = 0.0
    hold: float = 1.5
    max_open: int = 512


MAX_ANY_PORT_INBOUND = 64
"""Per round, inbound connections taken from unannounced ports of an endpoint-dependent
peer's public address (each costs a handshake); the rest are rejected like strangers."""

MAX_UNOFFERED_HOSTS = 16
"""Report entries for connections from unoffered hosts, per round; the rest are counted."""

Authenticator = Callable[[trio.SocketStream, int], Awaitable[tuple[int, bytes, bytes, bytes]]]
"""(stream, proposed link id) -> (link id, send key, recv key, handshake hash); raises
on failure."""


def _reuse(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


async def open_listener(bind_host: str, port: int, family: int) -> trio.socket.SocketType:
    """Bind the punch port (reusable, so dialing sockets can share it) and listen."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        _reuse(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((bind_host, port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _classify(exc: OSError) -> tuple[Outcome, str]:
    code = exc.errno
    if isinstance(exc, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "refused", "RST seen"
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable", exc.strerror or "unreachable"
    if code == errno.EADDRNOTAVAIL:
        return "crossed", "the peer's own connection already holds this address pair"
    if code == errno.ETIMEDOUT:
        return "timed out", "kernel gave up retransmitting SYN"
    return "error", f"{type(exc).__name__}: {exc.strerror or exc}"


class PunchRound:
    """One round of the race: accept on the listener, dial every remote at once."""

    def __init__(
        self,
        *,
        round_no: int,
        listeners: dict[int, trio.socket.SocketType],
        bind_host: dict[int, str],
        port: int,
        remotes: Sequence[Endpoint],
        authenticate: Authenticator,
        timing: PunchTiming,
        log: logging.LoggerAdapter[logging.Logger],
        first_link_id: int = 1,
        dial_delay: float = 0.0,
        birthday: BirthdayDial | None = None,
        accept_hosts: frozenset[str] = frozenset(),
        dial: bool = True,
    ) -> None:
        """``accept_hosts``: inbound connections from these addresses are taken from any
        port, not only the offered ones (a peer behind an endpoint-dependent NAT: its
        router picks the source port); they are authenticated like every other.
        ``dial=False``: only accept (this side holds a router port mapping and the peer
        dials it; our own SYNs from the punch port would take the 4-tuple the router's
        DNAT needs)."""
        self.round_no = round_no
        self.listeners = listeners
        self.bind_host = bind_host
        self.port = port
        self.remotes = list(remotes)
        self.offered = {(unmap_ipv4(h), p) for h, p in remotes}
        self.authenticate = authenticate
        self.timing = timing
        self.log = log
        self.pairs: list[PairReport] = []
        self._next_link_id = first_link_id
        self._unoffered: dict[str, PairReport] = {}
        self._unoffered_counts: dict[str, int] = {}
        self.dial_delay = dial_delay
        self.birthday = birthday
        self._accept_hosts = accept_hosts
        self._birthday_open = 0
        self._any_port_inbound = 0
        self.dial = dial

    def _new_link_id(self) -> int:
        link_id = self._next_link_id
        self._next_link_id += 1
        return link_id

    async def run(self, out: trio.MemorySendChannel[AuthenticatedLink]) -> None:
        """Race until cancelled; every authenticated link is sent to ``out``."""
        async with out, trio.open_nursery() as nursery:
            for listener in self.listeners.values():
                nursery.start_soon(self._accept_loop, listener, out.clone())
            for remote in self.remotes if self.dial else ():
                family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
                if family in self.listeners:
                    nursery.start_soon(self._dial, remote, family, out.clone())
            if self.birthday is not None and socket.AF_INET in self.listeners:
                nursery.start_soon(self._birthday, self.birthday, out.clone())

    async def _accept_loop(
        self, listener: trio.socket.SocketType, out: trio.MemorySendChannel[AuthenticatedLink]
    ) -> None:
        async with out, trio.open_nursery() as nursery:
            while True:
                try:
                    sock, addr = await listener.accept()
                except OSError as exc:  # EMFILE under a flood, ECONNABORTED: keep going
                    self.log.warning("accept on the punch port failed: %s", exc)
                    await trio.sleep(0.05)
                    continue
                peer = (unmap_ipv4(addr[0]), int(addr[1]))
                if peer not in self.offered:
                    # from any port of an endpoint-dependent peer's address: at most
                    # MAX_ANY_PORT_INBOUND per round (others behind that NAT, a flood)
                    if (
                        peer[0] not in self._accept_hosts
                        or self._any_port_inbound >= MAX_ANY_PORT_INBOUND
                    ):
                        self._reject_unoffered(sock, peer)
                        continue
                    self._any_port_inbound += 1
                pair = PairReport(
                    self.round_no,
                    format_endpoint(*_local(sock)),
                    format_endpoint(*peer),
                    "abandoned",
                    direction="inbound",
                )
                self.pairs.append(pair)
                nursery.start_soon(self._authenticate, sock, pair, trio.current_time(), out.clone())

    def _reject_unoffered(self, sock: trio.socket.SocketType, peer: Endpoint) -> None:
        """Close at once; one report entry per source host (a count in its detail), at
        most MAX_UNOFFERED_HOSTS of them, so a flood cannot grow the report."""
        local = format_endpoint(*_local(sock))
        sock.close()
        host = peer[0]
        pair = self._unoffered.get(host)
        if pair is None:
            if len(self._unoffered) >= MAX_UNOFFERED_HOSTS:
                host = "*"
                pair = self._unoffered.get(host)
            if pair is None:
                remote = format_endpoint(*peer) if host != "*" else "other hosts"
                pair = PairReport(self.round_no, local, remote, "rejected", direction="inbound")
                self._unoffered[host] = pair
                self.pairs.append(pair)
                self.log.info("closing inbound connection from unoffered %s", pair.remote)
        count = self._unoffered_counts.get(host, 0) + 1
        self._unoffered_counts[host] = count
        pair.detail = "source address was not offered" + (
            f" ({count} connections)" if count > 1 else ""
        )

    async def _dial(
        self, remote: Endpoint, family: int, out: trio.MemorySendChannel[AuthenticatedLink]
    ) -> None:
        async with out:
            if self.dial_delay:
                await trio.sleep(self.dial_delay)
            started = trio.current_time()
            deadline = started + self.timing.round_timeout
            pair = PairReport(
                self.round_no,
                format_endpoint(self.bind_host[family], self.port),
                format_endpoint(*remote),
                "abandoned",
            )
            self.pairs.append(pair)
            attempts = 0
            while True:
                attempts += 1
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
                try:
                    _reuse(sock)
                    await sock.bind((self.bind_host[family], self.port))
                    pair.local = format_endpoint(*_local(sock))
                    budget = min(self.timing.connect_timeout, deadline - trio.current_time())
                    with trio.fail_after(max(budget, 0.01)):
                        await sock.connect(remote)
                    pair.local = format_endpoint(*_local(sock))
                except trio.TooSlowError:
                    sock.close()
                    pair.local = _route_local(family, remote, self.port, pair.local)
                    pair.outcome = "timed out"
                    pair.detail = f"no SYN-ACK within {budget:.1f} s (attempt {attempts})"
                    pair.seconds = trio.current_time() - started
                    return
                except OSError as exc:
                    sock.close()
                    pair.local = _route_local(family, remote, self.port, pair.local)
                    pair.outcome, pair.detail = _classify(exc)
                    pair.detail += f" (attempt {attempts})"
                    pair.seconds = trio.current_time() - started
                    wait = self.timing.refused_retry_delay
                    if pair.outcome != "refused" or trio.current_time() + wait >= deadline:
                        # "crossed" is success seen from the other socket: no retry
                        return
                    await trio.sleep(wait)
                    continue
                except BaseException:
                    sock.close()
                    raise
                break
            try:
                if _local(sock) == (unmap_ipv4(remote[0]), remote[1]):
                    pair.outcome, pair.detail = "rejected", "self-connect"
                    sock.close()
                    return
            except BaseException:
                sock.close()
                raise
            await self._authenticate(sock, pair, started, out)

    async def _birthday(
        self, plan: BirthdayDial, out: trio.MemorySendChannel[AuthenticatedLink]
    ) -> None:
        """Start the birthday dials at the rate limit, within the time budget."""
        rep = plan.report
        async with out, trio.open_nursery() as nursery:
            if plan.start_delay:
                await trio.sleep(plan.start_delay)
            started = trio.current_time()
            earlier = rep.seconds  # a report shared by the session's birthday rounds
            stop = started + plan.seconds
            open_slots = trio.Semaphore(plan.max_open)
            hold = plan.hold if plan.role == "easy" else self.timing.round_timeout
            bind_port = self.port if plan.role == "easy" else 0
            for i, remote in enumerate(plan.remotes):
                now = trio.current_time()
                if now >= stop:
                    break
                await trio.sleep_until(started + i / plan.rate)
                await open_slots.acquire()
                rep.spent_syns += 1
                rep.seconds = earlier + trio.current_time() - started
                nursery.start_soon(
                    self._birthday_dial, remote, bind_port, hold, rep, open_slots, out.clone()
                )

    async def _birthday_dial(
        self,
        remote: Endpoint,
        bind_port: int,
        hold: float,
        rep: HardNatReport,
        open_slots: trio.Semaphore,
        out: trio.MemorySendChannel[AuthenticatedLink],
    ) -> None:
        """One birthday SYN; only a connection that comes up gets a report entry (a
        budget of thousands of misses would drown the report: they are counted)."""
        async with out:
            started = trio.current_time()
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._birthday_open += 1
            rep.spent_sockets = max(rep.spent_sockets, self._birthday_open)
            try:
                if bind_port:
                    _reuse(sock)
                await sock.bind((self.bind_host[socket.AF_INET], bind_port))
                with trio.move_on_after(hold) as scope:
                    await sock.connect(remote)
                if scope.cancelled_caught:
                    sock.close()
                    return
                local = _local(sock)
            except OSError as exc:
                sock.close()
                if _classify(exc)[0] == "refused":
                    rep.refused += 1
                else:
                    rep.errors += 1
                return
            except BaseException:
                sock.close()
                raise
            finally:
                self._birthday_open -= 1
                open_slots.release()
            if local == (unmap_ipv4(remote[0]), remote[1]):
                sock.close()
                return
            rep.hits += 1
            pair = PairReport(
                self.round_no,
                format_endpoint(*local),
                format_endpoint(*remote),
                "abandoned",
                detail=f"birthday ({rep.role} side)",
            )
            self.pairs.append(pair)
            await self._authenticate(sock, pair, started, out)

    async def _authenticate(
        self,
        sock: trio.socket.SocketType,
        pair: PairReport,
        started: float,
        out: trio.MemorySendChannel[AuthenticatedLink],
    ) -> None:
        try:
            stream = trio.SocketStream(sock)
            with trio.fail_after(self.timing.handshake_timeout):
                link_id, send_key, recv_key, hhash = await self.authenticate(
                    stream, self._new_link_id()
                )
        except (trio.TooSlowError, HolepunchError, trio.BrokenResourceError, OSError) as exc:
            self._rejected(sock, pair, started, exc)
            return
        except BaseException:  # cancelled or a bug: close now, not in the GC
            sock.close()
            raise
        pair.outcome, pair.detail = "connected", ""
        pair.seconds = trio.current_time() - started
        link = AuthenticatedLink(
            stream, link_id, send_key, recv_key, pair.local, pair.remote, pair, hhash
        )
        try:
            await out.send(link)
        except BaseException as exc:
            pair.outcome = "abandoned"
            sock.close()
            if not isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                raise

    def _rejected(
        self, sock: trio.socket.SocketType, pair: PairReport, started: float, exc: Exception
    ) -> None:
        if isinstance(exc, trio.TooSlowError):
            pair.outcome, pair.detail = "rejected", "handshake timed out"
        else:
            detail = str(exc) if isinstance(exc, HandshakeError) else type(exc).__name__
            pair.outcome, pair.detail = "rejected", f"handshake failed: {detail}"
        pair.seconds = trio.current_time() - started
        self.log.info("pair %s -> %s rejected: %s", pair.local, pair.remote, pair.detail)
        sock.close()


def _route_local(family: int, remote: Endpoint, port: int, current: str) -> str:
    """The local end of a pair that never connected, as the routing table would have
    chosen it, instead of the wildcard the socket was bound to (``0.0.0.0:P`` reads as
    if something were wrong with the address); ``*:P`` when there is no route at all.
    A UDP connect only asks the kernel for the route: no packet is sent."""
    host = current.rpartition(":")[0].strip("[]")
    if host not in ("0.0.0.0", "::"):
        return current
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(remote)
            return format_endpoint(unmap_ipv4(probe.getsockname()[0]), port)
    except OSError:
        return f"*:{port}"


def _local(sock: trio.socket.SocketType) -> Endpoint:
    name = sock.getsockname()
    return unmap_ipv4(name[0]), int(name[1])
