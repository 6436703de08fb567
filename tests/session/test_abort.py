"""``abort`` on the control channel is honoured at any point, also in the middle of a
transfer whose link stays open and silent: the receiver stops at once with the peer's
reason instead of waiting for the link's idle timeout."""

from __future__ import annotations

import io
import os

import trio
from testsupport.fake_source import fake_source_link

from holepunch_mig.errors import PeerAbort, ProtocolError
from holepunch_mig.net.record_io import RecordWriter
from holepunch_mig.session import api
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.records import RecordType


async def test_abort_mid_transfer_stops_the_destination_at_once() -> None:
    a, b = memory_channel_pair("127.0.0.1")
    state: dict[str, object] = {}
    stop = trio.Event()

    async def destination() -> None:
        try:
            async with api.connect(b, role="destination", idle_timeout=60) as link:
                await link.receive_file(io.BytesIO())
        except PeerAbort as exc:
            state["error"] = exc
            state["at"] = trio.current_time()
        stop.set()

    async def source() -> None:
        link = await fake_source_link(a)
        w = RecordWriter(link.sock, link.send_key)
        await trio.to_thread.run_sync(lambda: w.write(RecordType.DATA, 0, os.urandom(1 << 20)))
        await a.send_message(messages.encode(messages.Abort(reason="operator cancelled")))
        state["sent"] = trio.current_time()
        await stop.wait()  # the link stays open and silent meanwhile
        link.sock.close()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            await destination()
    assert "operator cancelled" in str(state["error"])
    assert state["at"] - state["sent"] < 5  # type: ignore[operator]


async def test_a_side_that_rejects_a_message_sends_abort() -> None:
    """The source refuses an answer naming another session and says why with abort
    (rather than only closing the channel)."""
    a, b = memory_channel_pair("127.0.0.1")
    state: dict[str, object] = {}

    async def source() -> None:
        try:
            async with api.connect(a, role="source"):
                pass
        except ProtocolError as exc:
            state["error"] = exc

    async def fake_destination() -> None:
        offer = messages.decode(await b.receive_message())
        assert isinstance(offer, messages.Offer)
        answer = messages.Answer(
            session="00" * 16,  # not the offer's
            key="ab" * 32,
            port=40000,
            candidates=[],
            limits={"max_record": 1 << 20},
        )
        await b.send_message(messages.encode(answer))
        state["reply"] = messages.decode(await b.receive_message())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(fake_destination)
    assert "different session id" in str(state["error"])
    reply = state["reply"]
    assert isinstance(reply, messages.Abort) and "different session id" in reply.reason
