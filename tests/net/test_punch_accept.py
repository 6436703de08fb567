"""The punch port's acceptance rule for a peer behind an endpoint-dependent NAT: any
source port of its public address is taken, up to a cap per round; strangers never."""

from __future__ import annotations

import logging
import re
import socket

import trio

from holepunch_mig.errors import HandshakeError
from holepunch_mig.net.punch import (
    MAX_ANY_PORT_INBOUND,
    AuthenticatedLink,
    PunchRound,
    PunchTiming,
    open_listener,
)

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


def _rejected(punch: PunchRound) -> int:
    """Connections the round closed unauthenticated, from its report entries."""
    total = 0
    for pair in punch.pairs:
        if pair.outcome == "rejected" and "not offered" in pair.detail:
            count = re.search(r"\((\d+) connections\)", pair.detail)
            total += int(count.group(1)) if count else 1
    return total


async def _flood(accept_hosts: frozenset[str], count: int) -> tuple[list[str], int]:
    """Connect ``count`` times from 127.0.0.1 (never offered) to a round's listener;
    (outcome of every report entry, handshakes attempted)."""
    listener = await open_listener("127.0.0.1", 0, socket.AF_INET)
    port = listener.getsockname()[1]
    handshakes = 0

    async def authenticate(stream: trio.SocketStream, link: int) -> tuple[int, bytes, bytes]:
        nonlocal handshakes
        handshakes += 1
        raise HandshakeError("not the peer")

    punch = PunchRound(
        round_no=1,
        listeners={socket.AF_INET: listener},
        bind_host={socket.AF_INET: "127.0.0.1"},
        port=port,
        remotes=[("127.0.0.1", 9)],  # the only offered endpoint: port 9
        authenticate=authenticate,
        timing=PunchTiming(connect_timeout=0.5, round_timeout=1.0),
        log=LOG,
        accept_hosts=accept_hosts,
    )
    send, receive = trio.open_memory_channel[AuthenticatedLink](8)
    clients = []
    with listener, receive:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(punch.run, send)
            for _ in range(count):
                c = trio.socket.socket()
                await c.connect(("127.0.0.1", port))
                clients.append(c)
            with trio.fail_after(5):
                while handshakes + _rejected(punch) < count:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for c in clients:
        c.close()
    return [p.outcome + ":" + p.detail for p in punch.pairs if p.direction == "inbound"], (
        handshakes
    )


def test_any_port_of_a_dependent_peer_is_taken_up_to_the_cap() -> None:
    extra = 10
    outcomes, handshakes = trio.run(_flood, frozenset({"127.0.0.1"}), MAX_ANY_PORT_INBOUND + extra)
    assert handshakes == MAX_ANY_PORT_INBOUND  # authenticated (and failed), no more
    rejected = [o for o in outcomes if "not offered" in o]
    assert len(rejected) == 1  # one report entry for the rest, with their count
    assert f"({extra} connections)" in rejected[0]


def test_without_the_rule_every_unoffered_port_is_rejected_unauthenticated() -> None:
    outcomes, handshakes = trio.run(_flood, frozenset(), 5)
    assert handshakes == 0
    assert outcomes == ["rejected:source address was not offered (5 connections)"]
