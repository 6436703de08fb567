"""The tunnel's worker-thread pump and the FrameTransport it gives the record layer.

When the control channel is a StreamChannel over a socket or pipes, a blocking worker
thread borrows its descriptors and moves ~1 MiB per system call, with the same frames
and the same credit rules (``wire.credit``) as the trio pump in ``net.tunnel``.  The
tunnel hands itself in as a :class:`PumpedTunnel`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import trio

from holepunch_mig.errors import ChannelClosed, HolepunchError, ProtocolError
from holepunch_mig.wire import messages
from holepunch_mig.wire.credit import ReceiveWindow, SendCredit

logger = logging.getLogger("holepunch_mig")

_TUNNEL_KIND = bytes([messages.KIND_TUNNEL])


@dataclass
class TunnelStats:
    """Counters for reports and tests (no payload, no keys)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    credits_sent: int = 0
    credits_received: int = 0
    max_buffered: int = 0
    control_routed: int = 0
    polls: int = 0
    """Worker-thread pump: times it had to wait in poll() (nothing could move)."""
    would_block: int = 0
    """Worker-thread pump: socket calls that found nothing to do (EAGAIN)."""


InboxItem = bytes | HolepunchError


class PumpedTunnel(Protocol):
    """What the worker-thread pump reads and updates on its tunnel."""

    chunk: int
    credit: SendCredit
    rwindow: ReceiveWindow
    stats: TunnelStats
    _pump_sock: socket.socket
    _inbox_send: trio.MemorySendChannel[InboxItem]


_HEADER = struct.Struct(">IB")
"""A tunnel-data frame's head: the 4-byte length and the kind byte."""
_UP_MESSAGES = 16
"""TunnelData messages per uplink batch: one recvmsg_into and one send per ~1 MiB."""
_DOWN_CHUNK = 1 << 20
"""Control-socket reads go into pooled buffers of this size."""
_IOV = 64
"""Views per sendmsg."""
_FREE_CHUNKS = 4

_Done = Callable[[BaseException | None], None]


class _Chunk:
    __slots__ = ("buf", "fill", "refs")

    def __init__(self, size: int) -> None:
        self.buf = memoryview(bytearray(size))
        self.fill = 0
        self.refs = 0
        """Views of this buffer still waiting to be written to the socketpair."""


class _Job:
    """One ``FrameTransport.sendall``: the caller's bytes, cut into frames by the pump."""

    __slots__ = ("cancelled", "cv", "done", "error", "pos", "view")

    def __init__(self, view: memoryview, cv: threading.Condition) -> None:
        self.view = view
        self.cv = cv
        self.pos = 0
        """Bytes cut into frames so far (changes only when credit arrives)."""
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False

    def complete(self, exc: BaseException | None) -> None:
        """The last frame is on the wire (or the pump stopped: ``exc``)."""
        with self.cv:
            self.done = True
            self.error = exc
            self.cv.notify_all()


class _Out:
    """One frame (or a batch of whole frames) waiting to go out on the control socket."""

    __slots__ = ("done", "uplink", "view")

    def __init__(self, view: memoryview, done: _Done | None, uplink: bool) -> None:
        self.view = view
        self.done = done
        self.uplink = uplink


class ThreadPump:
    """The tunnel's data path in one blocking worker thread, for a control channel that is
    a socket or a pair of pipes (StreamChannel over a trio.SocketStream, or over FdStreams:
    ``--control-cmd ssh ...``, ``--control-stdio``).

    The thread owns duplicates of the control descriptors and the socketpair end; it
    polls them and moves bytes in batches with few Python operations per MiB:

    * uplink: ``recvmsg_into`` up to 16 x 65535 bytes (as far as credit allows) into one
      preallocated buffer whose 5-byte frame heads sit between the segments, then one
      ``sendmsg`` of the whole run of frames;
    * downlink: ``recv_into`` pooled 1 MiB buffers, parse frames in place, hand tunnel
      data to the socketpair as memoryviews (gathered ``sendmsg``), return credit in
      batches, grant credit, and pass every other message to trio's inbox
      (``trio.from_thread.run``, blocking while the inbox is full, as the trio pump's
      router does);
    * control frames sent from trio (``result``, ``abort`` ...) are queued to the thread
      and go out between whole frames; credit frames likewise.

    Same wire format, same accounting (SendCredit / ReceiveWindow), same memory bound:
    tunnel data is only buffered between parse and socketpair write, and the peer can
    only have the window in flight.
    """

    def __init__(self, tunnel: PumpedTunnel, read_fd: int, write_fd: int, unread: bytes) -> None:
        self.t = tunnel
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.pump = tunnel._pump_sock
        self.unread = unread
        self.lock = threading.Lock()
        self.queued: collections.deque[tuple[bytes, _Done]] = collections.deque()
        self.dead = False
        self.stopping = False
        self.error: HolepunchError | None = None
        self.unread_out: bytes | None = unread
        self.send_intact = True
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # uplink
        chunk = tunnel.chunk
        self.stride = chunk + _HEADER.size
        self.up_buf = memoryview(bytearray(self.stride * _UP_MESSAGES))
        self.up_segments = [
            self.up_buf[i * self.stride + _HEADER.size : (i + 1) * self.stride]
            for i in range(_UP_MESSAGES)
        ]
        self.up_open = True
        self.up_busy = False
        # control socket output
        self.out: collections.deque[_Out] = collections.deque()
        self.out_partial = False
        # downlink
        self.down_open = True
        self.pending: collections.deque[tuple[memoryview, _Chunk]] = collections.deque()
        self.cur = _Chunk(max(_DOWN_CHUNK, len(unread) + messages.MAX_MESSAGE))
        self.free: list[_Chunk] = []
        self.head = bytearray()
        self.body_left = 0
        self.acc: bytearray | None = None
        """The control message being assembled (None while inside tunnel data)."""
        self.inbox_open = True
        # direct mode (FrameTransport): the record layer's threads use these
        self.cv = threading.Condition(threading.Lock())
        """Guards pending/free/chunk refs and the receive window against the reader
        thread, and wakes the transport's waiting reader and writers."""
        self.switch = False
        self.direct = False
        """The socketpair is retired: ``pending`` is read by the transport."""
        self.jobs: collections.deque[_Job] = collections.deque()
        self.ctl_out: collections.deque[bytes] = collections.deque()
        self.transport: FrameTransport | None = None

    # -- called from the record layer's threads (FrameTransport) --------------------------

    def attach(self, sock: socket.socket) -> FrameTransport | None:
        """Switch to direct mode; ``sock`` is the link's socketpair end (drained first)."""
        with self.cv:
            if self.dead or self.switch:
                return None
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # the pump reads what is left, then EOF
            self.transport = FrameTransport(self, sock)
            self.switch = True
        self._wake()
        return self.transport

    def send_direct(self, data: bytes | bytearray | memoryview, tr: FrameTransport) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            return
        job = _Job(view, self.cv)
        cv = self.cv
        with cv:
            if self.dead or tr.wr_shut:
                raise BrokenPipeError(errno.EPIPE, "the tunnel stopped")
            self.jobs.append(job)
        self._wake()
        with cv:
            while not job.done:
                if self.dead or tr.wr_shut:
                    job.cancelled = True
                    raise BrokenPipeError(errno.EPIPE, "the tunnel stopped")
                pos = job.pos
                if not cv.wait(tr.timeout) and not job.done and job.pos == pos:
                    job.cancelled = True
                    raise TimeoutError("timed out")
            if job.error is not None:
                raise BrokenPipeError(errno.EPIPE, f"the tunnel stopped: {job.error}")

    def recv_direct(self, buf: memoryview | bytearray, nbytes: int, tr: FrameTransport) -> int:
        view = memoryview(buf).cast("B")
        n = min(nbytes, len(view)) if nbytes else len(view)
        if n == 0:
            return 0
        pending, cv = self.pending, self.cv
        with cv:
            while not pending:
                if tr.rd_shut or self.dead or not self.down_open:
                    return 0
                if not cv.wait(tr.timeout) and not pending:
                    raise TimeoutError("timed out")
        # Only this thread takes from the left of ``pending`` (the pump appends on the
        # right), so the copies run without the lock.
        got = 0
        released = []
        while got < n and pending:
            v, chunk = pending[0]
            take = min(len(v), n - got)
            view[got : got + take] = v[:take]
            got += take
            if take == len(v):
                pending.popleft()
                released.append(chunk)
            else:
                pending[0] = (v[take:], chunk)
        with cv:
            for chunk in released:
                self._release(chunk)
            grant = self.t.rwindow.on_consumed(got)
            if grant:
                credit = messages.encode(messages.Credit(bytes=grant))
                self.ctl_out.append(messages.frame(credit))
                self.t.stats.credits_sent += 1
        if grant:
            self._wake()
        return got

    # -- called from trio --------------------------------------------------------------

    def submit(self, frame: bytes, done: _Done) -> bool:
        with self.lock:
            if self.dead:
                return False
            self.queued.append((frame, done))
        self._wake()
        return True

    def stop(self) -> None:
        self.stopping = True
        self._wake()

    def finish(self) -> None:
        """After the thread ended (or never started): release what it held."""
        with self.lock:
            self.dead = True
            queued = list(self.queued)
            self.queued.clear()
        with self.cv:
            self.cv.notify_all()
        closed = ChannelClosed("control channel broke while sending: the tunnel stopped")
        for _, done in queued:
            done(closed)
        for item in self.out:
            if item.done is not None:
                item.done(closed)
        self.out.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        for fd in {self.read_fd, self.write_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    # -- the thread --------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.unread:
                cur = self.cur
                cur.buf[: len(self.unread)] = self.unread
                cur.fill = len(self.unread)
                self._parse(cur, 0, cur.fill)
            self._loop()
        except HolepunchError as exc:
            self.error = exc
        finally:
            with self.lock:
                self.dead = True
            with self.cv:
                self.dead = True
                self.cv.notify_all()
            self.send_intact = not self.out_partial
            self.unread_out = self._unparsed()

    def _unparsed(self) -> bytes | None:
        """What was read but not consumed, as bytes a FrameDecoder can take; None when
        the thread stopped inside tunnel data."""
        if self.body_left == 0:
            return bytes(self.head)
        if self.acc is None:
            return None
        length = len(self.acc) + self.body_left
        return messages.LENGTH_PREFIX.pack(length) + bytes(self.acc)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        read_fd, write_fd, pump_fd = self.read_fd, self.write_fd, self.pump.fileno()
        masks = dict.fromkeys((read_fd, write_fd, pump_fd), 0)
        credit = self.t.credit
        while not self.stopping:
            progress = False
            while self.queued:
                frame, done = self.queued.popleft()
                self.out.append(_Out(memoryview(frame), done, False))
            while self.ctl_out:
                self.out.append(_Out(memoryview(self.ctl_out.popleft()), None, False))
            if self.switch and not self.direct:
                self.direct = True
                # the transport reads what is in the socketpair up to this EOF, then pending
                with contextlib.suppress(OSError):
                    self.pump.shutdown(socket.SHUT_WR)
            if self.up_open and not self.up_busy and credit.available:
                progress |= self._read_uplink()
            elif self.jobs and not self.up_open and credit.available:
                progress |= self._carve()
            if self.out:
                progress |= self._flush_out()
            progress |= self._read_control()
            if self.pending and not self.direct:
                progress |= self._flush_pending()
            if progress:
                continue
            want = dict.fromkeys(masks, 0)
            want[read_fd] |= select.POLLIN
            if self.out:
                want[write_fd] |= select.POLLOUT
            if self.up_open and not self.up_busy and credit.available:
                want[pump_fd] |= select.POLLIN
            if self.pending and not self.direct:
                want[pump_fd] |= select.POLLOUT
            for fd, mask in want.items():
                if mask != masks[fd]:
                    if mask:
                        poller.register(fd, mask)
                    else:
                        poller.unregister(fd)
                    masks[fd] = mask
            self.t.stats.polls += 1
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)

    def _read_uplink(self) -> bool:
        """Link -> peer: as much as credit allows, up to 16 messages, in one call."""
        chunk = self.t.chunk
        n = self.t.credit.take(chunk * _UP_MESSAGES)
        k = -(-n // chunk)
        segments = self.up_segments[:k]
        if n % chunk:
            segments[-1] = segments[-1][: n - (k - 1) * chunk]
        try:
            got = self.pump.recvmsg_into(segments)[0]
        except (BlockingIOError, InterruptedError):
            self.t.stats.would_block += 1
            return False
        except OSError:
            got = 0
        if not got:
            self.up_open = False  # the link closed its end; nothing more to carry
            return True
        self.t.credit.spend(got)
        m = -(-got // chunk)
        for i in range(m):
            size = min(chunk, got - i * chunk)
            _HEADER.pack_into(self.up_buf, i * self.stride, size + 1, messages.KIND_TUNNEL)
        total = (m - 1) * self.stride + _HEADER.size + (got - (m - 1) * chunk)
        self.out.append(_Out(self.up_buf[:total], None, True))
        self.up_busy = True
        stats = self.t.stats
        stats.bytes_sent += got
        stats.messages_sent += m
        return True

    def _carve(self) -> bool:
        """Direct mode, link -> peer: cut the transport's data into TunnelData frames
        (a 5-byte head, then a view of the caller's buffer) as far as credit allows."""
        job = self.jobs[0]
        if job.cancelled:
            self.jobs.popleft()
            return True
        chunk = self.t.chunk
        n = self.t.credit.take(len(job.view) - job.pos)
        pos, end = job.pos, job.pos + n
        out = self.out
        m = 0
        while pos < end:
            size = min(chunk, end - pos)
            out.append(_Out(memoryview(_HEADER.pack(size + 1, messages.KIND_TUNNEL)), None, False))
            out.append(_Out(job.view[pos : pos + size], None, False))
            pos += size
            m += 1
        self.t.credit.spend(n)
        with self.cv:
            job.pos = end
        if end == len(job.view):
            self.jobs.popleft()
            out[-1].done = job.complete
        stats = self.t.stats
        stats.bytes_sent += n
        stats.messages_sent += m
        return True

    def _flush_out(self) -> bool:
        out = self.out
        try:
            sent = os.writev(self.write_fd, [item.view for item in islice(out, _IOV)])
        except (BlockingIOError, InterruptedError):
            self.t.stats.would_block += 1
            return False
        except OSError as exc:
            raise ChannelClosed(f"control channel broke while sending: {exc}") from None
        while sent:
            head = out[0]
            size = len(head.view)
            if sent < size:
                head.view = head.view[sent:]
                self.out_partial = True
                break
            sent -= size
            out.popleft()
            self.out_partial = False
            if head.uplink:
                self.up_busy = False
            if head.done is not None:
                head.done(None)
        return True

    def _read_control(self) -> bool:
        cur = self.cur
        if cur.refs == 0:
            cur.fill = 0
        elif len(cur.buf) - cur.fill < messages.MAX_MESSAGE:
            with self.cv:
                reuse = self.free.pop() if self.free else None
            cur = self.cur = reuse or _Chunk(_DOWN_CHUNK)
            cur.fill = 0
        try:
            got = os.readv(self.read_fd, [cur.buf[cur.fill :]])
        except (BlockingIOError, InterruptedError):
            self.t.stats.would_block += 1
            return False
        except OSError as exc:
            raise ChannelClosed(f"control channel broke while receiving: {exc}") from None
        if not got:
            if self.head or self.body_left:
                partial = len(self.head) + (len(self.acc) if self.acc is not None else 0)
                raise ProtocolError(
                    "control channel ended inside a frame "
                    f"({partial or 'some'} bytes of an incomplete frame)"
                )
            raise ChannelClosed("control channel closed by the peer")
        start = cur.fill
        cur.fill += got
        self._parse(cur, start, cur.fill)
        return True

    def _parse(self, chunk: _Chunk, pos: int, end: int) -> None:
        try:
            self._parse_frames(chunk, pos, end)
        finally:
            if self.direct:
                with self.cv:
                    self.cv.notify_all()

    def _parse_frames(self, chunk: _Chunk, pos: int, end: int) -> None:
        buf = chunk.buf
        head = self.head
        cv = self.cv
        while pos < end:
            if self.body_left:
                take = min(self.body_left, end - pos)
                self.body_left -= take
                if self.acc is None:
                    if self.down_open:
                        with cv:
                            self.pending.append((buf[pos : pos + take], chunk))
                            chunk.refs += 1
                    pos += take
                    continue
                self.acc += buf[pos : pos + take]
                pos += take
                if not self.body_left:
                    raw, self.acc = bytes(self.acc), None
                    self._control(raw)
                continue
            if not head and end - pos >= _HEADER.size:
                length, kind = _HEADER.unpack_from(buf, pos)
                pos += _HEADER.size
            else:
                take = min(_HEADER.size - len(head), end - pos)
                head += buf[pos : pos + take]
                pos += take
                if len(head) < _HEADER.size:
                    break
                length, kind = _HEADER.unpack_from(head)
                head.clear()
            if length == 0:
                raise ProtocolError("zero-length frame")
            if length > messages.MAX_MESSAGE:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the {messages.MAX_MESSAGE}-byte limit"
                )
            if kind == messages.KIND_TUNNEL:
                n = length - 1
                with cv:
                    self.t.rwindow.on_data(n)
                stats = self.t.stats
                stats.bytes_received += n
                stats.messages_received += 1
                if self.t.rwindow.buffered > stats.max_buffered:
                    stats.max_buffered = self.t.rwindow.buffered
                self.body_left = n
                self.acc = None
            else:
                self.acc = bytearray((kind,))
                self.body_left = length - 1
                if not self.body_left:
                    raw, self.acc = bytes(self.acc), None
                    self._control(raw)

    def _control(self, raw: bytes) -> None:
        event = messages.decode(raw)
        if isinstance(event, messages.Credit):
            self.t.credit.grant(event.bytes)
            self.t.stats.credits_received += 1
            return
        self.t.stats.control_routed += 1
        if not self.inbox_open:
            return
        try:
            trio.from_thread.run(self.t._inbox_send.send, raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.inbox_open = False  # nobody will read control messages any more
        except (trio.Cancelled, trio.RunFinishedError):
            self.inbox_open = False
            self.stopping = True

    def _flush_pending(self) -> bool:
        """Peer -> link: gathered writes to the socketpair, credit back in batches."""
        pending = self.pending
        try:
            sent = self.pump.sendmsg([view for view, _ in islice(pending, _IOV)])
        except (BlockingIOError, InterruptedError):
            self.t.stats.would_block += 1
            return False
        except OSError:
            # the link closed its end: drop what is buffered, stop returning credit
            self.down_open = False
            while pending:
                self._release(pending.popleft()[1])
            return True
        consumed = sent
        while sent:
            view, chunk = pending[0]
            if sent < len(view):
                pending[0] = (view[sent:], chunk)
                break
            sent -= len(view)
            pending.popleft()
            self._release(chunk)
        grant = self.t.rwindow.on_consumed(consumed)
        if grant:
            credit = messages.encode(messages.Credit(bytes=grant))
            self.out.append(_Out(memoryview(messages.frame(credit)), None, False))
            self.t.stats.credits_sent += 1
        return True

    def _release(self, chunk: _Chunk) -> None:
        chunk.refs -= 1
        if chunk.refs == 0 and chunk is not self.cur and len(self.free) < _FREE_CHUNKS:
            self.free.append(chunk)


class FrameTransport:
    """The record layer's "socket" while the worker-thread pump runs (after the Noise
    handshake): :class:`~holepunch_mig.net.record_io.RecordWriter`,
    :class:`~holepunch_mig.net.record_io.RecordReader` and :class:`~holepunch_mig.session.link.Link`
    use it like a blocking socket, without the socketpair between them and the pump.

    * ``sendall`` hands the caller's buffer to the pump, which cuts it into TunnelData
      frames (<= 64 KiB each, 5-byte heads between views of the buffer, no copy) as far
      as credit allows and writes them with its other output (credit, control messages)
      in gathered ``writev`` calls; it returns once the last frame is on the wire.
    * ``recv_into`` copies from the pump's received TunnelData payloads (one copy, where
      the socketpair cost a write and a read) and returns the credit in batches as the
      record layer consumes, exactly as the socketpair path does when it hands bytes on.
    * It first reads what was already in the socketpair (the pump shuts its side once
      it stops writing there), so the switch keeps every byte in order.

    Same frames, same credit accounting, same memory bound (received data waits in the
    pump's pooled buffers, at most the window).
    """

    def __init__(self, pump: ThreadPump, drain: socket.socket) -> None:
        self._pump = pump
        self._drain: socket.socket | None = drain
        self.timeout: float | None = drain.gettimeout()
        self.rd_shut = False
        self.wr_shut = False
        self._closed = False

    def settimeout(self, value: float | None) -> None:
        self.timeout = value
        drain = self._drain
        if drain is not None:
            with contextlib.suppress(OSError):
                drain.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.timeout

    def setsockopt(self, *args: object) -> None:
        """Socket options (keepalive, buffers) mean nothing here: the control channel
        carries the data."""

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "transport closed")
        self._pump.send_direct(data, self)

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "transport closed")
        drain = self._drain
        if drain is not None:
            if self.rd_shut:
                return 0
            got = drain.recv_into(buffer, nbytes, flags)
            if got:
                return got
            self._drain = None
            drain.close()
        return self._pump.recv_direct(buffer, nbytes, self)

    def shutdown(self, how: int) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "transport closed")
        pump = self._pump
        with pump.cv:
            if how in (socket.SHUT_RD, socket.SHUT_RDWR):
                self.rd_shut = True
                # as when the link closed its socketpair end: stop handing on and
                # returning credit (the peer's sender stalls after the window)
                pump.down_open = False
            if how in (socket.SHUT_WR, socket.SHUT_RDWR):
                self.wr_shut = True
            pump.cv.notify_all()
        drain = self._drain
        if drain is not None:
            with contextlib.suppress(OSError):
                drain.shutdown(how)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
        self._closed = True
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.close()
