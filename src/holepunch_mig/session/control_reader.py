"""Typed, deadline-bound reading of the control channel (also once the tunnel owns it)."""

from __future__ import annotations

from typing import TypeVar, overload

import trio

from holepunch_mig.errors import ChannelClosed, ControlTimeout, PeerAbort, ProtocolError
from holepunch_mig.net.control import ControlChannel
from holepunch_mig.net.tunnel import Tunnel
from holepunch_mig.wire import messages
from holepunch_mig.wire.messages import Message
from holepunch_mig.wire.text import printable

_M1 = TypeVar("_M1", bound=Message)
_M2 = TypeVar("_M2", bound=Message)
_M3 = TypeVar("_M3", bound=Message)
_M4 = TypeVar("_M4", bound=Message)


class ControlReader:
    """Typed, deadline-bound access to the control channel."""

    def __init__(self, channel: ControlChannel, timeout: float) -> None:
        self.channel = channel
        self.timeout = timeout
        self._tunnel: Tunnel | None = None

    def attach(self, tunnel: Tunnel) -> None:
        """From now on the tunnel owns the channel's receive side; read its control inbox."""
        self._tunnel = tunnel

    async def _next(self) -> bytes:
        if self._tunnel is not None:
            return await self._tunnel.receive_control()
        return await self.channel.receive_message()

    async def send(self, message: Message, *, step: str = "") -> bytes:
        """Send one control message; a broken channel names what was being sent."""
        data = messages.encode(message)
        try:
            await self.channel.send_message(data)
        except ChannelClosed as exc:
            raise ChannelClosed(f"{exc} while sending {message.TYPE}{_step(step)}") from None
        return data

    @overload
    async def receive(
        self, a: type[_M1], /, *, timeout: float | None = None, step: str = ""
    ) -> tuple[_M1, bytes]: ...

    @overload
    async def receive(
        self, a: type[_M1], b: type[_M2], /, *, timeout: float | None = None, step: str = ""
    ) -> tuple[_M1 | _M2, bytes]: ...

    @overload
    async def receive(
        self,
        a: type[_M1],
        b: type[_M2],
        c: type[_M3],
        /,
        *,
        timeout: float | None = None,
        step: str = "",
    ) -> tuple[_M1 | _M2 | _M3, bytes]: ...

    @overload
    async def receive(
        self,
        a: type[_M1],
        b: type[_M2],
        c: type[_M3],
        d: type[_M4],
        /,
        *,
        timeout: float | None = None,
        step: str = "",
    ) -> tuple[_M1 | _M2 | _M3 | _M4, bytes]: ...

    async def receive(
        self, *expected: type[Message], timeout: float | None = None, step: str = ""
    ) -> tuple[Message, bytes]:
        """Next control message, which must be one of ``expected``; abort raises PeerAbort."""
        limit = self.timeout if timeout is None else timeout
        what = " or ".join(t.TYPE for t in expected)
        try:
            with trio.fail_after(limit):
                raw = await self._next()
        except trio.TooSlowError:
            raise ControlTimeout(
                f"no {what} message from the peer within {limit:.1f} s"
                + (f" ({step})" if step else "")
            ) from None
        except ChannelClosed as exc:
            raise ChannelClosed(f"{exc} while waiting for {what}" + _step(step)) from None
        event = messages.decode(raw)
        if isinstance(event, messages.TunnelData):
            raise ProtocolError(f"tunnel data arrived while waiting for {what}")
        if isinstance(event, messages.Abort) and messages.Abort not in expected:
            raise PeerAbort(f"peer aborted{_step(step)}: {printable(event.reason)}")
        if not isinstance(event, expected):
            clash = _ROLE_CLASH.get((tuple(t.TYPE for t in expected), event.type))
            if clash:
                raise ProtocolError(clash)
            raise ProtocolError(f"expected {what} message, got {event.type}" + _step(step))
        return event, raw


#: (expected, received) -> what it means: the two sides were given the same role
_ROLE_CLASH: dict[tuple[tuple[str, ...], str], str] = {
    (("answer",), "offer"): "both sides claim the source role: the peer sent an offer too; "
    "start one side as the destination (recv, or role 'destination')",
}


def _step(step: str) -> str:
    return f" ({step})" if step else ""
