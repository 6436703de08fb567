"""Carry several local stream connections over ONE encrypted record link.

QEMU opens one connection per migration channel (the main channel, plus one per
multifd channel; the return path rides the main channel backwards).  The link is a
single authenticated record stream (``records.RecordWriter``/``RecordReader``), so the
connections are multiplexed by stream id:

==========  ====================================================================
record      meaning (stream = the connection's id, 1..65535, chosen by the opener)
==========  ====================================================================
OPEN 0x10   the opener accepted a new local connection; the peer connects one to
            its local endpoint, in the order the OPENs arrive.  Payload: empty (the
            peer's one endpoint) or a channel label (1-32 bytes of ``a-z0-9-``)
            naming which of the peer's endpoints, e.g. ``migration`` or ``nbd``
DATA        bytes of that connection, in order
ACK         u64 BE: bytes of the stream delivered to the local socket so far
            (credit: a sender keeps at most ``window`` bytes unacknowledged; a
            receiver fails with MuxWindowExceeded when the peer goes beyond it)
END         u64 BE count + SHA-256 (or zeros): the sender saw EOF; the receiver
            checks count and digest of what it delivered, then half-closes
            (``shutdown(SHUT_WR)``) its local socket
ABORT       UTF-8 reason, stream 0: the peer failed; close everything
CLOSE       no more records: sent by ``finish()`` once every stream ended both ways
==========  ====================================================================

Threads (all blocking sockets; socket calls, AES-GCM and SHA-256 release the GIL):

* one reader per link: reads records and never blocks on a local socket; DATA is
  decrypted into a buffer of the record's size class from the mux's pool
  (:mod:`~holepunch_mig.migration.buffer_pool`) and queued on its stream (the
  deliverer gives the buffer back once written; records under the smallest class are
  copied out instead), so one stalled consumer cannot block
  the others (head-of-line deadlock: QEMU's multifd receive threads stop reading at
  each sync point until the main channel catches up);
* per stream one pump (local socket -> DATA records, 1 MiB preallocated buffer) and
  one deliverer (queue -> local socket with ``sendall``, then ACK every ``window/4``
  bytes).  The pump fills a record with whatever is available without waiting, except
  while the local writer is streaming (one read returned at least an eighth of a
  record: it had filled its socket buffer): then, when the stream's ``coalesce_wait``
  (:meth:`Mux.add_stream`) is > 0, it waits that long at most (rounded up to the
  kernel's tick) for the record to fill.  QEMU's socket holds about 200 KiB, so records
  would otherwise stay that small, and every record costs a pass through Python, a
  seal and a send.  Off by default: a writer faster than the pump loses the overlap of
  its writes with the pump's sends (the kernel wakes the waiting pump per buffer), so
  only QEMU's multifd channels get it (:class:`~holepunch_mig.migration.mux_group.
  MuxGroup`; docs/migration.md).  Small writes (requests, the return path) never wait.

Any failure (digest or count mismatch, peer ABORT, link error, local socket error)
fails the whole mux loudly: every local socket is shut down and closed at once, so
QEMU sees its migration fail (the source keeps running) even when it was blocked
writing, ABORT goes to the peer and the link is shut down.  ``finish()`` then raises
:class:`MuxError`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from holepunch_mig.errors import (
    FlowControlError,
    MuxError,
    MuxPeerAbort,
    MuxWindowExceeded,
    RecordError,
)
from holepunch_mig.migration.buffer_pool import BufferPool
from holepunch_mig.wire.credit import StreamWindow
from holepunch_mig.wire.digests import Algorithm, new_hash
from holepunch_mig.wire.records import ACK_PAYLOAD, END_PAYLOAD, HEADER, RecordType
from holepunch_mig.wire.text import printable

log = logging.getLogger(__name__)

DATA = RecordType.DATA
END = RecordType.END
ABORT = RecordType.ABORT
ACK = RecordType.ACK
CLOSE = RecordType.CLOSE
OPEN = RecordType.OPEN

_ZERO_DIGEST = bytes(32)
_LABEL = re.compile(rb"[a-z0-9-]{1,32}")
MAX_STREAM = 0xFFFF
DEFAULT_BUFSIZE = 1 << 20
DEFAULT_WINDOW = 16 << 20
QEMU_COALESCE_WAIT = 0.001
"""Seconds a pump waits at most for a streaming QEMU to fill a record (see above)."""
_TIMEVAL = struct.Struct("@ll")  # struct timeval for SO_RCVTIMEO (Linux)


class RecordLike(Protocol):
    @property
    def type(self) -> int: ...
    @property
    def stream(self) -> int: ...
    @property
    def payload(self) -> memoryview: ...


class LinkWriter(Protocol):
    """What the mux needs from ``records.RecordWriter`` (thread-safe)."""

    def write(self, type: int, stream: int, payload: bytes | bytearray | memoryview) -> None: ...

    max_record: int

    def new_frame(self) -> memoryview: ...

    def write_data_in_place(self, stream: int, frame: memoryview, n: int) -> None: ...


class LinkReader(Protocol):
    """What the mux needs from ``records.RecordReader`` (single consumer)."""

    max_record: int

    def read_into(self, take: Callable[[int, int], memoryview | None]) -> RecordLike: ...


__all__ = ["Mux", "MuxError", "MuxPeerAbort", "MuxStats", "MuxWindowExceeded", "StreamStats"]


@dataclass
class StreamStats:
    stream: int
    label: str = ""  # the OPEN's channel label ("" = the one endpoint)
    sent: int = 0  # local socket -> link
    received: int = 0  # link -> local socket (delivered)
    sent_digest: bytes = b""
    received_digest: bytes = b""
    records_sent: int = 0  # DATA records each way: bytes / records = the mean record,
    records_received: int = 0  # and the per-record costs are paid this often
    records_direct: int = 0
    """Received records the reader wrote to the local socket whole, at once (the rest went
    through the stream's queue and deliverer: the socket was full or a record waited)."""


@dataclass
class MuxStats:
    streams: list[StreamStats] = field(default_factory=list)
    seconds: float = 0.0
    active_seconds: float | None = None
    """From the first stream opened to the last stream closed (None before both)."""

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.streams)

    @property
    def received(self) -> int:
        return sum(s.received for s in self.streams)


@dataclass
class _End:
    count: int
    digest: bytes


class _Stream:
    def __init__(self, sid: int, sock: socket.socket, window: int, label: str = "") -> None:
        self.id = sid
        self.sock = sock
        self.cond = threading.Condition()
        self.stats = StreamStats(sid, label)
        # tx: local socket -> link
        self.tx_acked = 0
        self.tx_done = False
        # rx: link -> local socket
        self.queue: collections.deque[memoryview | bytes | _End] = collections.deque()
        self.rx_window = StreamWindow(window)
        self.rx_done = False
        self.rx_end_seen = False
        self.closed = False
        # Who writes to the local socket: the reader (straight after decrypting, when the
        # queue is empty and the socket takes the record without blocking) or the
        # deliverer (the queue); ``writing`` (under cond) keeps them in order.
        self.writing = False
        self.delivered = 0
        self.rx_hash: Any = None
        self.ack_owed = False  # the reader delivered past an ACK point: the deliverer sends it
        self.coalesce_wait = 0.0  # s the pump waits at most for a streaming writer


class Mux:
    """One end of a multiplexed link.

    The *opener* side (the QEMU source) calls :meth:`add_stream` for every local
    connection it accepts.  The other side passes ``connect``: called with the stream
    id on each OPEN, it returns a connected local socket (the destination QEMU's
    incoming socket); or ``connect_channel``, called with the stream id and the OPEN's
    channel label, when the opener labels its streams (several endpoints: a libvirt
    migration's stream channels and its NBD storage copy).  Call :meth:`start` once,
    then :meth:`finish` when no more streams will be opened (opener) / to wait for the
    peer to finish (other side).
    """

    def __init__(
        self,
        link: socket.socket,
        writer: LinkWriter,
        reader: LinkReader,
        *,
        connect: Callable[[int], socket.socket] | None = None,
        connect_channel: Callable[[int, str], socket.socket] | None = None,
        window: int = DEFAULT_WINDOW,
        bufsize: int = DEFAULT_BUFSIZE,
        digest: bool = True,
        algorithm: Algorithm = "sha256",
        name: str = "mux",
        on_fail: Callable[[MuxError], None] | None = None,
    ) -> None:
        if bufsize > writer.max_record:
            raise ValueError(f"bufsize ({bufsize}) exceeds the link's max record")
        if window < 4 * bufsize:
            raise ValueError(f"window ({window}) must be at least 4 * bufsize ({bufsize})")
        self._link = link
        self._writer = writer
        self._reader = reader
        if connect is not None and connect_channel is not None:
            raise ValueError("give connect or connect_channel, not both")
        self._connect = connect
        self._connect_channel = connect_channel
        self._window = window
        self._bufsize = bufsize
        # Buffers the reader decrypts DATA into, sized to the record; a deliverer hands
        # each back once it has written it out.  Every buffer in use is at least a
        # quarter full, so the window, not the record count, bounds them.
        self.pool = BufferPool(reader.max_record, budget=4 * window)
        self._digest = digest
        self._algorithm: Algorithm = algorithm
        """The END digest's algorithm when ``digest`` (a session's: its negotiated one)."""
        self.name = name
        self._on_fail = on_fail
        """Called once (from the failing thread) when this mux fails: a group of muxes
        over parallel links fails as one."""
        self._lock = threading.Condition()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._no_more_opens = False
        self._peer_closed = False
        self._failed: MuxError | None = None
        self._threads: list[threading.Thread] = []
        self._reader_thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        self.first_open: float | None = None  # perf_counter() of the first OPEN
        self.last_close: float | None = None  # perf_counter() when the last stream closed

    # -- public ----------------------------------------------------------------------

    @property
    def failed(self) -> MuxError | None:
        return self._failed

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._reader_thread = self._spawn(self._read_loop, "reader")

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until at least one stream was opened and every stream has closed in both
        directions (a migration's connections all ended), or the mux failed.  Returns
        False on timeout.  QEMU opens all its connections (main, multifd) before the
        main channel can end, so "all closed" after the first OPEN means it is done."""
        with self._lock:
            return self._lock.wait_for(
                lambda: (
                    self._failed is not None
                    or (bool(self._streams) and all(s.closed for s in self._streams.values()))
                ),
                timeout=timeout,
            )

    def progress(self) -> tuple[int, int, int]:
        """(streams, bytes local -> link, bytes link -> local) so far; cheap, lock-free
        reads of counters the pump and deliverer threads update."""
        streams = list(self._streams.values())
        return (
            len(streams),
            sum(s.stats.sent for s in streams),
            sum(s.stats.received for s in streams),
        )

    def add_stream(
        self,
        sock: socket.socket,
        label: str = "",
        sid: int | None = None,
        coalesce_wait: float = 0.0,
    ) -> int:
        """Carry a newly accepted local connection; announces it with OPEN (carrying
        ``label``, the channel the peer connects it to, when not empty).  ``sid``: the
        stream id to use (ids grow; a group of muxes numbers streams across its links),
        default the next one of this mux.  ``coalesce_wait``: seconds the pump may wait
        for a streaming writer to fill a record (module docstring; 0: never)."""
        try:
            check_coalesce_wait(coalesce_wait)
        except ValueError:
            sock.close()
            raise
        if label and _LABEL.fullmatch(label.encode()) is None:
            sock.close()
            raise MuxError(f"{self.name}: bad channel label {label!r} (1-32 of a-z0-9-)")
        with self._lock:
            if self._failed is not None:
                sock.close()
                raise MuxError(f"{self.name}: cannot add a stream: {self._failed}")
            if self._no_more_opens:
                sock.close()
                raise MuxError(f"{self.name}: finish() was called, no new streams")
            if self._next_id > MAX_STREAM:
                sock.close()
                raise MuxError(f"{self.name}: stream ids exhausted")
            if sid is None:
                sid = self._next_id
            elif not self._next_id <= sid <= MAX_STREAM:
                sock.close()
                raise MuxError(f"{self.name}: stream id {sid} not after {self._next_id - 1}")
            self._next_id = sid + 1
            st = self._new_stream(sid, sock, label)
            st.coalesce_wait = coalesce_wait
            self._streams[sid] = st
            # OPEN under the lock so stream order on the wire is the accept order.
            self._writer.write(OPEN, sid, label.encode())
            if self.first_open is None:
                self.first_open = time.perf_counter()
        log.debug("%s: stream %d opened", self.name, sid)
        self._start_stream(st)
        return sid

    def finish(self, timeout: float) -> MuxStats:
        """Wait until every stream ended in both directions, exchange CLOSE, join the
        threads and return the per-stream figures.  Raises MuxError on failure or when
        ``timeout`` seconds pass (the mux is then failed)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._connect is None and self._connect_channel is None:
                self._no_more_opens = True
            ok = self._lock.wait_for(
                lambda: (
                    self._failed is not None
                    or (
                        (self._no_more_opens or self._peer_closed)
                        and all(s.closed for s in self._streams.values())
                    )
                ),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            self._no_more_opens = True
        if not ok:
            open_ = [s.id for s in self._streams.values() if not s.closed]
            self.abort(f"finish timed out after {timeout} s; streams still open: {open_}")
        self._raise_if_failed()
        try:
            self._writer.write(CLOSE, 0, b"")
        except (OSError, RecordError) as exc:  # the peer failed and cut the link meanwhile
            self._fail(
                MuxError(f"{self.name}: link failed while sending CLOSE: {exc!r}"),
                notify_peer=False,
            )
            self._raise_if_failed()
        with self._lock:
            ok = self._lock.wait_for(
                lambda: self._failed is not None or self._peer_closed,
                timeout=max(0.0, deadline - time.monotonic()),
            )
        if not ok:
            self.abort(f"peer sent no CLOSE within {timeout} s")
        self._raise_if_failed()
        self._join(deadline)
        return self.stats()

    def abort(self, reason: str) -> None:
        """Fail the mux from outside (e.g. the migration was cancelled)."""
        self._fail(MuxError(f"{self.name}: {reason}"), notify_peer=True)

    def stats(self) -> MuxStats:
        with self._lock:
            streams = [s.stats for s in sorted(self._streams.values(), key=lambda s: s.id)]
            active = None
            if self.first_open is not None and self.last_close is not None:
                active = self.last_close - self.first_open
        return MuxStats(
            streams=list(streams), seconds=time.perf_counter() - self._t0, active_seconds=active
        )

    def close(self) -> None:
        """Release everything (after finish() or a failure).  Idempotent."""
        if self._failed is None and not self._peer_closed:
            self.abort("closed before finish")
        for st in list(self._streams.values()):
            _quiet_close(st.sock)

    # -- internals -------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], None], what: str) -> threading.Thread:
        t = threading.Thread(target=fn, name=f"{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _join(self, deadline: float) -> None:
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _start_stream(self, st: _Stream) -> None:
        self._spawn(lambda: self._pump(st), f"pump{st.id}")
        self._spawn(lambda: self._deliver(st), f"deliver{st.id}")

    def _fail(self, exc: MuxError, *, notify_peer: bool) -> None:
        with self._lock:
            if self._failed is not None:
                return
            self._failed = exc
            streams = list(self._streams.values())
            self._lock.notify_all()
        log.error("%s failed: %s", self.name, exc)
        for st in streams:
            with contextlib.suppress(OSError):
                st.sock.shutdown(socket.SHUT_RDWR)
            # Then close: a local writer (QEMU) blocked on a full socket waits for write
            # space, which a shutdown does not free (the unread bytes stay queued) and
            # QEMU's loop does not run a write handler on a bare hang-up; closing drops
            # them, so its next write fails (EPIPE/ECONNRESET) and its migration ends.
            _quiet_close(st.sock)
            with st.cond:
                st.cond.notify_all()
        if self._on_fail is not None:
            try:
                self._on_fail(exc)
            except Exception:
                log.exception("%s: on_fail callback failed", self.name)
        if notify_peer:
            # The writer lock may be held by a pump stuck on a full link: don't wait long.
            t = threading.Thread(
                target=self._send_abort, args=(str(exc),), name=f"{self.name}-abort", daemon=True
            )
            t.start()
            t.join(2.0)
        with contextlib.suppress(OSError):
            self._link.shutdown(socket.SHUT_RDWR)

    def _send_abort(self, reason: str) -> None:
        try:
            self._writer.write(ABORT, 0, reason.encode()[:4000])
        except Exception:
            log.debug("%s: could not send ABORT", self.name, exc_info=True)

    def _new_stream(self, sid: int, sock: socket.socket, label: str) -> _Stream:
        # room for a whole record in the local socket, so the reader's write seldom
        # falls back to the deliverer (best effort: the kernel caps it at wmem_max)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * self._reader.max_record)
        st = _Stream(sid, sock, self._window, label)
        st.rx_hash = new_hash(self._algorithm) if self._digest else None
        return st

    def _maybe_close(self, st: _Stream) -> None:
        # caller holds st.cond
        if st.tx_done and st.rx_done and not st.closed:
            st.closed = True
            _quiet_close(st.sock)
            log.debug("%s: stream %d closed (%s)", self.name, st.id, st.stats)
            with self._lock:
                if all(s.closed for s in self._streams.values()):
                    self.last_close = time.perf_counter()
                self._lock.notify_all()

    def _pump(self, st: _Stream) -> None:
        size = self._bufsize
        # QEMU's bytes are read straight into a record frame's body and sealed there
        frame = self._writer.new_frame()
        view = frame[HEADER.size : HEADER.size + size]
        h = new_hash(self._algorithm) if self._digest else None
        sock = st.sock
        write = self._writer.write
        write_in_place = self._writer.write_data_in_place
        limit = self._window - size
        wait = st.coalesce_wait
        sent = 0
        try:
            eof = False
            while not eof:
                with st.cond:
                    while self._failed is None and sent - st.tx_acked > limit:
                        st.cond.wait()
                if self._failed is not None:
                    return
                n = sock.recv_into(view, size)
                if n == 0:
                    break
                if wait and size // 8 <= n < size:
                    n, eof = _fill_for(sock, view, n, wait)
                else:  # coalesce whatever else is already there, without waiting
                    while n < size:
                        try:
                            k = sock.recv_into(view[n:], size - n, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        if k == 0:
                            eof = True
                            break
                        n += k
                chunk = view[:n]
                if h is not None:
                    h.update(chunk)
                write_in_place(st.id, frame, n)
                sent += n
                st.stats.sent = sent
                st.stats.records_sent += 1
            dig = h.digest() if h is not None else b""
            st.stats.sent_digest = dig
            write(END, st.id, END_PAYLOAD.pack(sent, dig or _ZERO_DIGEST))
            with st.cond:
                st.tx_done = True
                self._maybe_close(st)
        except Exception as exc:
            if self._failed is None:
                self._fail(
                    MuxError(f"{self.name}: stream {st.id} (local -> link) failed: {exc!r}"),
                    notify_peer=True,
                )

    def _delivered(self, st: _Stream, data: memoryview | bytes) -> None:
        """Account for bytes written to the local socket (by whichever thread holds
        ``st.writing``)."""
        if st.rx_hash is not None:
            st.rx_hash.update(data)
        st.delivered += len(data)
        st.stats.received = st.delivered

    def _ack_due(self, st: _Stream) -> bool:
        # caller holds st.cond
        return st.rx_window.ack_due(st.delivered, self._window // 4)

    def _deliver_now(self, st: _Stream, data: memoryview | bytes) -> None:
        """Reader thread, ``st.writing`` claimed: write what the local socket takes
        without blocking; queue the rest for the deliverer.  Never blocks on a socket."""
        try:
            n = st.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            with st.cond:
                st.writing = False
            raise MuxError(f"{self.name}: stream {st.id} (link -> local) failed: {exc!r}") from exc
        if n:
            self._delivered(st, data[:n])
        done = n == len(data)
        if done:
            st.stats.records_received += 1
            st.stats.records_direct += 1
            if isinstance(data, memoryview):
                self.pool.give(data)  # the reader decrypts into it again
        with st.cond:  # one lock for the hand-back, the rest and the ACK point
            st.writing = False
            due = bool(n) and self._ack_due(st)
            if not done:  # the rest goes out in order, before anything queued later
                st.queue.appendleft(data[n:])
            if due:
                st.ack_owed = True  # the reader never writes to the link itself
            if due or not done:
                st.cond.notify()

    def _deliver(self, st: _Stream) -> None:
        h = st.rx_hash
        sock = st.sock
        try:
            while True:
                with st.cond:
                    while self._failed is None and not st.queue and not st.ack_owed:
                        st.cond.wait()
                    if self._failed is not None:
                        return
                    owed, st.ack_owed = st.ack_owed, False
                    item = st.queue.popleft() if st.queue else None
                    if item is not None and not isinstance(item, _End):
                        st.writing = True
                if owed:
                    self._writer.write(ACK, st.id, ACK_PAYLOAD.pack(st.delivered))
                if item is None:
                    continue
                if isinstance(item, _End):
                    delivered = st.delivered
                    mine = h.digest() if h is not None else b""
                    st.stats.received_digest = mine
                    if item.count != delivered:
                        raise MuxError(
                            f"stream {st.id}: END says {item.count} bytes, {delivered} arrived"
                        )
                    if h is not None and item.digest != _ZERO_DIGEST and item.digest != mine:
                        raise MuxError(
                            f"stream {st.id}: {self._algorithm} mismatch over {delivered} bytes "
                            f"(sender {item.digest.hex()}, received {mine.hex()})"
                        )
                    sock.shutdown(socket.SHUT_WR)
                    with st.cond:
                        st.rx_done = True
                        self._maybe_close(st)
                    return
                try:
                    sock.sendall(item)
                    self._delivered(st, item)  # before the reader may write again
                finally:
                    with st.cond:
                        st.writing = False
                        due = self._ack_due(st)
                st.stats.records_received += 1
                if isinstance(item, memoryview):
                    self.pool.give(item)  # the reader decrypts into it again
                if due:
                    self._writer.write(ACK, st.id, ACK_PAYLOAD.pack(st.delivered))
        except Exception as exc:
            if self._failed is None:
                err = exc if isinstance(exc, MuxError) else None
                self._fail(
                    MuxError(f"{self.name}: {err}")
                    if err is not None
                    else MuxError(f"{self.name}: stream {st.id} (link -> local) failed: {exc!r}"),
                    notify_peer=True,
                )

    def _stream_for(self, sid: int, what: str) -> _Stream:
        st = self._streams.get(sid)
        if st is None:
            raise MuxError(f"{what} record for unknown stream {sid}")
        return st

    def _read_loop(self) -> None:
        read_into = self._reader.read_into
        take = self.pool.take
        smallest = self.pool.smallest

        def buffer_for(rtype: int, length: int) -> memoryview | None:
            return take(length) if rtype == DATA and length >= smallest else None

        try:
            while True:
                rec = read_into(buffer_for)
                t = rec.type
                if t == DATA:
                    st = self._stream_for(rec.stream, "DATA")
                    # in a pool buffer (the stream's until delivered), or a sliver in the
                    # reader's buffer: copied, so no pool buffer holds one
                    payload = rec.payload
                    data = payload if len(payload) >= smallest else bytes(payload)
                    with st.cond:
                        if st.rx_end_seen:
                            raise MuxError(f"DATA after END on stream {st.id}")
                        try:
                            st.rx_window.on_data(len(data))
                        except FlowControlError as exc:
                            raise MuxWindowExceeded(f"{self.name}: stream {st.id}: {exc}") from None
                        now = not st.queue and not st.writing
                        if now:
                            st.writing = True
                        else:
                            st.queue.append(data)
                            st.cond.notify()
                    if now:
                        self._deliver_now(st, data)
                elif t == ACK:
                    acked = self._streams.get(rec.stream)
                    if acked is not None:
                        (n,) = ACK_PAYLOAD.unpack(rec.payload)
                        with acked.cond:
                            acked.tx_acked = max(acked.tx_acked, n)
                            acked.cond.notify()
                elif t == END:
                    st = self._stream_for(rec.stream, "END")
                    count, dig = END_PAYLOAD.unpack(rec.payload)
                    with st.cond:
                        if st.rx_end_seen:
                            raise MuxError(f"second END on stream {st.id}")
                        st.rx_end_seen = True
                        st.queue.append(_End(count, dig))
                        st.cond.notify()
                elif t == OPEN:
                    self._on_open(rec.stream, bytes(rec.payload))
                elif t == ABORT:
                    reason = printable(bytes(rec.payload).decode("utf-8", "replace"))
                    self._fail(
                        MuxPeerAbort(f"{self.name}: peer aborted: {reason}"), notify_peer=False
                    )
                    return
                elif t == CLOSE:
                    with self._lock:
                        # The peer's ENDs precede its CLOSE; our deliverers may still be
                        # draining them, finish() waits for that.
                        open_ = [s.id for s in self._streams.values() if not s.rx_end_seen]
                        if open_:
                            raise MuxError(f"peer sent CLOSE before END of streams {open_}")
                        self._peer_closed = True
                        self._lock.notify_all()
                    log.debug("%s: peer closed the link", self.name)
                    return
                else:
                    raise MuxError(f"unexpected record type 0x{t:02x} on stream {rec.stream}")
        except Exception as exc:
            if self._failed is None:
                self._fail(
                    exc
                    if isinstance(exc, MuxError)
                    else MuxError(f"{self.name}: link read failed: {exc!r}"),
                    notify_peer=True,
                )

    def _on_open(self, sid: int, payload: bytes) -> None:
        if self._connect is None and self._connect_channel is None:
            raise MuxError(f"peer opened stream {sid}, but this side opens the streams")
        if payload and _LABEL.fullmatch(payload) is None:
            raise MuxError(f"OPEN of stream {sid}: bad channel label {payload[:40]!r}")
        label = payload.decode()
        if label and self._connect_channel is None:
            raise MuxError(f"OPEN of stream {sid} names channel {label!r}; this side has one")
        if not label and self._connect is None:
            raise MuxError(f"OPEN of stream {sid} names no channel; this side needs one")
        with self._lock:
            if sid in self._streams or sid < 1:
                raise MuxError(f"peer reopened stream id {sid}")
            if self._no_more_opens and self._peer_closed:
                raise MuxError(f"OPEN of stream {sid} after CLOSE")
        # Connect synchronously: the local endpoint accepts in OPEN order.
        try:
            if self._connect_channel is not None and label:
                sock = self._connect_channel(sid, label)
            else:
                assert self._connect is not None
                sock = self._connect(sid)
        except OSError as exc:
            raise MuxError(f"stream {sid}: cannot connect the local endpoint: {exc}") from exc
        st = self._new_stream(sid, sock, label)
        with self._lock:
            self._streams[sid] = st
            if self.first_open is None:
                self.first_open = time.perf_counter()
        log.debug("%s: stream %d connected", self.name, sid)
        self._start_stream(st)


def check_coalesce_wait(wait: float) -> None:
    if not 0 <= wait < 1:
        raise ValueError(f"coalesce_wait ({wait}) must be in [0, 1) seconds")


def _fill_for(sock: socket.socket, view: memoryview, n: int, wait: float) -> tuple[int, bool]:
    """Read into ``view[n:]`` until it is full, EOF, or ``wait`` seconds have passed
    (MSG_WAITALL under a receive timeout: the kernel returns what it has when the time
    is up), in one call.  Returns (bytes in ``view``, EOF seen)."""
    size = len(view)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, int(wait * 1e6)))
    try:
        k = sock.recv_into(view[n:], size - n, socket.MSG_WAITALL)
    except BlockingIOError:  # nothing more came in time
        k = -1
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 0))
    return (n + k, False) if k > 0 else (n, k == 0)


def _quiet_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
