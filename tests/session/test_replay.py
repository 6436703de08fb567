"""A replayed Noise KK message 1 from an offered address: in KK the responder completes
the handshake of a replay (the first message authenticates the initiator's static key,
not its freshness), so such a link is "authenticated" without anyone holding its keys.
It must never displace the genuine link: the responder refuses a link id it already
authenticated, and the nomination names the chosen link's handshake hash.

The test plays the source itself (offer, pings, sync, its own Noise initiator) against
the library's destination, and replays its first message from its own punch port."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import socket

import trio
from testsupport.fake_source import bound

from holepunch_mig.errors import HolepunchError
from holepunch_mig.net.record_io import RecordWriter
from holepunch_mig.session import api
from holepunch_mig.session.handshake import LINK_PAYLOAD, prologue
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.noise import HandshakeState, generate_keypair


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            return out
        out += chunk
    return out


async def test_replayed_first_message_cannot_displace_the_genuine_link() -> None:
    a, b = memory_channel_pair("127.0.0.1")
    data = os.urandom(2 << 20)
    out = io.BytesIO()
    results: dict[str, object] = {}

    async def destination() -> None:
        async with api.connect(
            b, role="destination", resume_attempts=0, idle_timeout=5, include_loopback=True
        ) as link:
            results["report"] = link.report
            with contextlib.suppress(HolepunchError):
                results["dst"] = await link.receive_file(out)

    async def fake_source() -> None:
        priv, pub = generate_keypair()
        holder = bound(0)  # our punch port; the destination's dials to it are refused
        port = holder.getsockname()[1]
        holder.close()
        session = os.urandom(16)
        offer = messages.encode(
            messages.Offer(
                session=session.hex(),
                key=pub.hex(),
                port=port,
                candidates=[f"candidate:1 1 tcp 1 127.0.0.1 {port} typ host tcptype so"],
                policy="direct",
                limits={"max_record": 1 << 20},
            )
        )
        await a.send_message(offer)
        answer_raw = await a.receive_message()
        answer = messages.decode(answer_raw)
        assert isinstance(answer, messages.Answer)
        for seq in range(3):
            await a.send_message(messages.encode(messages.Ping(seq=seq)))
            await a.receive_message()
        await a.send_message(messages.encode(messages.Sync(round=1)))
        pro = prologue(session, offer, answer_raw)
        hs = HandshakeState("KK", True, pro, s=priv, rs=bytes.fromhex(answer.key))
        msg1 = hs.write_message(LINK_PAYLOAD.pack(1, 1))
        frame1 = len(msg1).to_bytes(2, "big") + msg1

        def genuine() -> socket.socket:
            s = bound(port)
            s.connect(("127.0.0.1", answer.port))
            s.sendall(frame1)
            n = int.from_bytes(_recv_exact(s, 2), "big")
            hs.read_message(_recv_exact(s, n))
            return s

        def replay() -> bytes:
            # the same first message, from the same offered address, another 4-tuple
            s = bound(port)
            s.connect(("127.0.0.2", answer.port))
            s.sendall(frame1)
            s.settimeout(3)
            try:
                return _recv_exact(s, 2)  # the responder's message 2, or EOF when refused
            except OSError:
                return b""
            finally:
                s.close()

        sock = await trio.to_thread.run_sync(genuine)
        results["replay_answered"] = await trio.to_thread.run_sync(replay) != b""
        fields = {f.name for f in dataclasses.fields(messages.Nominate)}
        extra = {"handshake": hs.handshake_hash.hex()} if "handshake" in fields else {}
        await a.send_message(messages.encode(messages.Nominate(round=1, link=1, **extra)))
        k1, _k2 = hs.split()

        def send() -> None:
            try:
                RecordWriter(sock, k1).send_file(0, io.BytesIO(data), digest=True)
            except OSError as exc:  # the destination dropped the genuine link
                results["send_error"] = exc

        await trio.to_thread.run_sync(send)
        raw = await a.receive_message()
        results["result"] = messages.decode(raw)
        sock.close()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination)
            nursery.start_soon(fake_source)
    assert "send_error" not in results, results["send_error"]
    result = results["result"]
    assert isinstance(result, messages.Result) and result.ok, result
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert out.getvalue() == data
    assert results["replay_answered"] is False  # refused before message 2
    report = results["report"]
    details = [p.detail for p in report.pairs]  # type: ignore[attr-defined]
    assert any("duplicate link id 1" in d for d in details), details
