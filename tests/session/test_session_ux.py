"""What a session says when it fails: counts over every round, advice that fits the
policies given, rounds cut short by the evidence, and a role clash named as such."""

from __future__ import annotations

import dataclasses
import re

import pytest
import trio

from holepunch_mig.errors import ChannelClosed, NoDirectPath, ProtocolError
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.report import PairReport, Report
from holepunch_mig.session import api
from holepunch_mig.session.diagnosis import (
    TUNNEL_BOTH,
    diagnose_pairs,
    mapping_varies,
    tunnel_advice,
)
from holepunch_mig.session.policy import direct_rounds
from holepunch_mig.testing import MemoryChannel, memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.candidates import make_candidate
from holepunch_mig.wire.noise import generate_keypair

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=1.0)


class KeySwapper:
    """The source's view of the answer with another key: every link is rejected."""

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer_host = inner.peer_host

    async def send_message(self, message: bytes) -> None:
        await self.inner.send_message(message)

    async def receive_message(self) -> bytes:
        raw = await self.inner.receive_message()
        event = messages.decode(raw)
        if isinstance(event, messages.Answer):
            return messages.encode(dataclasses.replace(event, key=generate_keypair()[1].hex()))
        return raw

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_both_sides_claim_the_source_role() -> None:
    a, b = memory_channel_pair()
    errors: list[BaseException] = []

    async def side(channel: object) -> None:
        try:
            async with api.connect(channel, role="source", timing=FAST):  # type: ignore[arg-type]
                pytest.fail("a session came up with two sources")
        except (ProtocolError, ChannelClosed) as exc:
            errors.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, a)
            nursery.start_soon(side, b)
    clash = [e for e in errors if "both sides claim the source role" in str(e)]
    assert clash, errors
    assert "expected answer message, got offer" not in str(clash[0])


async def test_destination_counts_the_pairs_of_every_round() -> None:
    a, b = memory_channel_pair()
    failures: dict[str, BaseException] = {}

    async def side(channel: object, role: str) -> None:
        try:
            async with api.connect(channel, role=role, rounds=2, timing=FAST):  # type: ignore[arg-type]
                pytest.fail("a link came up with the wrong key")
        except (NoDirectPath, ChannelClosed) as exc:
            failures[role] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, KeySwapper(a), "source")  # type: ignore[arg-type]
            nursery.start_soon(side, b, "destination")
    for role in ("source", "destination"):
        exc = failures[role]
        assert isinstance(exc, NoDirectPath), (role, exc)
        pairs = exc.report.pairs  # type: ignore[union-attr]
        assert {p.round for p in pairs} == {1, 2}
        m = re.match(r"no direct link after 2 rounds \((\d+) pairs: (.*)\)$", str(exc))
        assert m, str(exc)
        assert int(m.group(1)) == len(pairs)
        total = sum(int(n) for n in re.findall(r"(\d+) [a-z ]+", m.group(2)))
        assert total == len(pairs)


def test_tunnel_advice_fits_the_policies() -> None:
    assert tunnel_advice("direct", "direct", False) == TUNNEL_BOTH
    assert "start the destination (recv) with --policy auto" in (
        tunnel_advice("auto", "direct", False) or ""
    )
    assert "on the source (send)" in (tunnel_advice("direct", "auto", False) or "")
    assert tunnel_advice("auto", "auto", True) is None  # the tunnel is in use already
    pairs = [PairReport(1, "10.0.0.1:4000", "192.0.2.7:5000", "timed out")]
    fell_back = diagnose_pairs(pairs, role="source", tunnel=None).verdict
    assert "--policy auto" not in fell_back
    refused = diagnose_pairs(
        pairs, role="source", tunnel=tunnel_advice("auto", "direct", False)
    ).verdict
    assert "start the destination (recv) with --policy auto too" in refused
    assert "on both sides" not in refused


def _srflx(host: str, port: int) -> str:
    return make_candidate(host, port, "srflx", base="10.0.0.1").to_line()


def test_mapping_varies_is_seen_from_the_candidates() -> None:
    same = [_srflx("198.51.100.1", 4000), _srflx("198.51.100.1", 4000)]
    assert mapping_varies(same) == []
    varied = [_srflx("198.51.100.1", 4000), _srflx("198.51.100.1", 61234)]
    assert mapping_varies(varied) == ["198.51.100.1:4000", "198.51.100.1:61234"]


def test_rounds_cut_short_only_when_the_tunnel_follows() -> None:
    assert direct_rounds("auto", "auto", 3, doomed=True) == 1
    assert direct_rounds("auto", "auto", 3, doomed=False) == 3
    # no tunnel allowed: punching is the only chance, every round is run
    assert direct_rounds("direct", "auto", 3, doomed=True) == 3
    assert direct_rounds("auto", "direct", 3, doomed=True) == 3


def test_report_summary_counts_the_other_pairs() -> None:
    rep = Report(session="s", role="source", path="direct", local="a:1", remote="b:2")
    rep.rounds = 1
    rep.time_to_link = 0.1
    rep.pairs = [
        PairReport(1, "a:1", "b:2", "nominated"),
        PairReport(1, "a:1", "10.9.9.9:2", "unreachable", "Network is unreachable"),
        PairReport(1, "a:1", "10.9.9.8:2", "unreachable", "Network is unreachable"),
    ]
    text = rep.summary()
    assert "1 round," not in text and ", 1 round" in text
    assert "Network is unreachable" not in text
    assert "2 other pairs tried: 2 unreachable" in text
