"""The public API on this machine's own addresses: trio, blocking and asyncio entry points,
and the failures a caller must see (wrong keys, a vanished peer)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import socket
import threading
from collections.abc import Callable

import blake3
import pytest
import trio

from holepunch_mig.errors import ChannelClosed, ControlTimeout, NoDirectPath
from holepunch_mig.net import record_io
from holepunch_mig.net.control import (
    ControlChannel,
    StreamChannel,
)
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.session import api
from holepunch_mig.testing import MemoryChannel, memory_channel_pair
from holepunch_mig.wire import messages
from holepunch_mig.wire.noise import generate_keypair

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=1.0)


async def _transfer(
    a: ControlChannel, b: ControlChannel, data: bytes, **options: object
) -> tuple[api.Link, api.Link, bytes]:
    out = io.BytesIO()
    links: dict[str, api.Link] = {}

    async def source() -> None:
        async with api.connect(a, role="source", **options) as link:
            links["source"] = link
            result = await link.send_file(io.BytesIO(data))
            assert result.bytes == len(data)

    async def destination() -> None:
        async with api.connect(b, role="destination", **options) as link:
            links["destination"] = link
            await link.receive_file(out)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    return links["source"], links["destination"], out.getvalue()


async def test_memory_control_direct_link() -> None:
    a, b = memory_channel_pair()
    data = os.urandom(8 << 20)
    src, dst, got = await _transfer(a, b, data)
    assert got == data
    digest = blake3.blake3(data).hexdigest()
    for link in (src, dst):
        rep = link.report
        assert rep.path == "direct"
        assert rep.ok is True
        assert rep.digest == "blake3"
        assert rep.sha256 == digest
        assert rep.bytes == len(data)
        assert rep.time_to_link is not None and rep.time_to_link > 0
        assert rep.rounds == 1
        assert [p.outcome for p in rep.pairs].count("nominated") == 1
        parsed = json.loads(rep.to_json())
        assert parsed["path"] == "direct" and parsed["sha256"] == digest
        assert rep.session == src.report.session
    assert src.report.rtt is not None
    # no key material in reports: the session's public keys never appear either
    assert "key" not in src.report.to_json().lower().replace("keys", "")


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        ("auto", "auto", "blake3"),
        ("sha256", "auto", "sha256"),
        ("auto", "sha256", "sha256"),
        ("blake3", "blake3", "blake3"),
    ],
)
async def test_digest_negotiation(source: str, destination: str, expected: str) -> None:
    """Each side announces BLAKE3 unless it asks for SHA-256; both hash with what both
    announced, and the result is that algorithm's digest of the data."""
    a, b = memory_channel_pair()
    data = os.urandom(3 << 20)
    out = io.BytesIO()
    results: dict[str, api.TransferResult] = {}

    async def src() -> None:
        async with api.connect(a, role="source", digest=source) as link:
            results["source"] = await link.send_file(io.BytesIO(data))

    async def dst() -> None:
        async with api.connect(b, role="destination", digest=destination) as link:
            results["destination"] = await link.receive_file(out)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(src)
            nursery.start_soon(dst)
    want = (blake3.blake3 if expected == "blake3" else hashlib.sha256)(data).hexdigest()
    assert out.getvalue() == data
    for result in results.values():
        assert result.digest == expected and result.sha256 == want


@pytest.mark.parametrize("resume_attempts", [0, 3])
@pytest.mark.parametrize("digest", ["blake3", "sha256"])
async def test_blake3_is_hashed_inline_sha256_in_a_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch, digest: str, resume_attempts: int
) -> None:
    """BLAKE3 is hashed by the thread that just read or opened the bytes, in place; only
    SHA-256 gets a hash thread and its own plaintext buffers -- with resume on (what
    send/recv run) as without.  (A resumable link once told the record layer "sha256"
    whatever the session's digest, so BLAKE3 went through the slower threaded path.)"""
    hash_threads: list[str] = []
    real_init = record_io._HashThread.__init__

    def spy(self: record_io._HashThread, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        hash_threads.append(self._h.name)  # what the thread hashes, whatever it was told

    monkeypatch.setattr(record_io._HashThread, "__init__", spy)
    a, b = memory_channel_pair()
    data = os.urandom(5 << 20)
    src, dst, got = await _transfer(a, b, data, digest=digest, resume_attempts=resume_attempts)
    assert got == data
    want = (blake3.blake3 if digest == "blake3" else hashlib.sha256)(data).hexdigest()
    assert src.report.sha256 == dst.report.sha256 == want
    assert hash_threads == ([] if digest == "blake3" else ["sha256", "sha256"])


async def test_required_blake3_refused_by_sha256_peer() -> None:
    a, b = memory_channel_pair()
    failures: list[BaseException] = []

    async def side(channel: ControlChannel, role: str, digest: str) -> None:
        try:
            async with api.connect(channel, role=role, digest=digest):  # type: ignore[arg-type]
                pass
        except Exception as exc:
            failures.append(exc)
        finally:
            await channel.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, a, "source", "blake3")
            nursery.start_soon(side, b, "destination", "sha256")
    assert any("digest blake3 was required" in str(exc) for exc in failures), failures
    assert len(failures) == 2, failures  # the other side fails too, it is not left waiting


async def test_tcp_control_direct_link() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = trio.socket.socket()
    await client.connect(("127.0.0.1", port))
    server, _ = await listener.accept()
    listener.close()
    a = StreamChannel(trio.SocketStream(client))
    b = StreamChannel(trio.SocketStream(server))
    assert a.peer_host == "127.0.0.1"
    data = os.urandom(3 << 20)
    _src, _dst, got = await _transfer(a, b, data)
    assert got == data


def _blocking_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_blocking_facade() -> None:
    left, right = _blocking_pair()
    data = os.urandom(2 << 20)
    out = io.BytesIO()
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> threading.Thread:
        def wrapped() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=wrapped)
        thread.start()
        return thread

    def source() -> None:
        with api.connect_blocking(left, role="source", include_loopback=True) as link:
            link.send_file(io.BytesIO(data))

    def destination() -> None:
        with api.connect_blocking(right, role="destination", include_loopback=True) as link:
            link.receive_file(out)
            assert link.report.path == "direct"

    threads = [run(source), run(destination)]
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert not errors, errors
    assert out.getvalue() == data


def test_asyncio_facade() -> None:
    left, right = _blocking_pair()
    data = os.urandom(1 << 20)
    out = io.BytesIO()

    async def main() -> None:
        async def source() -> None:
            link = await api.connect_asyncio(left, role="source", include_loopback=True)
            with link:
                await asyncio.to_thread(link.send_file, io.BytesIO(data))

        async def destination() -> None:
            link = await api.connect_asyncio(right, role="destination", include_loopback=True)
            with link:
                await asyncio.to_thread(link.receive_file, out)

        await asyncio.wait_for(asyncio.gather(source(), destination()), 30)

    asyncio.run(main())
    assert out.getvalue() == data


class KeySwapper:
    """A control path that replaces the answer's key: the offer no longer matches who
    answers the handshake, so every link must be rejected."""

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer_host = inner.peer_host

    async def send_message(self, message: bytes) -> None:
        await self.inner.send_message(message)

    async def receive_message(self) -> bytes:
        raw = await self.inner.receive_message()
        event = messages.decode(raw)
        if isinstance(event, messages.Answer):
            forged = dataclasses.replace(event, key=generate_keypair()[1].hex())
            return messages.encode(forged)
        return raw

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_wrong_key_rejects_every_link() -> None:
    a, b = memory_channel_pair()
    failures: list[BaseException] = []

    async def side(channel: ControlChannel, role: str) -> None:
        try:
            async with api.connect(channel, role=role, rounds=1, timing=FAST):  # type: ignore[arg-type]
                pytest.fail("a link came up with the wrong key")
        except (NoDirectPath, ChannelClosed) as exc:
            failures.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, KeySwapper(a), "source")
            nursery.start_soon(side, b, "destination")
    src_fail = [f for f in failures if isinstance(f, NoDirectPath)]
    assert src_fail, failures
    report = src_fail[0].report  # type: ignore[attr-defined]
    outcomes = {p.outcome for p in report.pairs}
    assert "rejected" in outcomes
    assert "connected" not in outcomes and "nominated" not in outcomes
    assert any("handshake failed" in p.detail for p in report.pairs)


async def test_destination_vanishes_before_answer() -> None:
    a, b = memory_channel_pair()

    async def vanish() -> None:
        await b.receive_message()
        await b.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vanish)
            with pytest.raises(ChannelClosed, match="waiting for the answer"):
                async with api.connect(a, role="source"):
                    pass


async def test_source_never_offers_times_out() -> None:
    _a, b = memory_channel_pair()
    expected = r"no offer message .* within 0.2"
    with trio.fail_after(10), pytest.raises(ControlTimeout, match=expected):
        async with api.connect(b, role="destination", control_timeout=0.2):
            pass


def test_unknown_option_and_role() -> None:
    a, _b = memory_channel_pair()

    async def main() -> None:
        with pytest.raises(TypeError, match="unknown option 'colour'"):
            async with api.connect(a, role="source", colour="red"):
                pass
        with pytest.raises(ValueError, match="role must be"):
            async with api.connect(a, role="sender"):  # type: ignore[arg-type]
                pass

    trio.run(main)
