"""Parallel links of one session on this machine's own addresses: each is punched and
authenticated on its own, carries its own records, and the tunnel has none."""

from __future__ import annotations

import io
import os
import threading

import pytest
import trio

from holepunch_mig.errors import ProtocolError, RecordError
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.session import api
from holepunch_mig.session.links import DataLink
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.records import RecordType

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=1.0)


async def _open(count: int, **options: object) -> tuple[list[DataLink], list[DataLink], dict]:
    a, b = memory_channel_pair()
    got: dict[str, list[DataLink]] = {}
    reports: dict[str, object] = {}

    async def side(channel: object, role: str) -> None:
        async with api.connect(channel, role=role, timing=FAST, **options) as link:  # type: ignore[arg-type]
            got[role] = await link.open_links(count)
            reports[role] = link.report
            # the first link still works after the others were punched
            if role == "source":
                await link.send_file(io.BytesIO(b"first link"))
            else:
                out = io.BytesIO()
                await link.receive_file(out)
                assert out.getvalue() == b"first link"

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, a, "source")
            nursery.start_soon(side, b, "destination")
    return got["source"], got["destination"], reports


def _pump(src: DataLink, dst: DataLink, data: bytes) -> bytes:
    out = io.BytesIO()
    t = threading.Thread(target=lambda: src.writer.send_file(1, io.BytesIO(data)))
    t.start()
    dst.reader.receive_file(1, out)
    t.join()
    return out.getvalue()


async def test_three_more_links_each_authenticated_and_separate() -> None:
    src, dst, reports = await _open(3)
    try:
        assert [d.index for d in src] == [d.index for d in dst] == [1, 2, 3]
        # four distinct TCP connections (the first one's pair included in the report)
        pairs = {(d.local, d.remote) for d in src}
        assert len(pairs) == 3
        for s, d in zip(src, dst, strict=True):
            assert (s.local, s.remote) == (d.remote, d.local)
        for role in ("source", "destination"):
            rep = reports[role]
            assert rep.links == 4  # type: ignore[attr-defined]
            nominated = [p for p in rep.pairs if p.outcome == "nominated"]  # type: ignore[attr-defined]
            assert len(nominated) == 4
            assert sorted(p.detail for p in nominated if p.detail) == [
                "link 1",
                "link 2",
                "link 3",
            ]
        # each link moves its own records, in both directions
        for s, d in zip(src, dst, strict=True):
            data = os.urandom((1 << 20) + s.index)
            got = await trio.to_thread.run_sync(_pump, s, d, data)
            assert got == data
            back = os.urandom(4096)
            assert await trio.to_thread.run_sync(_pump, d, s, back) == back
        # a record sealed for link 1 does not open on link 2: every link has its own keys
        raw = bytearray()
        src[0].writer._seal_send(RecordType.DATA, 1, b"x" * 64)
        raw += dst[0].sock.recv(1 << 16)
        dst[1].sock.settimeout(5)
        src[1].sock.sendall(bytes(raw))
        with pytest.raises(RecordError):
            await trio.to_thread.run_sync(dst[1].reader.read)
    finally:
        for d in src + dst:
            d.close()


async def test_tunnel_has_no_parallel_links() -> None:
    src, dst, reports = await _open(2, policy="tunnel")
    assert src == [] and dst == []
    assert reports["source"].links == 1  # type: ignore[attr-defined]


def test_link_messages_are_strict() -> None:
    fields = {
        "session": "ab" * 16,
        "index": 1,
        "key": "cd" * 32,
        "port": 4000,
        "candidates": ["candidate:1 1 tcp 1 10.0.0.1 4000 typ host tcptype so"],
    }
    for cls in (messages.LinkOffer, messages.LinkAnswer):
        msg = cls(**fields)  # type: ignore[arg-type]
        assert messages.decode(messages.encode(msg)) == msg
        for bad in ({"index": 0}, {"index": messages.MAX_LINKS}, {"index": True}, {"port": 0}):
            with pytest.raises(ProtocolError):
                cls(**{**fields, **bad})  # type: ignore[arg-type]
    offer = messages.MigrateOffer(digest=False, links=5)
    assert messages.decode(messages.encode(offer)) == offer
    assert b'"links"' not in messages.encode(messages.MigrateOffer(digest=False))
    with pytest.raises(ProtocolError, match="links"):
        messages.MigrateReady(digest=False, links=messages.MAX_LINKS + 1)
