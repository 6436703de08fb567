"""Resume of stream transfers (docs/protocol.md section 7), in-process on loopback: the
data link is killed mid-transfer from a test hook and the transfer must complete
byte-exact, with every interruption in both reports."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Callable
from typing import Any

import blake3
import trio

from holepunch_mig.errors import HolepunchError, ResumeFailed, TransferError
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.session import api
from holepunch_mig.testing import memory_channel_pair

FAST = PunchTiming(connect_timeout=1.0, round_timeout=1.5, handshake_timeout=1.0)
MiB = 1 << 20


class Killer:
    """A progress hook that kills the link's socket when the stream passes each offset
    in ``at`` (``how``: "shutdown" = both directions, "rst" = close with RST)."""

    def __init__(self, at: list[int], how: str = "shutdown") -> None:
        self.at = sorted(at)
        self.how = how
        self.link: api.Link | None = None
        self.killed: list[int] = []

    def __call__(self, total: int) -> None:
        if self.at and total >= self.at[0] and self.link is not None:
            self.at.pop(0)
            self.killed.append(total)
            sock = self.link.sock
            if self.how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Unseekable(io.RawIOBase):
    """A pipe-like input: readinto only, short reads, no seek."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), 300_000, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


async def _run(
    data: bytes,
    *,
    src_hook: Killer | None = None,
    dst_hook: Killer | None = None,
    src_file: Callable[[bytes], Any] = io.BytesIO,
    src_opts: dict[str, object] | None = None,
    dst_opts: dict[str, object] | None = None,
    **options: object,
) -> tuple[api.Link, api.Link, bytes, dict[str, BaseException]]:
    a, b = memory_channel_pair()
    out = io.BytesIO()
    links: dict[str, api.Link] = {}
    errors: dict[str, BaseException] = {}
    options.setdefault("timing", FAST)
    options.setdefault("link_timeout", 3.0)

    async def source() -> None:
        try:
            async with api.connect(a, role="source", **options, **(src_opts or {})) as link:
                links["source"] = link
                if src_hook:
                    src_hook.link = link
                await link.send_file(src_file(data), progress=src_hook)
        except HolepunchError as exc:
            errors["source"] = exc

    async def destination() -> None:
        try:
            async with api.connect(b, role="destination", **options, **(dst_opts or {})) as link:
                links["destination"] = link
                if dst_hook:
                    dst_hook.link = link
                await link.receive_file(out, progress=dst_hook)
        except HolepunchError as exc:
            errors["destination"] = exc

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source)
            nursery.start_soon(destination)
    return links["source"], links["destination"], out.getvalue(), errors


def _check_ok(src: api.Link, dst: api.Link, got: bytes, data: bytes, cuts: int) -> None:
    assert got == data
    digest = blake3.blake3(data).hexdigest()  # the session's digest: both have BLAKE3
    for link in (src, dst):
        rep = link.report
        assert rep.ok is True and rep.resume is True
        assert rep.digest == "blake3"
        assert rep.sha256 == digest and rep.bytes == len(data)
        assert len(rep.interruptions) == cuts, rep.interruptions
        for cut in rep.interruptions:
            assert cut.outcome == "resumed"
            assert cut.resume_seconds is not None and cut.resume_seconds < 10
            assert cut.resumed_from is not None and cut.acked <= cut.resumed_from
            assert cut.seen
        assert "interruption 1" in rep.summary() if cuts else True


async def test_source_side_kill_resumes() -> None:
    data = os.urandom(48 * MiB)
    killer = Killer([20 * MiB])
    src, dst, got, errors = await _run(data, src_hook=killer)
    assert not errors
    _check_ok(src, dst, got, data, 1)
    # the source's worker or the destination's (seeing FIN) may notice first
    views = {src.report.interruptions[0].detected_by, dst.report.interruptions[0].detected_by}
    assert "local" in views
    assert src.epoch == dst.epoch == 1


async def test_destination_side_kill_resumes_twice() -> None:
    data = os.urandom(64 * MiB)
    killer = Killer([10 * MiB, 40 * MiB], how="rst")
    src, dst, got, errors = await _run(data, dst_hook=killer)
    assert not errors
    _check_ok(src, dst, got, data, 2)
    for s_cut, d_cut in zip(src.report.interruptions, dst.report.interruptions, strict=True):
        # whoever's socket failed first told the other over the control channel
        assert "local" in (s_cut.detected_by, d_cut.detected_by)
        assert s_cut.resumed_from == d_cut.resumed_from == d_cut.sent
    # the destination reported progress every ack_interval: the second cut saw acks
    assert src.report.interruptions[1].acked >= 10 * MiB


async def test_unseekable_input_replays_from_its_buffer() -> None:
    data = os.urandom(40 * MiB)
    killer = Killer([25 * MiB])
    opts = {"ack_interval": 2 * MiB, "resume_buffer": 6 * MiB}
    src, dst, got, errors = await _run(
        data, src_hook=killer, src_file=Unseekable, src_opts=opts, dst_opts=opts
    )
    assert not errors
    _check_ok(src, dst, got, data, 1)


async def test_resume_attempts_exhausted() -> None:
    data = os.urandom(48 * MiB)
    killer = Killer([8 * MiB, 20 * MiB])
    _src, _dst, got, errors = await _run(data, src_hook=killer, resume_attempts=1)
    exc = errors["source"]
    assert isinstance(exc, ResumeFailed), errors
    assert exc.attempts == 1
    assert "resume attempts exhausted (1 of resume_attempts=1 used)" in str(exc)
    assert "link lost 2 times" in str(exc)
    assert isinstance(errors["destination"], TransferError)
    assert "resume attempts exhausted" in str(errors["destination"])
    assert len(got) < len(data)
    rep = exc.report
    assert rep is not None and rep.ok is False
    assert [c.outcome for c in rep.interruptions] == ["resumed", "failed"]


async def test_resume_off_fails_like_before() -> None:
    data = os.urandom(32 * MiB)
    killer = Killer([8 * MiB])
    src, dst, _got, errors = await _run(data, src_hook=killer, resume_attempts=0)
    assert isinstance(errors["source"], TransferError)
    assert not isinstance(errors["source"], ResumeFailed)
    assert src.report.resume is False and dst.report.resume is False


async def test_unbroken_transfer_has_no_interruptions() -> None:
    data = os.urandom(8 * MiB + 123)
    src, dst, got, errors = await _run(data)
    assert not errors
    _check_ok(src, dst, got, data, 0)
