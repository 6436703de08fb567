"""One side's preparation of a negotiation round, the same for the first link and for
every re-punch: punch listeners, candidates, a fresh static keypair; then, once the
peer's offer or answer is in, the keys and prologue the handshakes use."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Container, Sequence
from dataclasses import dataclass

import trio

from holepunch_mig.errors import HandshakeError
from holepunch_mig.net.gather import Gathered, gather
from holepunch_mig.net.portmap import delete_mapping, request_mapping
from holepunch_mig.net.punch import open_listener
from holepunch_mig.report import Report
from holepunch_mig.session.handshake import prologue
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.wire.birthday import NatClass
from holepunch_mig.wire.candidates import (
    Candidate,
    dedupe_and_sort,
    is_loopback_address,
    make_candidate,
    observed_candidates,
)
from holepunch_mig.wire.endpoints import format_endpoint
from holepunch_mig.wire.noise import generate_keypair
from holepunch_mig.wire.portmap import PortMapError, PortMapping

Listeners = dict[int, trio.socket.SocketType]

#: Seconds a router port mapping is asked for; it is deleted as soon as the punch port
#: closes, the lifetime only bounds what a crashed process leaves behind.
MAPPING_LIFETIME = 300

logger = logging.getLogger("holepunch_mig")


@dataclass(frozen=True)
class PeerKeys:
    """What every Noise handshake of the round needs: our static key, the peer's, and
    the prologue over both sides' exact messages."""

    static_private: bytes
    remote_public: bytes
    prologue: bytes


@dataclass(frozen=True)
class Prepared:
    """This side's half of a round, ready to be announced in an offer or answer."""

    options: ConnectOptions
    listeners: Listeners
    port: int
    local: list[Candidate]
    notes: list[str]
    static_private: bytes
    static_public: bytes
    seconds: float = 0.0
    """How long the preparation took (listeners, STUN): part of the time to link."""
    nat: NatClass = "unknown"
    """This side's NAT as its STUN answers show it (birthday punching needs it)."""
    mapping_protocol: str | None = None
    """How the router mapped the punch port ("pcp", "nat-pmp", "upnp-igd"), or None."""

    @property
    def lines(self) -> list[str]:
        """The local candidates as announced on the wire."""
        return [c.to_line() for c in self.local]

    def bind_host(self, family: int) -> str:
        return choose_bind(self.options, family)

    def keys_for(
        self, peer_key: str, session_id: bytes, offer: bytes, answer: bytes, binding: bytes = b""
    ) -> PeerKeys:
        """The peer's announced key (hex) with the prologue (ending with the control
        session's ``binding``); our own key back is refused."""
        remote_public = bytes.fromhex(peer_key)
        if remote_public == self.static_public:
            raise HandshakeError("peer announced our own public key")
        return PeerKeys(
            self.static_private, remote_public, prologue(session_id, offer, answer, binding)
        )

    def remotes(
        self, lines: Sequence[str], peer_host: str | None, peer_port: int, report: Report
    ) -> list[tuple[str, int]]:
        """The peer's endpoints this side can dial (see :func:`remote_endpoints`)."""
        return remote_endpoints(
            lines,
            peer_host,
            peer_port,
            report,
            self.listeners,
            allow_loopback=self.options.include_loopback,
        )


async def prepare_round(
    options: ConnectOptions,
    peer_host: str | None,
    listeners: Listeners,
    *,
    skip_gather: str | None = None,
    mappings: list[PortMapping] | None = None,
    label: str = "",
) -> Prepared:
    """Open the punch listeners into ``listeners`` (the caller closes them), gather the
    candidates (none when ``skip_gather`` says why not), ask the gateway for a port
    mapping of the punch port (into ``mappings``; the caller deletes them with
    :func:`release`; UPnP-IGD names it "holepunch_mig ``label``", the session id's
    prefix where known) and make a fresh keypair."""
    began = trio.current_time()
    port = await open_listeners(options, listeners)
    include_loopback = options.include_loopback
    if include_loopback is None:
        include_loopback = is_loopback(peer_host)
    if skip_gather is not None:
        local: list[Candidate] = []
        notes = [skip_gather]
        nat: NatClass = "unknown"
        mapping_protocol: str | None = None
    else:
        mapping_protocol = None
        gathered: list[Gathered] = []
        mapped: list[PortMapping | str] = []
        want_mapping = mappings is not None and (
            options.port_mapping == "on" or (options.port_mapping == "auto" and options.stun)
        )

        async def do_gather() -> None:
            gathered.append(
                await gather(
                    port,
                    stun_servers=options.stun,
                    given=options.candidates,
                    include_loopback=include_loopback,
                    ipv6=socket.AF_INET6 in listeners,
                    stun_timeout=options.stun_timeout,
                )
            )

        async def do_map() -> None:
            try:
                mapped.append(
                    await request_mapping(
                        port,
                        MAPPING_LIFETIME,
                        timeout=options.port_mapping_timeout,
                        description=f"holepunch_mig {label}".strip(),
                    )
                )
            except PortMapError as exc:
                mapped.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_gather)
            if want_mapping:
                nursery.start_soon(do_map)
        local, notes, nat = gathered[0]
        for result in mapped:
            if isinstance(result, str):
                notes.append(f"no router port mapping: {result}")
                continue
            assert mappings is not None
            mappings.append(result)
            where = format_endpoint(result.external_ip, result.external_port)
            notes.append(
                f"router port mapping ({result.protocol}): {where} -> punch port {port} "
                f"for {result.lifetime} s"
            )
            local = dedupe_and_sort(
                [*local, make_candidate(result.external_ip, result.external_port, "given")]
            )
            nat = "mapped"
            mapping_protocol = result.protocol
    static_private, static_public = generate_keypair()
    return Prepared(
        options,
        listeners,
        port,
        local,
        notes,
        static_private,
        static_public,
        trio.current_time() - began,
        nat,
        mapping_protocol,
    )


async def release(listeners: Listeners, mappings: Sequence[PortMapping]) -> None:
    """Close the punch listeners and delete the router mappings of their port (shielded:
    this runs on the way out, also when cancelled).  Links already set up through a
    mapping keep working: the router's connection tracking holds them."""
    for sock in listeners.values():
        sock.close()
    for mapping in mappings:
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await delete_mapping(mapping)
            except PortMapError as exc:
                logger.warning(
                    "could not delete the %s mapping of port %d: %s",
                    mapping.protocol,
                    mapping.internal_port,
                    exc,
                )
            else:
                logger.info(
                    "deleted the %s mapping of port %d", mapping.protocol, mapping.internal_port
                )


def choose_bind(options: ConnectOptions, family: int) -> str:
    if options.bind_host:
        return options.bind_host
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def is_loopback(host: str | None) -> bool:
    return host is not None and is_loopback_address(host)


async def open_listeners(options: ConnectOptions, listeners: Listeners) -> int:
    """Bind the punch port for every usable family into ``listeners``; return the port."""
    families = [socket.AF_INET]
    if (
        options.ipv6
        and socket.has_ipv6
        and not (options.bind_host and ":" not in options.bind_host)
    ):
        families.append(socket.AF_INET6)
    if options.bind_host and ":" in options.bind_host:
        families = [socket.AF_INET6]
    first = await open_listener(choose_bind(options, families[0]), options.port, families[0])
    listeners[families[0]] = first
    port = int(first.getsockname()[1])
    for fam in families[1:]:
        # no IPv6 on this host, or the port is taken there: go on with IPv4
        with contextlib.suppress(OSError):
            listeners[fam] = await open_listener(choose_bind(options, fam), port, fam)
    return port


MAX_DIALS_PER_ROUND = 16
"""Remote endpoints one side dials in one round (the observed one first, then the
announced ones by priority); the rest are noted in the report and not dialled."""


def remote_endpoints(
    lines: Sequence[str],
    peer_host: str | None,
    peer_port: int,
    report: Report,
    families: Container[int],
    *,
    allow_loopback: bool | None = None,
    limit: int = MAX_DIALS_PER_ROUND,
) -> list[tuple[str, int]]:
    """The peer's endpoints to dial: the observed one plus its candidates by priority,
    deduplicated, of the address families this side has a listener for, at most
    ``limit``.  Bad lines are noted in the report and skipped, and so are loopback ones
    unless ``allow_loopback`` (default: the control peer itself is on loopback) -- a
    peer elsewhere has no business making this host dial its own services."""
    if allow_loopback is None:
        allow_loopback = is_loopback(peer_host)
    out: list[tuple[str, int]] = []
    cands: list[Candidate] = []
    for line in lines:
        try:
            cand = Candidate.from_line(line)
        except Exception as exc:
            report.notes.append(f"ignored remote candidate {line[:80]!r}: {exc}")
            continue
        if not allow_loopback and is_loopback_address(cand.host):
            report.notes.append(
                f"ignored remote candidate {line[:80]!r}: loopback, and the control peer "
                "is not on loopback"
            )
            continue
        cands.append(cand)
    cands.sort(key=lambda c: -c.priority)
    announced = {(c.host, c.port) for c in cands}
    observed = observed_candidates(peer_host, [peer_port])
    for cand in observed:
        if (cand.host, cand.port) not in announced:
            # the report lists every remote candidate dialled, the observed one too (it
            # is often the one nominated)
            report.remote_candidates.append(cand.to_line())
    cands[:0] = observed
    dropped = 0
    for cand in cands:
        endpoint = (cand.host, cand.port)
        family = socket.AF_INET6 if ":" in cand.host else socket.AF_INET
        if endpoint in out or family not in families:
            continue
        if len(out) >= limit:
            dropped += 1
            continue
        out.append(endpoint)
    if dropped:
        report.notes.append(
            f"dialling {limit} remote candidates per round; {dropped} more not dialled"
        )
    return out
