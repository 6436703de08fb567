"""Resume of stream transfers after the data link died (docs/protocol.md section 7).

What lives here is the bookkeeping; the states of a resumable transfer are
:mod:`~holepunch_mig.session.resume_state`'s machine, which ``link`` drives, and the
re-punch is ``negotiate.repunch``:

* :class:`ResumableSource` wraps the sender's input so the stream can go on from any
  byte the destination kept: a seekable input is re-positioned with ``seek``; a pipe's
  unacknowledged tail is kept in memory (at most ``limit`` bytes; reading pauses until
  acknowledgements free room).  SHA-256 states at record boundaries (``marks``) let the
  digest go on from the resume offset without re-reading the input.
* :class:`AckPoster` carries the destination's "bytes written" from its worker thread
  to the trio side, which sends them as ``progress`` control messages.
* :func:`tune_link` makes a dead path show as a socket error within ``link_timeout``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, BinaryIO

import trio

from holepunch_mig.errors import InputFailed, Interrupted, OutputFailed
from holepunch_mig.wire.digests import Algorithm, new_hash
from holepunch_mig.wire.records import MAX_RECORD, StreamPosition


class Output:
    """The destination's output, with its errors told apart from the link's (a broken
    pipe on stdout is a ConnectionError too)."""

    def __init__(self, dst: BinaryIO) -> None:
        self._dst = dst

    def write(self, data: Any) -> int:
        try:
            return self._dst.write(data)
        except OSError as exc:
            raise OutputFailed(exc) from exc

    def flush(self) -> None:
        flush = getattr(self._dst, "flush", None)  # a bare writable need not buffer
        if flush is None:
            return
        try:
            flush()
        except OSError as exc:
            raise OutputFailed(exc) from exc


def tune_link(sock: socket.socket, link_timeout: float) -> None:
    """Keepalive probes after a second of silence and TCP_USER_TIMEOUT: a path that
    answers nothing for ``link_timeout`` seconds fails the socket (ETIMEDOUT) whether
    this side is sending (unacknowledged data) or only receiving (unanswered probes)."""
    if link_timeout <= 0:
        return
    idle = max(1, int(link_timeout / 3))
    opts = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), max(1, int(link_timeout))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), int(link_timeout * 1000)),
    ]
    for level, name, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, name, value)


def abort_socket(sock: socket.socket) -> None:
    """Stop every thread blocked on ``sock`` and close it with RST (no TIME_WAIT, so a
    fixed punch port can be dialed again at once)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _seekable(src: BinaryIO) -> int | None:
    """The input's current position when it can seek back there, else None."""
    try:
        if not src.seekable():
            return None
        return src.tell()
    except (AttributeError, OSError, ValueError):
        return None


class ResumableSource:
    """The sender's input, re-readable from any offset the destination may report.

    ``position`` (a :class:`StreamPosition` with ``marks``) is what ``send_file`` gets;
    ``readinto`` is what it reads.  Offsets are stream offsets (0 = the input's position
    when wrapped).  Thread-safety: ``readinto`` runs in the sender's worker thread,
    ``ack``/``interrupt`` on the trio thread; shared state is under one condition."""

    def __init__(
        self, src: BinaryIO, *, digest: bool, limit: int, algorithm: Algorithm = "sha256"
    ) -> None:
        self._src = src
        self._readinto = src.readinto  # type: ignore[attr-defined]
        self._base = _seekable(src)
        self.seekable = self._base is not None
        self.digest = digest
        self.limit = limit
        self.position = StreamPosition(
            0,
            new_hash(algorithm) if digest else None,
            [(0, new_hash(algorithm))] if digest else None,
        )
        self._cond = threading.Condition()
        self._cursor = 0  # next stream offset readinto yields
        self._read = 0  # stream offset up to which the input itself was read
        # pipes: input bytes [buf_start, read) in a ring of ``limit`` bytes, allocated on
        # first use (no growth, no memmove: the ring index is the stream offset mod limit)
        self._ring = bytearray()
        self._buf_start = 0
        self._interrupted = False
        self.acked = 0
        self.peak_buffered = 0

    @property
    def sent_upto(self) -> int:
        """Bytes handed to the record layer so far (sealed, maybe not on the wire)."""
        return self._cursor

    def readinto(self, view: memoryview) -> int:
        n = len(view)
        with self._cond:
            if self._interrupted:
                raise Interrupted("link lost")
            if self.seekable:
                pass
            elif self._cursor < self._read:  # replay what the last link may have lost
                k = min(n, self._read - self._cursor)
                self._ring_copy_out(self._cursor, view[:k])
                self._cursor += k
                return k
            else:
                if not self._ring:
                    self._ring = bytearray(self.limit)
                while self._read - self._buf_start + n > self.limit and not self._interrupted:
                    self._cond.wait()
                if self._interrupted:
                    raise Interrupted("link lost")
        try:
            got = self._readinto(view) or 0
        except OSError as exc:
            raise InputFailed(exc) from exc
        with self._cond:
            if not self.seekable and got:
                self._ring_copy_in(self._cursor, view[:got])
                self.peak_buffered = max(self.peak_buffered, self._cursor + got - self._buf_start)
            self._cursor += got
            self._read = max(self._read, self._cursor)
        return got

    def _ring_copy_in(self, offset: int, data: memoryview) -> None:
        """Store input bytes at stream ``offset`` (at most two slices: the ring wraps)."""
        at = offset % self.limit
        first = min(len(data), self.limit - at)
        self._ring[at : at + first] = data[:first]
        if first < len(data):
            self._ring[: len(data) - first] = data[first:]

    def _ring_copy_out(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the stored bytes from stream ``offset``."""
        at = offset % self.limit
        first = min(len(out), self.limit - at)
        out[:first] = self._ring[at : at + first]
        if first < len(out):
            out[first:] = self._ring[: len(out) - first]

    def _restart_point(self, offset: int) -> tuple[int, Any]:
        """The latest digest mark at or before ``offset``: (its offset, its hash)."""
        marks = self.position.marks
        if marks is None:
            return offset, None
        best = (0, None)
        for mark in marks:
            if mark[0] > offset:
                break
            best = mark
        if best[1] is None:
            raise RuntimeError(f"no digest mark at or before byte {offset}")
        return best

    def ack(self, offset: int) -> None:
        """The destination holds ``offset`` bytes: forget what no resume can need."""
        with self._cond:
            if offset <= self.acked:
                return
            self.acked = offset
            keep_from, _ = self._restart_point(min(offset, self._read))
            marks = self.position.marks
            if marks is not None:
                k = 0
                while k + 1 < len(marks) and marks[k + 1][0] <= keep_from:
                    k += 1
                del marks[:k]
            if not self.seekable and keep_from > self._buf_start:
                self._buf_start = keep_from
                self._cond.notify_all()

    def interrupt(self) -> None:
        """Make a reader blocked on buffer room (or the next read) raise Interrupted."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def rewind(self, offset: int) -> None:
        """Go on from stream byte ``offset`` (which the destination kept): position the
        input there and set ``position`` (offset, hash of bytes [0, offset))."""
        with self._cond:
            if offset > self._read:
                raise ValueError(
                    f"peer kept {offset} bytes but only {self._read} were read from the input"
                )
            if offset < self.acked:
                raise ValueError(f"peer kept {offset} bytes after acknowledging {self.acked}")
            mark_at, mark = self._restart_point(offset)
            h = None if mark is None else mark.copy()
            if h is not None and mark_at < offset:
                self._rehash(h, mark_at, offset)
            marks = self.position.marks
            if marks is not None:
                while marks and marks[-1][0] > offset:
                    marks.pop()
            self.position.offset = offset
            self.position.sha256 = h
            self._cursor = offset
            self._interrupted = False
            if self.seekable:
                assert self._base is not None
                self._src.seek(self._base + offset)

    def _rehash(self, h: Any, start: int, end: int) -> None:
        """Hash input bytes [start, end) (records and marks normally line up, so this
        runs only for a peer with other record boundaries)."""
        if not self.seekable:
            part = bytearray(end - start)
            self._ring_copy_out(start, memoryview(part))
            h.update(part)
            return
        assert self._base is not None
        self._src.seek(self._base + start)
        chunk = memoryview(bytearray(MAX_RECORD))
        left = end - start
        while left:
            got = self._readinto(chunk[: min(left, MAX_RECORD)])
            if not got:
                raise RuntimeError("input shrank while resuming")
            h.update(chunk[:got])
            left -= got


class AckPoster:
    """Destination: the worker thread reports bytes written; the trio side sends the
    latest value as ``progress``.  Posting never blocks the worker (values coalesce)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.next = interval
        self.latest = 0
        self.sent = 0
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()

    def due(self, total: int) -> bool:
        return total >= self.next

    def post(self, total: int) -> None:
        """From the worker thread, after ``dst`` was flushed up to ``total``."""
        self.next = total + self.interval
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._set, total)

    def _set(self, total: int) -> None:
        self.latest = max(self.latest, total)
        self._event.set()

    async def run(self, send: Any) -> None:
        """Send ``progress`` whenever a new value was posted; cancel to stop."""
        while True:
            await self._event.wait()
            self._event = trio.Event()
            if self.latest > self.sent:
                self.sent = self.latest
                await send(self.sent)
