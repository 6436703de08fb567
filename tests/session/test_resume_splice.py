"""The resume splice: a party that can write on the destination's control channel, but
holds none of the link's keys, forges a resume-offer mid-transfer with a key and
candidates of its own, punches a link of its own to the destination and sends a suffix
of its own bytes ending in an END with an all-zero digest.  The resume messages are
authenticated by the session's last link, so the destination refuses the forged offer;
and an all-zero END digest is never accepted once resume is on.

A relay between the two control channels forwards everything until the destination's
first ``progress``, then the attacker takes over the destination's side."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import threading
from typing import Any

import trio
from testsupport.fake_source import bound, recv_exact

from holepunch_mig.errors import HolepunchError, ProtocolError
from holepunch_mig.net.record_io import RecordWriter
from holepunch_mig.session import api
from holepunch_mig.session.handshake import LINK_PAYLOAD, prologue
from holepunch_mig.testing import MemoryChannel, memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.noise import HandshakeState, generate_keypair
from holepunch_mig.wire.records import RecordType, end_payload

MiB = 1 << 20


class GatedInput(io.RawIOBase):
    """The source's input: ``open_bytes`` at once, then nothing until ``gate`` opens
    (so the transfer is still running when the attack comes)."""

    def __init__(self, data: bytes, open_bytes: int, gate: threading.Event) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._open = open_bytes
        self._gate = gate

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._pos >= self._open:
            self._gate.wait(30)
        n = min(len(b), len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def _with_optional(cls: type[messages.Message], **fields: Any) -> dict[str, Any]:
    """Only the fields ``cls`` has (the same attack against older message schemas)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in fields.items() if k in names}


async def _attacker(
    to_dst: MemoryChannel,
    inbox: trio.MemoryReceiveChannel[bytes],
    session: str,
    state: dict[str, Any],
) -> None:
    priv, pub = generate_keypair()
    holder = bound(0)
    port = holder.getsockname()[1]
    holder.close()
    cands = [f"candidate:1 1 tcp 1 127.0.0.1 {port} typ host tcptype so"]
    offer = messages.ResumeOffer(
        **_with_optional(
            messages.ResumeOffer,
            session=session,
            epoch=1,
            key=pub.hex(),
            port=port,
            candidates=cands,
            reason="link 0 lost",
            mac=os.urandom(32).hex(),  # no link key: a guess
        )
    )
    offer_raw = messages.encode(offer)
    await to_dst.send_message(offer_raw)
    while True:
        answer_raw = await inbox.receive()
        answer = messages.decode(answer_raw)
        if isinstance(answer, messages.ResumeAnswer):
            break
        if isinstance(answer, messages.Result | messages.Abort):
            state["refused"] = answer
            return
    state["answered"] = True
    for seq in range(3):
        await to_dst.send_message(messages.encode(messages.Ping(seq=seq)))
        await inbox.receive()
    await to_dst.send_message(messages.encode(messages.Sync(round=1)))
    pro = prologue(bytes.fromhex(session), offer_raw, answer_raw)
    hs = HandshakeState("KK", True, pro, s=priv, rs=bytes.fromhex(answer.key))

    def punch() -> socket.socket:
        s = bound(port)
        s.connect(("127.0.0.1", answer.port))
        msg1 = hs.write_message(LINK_PAYLOAD.pack(1, 1))
        s.sendall(len(msg1).to_bytes(2, "big") + msg1)
        hs.read_message(recv_exact(s, int.from_bytes(recv_exact(s, 2), "big")))
        return s

    sock = await trio.to_thread.run_sync(punch)
    nominate = messages.Nominate(
        **_with_optional(messages.Nominate, round=1, link=1, handshake=hs.handshake_hash.hex())
    )
    await to_dst.send_message(messages.encode(nominate))
    k1, _ = hs.split()
    suffix = b"attacker bytes " * 60_000

    def splice() -> None:
        w = RecordWriter(sock, k1)
        w.write(RecordType.DATA, 0, suffix)
        w.write(RecordType.END, 0, end_payload(answer.bytes + len(suffix)))  # zero digest

    await trio.to_thread.run_sync(splice)
    state["spliced"] = True
    state["result"] = messages.decode(await inbox.receive())
    sock.close()


async def test_forged_resume_offer_cannot_splice_the_stream() -> None:
    src_end, relay_src = memory_channel_pair("127.0.0.1")
    relay_dst, dst_end = memory_channel_pair("127.0.0.1")
    data = os.urandom(8 * MiB)
    gate = threading.Event()
    out = io.BytesIO()
    state: dict[str, Any] = {}
    inbox_send, inbox = trio.open_memory_channel[bytes](64)
    options = {"ack_interval": MiB, "resume_buffer": 3 * MiB, "link_timeout": 3.0}

    async def source() -> None:
        try:
            async with api.connect(src_end, role="source", **options) as link:
                await link.send_file(GatedInput(data, 2 * MiB, gate))
        except HolepunchError as exc:
            state["source_error"] = exc

    async def destination() -> None:
        try:
            async with api.connect(dst_end, role="destination", **options) as link:
                state["dst_result"] = await link.receive_file(out)
        except HolepunchError as exc:
            state["dst_error"] = exc

    async def forward_src_to_dst() -> None:
        while True:
            raw = await relay_src.receive_message()
            if "hijacked" in state:
                continue  # the source is cut off from here on
            event = messages.decode(raw)
            if isinstance(event, messages.Offer):
                state["session"] = event.session
            await relay_dst.send_message(raw)

    async def forward_dst_to_src(nursery: trio.Nursery) -> None:
        while True:
            raw = await relay_dst.receive_message()
            if "hijacked" in state:
                await inbox_send.send(raw)
                continue
            if isinstance(messages.decode(raw), messages.Progress):
                state["hijacked"] = True
                nursery.start_soon(_attacker, relay_dst, inbox, state["session"], state)
                continue
            await relay_src.send_message(raw)

    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as outer:
                outer.start_soon(source)
                outer.start_soon(forward_src_to_dst)
                outer.start_soon(forward_dst_to_src, outer)
                await destination()
                outer.cancel_scope.cancel()
    finally:
        gate.set()
    got = out.getvalue()
    assert "dst_result" not in state, f"the destination accepted a spliced stream: {state}"
    assert b"attacker bytes" not in got
    assert got == data[: len(got)]
    error = state["dst_error"]
    assert isinstance(error, ProtocolError), error
    assert "not authenticated" in str(error)
    assert "answered" not in state  # refused before any answer


async def test_result_without_sha256_is_not_verified() -> None:
    """A ``result`` whose ``sha256`` is null (forged on the control channel, or from a
    destination that did not hash) matched only the byte count: not verified."""
    src_end, relay_src = memory_channel_pair("127.0.0.1")
    relay_dst, dst_end = memory_channel_pair("127.0.0.1")
    data = os.urandom(2 * MiB)
    state: dict[str, Any] = {}

    async def source() -> None:
        try:
            async with api.connect(src_end, role="source") as link:
                state["src_result"] = await link.send_file(io.BytesIO(data))
        except HolepunchError as exc:
            state["source_error"] = exc

    async def destination() -> None:
        async with api.connect(dst_end, role="destination") as link:
            await link.receive_file(io.BytesIO())

    async def relay(a: MemoryChannel, b: MemoryChannel) -> None:
        while True:
            raw = await a.receive_message()
            event = messages.decode(raw)
            if isinstance(event, messages.Result):
                raw = messages.encode(dataclasses.replace(event, sha256=None))
            await b.send_message(raw)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, relay_src, relay_dst)
            nursery.start_soon(relay, relay_dst, relay_src)
            nursery.start_soon(destination)
            await source()
            nursery.cancel_scope.cancel()
    assert "src_result" not in state, state
    assert "not verified" in str(state["source_error"])


async def test_tampered_resume_answer_fails_the_source_which_says_why() -> None:
    """A resume-answer whose MAC does not verify (here: its offset moved on the way) is
    refused by the source, which tells the destination with abort."""
    src_end, relay_src = memory_channel_pair("127.0.0.1")
    relay_dst, dst_end = memory_channel_pair("127.0.0.1")
    data = os.urandom(8 * MiB)
    gate = threading.Event()
    state: dict[str, Any] = {}
    options = {"ack_interval": MiB, "resume_buffer": 3 * MiB, "link_timeout": 3.0}

    async def source() -> None:
        try:
            async with api.connect(src_end, role="source", **options) as link:
                state["src_link"] = link
                await link.send_file(GatedInput(data, 2 * MiB, gate))
        except HolepunchError as exc:
            state["source_error"] = exc

    async def destination() -> None:
        try:
            async with api.connect(dst_end, role="destination", **options) as link:
                await link.receive_file(io.BytesIO())
        except HolepunchError as exc:
            state["dst_error"] = exc

    async def relay(a: MemoryChannel, b: MemoryChannel) -> None:
        while True:
            raw = await a.receive_message()
            event = messages.decode(raw)
            if isinstance(event, messages.Progress) and "cut" not in state:
                state["cut"] = True  # the source's link dies once the first MiB is kept
                link = state["src_link"]
                with contextlib.suppress(OSError):
                    link.sock.shutdown(socket.SHUT_RDWR)
                gate.set()
            if isinstance(event, messages.ResumeAnswer):
                raw = messages.encode(dataclasses.replace(event, bytes=0))
            await b.send_message(raw)

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, relay_src, relay_dst)
            nursery.start_soon(relay, relay_dst, relay_src)
            nursery.start_soon(source)
            await destination()
            nursery.cancel_scope.cancel()
    gate.set()
    assert isinstance(state["source_error"], ProtocolError), state
    assert "resume-answer for epoch 1 is not authenticated" in str(state["source_error"])
    assert "not authenticated" in str(state["dst_error"]), state["dst_error"]
