"""Control channel adapters: whole messages, deadlines, and errors that name the problem."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

from holepunch_mig.errors import ChannelClosed, ControlTimeout, PeerAbort, ProtocolError
from holepunch_mig.net.control import (
    StreamChannel,
    open_process_channel,
)
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.testing import MemoryChannel, memory_channel_pair
from holepunch_mig.wire import messages


async def test_stream_channel_round_trip() -> None:
    a, b = trio.testing.memory_stream_pair()
    ca, cb = StreamChannel(a), StreamChannel(b)
    big = b"\x02" + b"x" * (messages.MAX_MESSAGE - 1)
    await ca.send_message(b"\x01hello")
    await ca.send_message(big)
    assert await cb.receive_message() == b"\x01hello"
    assert await cb.receive_message() == big


async def test_stream_channel_refuses_oversize_send() -> None:
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(ProtocolError, match="exceeds"):
        await StreamChannel(a).send_message(b"x" * (messages.MAX_FRAME + 1))


async def test_stream_channel_oversize_frame_from_peer() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all((1 << 20).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="frame of 1048576 bytes exceeds"):
        await StreamChannel(b).receive_message()


async def test_stream_channel_truncated_frame() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"\x00\x00\x00\x10abc")
    await a.aclose()
    with pytest.raises(ProtocolError, match="ended inside a frame"):
        await StreamChannel(b).receive_message()


async def test_stream_channel_clean_close() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.aclose()
    with pytest.raises(ChannelClosed, match="closed by the peer"):
        await StreamChannel(b).receive_message()


async def test_reader_deadline_names_what_was_awaited() -> None:
    a, _b = memory_channel_pair()
    reader = ControlReader(a, timeout=0.05)
    with pytest.raises(ControlTimeout, match=r"no answer message .* \(waiting for the answer\)"):
        await reader.receive(messages.Answer, step="waiting for the answer")


async def test_reader_rejects_unexpected_type_and_garbage() -> None:
    a, b = memory_channel_pair()
    reader = ControlReader(a, timeout=1)
    await b.send_message(messages.encode(messages.Ping(seq=1)))
    with pytest.raises(ProtocolError, match="expected answer message, got ping"):
        await reader.receive(messages.Answer)
    await b.send_message(b"\x01garbage")
    with pytest.raises(ProtocolError, match="not JSON"):
        await reader.receive(messages.Answer)


async def test_reader_surfaces_peer_abort() -> None:
    a, b = memory_channel_pair()
    await b.send_message(messages.encode(messages.Abort(reason="disk full")))
    with pytest.raises(PeerAbort, match="disk full"):
        await ControlReader(a, timeout=1).receive(messages.Result)


async def test_memory_pair_close() -> None:
    a, b = memory_channel_pair()
    assert isinstance(a, MemoryChannel)
    await a.aclose()
    with pytest.raises(ChannelClosed):
        await b.receive_message()


async def test_process_channel_talks_to_a_child() -> None:
    # the child echoes frames back: proves stdin/stdout framing works across a process
    child = (
        "import sys\n"
        "data = sys.stdin.buffer.read(4)\n"
        "n = int.from_bytes(data, 'big')\n"
        "body = sys.stdin.buffer.read(n)\n"
        "sys.stdout.buffer.write(data + body)\n"
        "sys.stdout.buffer.flush()\n"
    )
    channel = await open_process_channel([sys.executable, "-c", child])
    try:
        with trio.fail_after(10):
            await channel.send_message(b"\x01echo")
            assert await channel.receive_message() == b"\x01echo"
            with pytest.raises(ChannelClosed):
                await channel.receive_message()
    finally:
        await channel.aclose()
    assert channel.process.returncode == 0
