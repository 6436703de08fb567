"""The STUN client over TCP: a real coturn on loopback, and fake servers."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from aioice import stun as aiostun
from testsupport.stun import binding_response as _response
from testsupport.stun import free_port

from holepunch_mig.errors import StunError
from holepunch_mig.net.stun import probe_mapping, stun_binding_tcp

# --------------------------------------------------------------------------- helpers


def reuse_listener(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen()
    return s


# --------------------------------------------------------------------------- coturn


def test_coturn_binding_returns_local_port(coturn: tuple[str, int]) -> None:
    port = free_port()
    got = trio.run(lambda: stun_binding_tcp(coturn, port, local_host="127.0.0.1"))
    assert got == ("127.0.0.1", port)
    # again from the same port to the same server: no TIME_WAIT in the way (SO_LINGER 0)
    got = trio.run(lambda: stun_binding_tcp(coturn, port))
    assert got == ("127.0.0.1", port)


def test_coturn_binding_while_port_listens(coturn: tuple[str, int]) -> None:
    port = free_port()
    with reuse_listener("127.0.0.1", port):
        assert trio.run(lambda: stun_binding_tcp(coturn, port, local_host="127.0.0.1")) == (
            "127.0.0.1",
            port,
        )
    with reuse_listener("0.0.0.0", port):
        assert trio.run(lambda: stun_binding_tcp(coturn, port)) == ("127.0.0.1", port)


def test_bind_conflict_without_reuseport_is_named(coturn: tuple[str, int]) -> None:
    with socket.socket() as plain:  # no SO_REUSEADDR/SO_REUSEPORT: exclusive
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        with pytest.raises(StunError, match=rf"cannot bind 127\.0\.0\.1:{port} for STUN"):
            trio.run(lambda: stun_binding_tcp(coturn, port, local_host="127.0.0.1"))


def test_probe_mapping_with_coturn(coturn: tuple[str, int]) -> None:
    port = free_port()
    dead = ("127.0.0.1", free_port())
    report = trio.run(lambda: probe_mapping([coturn, coturn, dead], port, timeout=2.0))
    assert report["mapping"] == "endpoint-independent"
    assert report["port_preserving"] is True
    assert report["public_addresses"] == ["127.0.0.1"]
    assert len(report["results"]) == 2 and len(report["errors"]) == 1
    assert "refused" in report["errors"][0]


def test_nothing_listening_fails_fast() -> None:
    dead = ("127.0.0.1", free_port())
    start = time.monotonic()
    with pytest.raises(StunError, match="refused the TCP connection"):
        trio.run(lambda: stun_binding_tcp(dead, 0, timeout=3.0))
    assert time.monotonic() - start < 1.0


def test_bad_local_port() -> None:
    with pytest.raises(StunError, match="local port 70000"):
        trio.run(lambda: stun_binding_tcp(("127.0.0.1", 1), 70000))


# --------------------------------------------------------------------------- fake servers

Behaviour = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> bytes:
    buf = b""
    while len(buf) < 20:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError("client closed")
        buf += chunk
    need = 20 + struct.unpack("!H", buf[2:4])[0]
    while len(buf) < need:
        buf += await stream.receive_some(4096)
    return buf[8:20]


async def _garbage(stream: trio.SocketStream, tid: bytes) -> None:
    await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n" + b"\0" * 8)
    await trio.sleep_forever()


async def _wrong_tid(stream: trio.SocketStream, tid: bytes) -> None:
    await stream.send_all(_response(b"z" * 12, XOR_MAPPED_ADDRESS=("127.0.0.1", 1)))
    await trio.sleep_forever()


async def _error(stream: trio.SocketStream, tid: bytes) -> None:
    await stream.send_all(_response(tid, aiostun.Class.ERROR, ERROR_CODE=(500, "Server Error")))
    await trio.sleep_forever()


async def _silent(stream: trio.SocketStream, tid: bytes) -> None:
    await trio.sleep_forever()


async def _close(stream: trio.SocketStream, tid: bytes) -> None:
    await stream.aclose()


async def _half(stream: trio.SocketStream, tid: bytes) -> None:
    data = _response(tid, XOR_MAPPED_ADDRESS=("127.0.0.1", 1))
    await stream.send_all(data[:24])
    await stream.aclose()


async def _huge_stall(stream: trio.SocketStream, tid: bytes) -> None:
    # valid header promising a body that never comes
    await stream.send_all(struct.pack("!HHI12s", 0x0101, 400, aiostun.COOKIE, tid))
    await trio.sleep_forever()


async def _trickle(stream: trio.SocketStream, tid: bytes) -> None:
    data = _response(tid, MAPPED_ADDRESS=("198.51.100.77", 4321))
    for i in range(len(data)):  # one byte at a time: framing must reassemble
        await stream.send_all(data[i : i + 1])
        await trio.sleep(0.001)
    await trio.sleep_forever()


async def _with_fake(
    behaviour: Behaviour, timeout: float, host: str = "127.0.0.1"
) -> tuple[str, int]:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            tid = await _read_request(stream)
        except (RuntimeError, trio.BrokenResourceError):
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await behaviour(stream, tid)

    outcome: tuple[str, int] | StunError
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
        port = listeners[0].socket.getsockname()[1]
        try:
            outcome = await stun_binding_tcp((host, port), 0, timeout=timeout)
        except StunError as exc:  # re-raised outside the nursery, not in an ExceptionGroup
            outcome = exc
        nursery.cancel_scope.cancel()
    if isinstance(outcome, StunError):
        raise outcome
    return outcome


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (_garbage, "not a STUN message"),
        (_wrong_tid, "wrong transaction id"),
        (_error, "Binding error response: 500 Server Error"),
        (_silent, "no answer within 0.5 s (waiting for the answer)"),
        (_close, "closed the connection without answering"),
        (_half, "closed the connection after 24 bytes of its answer"),
        (_huge_stall, "no answer within 0.5 s"),
    ],
)
def test_fake_server_failures(behaviour: Behaviour, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(StunError) as info:
        trio.run(_with_fake, behaviour, 0.5)
    assert message in str(info.value), str(info.value)
    assert "STUN server 127.0.0.1:" in str(info.value)
    assert time.monotonic() - start < 2.0


def test_fake_server_trickled_mapped_address() -> None:
    assert trio.run(_with_fake, _trickle, 3.0) == ("198.51.100.77", 4321)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _v6_answer(stream: trio.SocketStream, tid: bytes) -> None:
    await stream.send_all(_response(tid, XOR_MAPPED_ADDRESS=("2001:db8::9", 5555)))
    await trio.sleep_forever()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1")
def test_fake_server_over_ipv6_loopback() -> None:
    assert trio.run(_with_fake, _v6_answer, 3.0, "::1") == ("2001:db8::9", 5555)
