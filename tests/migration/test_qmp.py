"""The QMP client against a fake QMP server on the other end of a socketpair."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from holepunch_mig.errors import QmpError
from holepunch_mig.migration.qmp import QmpClient

_GREETING = {"QMP": {"version": {"qemu": {"major": 8}}, "capabilities": []}}
_RESUME = {"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}


async def _fake_server(sock: trio.socket.SocketType, before: list[dict[str, Any]]) -> None:
    """Send ``before`` then answer every command with an empty return."""
    stream = trio.SocketStream(sock)
    for msg in before:
        await stream.send_all(json.dumps(msg).encode() + b"\r\n")
    buf = b""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            # An event between the request and its answer, as QEMU may send.
            await stream.send_all(json.dumps(_RESUME).encode() + b"\r\n")
            await stream.send_all(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\n")


async def _negotiate(before: list[dict[str, Any]]) -> QmpClient:
    a, b = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_server, b, before)
        with trio.fail_after(5):
            client = await QmpClient.negotiate(trio.SocketStream(a), "fake")
            try:
                await client.execute("query-status")
            finally:
                await client.aclose()
        nursery.cancel_scope.cancel()
    return client


async def test_events_before_the_greeting_are_collected_not_taken_for_it() -> None:
    client = await _negotiate([_RESUME, _RESUME, _GREETING])
    assert client.greeting == _GREETING
    # Two before the greeting, one with qmp_capabilities, one with query-status.
    assert [e["event"] for e in client.events] == ["RESUME"] * 4


async def test_plain_greeting() -> None:
    client = await _negotiate([_GREETING])
    assert client.greeting == _GREETING


async def test_a_reply_in_place_of_the_greeting_is_refused() -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(QmpError, match="unexpected greeting"), flatten_subgroups=True
    ):
        await _negotiate([{"return": {}}])
