"""Dial discipline at the destination: it dials what the source offers, so it bounds
that itself -- its own round limit (a source that keeps sending round-failed with retry
cannot make it dial forever), a cap on dials per round and per session, and no dials
to link-local, multicast, unspecified, IPv4-mapped or (unless the control peer is on
loopback) loopback candidates."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from holepunch_mig.errors import CandidateError, HolepunchError, ProtocolError
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.report import Report
from holepunch_mig.session import api
from holepunch_mig.session.prepare import MAX_DIALS_PER_ROUND, remote_endpoints
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.candidates import Candidate
from holepunch_mig.wire.noise import generate_keypair

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=0.5)
FAMILIES = {socket.AF_INET, socket.AF_INET6}


def _line(host: str, port: int = 4000) -> str:
    return f"candidate:1 1 tcp 1 {host} {port} typ host tcptype so"


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),
        ("::ffff:169.254.1.1", "IPv4-mapped"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
    ],
)
def test_unusable_candidate_addresses_are_rejected(host: str, why: str) -> None:
    with pytest.raises(CandidateError, match=why):
        Candidate.from_line(_line(host))


def test_unusable_candidates_are_dropped_and_noted() -> None:
    report = Report(session="00" * 16, role="destination")
    lines = [_line("169.254.10.1"), _line("::ffff:10.0.0.1"), _line("198.51.100.7")]
    assert remote_endpoints(lines, "198.51.100.7", 4001, report, FAMILIES) == [
        ("198.51.100.7", 4001),  # the observed one first
        ("198.51.100.7", 4000),
    ]
    notes = " ".join(report.notes)
    assert "169.254.10.1" in notes and "::ffff:10.0.0.1" in notes


def test_loopback_candidates_only_when_the_control_peer_is_on_loopback() -> None:
    lines = [_line("127.0.0.1"), _line("::1"), _line("198.51.100.7")]
    report = Report(session="00" * 16, role="destination")
    remote = remote_endpoints(lines, "198.51.100.9", 4001, report, FAMILIES)
    assert ("127.0.0.1", 4000) not in remote and ("::1", 4000) not in remote
    assert "loopback" in " ".join(report.notes)
    report = Report(session="00" * 16, role="destination")
    remote = remote_endpoints(lines, "127.0.0.1", 4001, report, FAMILIES)
    assert ("127.0.0.1", 4000) in remote


async def test_destination_enforces_its_round_limit_and_dial_cap() -> None:
    """The source offers 64 candidates and answers every round with round-failed
    {retry: true}, 20 times; the destination stops after its own 3 rounds and never has
    more than its per-round cap of candidates dialled."""
    a, b = memory_channel_pair("127.0.0.1")
    listeners = []
    for _ in range(64):
        s = trio.socket.socket()
        await s.bind(("127.0.0.1", 0))
        s.listen(64)
        listeners.append(s)
    ports = [s.getsockname()[1] for s in listeners]
    accepted = 0
    grew = trio.Event()
    state: dict[str, object] = {}

    async def accept(s: trio.socket.SocketType) -> None:
        nonlocal accepted, grew
        held = []
        while True:
            conn, _ = await s.accept()
            held.append(conn)  # never speaks: the destination's handshake times out
            accepted += 1
            grew.set()
            grew = trio.Event()

    async def destination() -> None:
        try:
            async with api.connect(b, role="destination", timing=FAST) as link:
                state["link"] = link
        except HolepunchError as exc:
            state["error"] = exc

    async def fake_source() -> None:
        _, pub = generate_keypair()
        offer = messages.Offer(
            session=os.urandom(16).hex(),
            key=pub.hex(),
            port=ports[0],
            candidates=[_line("127.0.0.1", p) for p in ports],
            policy="direct",
            limits={"max_record": 1 << 20},
        )
        await a.send_message(messages.encode(offer))
        await a.receive_message()
        for seq in range(3):
            await a.send_message(messages.encode(messages.Ping(seq=seq)))
            await a.receive_message()
        for round_no in range(1, 21):
            before = accepted
            try:
                await a.send_message(messages.encode(messages.Sync(round=round_no)))
                # wait until this round's dials arrived (at least some), then fail it
                with trio.move_on_after(3):
                    while accepted < before + 16:
                        await grew.wait()
                await a.send_message(
                    messages.encode(
                        messages.RoundFailed(round=round_no, retry=True, reason="again")
                    )
                )
            except HolepunchError:
                return
            if "error" in state:
                return

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for s in listeners:
                nursery.start_soon(accept, s)
            nursery.start_soon(fake_source)
            await destination()
            nursery.cancel_scope.cancel()
    for s in listeners:
        s.close()
    error = state.get("error")
    assert isinstance(error, ProtocolError), (error, f"{accepted} dials")
    assert "round 4" in str(error) and "3" in str(error)
    assert accepted <= 3 * MAX_DIALS_PER_ROUND, f"{accepted} dials in 3 rounds"


def test_dials_per_round_are_capped_observed_first() -> None:
    report = Report(session="00" * 16, role="destination")
    lines = [_line("198.51.100.7", 5000 + i) for i in range(64)]
    remote = remote_endpoints(lines, "203.0.113.5", 4001, report, FAMILIES)
    assert len(remote) == MAX_DIALS_PER_ROUND
    assert remote[0] == ("203.0.113.5", 4001)
    assert f"{64 + 1 - MAX_DIALS_PER_ROUND} more not dialled" in " ".join(report.notes)
