"""An in-memory pair of control channels: both ends of a session in one process.

What the suite uses to run a source and a destination side by side without a socket;
shipped so that a migration manager's own tests can do the same.
"""

from __future__ import annotations

import trio

from holepunch_mig.errors import ChannelClosed, ProtocolError
from holepunch_mig.wire.messages import MAX_FRAME

__all__ = ["MemoryChannel", "memory_channel_pair"]


class MemoryChannel:
    """One end of an in-memory pair: whole messages, no framing (tests, same-process use)."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        peer_host: str | None,
    ) -> None:
        self._send = send
        self._receive = receive
        self.peer_host = peer_host

    async def send_message(self, message: bytes) -> None:
        if len(message) > MAX_FRAME:  # a sealed frame may exceed MAX_MESSAGE by 17
            raise ProtocolError(f"frame of {len(message)} bytes exceeds the {MAX_FRAME}-byte limit")
        try:
            await self._send.send(bytes(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChannelClosed("control channel closed by the peer") from None

    async def receive_message(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ChannelClosed("control channel closed by the peer") from None

    async def aclose(self) -> None:
        # synchronous closes: a cancellation cannot leave one end open
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


def memory_channel_pair(
    peer_host: str | None = "127.0.0.1", buffer: int = 64
) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected in-memory control channels."""
    a_send, b_recv = trio.open_memory_channel[bytes](buffer)
    b_send, a_recv = trio.open_memory_channel[bytes](buffer)
    return MemoryChannel(a_send, a_recv, peer_host), MemoryChannel(b_send, b_recv, peer_host)
