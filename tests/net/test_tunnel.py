"""The control-channel tunnel: flow-control accounting (sans-IO), the pump over an
in-memory control pair (throughput path, interleaved control messages, a peer that stops
reading, a peer that ignores credit, a vanished peer) and the policies through the API."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import blake3
import pytest
import trio
import trio.testing

from holepunch_mig.errors import (
    ChannelClosed,
    NoDirectPath,
    PeerAbort,
    ProtocolError,
    TunnelClosed,
    TunnelRefused,
)
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.net.punch import PunchRound, PunchTiming
from holepunch_mig.net.tunnel import Tunnel
from holepunch_mig.net.tunnel_pump import FrameTransport
from holepunch_mig.session import api
from holepunch_mig.session.control_reader import ControlReader
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.credit import MAX_CHUNK

FAST = PunchTiming(connect_timeout=0.5, round_timeout=0.6, handshake_timeout=1.0)
KiB, MiB = 1 << 10, 1 << 20


# --------------------------------------------------------------------------- the pump


def socket_channel_pair() -> tuple[StreamChannel, StreamChannel]:
    """Two StreamChannels over a socketpair: the tunnel runs its worker-thread pump."""
    sa, sb = trio.socket.socketpair()
    return StreamChannel(trio.SocketStream(sa)), StreamChannel(trio.SocketStream(sb))


def pipe_channel_pair() -> tuple[StreamChannel, StreamChannel]:
    """Two StreamChannels over two pipes (as --control-cmd ssh ... / --control-stdio)."""
    ab_r, ab_w = os.pipe()
    ba_r, ba_w = os.pipe()
    fd = trio.lowlevel.FdStream
    return (
        StreamChannel(trio.StapledStream(fd(ab_w), fd(ba_r))),
        StreamChannel(trio.StapledStream(fd(ba_w), fd(ab_r))),
    )


def channel_pair(kind: str) -> tuple[Any, Any]:
    if kind == "pipes":
        return pipe_channel_pair()
    if kind == "stream":  # a StreamChannel on no descriptor: trio pump, batched frames
        a, b = trio.testing.memory_stream_pair()
        return StreamChannel(a), StreamChannel(b)
    return memory_channel_pair() if kind == "memory" else socket_channel_pair()


@asynccontextmanager
async def tunnel_pair(
    kind: str = "memory",
    **kw: Any,
) -> AsyncIterator[tuple[Tunnel, Tunnel, trio.SocketStream, trio.SocketStream]]:
    a, b = channel_pair(kind)
    ta, tb = Tunnel(a, **kw), Tunnel(b, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(ta.run)
        await nursery.start(tb.run)
        sa, sb = ta.link_stream(), tb.link_stream()
        trio_pump = kind in ("memory", "stream")
        assert ta.pump_kind == tb.pump_kind == ("trio" if trio_pump else "thread")
        try:
            yield ta, tb, sa, sb
        finally:
            await sa.aclose()
            await sb.aclose()
            await ta.aclose()
            await tb.aclose()
    if kind != "memory":
        await a.aclose()
        await b.aclose()


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"stream ended after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


@pytest.mark.parametrize("kind", ["memory", "stream", "socket", "pipes"])
async def test_bytes_cross_both_ways_with_batched_credit(kind: str) -> None:
    data_ab, data_ba = os.urandom(24 * MiB), os.urandom(3 * MiB)
    with trio.fail_after(30):
        async with tunnel_pair(kind) as (ta, tb, sa, sb):
            got: dict[str, bytes] = {}

            async def read(name: str, stream: trio.SocketStream, n: int) -> None:
                got[name] = await _receive_exactly(stream, n)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sa.send_all, data_ab)
                nursery.start_soon(sb.send_all, data_ba)
                nursery.start_soon(read, "ab", sb, len(data_ab))
                nursery.start_soon(read, "ba", sa, len(data_ba))
    assert hashlib.sha256(got["ab"]).digest() == hashlib.sha256(data_ab).digest()
    assert got["ba"] == data_ba
    assert ta.stats.bytes_sent == tb.stats.bytes_received == len(data_ab)
    # every message at most 64 KiB, and credit comes back per 4 MiB, never per chunk
    assert ta.stats.messages_sent >= len(data_ab) // MAX_CHUNK
    assert tb.stats.credits_sent <= 1 + len(data_ab) // (4 * MiB)
    assert tb.stats.credits_sent < ta.stats.messages_sent / 50
    assert tb.stats.max_buffered <= 16 * MiB


@pytest.mark.parametrize("kind", ["memory", "stream", "socket", "pipes"])
async def test_control_messages_interleave_with_tunnel_data(kind: str) -> None:
    a, b = channel_pair(kind)
    ta, tb = Tunnel(a), Tunnel(b)
    payload = os.urandom(8 * MiB)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ta.run)
            await nursery.start(tb.run)
            reader_a, reader_b = ControlReader(a, timeout=10), ControlReader(b, timeout=10)
            reader_a.attach(ta)
            reader_b.attach(tb)
            sa, sb = ta.link_stream(), tb.link_stream()
            received: list[bytes] = []

            async def sink() -> None:
                received.append(await _receive_exactly(sb, len(payload)))

            nursery.start_soon(sa.send_all, payload)
            nursery.start_soon(sink)
            # while the data flows, the control plane keeps working in both directions
            await reader_b.send(messages.Result(ok=True, bytes=1, sha256=None, error=None))
            msg, _ = await reader_a.receive(messages.Result)
            assert msg.ok is True
            await reader_a.send(messages.Ping(seq=7))
            msg, _ = await reader_b.receive(messages.Ping)
            assert msg.seq == 7
            await reader_a.send(messages.Abort(reason="stop"))
            with pytest.raises(PeerAbort, match=r"peer aborted.*stop"):
                await reader_b.receive(messages.Result)
            while not received:
                await trio.sleep(0.01)
            for t in (ta, tb):
                await t.aclose()
    assert received[0] == payload


async def test_peer_that_stops_reading_cannot_grow_memory() -> None:
    """The destination's link never reads: the source's writer must stall with at most
    the window buffered in user space (plus bounded kernel socket buffers)."""
    window, batch, sockbuf = 512 * KiB, 128 * KiB, 64 * KiB
    payload = os.urandom(32 * MiB)
    pair = tunnel_pair(window=window, credit_batch=batch, socket_buffer=sockbuf)
    with trio.fail_after(30):
        async with pair as (ta, tb, sa, sb), trio.open_nursery() as nursery:
            nursery.start_soon(sa.send_all, payload)
            # everything that can move has moved once every task is blocked
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            handed_to_link = tb.rwindow.received_total - tb.buffered
            assert ta.credit.available == 0, "sender must be out of credit"
            assert tb.buffered <= window
            assert tb.stats.max_buffered <= window
            assert ta.stats.bytes_sent <= window + handed_to_link
            # what left user space sits in kernel buffers of bounded size
            assert handed_to_link <= 8 * sockbuf
            assert ta.stats.bytes_sent < len(payload) // 8
            stalled_at = ta.stats.bytes_sent
            # still stalled: nothing more goes while nobody reads
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert ta.stats.bytes_sent == stalled_at
            # the reader comes back: the flow resumes and every byte arrives intact
            got = await _receive_exactly(sb, len(payload))
            assert got == payload
            nursery.cancel_scope.cancel()
    assert tb.stats.max_buffered <= window


async def _quiescent(*probes: Any, settle: float = 0.2) -> None:
    """Wait until the probes stop changing (worker threads are invisible to
    wait_all_tasks_blocked)."""
    last, since = None, trio.current_time()
    while True:
        now = tuple(p() for p in probes)
        if now != last:
            last, since = now, trio.current_time()
        elif trio.current_time() - since >= settle:
            return
        await trio.sleep(0.02)


async def test_worker_pump_peer_that_stops_reading_cannot_grow_memory() -> None:
    """As above, with the worker-thread pump on a socket-backed channel; control messages
    still arrive while the link is stalled."""
    window, batch, sockbuf = 512 * KiB, 128 * KiB, 64 * KiB
    payload = os.urandom(32 * MiB)
    pair = tunnel_pair("socket", window=window, credit_batch=batch, socket_buffer=sockbuf)
    with trio.fail_after(30):
        async with pair as (ta, tb, sa, sb), trio.open_nursery() as nursery:
            nursery.start_soon(sa.send_all, payload)
            await _quiescent(
                lambda: ta.stats.bytes_sent,
                lambda: tb.rwindow.received_total,
                lambda: tb.buffered,
            )
            handed_to_link = tb.rwindow.received_total - tb.buffered
            assert ta.credit.available == 0, "sender must be out of credit"
            assert 0 < tb.buffered <= window
            assert tb.stats.max_buffered <= window
            assert ta.stats.bytes_sent <= window + handed_to_link
            assert handed_to_link <= 8 * sockbuf
            assert ta.stats.bytes_sent < len(payload) // 8
            # the control plane still works both ways while the data path is stalled
            reader_a, reader_b = ControlReader(ta.channel, 5), ControlReader(tb.channel, 5)
            reader_a.attach(ta)
            reader_b.attach(tb)
            await reader_a.send(messages.Ping(seq=3))
            assert (await reader_b.receive(messages.Ping))[0].seq == 3
            await reader_b.send(messages.Pong(seq=3))
            assert (await reader_a.receive(messages.Pong))[0].seq == 3
            got = await _receive_exactly(sb, len(payload))
            assert got == payload
            nursery.cancel_scope.cancel()
    assert tb.stats.max_buffered <= window


@pytest.mark.parametrize("kind", ["memory", "socket", "pipes"])
async def test_peer_ignoring_credit_fails_the_tunnel(kind: str) -> None:
    a, b = channel_pair(kind)
    # credit comes back only per whole window: two chunks (2 x 65535 B) cannot earn any,
    # so the third overruns whatever the link has read (a smaller batch made this racy)
    tb = Tunnel(b, window=128 * KiB, credit_batch=128 * KiB)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            sb = tb.link_stream()
            grant = messages.decode(await a.receive_message())
            assert isinstance(grant, messages.Message) and grant.bytes == 128 * KiB
            chunk = messages.encode(messages.TunnelData(b"x" * MAX_CHUNK))
            for _ in range(3):  # 3 x 64 KiB > 128 KiB of credit
                await a.send_message(chunk)
            with pytest.raises(ProtocolError, match="ignores flow control"):
                await tb.receive_control()
            # the link sees the end of the stream after what was within credit
            data = b""
            while chunk_in := await sb.receive_some(1 << 20):
                data += chunk_in
            assert len(data) <= 128 * KiB
            await tb.aclose()
            nursery.cancel_scope.cancel()


async def test_worker_pump_takes_over_buffered_bytes_and_gives_the_channel_back() -> None:
    """Frames the StreamChannel had already read when the tunnel started are routed by
    the worker; after the tunnel closes the channel works as before."""
    a, b = socket_channel_pair()
    enc = messages.encode
    burst = b"".join(
        messages.frame(m)
        for m in (
            enc(messages.Ping(seq=1)),
            enc(messages.Credit(bytes=5000)),
            enc(messages.TunnelData(b"early bytes")),
            enc(messages.Pong(seq=2)),
        )
    )
    with trio.fail_after(10):
        await a._stream.send_all(burst)
        assert await b.receive_message() == enc(messages.Ping(seq=1))
        tb = Tunnel(b, window=128 * KiB, credit_batch=64 * KiB)
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            assert tb.pump_kind == "thread"
            sb = tb.link_stream()
            assert await tb.receive_control() == enc(messages.Pong(seq=2))
            assert await _receive_exactly(sb, 11) == b"early bytes"
            assert tb.credit.available == 5000
            await sb.send_all(b"up")
            while tb.stats.bytes_sent < 2:
                await trio.sleep(0.01)
            await tb.aclose()
            await sb.aclose()
        # the peer saw the initial grant and the uplinked bytes, then the channel is
        # handed back intact: both directions work without the tunnel
        assert messages.decode(await a.receive_message()) == messages.Credit(bytes=128 * KiB)
        assert await a.receive_message() == enc(messages.TunnelData(b"up"))
        await a.send_message(enc(messages.Ping(seq=9)))
        assert await b.receive_message() == enc(messages.Ping(seq=9))
        await b.send_message(enc(messages.Pong(seq=9)))
        assert await a.receive_message() == enc(messages.Pong(seq=9))
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("kind", ["memory", "socket", "pipes"])
async def test_control_channel_closing_ends_the_tunnel(kind: str) -> None:
    a, b = channel_pair(kind)
    tb = Tunnel(b)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            sb = tb.link_stream()
            await a.receive_message()  # initial credit
            await a.aclose()
            with pytest.raises(ChannelClosed):
                await tb.receive_control()
            assert await sb.receive_some(100) == b""
            with pytest.raises(TunnelClosed):
                await tb.receive_control()
            await tb.aclose()


# --------------------------------------------------------------------------- policies


# --------------------------------------------------------------------------- FrameTransport


def _blocking(stream: trio.SocketStream) -> socket.socket:
    """The link's end as Link takes it after the handshake."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(True)
    return sock


def _transports(
    ta: Tunnel, tb: Tunnel, sa: trio.SocketStream, sb: trio.SocketStream
) -> tuple[FrameTransport, FrameTransport]:
    xa, xb = ta.link_transport(_blocking(sa)), tb.link_transport(_blocking(sb))
    assert isinstance(xa, FrameTransport) and isinstance(xb, FrameTransport)
    return xa, xb


def _recv_all(x: FrameTransport, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = x.recv_into(view[got:], min(n - got, 1 << 20), socket.MSG_WAITALL)
        assert k, f"transport ended after {got} of {n} bytes"
        got += k
    return bytes(buf)


async def test_trio_pump_keeps_the_socketpair_for_the_record_layer() -> None:
    async with tunnel_pair("memory") as (ta, _tb, sa, _sb):
        sock = _blocking(sa)
        assert ta.link_transport(sock) is sock
        sock.close()


async def test_frame_transport_carries_bytes_both_ways_after_the_socketpair() -> None:
    """Bytes still in the socketpair when the record layer switches come first, in order;
    then records go straight into <= 64 KiB TunnelData frames with batched credit."""
    window, batch = 512 * KiB, 128 * KiB
    early_ab, early_ba = os.urandom(300 * KiB + 5), os.urandom(5000)
    ab, ba = os.urandom(8 * MiB + 3), os.urandom(3 * MiB + 1)
    with trio.fail_after(30):
        async with tunnel_pair("socket", window=window, credit_batch=batch) as (ta, tb, sa, sb):
            await sa.send_all(early_ab)
            await sb.send_all(early_ba)
            xa, xb = _transports(ta, tb, sa, sb)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, xa.sendall, ab)
                nursery.start_soon(trio.to_thread.run_sync, xb.sendall, ba)
                got_b = await trio.to_thread.run_sync(_recv_all, xb, len(early_ab) + len(ab))
                got_a = await trio.to_thread.run_sync(_recv_all, xa, len(early_ba) + len(ba))
            assert got_b == early_ab + ab
            assert got_a == early_ba + ba
            assert ta.stats.bytes_sent == len(early_ab) + len(ab)
            assert ta.stats.messages_sent >= ta.stats.bytes_sent // MAX_CHUNK
            assert tb.stats.max_buffered <= window
            # credit in batches: about one message per batch, never one per chunk
            assert tb.stats.credits_sent <= 2 + (len(early_ab) + len(ab)) // batch
            xa.close()
            xb.close()


async def test_frame_transport_peer_that_stops_reading_cannot_grow_memory() -> None:
    """The destination's record layer never reads: the source's sendall stalls with at
    most the window buffered (no socketpair any more), control messages still pass."""
    window, batch = 512 * KiB, 128 * KiB
    payload = os.urandom(32 * MiB)
    with trio.fail_after(30):
        async with tunnel_pair("socket", window=window, credit_batch=batch) as (ta, tb, sa, sb):
            xa, xb = _transports(ta, tb, sa, sb)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, xa.sendall, payload)
                await _quiescent(
                    lambda: ta.stats.bytes_sent,
                    lambda: tb.rwindow.received_total,
                    lambda: tb.buffered,
                )
                assert ta.credit.available == 0, "sender must be out of credit"
                assert 0 < tb.buffered <= window
                assert ta.stats.bytes_sent <= window
                assert tb.stats.max_buffered <= window
                reader_a, reader_b = ControlReader(ta.channel, 5), ControlReader(tb.channel, 5)
                reader_a.attach(ta)
                reader_b.attach(tb)
                await reader_a.send(messages.Ping(seq=4))
                assert (await reader_b.receive(messages.Ping))[0].seq == 4
                await reader_b.send(messages.Pong(seq=4))
                assert (await reader_a.receive(messages.Pong))[0].seq == 4
                got = await trio.to_thread.run_sync(_recv_all, xb, len(payload))
            assert got == payload
            assert tb.stats.max_buffered <= window
            xa.close()
            xb.close()


async def test_frame_transport_timeout_shutdown_and_tunnel_end() -> None:
    window, batch = 256 * KiB, 64 * KiB
    with trio.fail_after(30):
        async with tunnel_pair("socket", window=window, credit_batch=batch) as (ta, tb, sa, sb):
            xa, xb = _transports(ta, tb, sa, sb)
            # an idle link times out like a socket with a timeout
            xb.settimeout(0.2)
            assert xb.gettimeout() == 0.2
            with pytest.raises(TimeoutError):
                await trio.to_thread.run_sync(xb.recv_into, bytearray(10), 10)
            xb.settimeout(None)
            xb.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a no-op
            # one small round trip switches both directions to the frames
            await trio.to_thread.run_sync(xa.sendall, b"hello")
            assert await trio.to_thread.run_sync(_recv_all, xb, 5) == b"hello"
            # shutdown wakes a blocked reader with end of stream
            results: list[int] = []

            async def reader() -> None:
                results.append(await trio.to_thread.run_sync(xb.recv_into, bytearray(10), 10))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.1)
                xb.shutdown(socket.SHUT_RDWR)
            assert results == [0]
            # the reader is gone: no credit comes back, the sender blocks, then fails
            # once its side shuts down
            failed: list[BaseException] = []

            async def writer() -> None:
                try:
                    await trio.to_thread.run_sync(xa.sendall, os.urandom(4 * window))
                except OSError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await _quiescent(lambda: ta.stats.bytes_sent)
                assert ta.credit.available == 0
                xa.shutdown(socket.SHUT_WR)
            assert len(failed) == 1 and isinstance(failed[0], BrokenPipeError)
            with pytest.raises(BrokenPipeError):
                await trio.to_thread.run_sync(xa.sendall, b"more")
            # the tunnel stops: the transport ends the stream and refuses to send
            await ta.aclose()
            await ta.channel.aclose()
            with trio.fail_after(5):
                while tb.error is None:
                    await trio.sleep(0.02)
            xc = xa
            xc.close()
            xc.close()  # idempotent
            with pytest.raises(OSError):
                xc.sendall(b"x")
            xb.close()


def _no_direct_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SYN vanishes: the punch race yields nothing (as behind dropping firewalls)."""

    async def run(self: PunchRound, out: trio.MemorySendChannel[Any]) -> None:
        async with out:
            await trio.sleep_forever()

    monkeypatch.setattr(PunchRound, "run", run)


async def _transfer(
    data: bytes,
    src_opts: dict[str, Any],
    dst_opts: dict[str, Any],
    kind: str = "memory",
) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    a, b = channel_pair(kind)
    out = io.BytesIO()
    seen: dict[str, Any] = {}

    async def side(name: str, channel: ControlChannel, role: Any, opts: dict[str, Any]) -> None:
        try:
            async with api.connect(channel, role=role, timing=FAST, rounds=1, **opts) as link:
                seen[name] = link
                if role == "source":
                    await link.send_file(io.BytesIO(data))
                else:
                    await link.receive_file(out)
        except NoDirectPath as exc:
            seen[name] = exc
        finally:
            await channel.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "source", a, "source", src_opts)
            nursery.start_soon(side, "destination", b, "destination", dst_opts)
    return seen["source"], seen["destination"], out.getvalue()


@pytest.mark.parametrize("kind", ["memory", "socket"])
async def test_policy_tunnel_carries_the_records_end_to_end(kind: str) -> None:
    """Over a memory pair the record layer uses the socketpair (trio pump); over a
    socket it writes straight into tunnel frames (worker pump, FrameTransport)."""
    data = os.urandom(20 * MiB + 17)
    src, dst, got = await _transfer(data, {"policy": "tunnel"}, {"policy": "auto"}, kind)
    assert got == data
    digest = blake3.blake3(data).hexdigest()
    for link in (src, dst):
        assert link.path == "tunnel" and link.report.path == "tunnel"
        assert link.fell_back is False and link.report.fell_back is False
        assert link.report.ok is True and link.report.sha256 == digest
        assert link.report.policy == "tunnel"
        assert "policy 'tunnel'" in link.report.path_reason
        assert link.report.pairs == []
        assert isinstance(link.sock, FrameTransport) == (kind == "socket")
        assert link.tunnel.pump_kind == ("thread" if kind == "socket" else "trio")
    # tunnel bytes are records (encrypted), never the plaintext
    assert src.tunnel.stats.bytes_sent > len(data)


async def test_policy_auto_falls_back_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _no_direct_path(monkeypatch)
    data = os.urandom(3 * MiB)
    with caplog.at_level(logging.WARNING, logger="holepunch_mig"):
        src, dst, got = await _transfer(data, {"policy": "auto"}, {"policy": "auto"})
    assert got == data
    for link in (src, dst):
        assert link.path == "tunnel"
        assert link.fell_back is True and link.report.fell_back is True
        assert link.report.ok is True
        assert link.report.path_reason.startswith("fell back to the tunnel (policy auto)")
        assert link.report.verdict  # why direct failed, for the admin
        assert "FALLBACK" in link.report.summary()
    assert any("falling back to the tunnel" in r.getMessage() for r in caplog.records)


async def test_policy_auto_prefers_direct() -> None:
    data = os.urandom(1 * MiB)
    src, dst, got = await _transfer(data, {"policy": "auto"}, {"policy": "auto"})
    assert got == data
    assert src.path == dst.path == "direct"
    assert not src.fell_back and not dst.fell_back


async def test_policy_direct_fails_with_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_direct_path(monkeypatch)
    src, dst, _ = await _transfer(b"x", {"policy": "direct"}, {"policy": "auto"})
    for exc in (src, dst):
        assert type(exc) is NoDirectPath
        assert exc.report.path == "none" and exc.report.ok is False
        assert exc.verdict == exc.report.verdict


async def test_destination_direct_refuses_the_sources_auto_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_direct_path(monkeypatch)
    src, dst, _ = await _transfer(b"x", {"policy": "auto"}, {"policy": "direct"})
    for exc in (src, dst):
        assert isinstance(exc, TunnelRefused)
        assert "destination's policy 'direct' forbids" in str(exc)
        assert exc.report.path == "none"


async def test_destination_direct_refuses_tunnel_only() -> None:
    src, dst, _ = await _transfer(b"x", {"policy": "tunnel"}, {"policy": "direct"})
    for exc in (src, dst):
        assert isinstance(exc, TunnelRefused)
        assert "forbids the tunnel" in str(exc)


async def test_unknown_policy_is_refused() -> None:
    a, _b = memory_channel_pair()
    with pytest.raises(ValueError, match="policy must be"):
        async with api.connect(a, role="source", policy="sometimes"):
            pass


def test_blocking_facade_over_the_tunnel() -> None:
    import socket
    import threading

    data = os.urandom(4 * MiB)
    ca, cb = socket.socketpair()
    out = io.BytesIO()
    results: dict[str, Any] = {}

    def run(name: str, sock: socket.socket, role: Any) -> None:
        try:
            with api.connect_blocking(sock, role=role, policy="tunnel") as link:
                results[name + "-path"] = (link.path, link.fell_back)
                if role == "source":
                    results[name] = link.send_file(io.BytesIO(data))
                else:
                    results[name] = link.receive_file(out)
        except BaseException as exc:  # surfaced below
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("src", ca, "source")),
        threading.Thread(target=run, args=("dst", cb, "destination")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out.getvalue() == data, results
    assert results["src-path"] == results["dst-path"] == ("tunnel", False)
    assert results["src"].sha256 == blake3.blake3(data).hexdigest()
