"""The authenticated control channel through the library: the listener keeps serving
through a stranger, the tunnel runs over sealed messages, and every link is bound to the
control session (a relay that splices two authenticated control sessions gets no link)."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import blake3
import pytest
import trio

from holepunch_mig.errors import ControlRejected, HolepunchError, NoDirectPath, ProtocolError
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.net.secure_control import (
    Pending,
    SecureChannel,
    accept_authenticated,
    choose_eviction,
    connect_authenticated,
    secure,
    source_prefix,
)
from holepunch_mig.session import api, negotiate
from holepunch_mig.wire.control_auth import ControlAuth
from holepunch_mig.wire.identity import Identity, PeerSet, parse_peer_line

FAST = {"control_timeout": 10.0, "rounds": 1, "stun_timeout": 0.5, "ipv6": False}


async def test_listener_serves_through_a_stranger_then_authenticates() -> None:
    auth = ControlAuth.from_secret(os.urandom(32))
    stranger = ControlAuth.from_secret(os.urandom(32))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: _accept(auth, task_status))
        with trio.fail_after(10):
            with pytest.raises(ControlRejected, match="another pre-shared secret"):
                ch = await connect_authenticated("127.0.0.1", port, stranger)
                await ch.receive_message()
            real = await connect_authenticated("127.0.0.1", port, auth)
            await real.send_message(b"\x01hello")
            assert await real.receive_message() == b"\x01hello back"
            await real.aclose()


async def _accept(auth: ControlAuth, task_status: trio.TaskStatus[int]) -> None:
    channel = await accept_authenticated("127.0.0.1", 0, auth, task_status=task_status)
    assert channel.session.peer == "holder of the pre-shared secret"
    assert any("refused 1 connection(s)" in n for n in channel.notes), channel.notes
    assert await channel.receive_message() == b"\x01hello"
    await channel.send_message(b"\x01hello back")
    with pytest.raises(HolepunchError):
        await channel.receive_message()  # the peer closed
    await channel.aclose()


async def _pair() -> tuple[StreamChannel, StreamChannel]:
    a, b = trio.socket.socketpair()
    return (
        StreamChannel(trio.SocketStream(a), peer_host="127.0.0.1"),
        StreamChannel(trio.SocketStream(b), peer_host="127.0.0.1"),
    )


async def test_tunnel_runs_over_the_sealed_channel() -> None:
    """The tunnel cannot borrow the socket of a sealed channel: it goes through the
    trio pump, sealed, and still delivers verified bytes."""
    auth = ControlAuth.from_secret(os.urandom(32))
    a, b = await _pair()
    data = os.urandom(3 << 20)
    got = io.BytesIO()

    async def source() -> None:
        async with api.connect(a, role="source", auth=auth, policy="tunnel", **FAST) as link:
            assert link.report.path == "tunnel"
            assert link.report.control_peer == "holder of the pre-shared secret"
            await link.send_file(io.BytesIO(data))

    async def destination() -> None:
        async with api.connect(b, role="destination", auth=auth, policy="auto", **FAST) as link:
            result = await link.receive_file(got)
            assert result.digest == "blake3" and result.sha256 == blake3.blake3(data).hexdigest()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    assert got.getvalue() == data


async def _splice(left: ControlChannel, right: ControlChannel) -> None:
    async def pump(src: ControlChannel, dst: ControlChannel) -> None:
        try:
            while True:
                await dst.send_message(await src.receive_message())
        except HolepunchError:
            await dst.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, left, right)
        nursery.start_soon(pump, right, left)


async def _spliced_session(monkeypatch: pytest.MonkeyPatch | None) -> tuple[object, object]:
    """A relay that holds the psk (a third host the manager gave it to) terminates one
    control session towards each side and forwards every message unchanged."""
    if monkeypatch is not None:  # the control: no binding, as before the change
        monkeypatch.setattr(negotiate, "control_binding", lambda control: b"")
    auth = ControlAuth.from_secret(os.urandom(32))
    src_ch, relay_a = await _pair()
    relay_b, dst_ch = await _pair()
    outcome: dict[str, object] = {}

    async def side(channel: ControlChannel, role: str) -> None:
        try:
            secured = await secure(channel, auth, initiator=role == "source")
            async with api.connect(secured, role=role, **FAST) as link:  # type: ignore[arg-type]
                outcome[role] = link.report.path
        except HolepunchError as exc:
            outcome[role] = exc

    async def relay() -> None:
        facing_src, facing_dst = await _both(
            secure(relay_a, auth, initiator=False), secure(relay_b, auth, initiator=True)
        )
        assert isinstance(facing_src, SecureChannel) and isinstance(facing_dst, SecureChannel)
        assert facing_src.binding != facing_dst.binding  # two control sessions
        await _splice(facing_src, facing_dst)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            nursery.start_soon(side, src_ch, "source")
            nursery.start_soon(side, dst_ch, "destination")
            while len(outcome) < 2:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    return outcome["source"], outcome["destination"]


async def _both(*coros):  # type: ignore[no-untyped-def]
    results: list[object] = [None] * len(coros)

    async def run(i: int, coro) -> None:  # type: ignore[no-untyped-def]
        results[i] = await coro

    async with trio.open_nursery() as nursery:
        for i, coro in enumerate(coros):
            nursery.start_soon(run, i, coro)
    return results


async def test_a_relay_splicing_two_control_sessions_gets_no_link() -> None:
    source, destination = await _spliced_session(None)
    assert isinstance(source, NoDirectPath), source
    assert isinstance(destination, HolepunchError), destination


async def test_without_the_binding_the_splice_would_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: the same relay, links not bound to the control
    session, and the spliced session links (the relay could then steer it)."""
    source, destination = await _spliced_session(monkeypatch)
    assert source == "direct" and destination == "direct"


class _GatedChannel:
    """Forwards to ``inner``; once armed, the next send waits at a gate first (a write
    that has not reached the socket yet when its task is cancelled)."""

    def __init__(self, inner: ControlChannel) -> None:
        self.inner = inner
        self.peer_host = inner.peer_host
        self.armed = False
        self.waiting = trio.Event()
        self.gate = trio.Event()

    async def send_message(self, message: bytes) -> None:
        if self.armed:
            self.armed = False
            self.waiting.set()
            await self.gate.wait()
        await self.inner.send_message(message)

    async def receive_message(self) -> bytes:
        return await self.inner.receive_message()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_cancelled_send_does_not_desynchronise_the_sealed_stream() -> None:
    """A send cancelled after its frame was sealed (a racing task cancelled by its
    nursery) must still put that frame on the wire: otherwise the next message carries a
    sequence number the peer does not expect and the session fails authentication."""
    auth = ControlAuth.from_secret(os.urandom(32))
    a, b = await _pair()
    gated = _GatedChannel(a)
    sides: dict[bool, SecureChannel] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_secure_into, gated, auth, True, sides)
            nursery.start_soon(_secure_into, b, auth, False, sides)
        src, dst = sides[True], sides[False]
        scope = trio.CancelScope()

        async def first() -> None:
            with scope:
                await src.send_message(b"\x01first")

        gated.armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await gated.waiting.wait()  # sealed, not yet written
            scope.cancel()
            gated.gate.set()
        await src.send_message(b"\x01second")
        assert await dst.receive_message() == b"\x01first"
        assert await dst.receive_message() == b"\x01second"


async def _secure_into(
    inner: ControlChannel, auth: ControlAuth, initiator: bool, out: dict[bool, SecureChannel]
) -> None:
    out[initiator] = await secure(inner, auth, initiator=initiator)


def _pinned(identity: Identity, name: str) -> PeerSet:
    peers = PeerSet()
    peers.add(parse_peer_line(identity.public_line(name), name), name)
    return peers


async def test_squatters_that_keep_reconnecting_do_not_keep_the_real_peer_out() -> None:
    """Twenty silent connections from five addresses overfill the pending slots and
    reopen the moment one is closed.  The listener used to refuse newcomers while full,
    so the real source lost every race for a slot until its wait ran out; now the
    connection that has shown least is dropped and the real source gets in."""
    a, b = Identity.generate(), Identity.generate()
    destination = ControlAuth(identity=b, peers=_pinned(a, "source"))
    source = ControlAuth(identity=a, peers=_pinned(b, "destination"))
    stop = trio.Event()
    full = _Seen("control listener")
    logging.getLogger("holepunch_mig").addHandler(full)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    lambda task_status: accept_authenticated(
                        "127.0.0.1", 0, destination, task_status=task_status
                    )
                )

                async def squat(i: int) -> None:
                    while not stop.is_set():
                        with trio.socket.socket() as s:
                            await s.bind((f"127.0.0.{2 + i // 4}", 0))
                            await s.connect(("127.0.0.1", port))
                            with contextlib.suppress(OSError):
                                await s.recv(1)  # b"" once the listener closes it

                for i in range(20):
                    nursery.start_soon(squat, i)
                while not full.seen:  # the listener has dropped one: every slot is taken
                    await trio.sleep(0.01)
                channel = await connect_authenticated("127.0.0.1", port, source, wait=10)
                assert channel.session.peer.startswith("pinned key 'destination'")
                await channel.aclose()
                stop.set()
                nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("holepunch_mig").removeHandler(full)


class _Seen(logging.Handler):
    """Remembers whether a record containing ``text`` was logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage() and "dropped" in record.getMessage():
            self.seen = True


def test_eviction_drops_the_connection_that_showed_least() -> None:
    def entry(prefix: str, started: float, received: int = 0) -> Pending:
        return Pending(prefix, started, received)

    crowd = [entry("10.0.0.0/24", t) for t in range(3)] + [entry("10.0.1.0/24", 9, 1)]
    assert choose_eviction(crowd, "10.0.2.0/24", max_pending=16, per_prefix=4) is None
    # over the per-prefix limit: the victim comes from the newcomer's prefix, oldest first
    assert choose_eviction(crowd, "10.0.0.0/24", max_pending=16, per_prefix=3) is crowd[0]
    # full: a silent one before one that sent its first frame, however old that one is
    full = [entry("10.0.1.0/24", 0, received=1), *crowd[:3]]
    assert choose_eviction(full, "10.0.3.0/24", max_pending=4, per_prefix=4) is full[1]
    # same progress: the most crowded prefix loses first
    mixed = [entry("10.0.5.0/24", 0), entry("10.0.6.0/24", 1), entry("10.0.6.0/24", 2)]
    assert choose_eviction(mixed, "10.0.7.0/24", max_pending=3, per_prefix=4) is mixed[1]
    assert source_prefix("192.0.2.77") == "192.0.2.0/24"
    assert source_prefix("2001:db8::1:2") == "2001:db8::/64"
    assert source_prefix("::ffff:192.0.2.1") == "192.0.2.0/24"


async def test_a_large_frame_is_refused_at_its_length_not_after_its_body() -> None:
    """A reader with a limit refuses on the length prefix: it does not wait for (or
    buffer) the body a stranger may trickle for the whole handshake deadline."""
    ours, theirs = await _pair()
    await theirs._stream.send_all((60_000).to_bytes(4, "big") + b"\x03" * 100)
    with trio.fail_after(2), pytest.raises(ProtocolError, match="60000 bytes exceeds the 512"):
        await ours.receive_message(limit=512)
    await ours.aclose()
    await theirs.aclose()


async def test_listener_refuses_an_oversized_handshake_frame_at_once() -> None:
    """A stranger that announces a 60 kB handshake frame is refused as soon as its length
    arrives (well inside the 30 s handshake deadline), the refusal names why, and the real
    peer still links."""
    auth = ControlAuth.from_secret(os.urandom(32))
    notes: list[str] = []

    async def listen(task_status: trio.TaskStatus[int]) -> None:
        channel = await accept_authenticated(
            "127.0.0.1", 0, auth, handshake_timeout=30, task_status=task_status
        )
        notes.extend(channel.notes)
        await channel.aclose()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(listen)
        stranger = trio.socket.socket()
        with stranger, trio.fail_after(10):
            await stranger.connect(("127.0.0.1", port))
            await stranger.send((60_000).to_bytes(4, "big"))
            assert await stranger.recv(100) == b""
            real = await connect_authenticated("127.0.0.1", port, auth)
            await real.aclose()
    assert any("60000 bytes exceeds the 512-byte limit" in n for n in notes), notes


async def test_a_flood_of_strangers_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refusal is counted in the notes, but only the first few are logged as
    warnings: 40 strangers give at most 10 warning lines."""
    auth = ControlAuth.from_secret(os.urandom(32))
    notes: list[str] = []

    async def listen(task_status: trio.TaskStatus[int]) -> None:
        channel = await accept_authenticated("127.0.0.1", 0, auth, task_status=task_status)
        notes.extend(channel.notes)
        await channel.aclose()

    caplog.set_level(logging.WARNING, logger="holepunch_mig")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listen)
        with trio.fail_after(20):
            for _ in range(40):
                stranger = trio.socket.socket()
                with stranger:
                    await stranger.connect(("127.0.0.1", port))
                    await stranger.send(b"\x00\x00\x00\x02\x01{")  # not a handshake frame
                    while await stranger.recv(1000):  # the reject, then the close
                        pass
            real = await connect_authenticated("127.0.0.1", port, auth)
            await real.aclose()
    refusals = [r for r in caplog.records if "control listener: refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 10, len(refusals)
    assert any("refused 40 connection(s)" in n for n in notes), notes
