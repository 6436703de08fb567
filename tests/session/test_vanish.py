"""A peer vanishing at every protocol step.

The peer is the real library in the same process; a tap on its control channel (or on
its link authenticator, or its data link) makes it vanish at one step:

* ``close`` — the peer is gone: its control channel is closed and its task cancelled, so
  its sockets close (FIN/RST), as when its process dies;
* ``silent`` — the peer freezes at that step, holding every socket open (a hung process,
  a dead network path that sends nothing back).

The survivor must fail within its deadline with a specific exception whose message names
the step, and release every file descriptor and its punch port.  File-level outcomes (no
partial output presented as complete) are checked with the CLI and SIGKILL at the end.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HolepunchError,
    NoDirectPath,
    TransferError,
    TruncatedStream,
)
from holepunch_mig.net.keyfiles import PinnedPair, load_auth, pinned_pair
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.net.secure_control import connect_authenticated
from holepunch_mig.session import api, rounds
from holepunch_mig.session import link as link_module
from holepunch_mig.testing import MemoryChannel, memory_channel_pair
from holepunch_mig.wire import messages

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=1.0)
CONTROL_TIMEOUT = 2.0
OPTIONS: dict[str, Any] = {
    "timing": FAST,
    "rounds": 1,
    "control_timeout": CONTROL_TIMEOUT,
    "ipv6": False,
    "idle_timeout": 2.0,
    # the peers here stop mid-protocol by hand; resume (tests/session/test_resume.py) would try to
    # re-punch with a peer that no longer speaks the protocol
    "resume_attempts": 0,
}
# The longest wait any step has with OPTIONS: the destination's wait for nominate
# (2 * round_timeout + control_timeout) after a handshake timeout, plus slack.
DEADLINE = 2 * FAST.round_timeout + CONTROL_TIMEOUT + FAST.handshake_timeout + 3.0

Trigger = Callable[[str, messages.Message], bool]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def leaked_fds(before: set[str]) -> dict[str, str]:
    """Descriptors open now that were not before, with what they point to.  (Comparing
    sets, not counts: descriptors that other tests' leftovers close meanwhile must not
    hide a leak or fail the test.)"""
    out = {}
    for fd in open_fds() - before:
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed while listing (the listing's own descriptor)
    return out


def port_released(port: int) -> bool:
    """True when no socket listens on ``port`` (a plain bind + listen would clash)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(1)
        return True
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE, exc
        return False
    finally:
        s.close()


class Tap:
    """Wraps a control channel.  With a trigger, the side using it vanishes at that
    step: ``when(direction, message)`` is asked before each message is sent ("send",
    the message is then not sent), after it is sent ("sent") and when one arrives
    ("recv", before the peer sees it).  Without a trigger it only records the punch port
    this side announced."""

    def __init__(self, inner: MemoryChannel, when: Trigger | None = None, mode: str = "close"):
        self.inner = inner
        self.peer_host = inner.peer_host
        self.when = when
        self.mode = mode
        self.fired = trio.Event()
        self.port: int | None = None

    async def vanish(self) -> None:
        self.fired.set()
        if self.mode == "close":
            await close_fully(self.inner)
        # the test cancels the peer now (close) or when the survivor is done (silent)
        await trio.sleep_forever()

    def _check(self, direction: str, raw: bytes) -> bool:
        event = messages.decode(raw)
        if not isinstance(event, messages.Message):
            return False
        if direction == "send" and isinstance(event, messages.Offer | messages.Answer):
            self.port = event.port
        return self.when is not None and not self.fired.is_set() and self.when(direction, event)

    async def send_message(self, message: bytes) -> None:
        if self._check("send", message):
            await self.vanish()
        await self.inner.send_message(message)
        if self._check("sent", message):
            await self.vanish()

    async def receive_message(self) -> bytes:
        raw = await self.inner.receive_message()
        if self._check("recv", raw):
            await self.vanish()
        return raw

    async def aclose(self) -> None:
        await self.inner.aclose()


async def close_fully(channel: MemoryChannel) -> None:
    """Close both ends of a MemoryChannel even if we are being cancelled.

    MemoryChannel.aclose awaits its send end's aclose and then its receive end's; a
    cancellation delivered at the first checkpoint leaves the receive end open, so the
    other side can go on sending into a channel nobody reads (control.py; found here)."""
    with trio.CancelScope(shield=True):
        await channel.aclose()


def on(direction: str, type_: type[messages.Message], **fields: Any) -> Trigger:
    def when(d: str, m: messages.Message) -> bool:
        return (
            d == direction
            and isinstance(m, type_)
            and all(getattr(m, k) == v for k, v in fields.items())
        )

    return when


class Zeros(io.RawIOBase):
    """``size`` zero bytes without holding them in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


PeerAction = Callable[[api.Link, Tap], Awaitable[None]]


async def send_all(link: api.Link, tap: Tap) -> None:
    await link.send_file(io.BytesIO(b"payload" * 1000))


async def receive_all(link: api.Link, tap: Tap) -> None:
    await link.receive_file(io.BytesIO())


async def cut_after_some_records(link: api.Link, tap: Tap) -> None:
    """Destination peer: verify a few records, then cut the link and vanish."""
    for _ in range(3):
        await trio.to_thread.run_sync(link.reader.read)
    link.sock.shutdown(socket.SHUT_RDWR)
    await tap.vanish()


async def send_some_then_cut(link: api.Link, tap: Tap) -> None:
    """Source peer: three full DATA records, then the link is cut and the peer vanishes."""
    await trio.to_thread.run_sync(link.writer.write_data, 0, bytes(3 << 20))
    link.sock.shutdown(socket.SHUT_RDWR)
    await tap.vanish()


async def send_data_without_end(link: api.Link, tap: Tap) -> None:
    """Source peer: every DATA record, never END; then vanishes (close) or freezes."""
    await trio.to_thread.run_sync(link.writer.write_data, 0, bytes(1 << 20))
    if tap.mode == "close":
        await link.aclose()
    await tap.vanish()


async def receive_then_no_verdict(link: api.Link, tap: Tap) -> None:
    """Destination peer: receives and verifies the stream, never sends the result."""
    await trio.to_thread.run_sync(
        lambda: link.reader.receive_file(0, io.BytesIO(), algorithm=link.digest)
    )
    await tap.vanish()


@dataclass
class Case:
    id: str
    survivor: str  # "source" | "destination"
    mode: str  # "close" | "silent"
    expected: type[HolepunchError]
    match: str
    trigger: Trigger | None = None
    in_handshake: bool = False  # the peer vanishes when its first link is TCP-connected
    peer_action: PeerAction | None = None
    survivor_payload: int = 64 << 10
    grouped: bool = False  # known bug: arrives wrapped in an ExceptionGroup (see below)


def cases() -> list[Case]:
    c = [
        # before the offer: the source never sends it
        Case("before-offer", "destination", "close", ChannelClosed, "waiting for the offer",
             on("send", messages.Offer)),
        Case("before-offer", "destination", "silent", ControlTimeout,
             r"no offer message .* \(waiting for the offer\)", on("send", messages.Offer)),
        # after the offer, before the answer
        Case("after-offer", "source", "close", ChannelClosed, "waiting for the answer",
             on("recv", messages.Offer)),
        Case("after-offer", "source", "silent", ControlTimeout,
             r"no answer message .* \(waiting for the answer\)", on("recv", messages.Offer)),
        # RTT pings
        Case("rtt", "source", "close", ChannelClosed, r"waiting for pong \(measuring RTT\)",
             on("recv", messages.Ping, seq=1)),
        Case("rtt", "source", "silent", ControlTimeout, r"no pong .*\(measuring RTT\)",
             on("recv", messages.Ping, seq=1)),
        Case("rtt", "destination", "close", ChannelClosed, r"waiting for ping \(measuring RTT\)",
             on("recv", messages.Pong, seq=0)),
        Case("rtt", "destination", "silent", ControlTimeout, r"no ping .*\(measuring RTT\)",
             on("recv", messages.Pong, seq=0)),
        # mid-punch: sync went out / came in, then the peer is gone
        Case("after-sync", "destination", "close", ChannelClosed,
             r"waiting for nominate or round-failed \(round 1\)", on("sent", messages.Sync),
             grouped=True),
        Case("after-sync", "destination", "silent", ControlTimeout,
             r"no nominate or round-failed message .* \(round 1\)", on("sent", messages.Sync),
             grouped=True),
        Case("after-sync", "source", "close", ChannelClosed,
             r"closed by the peer while sending round-failed \(round 1\)",
             on("recv", messages.Sync)),
        Case("after-sync", "source", "silent", NoDirectPath, "no direct link after 1 round ",
             on("recv", messages.Sync)),
        # mid-handshake: TCP connected, then the peer closes or says nothing
        Case("handshake", "source", "close", ChannelClosed,
             r"closed by the peer while sending round-failed \(round 1\)",
             in_handshake=True),
        Case("handshake", "source", "silent", NoDirectPath, r"1 round \(.*rejected",
             in_handshake=True),
        Case("handshake", "destination", "close", ChannelClosed,
             r"waiting for nominate or round-failed \(round 1\)", in_handshake=True, grouped=True),
        # the frozen authenticator times out; the source carries on and ends the round
        Case("handshake", "destination", "silent", NoDirectPath, r"after 1 round \(.*rejected",
             in_handshake=True),
        # mid-transfer: the link is cut (socket shutdown), the peer vanishes
        Case("mid-transfer", "source", "close", TransferError, r"sending failed after \d+ bytes",
             peer_action=cut_after_some_records, survivor_payload=256 << 20),
        Case("mid-transfer", "destination", "close", TruncatedStream,
             r"link ended at the start of record 3\b", peer_action=send_some_then_cut),
        # all data sent, END never comes / the verdict never comes
        Case("before-end", "destination", "close", TruncatedStream,
             r"link ended at the start of record 1\b", peer_action=send_data_without_end),
        Case("before-end", "destination", "silent", TruncatedStream,
             r"link silent for 2 s after 1048576 bytes, before end-of-stream",
             peer_action=send_data_without_end),
        Case("before-verdict", "source", "close", ChannelClosed,
             r"waiting for result \(waiting for the destination's verdict\)",
             peer_action=receive_then_no_verdict),
        Case("before-verdict", "source", "silent", ControlTimeout,
             r"no result message .* \(waiting for the destination's verdict\)",
             peer_action=receive_then_no_verdict),
    ]  # fmt: skip
    return c


async def run_case(
    case: Case, monkeypatch: pytest.MonkeyPatch, unwrap_groups: bool = True
) -> HolepunchError:
    peer_role = "destination" if case.survivor == "source" else "source"
    a, b = memory_channel_pair()
    raw_survivor, raw_peer = (a, b) if case.survivor == "source" else (b, a)
    survivor_ch = Tap(raw_survivor)
    peer_ch = Tap(raw_peer, case.trigger, case.mode)

    if case.in_handshake:
        real = rounds.make_authenticator

        def make(role: str, *args: Any) -> Any:
            auth = real(role, *args)  # type: ignore[arg-type]
            if role != peer_role:
                return auth

            async def vanish_instead(stream: trio.SocketStream, link_id: int) -> Any:
                await peer_ch.vanish()

            return vanish_instead

        monkeypatch.setattr(rounds, "make_authenticator", make)

    async def peer() -> None:
        action = case.peer_action or (receive_all if peer_role == "destination" else send_all)
        try:
            async with api.connect(peer_ch, role=peer_role, **OPTIONS) as link:  # type: ignore[arg-type]
                await action(link, peer_ch)
        finally:
            await close_fully(raw_peer)

    async def survivor() -> HolepunchError:
        started = trio.current_time()
        try:
            with pytest.raises(case.expected, match=case.match) as info:
                try:
                    async with api.connect(survivor_ch, role=case.survivor, **OPTIONS) as link:  # type: ignore[arg-type]
                        if case.survivor == "source":
                            await link.send_file(Zeros(case.survivor_payload))
                        else:
                            await link.receive_file(io.BytesIO())
                except BaseExceptionGroup as group:
                    if not (case.grouped and unwrap_groups) or len(group.exceptions) != 1:
                        raise
                    raise group.exceptions[0] from None
        finally:
            elapsed = trio.current_time() - started
        assert elapsed < DEADLINE, f"took {elapsed:.1f} s"
        return info.value

    result: list[HolepunchError] = []
    with trio.fail_after(DEADLINE + 10):
        async with trio.open_nursery() as nursery:
            peer_scope = trio.CancelScope()

            async def run_peer() -> None:
                # whatever the vanished peer itself raises is not under test
                with peer_scope, contextlib.suppress(HolepunchError, BaseExceptionGroup):
                    await peer()

            async def cancel_when_gone() -> None:
                await peer_ch.fired.wait()
                if case.mode == "close":
                    peer_scope.cancel()  # the peer's process is gone: every socket closes

            nursery.start_soon(run_peer)
            nursery.start_soon(cancel_when_gone)
            result.append(await survivor())
            assert peer_ch.fired.is_set(), "the peer never reached the step"
            nursery.cancel_scope.cancel()
    await raw_survivor.aclose()
    if survivor_ch.port is not None:  # None when it failed before announcing one
        assert port_released(survivor_ch.port)
    return result[0]


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c.id}-{c.mode}-{c.survivor}-survives")
async def test_peer_vanishes(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "RESULT_TIMEOUT", CONTROL_TIMEOUT)
    gc.collect()  # earlier tests' garbage must not be closed (and counted) during this one
    before = open_fds()
    exc = await run_case(case, monkeypatch)
    if case.in_handshake and isinstance(exc, NoDirectPath):
        # the exception only counts outcomes; the report says which step failed
        details = [p.detail for p in exc.report.pairs]  # type: ignore[union-attr]
        assert any("handshake timed out" in d for d in details), details
    # every descriptor of both sides is released (the peer's too: it ran in this process);
    # collected first so only a real leak (a live reference) can fail this
    gc.collect()
    assert leaked_fds(before) == {}


@pytest.mark.parametrize("case", [c for c in cases() if c.grouped], ids=lambda c: c.id + c.mode)
async def test_destination_round_errors_are_not_exception_groups(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run_case(case, monkeypatch, unwrap_groups=False)


async def test_cancelled_handshake_closes_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in cases() if c.id == "handshake" and c.survivor == "destination")
    gc.collect()
    before = open_fds()
    gc.disable()
    try:
        await run_case(case, monkeypatch)
        assert leaked_fds(before) == {}
    finally:
        gc.enable()


@pytest.mark.parametrize("in_handshake", [False, True])
async def test_send_failures_name_the_step(
    monkeypatch: pytest.MonkeyPatch, in_handshake: bool
) -> None:
    case = Case(
        "after-sync",
        "source",
        "close",
        ChannelClosed,
        r"round-failed.*round 1",
        None if in_handshake else on("recv", messages.Sync),
        in_handshake=in_handshake,
    )
    await run_case(case, monkeypatch)


async def test_end_never_comes_and_link_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case(
        "before-end",
        "destination",
        "silent",
        TruncatedStream,
        "before end-of-stream",
        peer_action=send_data_without_end,
    )
    await run_case(case, monkeypatch)


# ------------------------------------------------------------------ CLI, SIGKILL

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling, bounded by the deadline


def _part_files(folder: Path) -> list[Path]:
    return list(folder.glob(".out.bin.*.part"))


def _keys(tmp_path: Path) -> PinnedPair:
    """Key files outside the output folder (whose contents the tests check)."""
    folder = tmp_path.parent / f"{tmp_path.name}-keys"
    folder.mkdir(exist_ok=True)
    return pinned_pair(folder)


def _start_pair(tmp_path: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A receiver writing tmp/out.bin and a sender reading its stdin (fed by the test)."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    keys = _keys(tmp_path)
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output",
         str(tmp_path / "out.bin"), "-q", *keys.destination],
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    send = subprocess.Popen(
        [*CLI, "send", "--control", f"127.0.0.1:{port}", "-q", *keys.source],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    return recv, send


def _kill(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_cli_sender_killed_mid_transfer_leaves_no_output(tmp_path: Path) -> None:
    recv, send = _start_pair(tmp_path)
    try:
        assert send.stdin is not None
        chunk = os.urandom(1 << 20)
        # feed until the receiver's temporary file holds verified bytes
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in _part_files(tmp_path)):
            assert time.monotonic() < deadline, "the transfer never started"
            assert send.poll() is None and recv.poll() is None
            send.stdin.write(chunk)
            send.stdin.flush()
        started = time.monotonic()
        send.send_signal(signal.SIGKILL)
        send.wait(10)
        _, err = recv.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        _kill(send, recv)
    assert recv.returncode == 1, err.decode()
    assert elapsed < 10
    # resume is on in the CLI: the receiver waits for the sender to re-punch, and learns
    # from the control channel that it is gone
    assert (b"before CLOSE" in err) or (
        b"control channel" in err and b"waiting for resume-offer" in err
    ), err.decode()
    assert b"TruncatedStream" not in err and b"ChannelClosed" not in err  # no class names
    assert not (tmp_path / "out.bin").exists()
    assert not _part_files(tmp_path)


def test_cli_receiver_killed_mid_transfer(tmp_path: Path) -> None:
    recv, send = _start_pair(tmp_path)
    try:
        assert send.stdin is not None
        chunk = os.urandom(1 << 20)
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in _part_files(tmp_path)):
            assert time.monotonic() < deadline, "the transfer never started"
            send.stdin.write(chunk)
            send.stdin.flush()
        started = time.monotonic()
        recv.send_signal(signal.SIGKILL)
        recv.wait(10)
        # the sender learns it on its next write (link reset) or from the control channel
        try:
            for _ in range(64):
                send.stdin.write(chunk)
                send.stdin.flush()
            send.stdin.close()
        except BrokenPipeError:
            pass
        _, err = send.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        _kill(send, recv)
    assert send.returncode == 1, err.decode()
    assert elapsed < 15
    assert b"sending failed after" in err or b"verdict" in err or b"control channel" in err, (
        err.decode()
    )
    assert b"TransferError" not in err  # words, not class names
    # SIGKILL leaves the temporary file behind, but never under the final name
    assert not (tmp_path / "out.bin").exists()
    assert all(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_cli_sender_killed_before_offer(tmp_path: Path) -> None:
    port = _free_port()
    keys = _keys(tmp_path)
    recv = subprocess.Popen(
        [*CLI, "recv", "--control-listen", f"127.0.0.1:{port}", "--output",
         str(tmp_path / "out.bin"), "-q", *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # a sender that authenticates and dies before saying anything more (its kernel
        # sends FIN, as for a SIGKILL): the receiver fails, it does not wait forever
        auth = load_auth(Path(keys.source[1]), peers_file=Path(keys.source[3]))
        assert auth is not None

        async def handshake_then_vanish() -> None:
            channel = await connect_authenticated("127.0.0.1", port, auth, wait=15)
            await channel.aclose()

        trio.run(handshake_then_vanish)
        _, err = recv.communicate(timeout=30)
    finally:
        _kill(recv)
    assert recv.returncode == 1
    assert b"waiting for the offer" in err, err.decode()
    assert not list(tmp_path.iterdir())


def test_digest_helper_sanity() -> None:
    # Zeros yields exactly the bytes it says (the source side's payload above)
    z = Zeros(5 << 20)
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    while n := z.readinto(buf):
        h.update(buf[:n])
    assert h.hexdigest() == hashlib.sha256(bytes(5 << 20)).hexdigest()
