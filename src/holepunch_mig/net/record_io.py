"""The record layer on blocking sockets: pipelined writer and prefetching reader.

The codec is ``wire.records``.  The writer seals a record into a preallocated frame and
sends it with a single ``sendall``; the reader ``recv_into``\\ s the header and then the
body with ``MSG_WAITALL`` and decrypts into a preallocated plaintext buffer.  Helper
threads overlap sealing/opening with socket I/O and SHA-256.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Generator
from typing import Any, BinaryIO

from holepunch_mig.errors import PeerAborted, RecordError, TruncatedStream
from holepunch_mig.wire.digests import Algorithm, new_hash
from holepunch_mig.wire.records import (
    ACK_PAYLOAD,
    HEADER,
    MAX_RECORD,
    REKEY_INTERVAL,
    TAG,
    Record,
    RecordOpener,
    RecordSealer,
    RecordType,
    StreamPosition,
    abort_payload,
    end_payload,
    record_type_name,
    verify_end,
)
from holepunch_mig.wire.text import printable

__all__ = ["RecordReader", "RecordWriter"]

_Fetched = Generator[tuple[memoryview, int, int, int], None, None]
"""Fetched, not yet verified records: (frame, type, stream, length)."""


INLINE_DIGESTS = frozenset({"blake3"})
"""Digests fast enough (BLAKE3: 4-8 GB/s a core, several times AES-GCM's share of the work
here) to run in the thread that just read or opened the bytes, while they are in its
cache, instead of handing each buffer to a hash thread.  SHA-256 (~1-2 GB/s) keeps its
thread, so it overlaps with sealing and I/O."""

HASHED_PREFETCH = 3
"""``receive_file``'s default prefetch depth when it hashes the stream; unhashed, the
default is 0 (no prefetch thread).  A prefetch thread overlaps the socket copy with the
rest of each record's work, which pays when that rest is large (a digest, an output
file) and costs a hand-off per record when it is only the decryption.  Measured in the
lab (2 cores, 0 ms, 2 GiB, alternated twice): the bare link (bench row 5a) received at
1961/2011 MB/s and 0.25 CPU s/GiB on the receiver without prefetch, 1917/1880 MB/s and
0.34 s/GiB with 3; the real ``send``/``recv`` of a file (row 6, BLAKE3) ran at 808-843
MB/s with 3 and 668-732 MB/s without.  One thread recv-ing and decrypting keeps up with
about 4 GB/s per core, above a 25 Gb/s NIC; more than that is what parallel links are for."""


def _check_position(algorithm: Algorithm, position: StreamPosition | None) -> None:
    """A resume position's hash must be of ``algorithm``: the digest would still come out
    right with another, but ``algorithm`` picks the path (inline or a hash thread), so a
    mismatch silently takes the slower one."""
    h = None if position is None else position.sha256
    if h is not None and getattr(h, "name", algorithm) != algorithm:
        raise ValueError(f"the resume position holds a {h.name} hash, not {algorithm}")


def _continued_hash(algorithm: Algorithm, position: StreamPosition | None) -> Any:
    """The hash a transfer updates: the resume position's (continued in place) or new."""
    if position is None or position.sha256 is None:
        return new_hash(algorithm)
    return position.sha256


class _HashThread:
    """The digest of a sequence of buffers in a thread of its own (hashlib and blake3
    release the GIL on large buffers), so hashing overlaps sealing/opening and socket
    I/O.  Buffers are hashed in ``put`` order; each index goes back to ``free`` once
    hashed."""

    def __init__(
        self,
        bufs: list[memoryview],
        free: queue.SimpleQueue[int],
        h: Any = None,
        marks: list[tuple[int, Any]] | None = None,
        start: int = 0,
        algorithm: Algorithm = "sha256",
    ) -> None:
        self._h = new_hash(algorithm) if h is None else h
        self._marks = marks
        self._pos = start
        self._bufs = bufs
        self._free = free
        self._todo: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"records-{algorithm}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update = self._h.update
        while True:
            item = self._todo.get()
            if item is None:
                return
            i, n = item
            try:
                update(self._bufs[i][:n])
                if self._marks is not None:
                    self._pos += n
                    self._marks.append((self._pos, self._h.copy()))
            finally:
                self._free.put(i)

    def put(self, i: int, n: int) -> None:
        self._todo.put((i, n))

    def finish(self) -> bytes:
        """Wait for everything put so far; return the digest."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        digest: bytes = self._h.digest()
        return digest

    @property
    def state(self) -> Any:
        """The hash object (complete only after ``finish``)."""
        return self._h


class RecordWriter(RecordSealer):
    """Sends records on a blocking socket.  Thread-safe: every record is sealed and sent
    under one lock, so several pump threads may share a link (records interleave whole)."""

    def __init__(
        self,
        sock: socket.socket,
        key: bytes,
        *,
        max_record: int = MAX_RECORD,
        rekey_interval: int = REKEY_INTERVAL,
    ) -> None:
        super().__init__(key, max_record=max_record, rekey_interval=rekey_interval)
        self._sock = sock
        self._frame = bytearray(HEADER.size + max_record + TAG)
        self._fview = memoryview(self._frame)
        # _lock: counter assignment, sealing into the shared frame.  _turn: records go on
        # the wire in counter order; _next_send is the counter of the next record to send
        # (only a pipelined send_file has sealed records not yet sent).
        self._lock = threading.Lock()
        self._turn = threading.Condition(threading.Lock())
        self._next_send = 0
        self.records_sent = 0
        self.bytes_sent = 0  # plaintext payload bytes of all records
        self.wire_bytes_sent = 0  # header + ciphertext + tag

    # -- core -------------------------------------------------------------------------------

    def _send_in_turn(self, counter: int, frame: memoryview) -> None:
        """Send a sealed frame once every record before it is on the wire."""
        turn = self._turn
        with turn:
            while self._next_send != counter:
                if self._broken is not None:
                    raise RecordError(f"link unusable: {self._broken}")
                turn.wait()
            if self._broken is not None:
                raise RecordError(f"link unusable: {self._broken}")
        try:
            self._sock.sendall(frame)
        except BaseException as exc:
            # Part of a record may be on the wire: nothing sent afterwards can be valid.
            with turn:
                self._broken = f"send of record {counter} failed: {exc!r}"
                turn.notify_all()
            raise
        with turn:
            self._next_send = counter + 1
            self.records_sent += 1
            self.bytes_sent += len(frame) - HEADER.size - TAG
            self.wire_bytes_sent += len(frame)
            turn.notify_all()

    def _seal_send(self, type: int, stream: int, payload: bytes | memoryview | bytearray) -> None:
        """Seal one record into the shared frame and send it.  Caller validated it."""
        with self._lock:
            counter, end = self._seal_into(self._fview, type, stream, payload)
            # Still under _lock (the shared frame is in use): wait for a pipelined
            # send_file's earlier records, which never need _lock to go out.
            self._send_in_turn(counter, self._fview[:end])

    # -- public API -------------------------------------------------------------------------

    def write(self, type: int, stream: int, payload: bytes | memoryview | bytearray) -> None:
        """Send one record; ``len(payload) <= max_record``."""
        self._check_record(type, stream, len(payload))
        self._seal_send(type, stream, payload)

    def write_data(self, stream: int, data: bytes | memoryview | bytearray) -> None:
        """Send ``data`` on ``stream`` as DATA records of at most ``max_record`` bytes
        (nothing is sent for empty data)."""
        self._check_record(RecordType.DATA, stream, 0)
        view = memoryview(data).cast("B")
        step = self.max_record
        for off in range(0, len(view), step):
            self._seal_send(RecordType.DATA, stream, view[off : off + step])

    def new_frame(self) -> memoryview:
        """A frame for :meth:`write_data_in_place`: the caller fills its body
        (``frame[HEADER.size : HEADER.size + n]``, at most ``max_record`` bytes)."""
        return memoryview(bytearray(HEADER.size + self.max_record + TAG))

    def write_data_in_place(self, stream: int, frame: memoryview, n: int) -> None:
        """Seal the ``n`` bytes already in ``frame``'s body as one DATA record, in place,
        and send it.  A pump that reads its socket straight into the frame spares the
        copy and the buffer :meth:`write` needs.  ``frame`` is the caller's again when
        this returns (its body is then ciphertext)."""
        self._check_record(RecordType.DATA, stream, n)
        if len(frame) < HEADER.size + n + TAG:
            raise RecordError(f"frame of {len(frame)} bytes cannot hold a {n}-byte record")
        with self._lock:
            counter, end = self._seal_into(
                frame, RecordType.DATA, stream, frame[HEADER.size : HEADER.size + n]
            )
        # The frame is ours, not the shared one: wait for our turn without _lock, so
        # other pumps seal meanwhile (records still leave in counter order).
        self._send_in_turn(counter, frame[:end])

    def send_file(
        self,
        stream: int,
        src: BinaryIO,
        *,
        digest: bool = True,
        progress: Callable[[int], None] | None = None,
        pipeline: int = 3,
        position: StreamPosition | None = None,
        algorithm: Algorithm = "sha256",
    ) -> tuple[int, bytes]:
        """Send everything ``src`` yields until EOF as DATA records, then END with the count
        and (when ``digest``) the ``algorithm`` digest of the bytes (the session's, both
        sides must agree).  Returns ``(count, digest or b"")``.

        ``src`` must support ``readinto`` (files, sockets' makefile, BytesIO...).

        ``pipeline`` >= 2: the caller's thread reads and seals records into a ring of that
        many frames while a helper thread sends them (in counter order), and SHA-256 runs
        in a third thread (BLAKE3 inline, see :data:`INLINE_DIGESTS`); 0 or 1 does
        everything in the caller's thread.  Either way the bytes on the wire are the same,
        and when send_file returns or raises every sealed record has been sent (or the
        writer is broken).  ``progress(total)`` is called
        after each record is sealed and queued.

        ``position`` (resume): the stream already holds ``position.offset`` bytes, hashed
        into ``position.sha256``; ``src`` continues from there.  Counts, progress and END
        cover the whole stream; see :class:`StreamPosition`."""
        self._check_record(RecordType.DATA, stream, 0)
        _check_position(algorithm, position)
        if pipeline < 2:
            total, dig = self._send_serial(stream, src, digest, progress, position, algorithm)
        else:
            total, dig = self._send_pipelined(
                stream, src, digest, progress, pipeline, position, algorithm
            )
        self.end(stream, total, dig)
        return total, dig

    def _fill(self, readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
        """Fill ``view`` (pipes and sockets return short reads) so records stay big."""
        step = len(view)
        got = 0
        while got < step:
            k = readinto(view[got:])
            if not k:
                break
            got += k
        return got

    def _send_serial(
        self,
        stream: int,
        src: BinaryIO,
        digest: bool,
        progress: Callable[[int], None] | None,
        position: StreamPosition | None = None,
        algorithm: Algorithm = "sha256",
    ) -> tuple[int, bytes]:
        view = memoryview(bytearray(self.max_record))
        h = None
        marks = None
        if digest:
            h = _continued_hash(algorithm, position)
            marks = None if position is None else position.marks
        readinto = src.readinto  # type: ignore[attr-defined]
        step = self.max_record
        total = 0 if position is None else position.offset
        while True:
            got = self._fill(readinto, view)
            if got == 0:
                break
            chunk = view[:got]
            if h is not None:
                h.update(chunk)
                if marks is not None:
                    marks.append((total + got, h.copy()))
            self._seal_send(RecordType.DATA, stream, chunk)
            total += got
            if progress is not None:
                progress(total)
            if got < step:
                break
        return total, (h.digest() if h is not None else b"")

    def _send_pipelined(
        self,
        stream: int,
        src: BinaryIO,
        digest: bool,
        progress: Callable[[int], None] | None,
        depth: int,
        position: StreamPosition | None = None,
        algorithm: Algorithm = "sha256",
    ) -> tuple[int, bytes]:
        step = self.max_record
        frames = [memoryview(bytearray(HEADER.size + step + TAG)) for _ in range(depth)]
        # With a threaded digest the plaintext must outlive sealing (the hash thread reads
        # it), so it has buffers of its own; without one (or with BLAKE3, hashed here
        # first), it is read straight into the frame's body and sealed in place: one
        # buffer less for every byte to pass through the cache (about 0.1 CPU s/GiB on
        # the sender, measured; BLAKE3 inline instead of a hash thread: 2.0 -> 1.7 CPU
        # s/GiB for both sides over a socketpair; `bench --loopback --rows records-blake3`
        # measures this path).
        in_place = not digest or algorithm in INLINE_DIGESTS
        plains = [memoryview(bytearray(step)) for _ in range(0 if in_place else depth + 1)]
        free_plain: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(plains)):
            free_plain.put(i)
        free_frames: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for i in range(depth):
            free_frames.put(i)
        to_send: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        failed: list[BaseException] = []

        def pump() -> None:
            try:
                while True:
                    item = to_send.get()
                    if item is None:
                        return
                    i, counter, end = item
                    self._send_in_turn(counter, frames[i][:end])
                    free_frames.put(i)
            except BaseException as exc:
                failed.append(exc)
                free_frames.put(None)  # wake the sealer

        start = 0 if position is None else position.offset
        hasher = None
        inline: Any = None  # the hash of an inline digest, updated in this thread
        marks = None if position is None else position.marks
        if digest and in_place:
            inline = _continued_hash(algorithm, position)
        elif digest:
            if position is None:
                hasher = _HashThread(plains, free_plain, algorithm=algorithm)
            else:
                hasher = _HashThread(
                    plains, free_plain, position.sha256, position.marks, start, algorithm
                )
        sender = threading.Thread(target=pump, name="records-send", daemon=True)
        sender.start()
        readinto = src.readinto  # type: ignore[attr-defined]
        lock = self._lock
        seal_into = self._seal_into
        total = start
        dig = b""
        try:
            try:
                while True:
                    taken: int | None = None  # the frame already holding the plaintext
                    if in_place:
                        taken = free_frames.get()
                        if taken is None:
                            break  # the send thread failed; raised below
                        pi = -1
                        plain = frames[taken][HEADER.size : HEADER.size + step]
                    else:
                        pi = free_plain.get()
                        plain = plains[pi]
                    got = self._fill(readinto, plain)
                    if got == 0:
                        if taken is not None:
                            free_frames.put(taken)
                        else:
                            free_plain.put(pi)
                        break
                    chunk = plain[:got]
                    if inline is not None:  # before sealing overwrites the plaintext
                        inline.update(chunk)
                        if marks is not None:
                            marks.append((total + got, inline.copy()))
                    if taken is not None:
                        fi = taken
                    else:
                        if hasher is not None:
                            hasher.put(pi, got)  # hashes while we seal; frees pi when done
                        got_frame = free_frames.get()
                        if got_frame is None:
                            break  # the send thread failed; raised below
                        fi = got_frame
                    with lock:
                        counter, end = seal_into(frames[fi], RecordType.DATA, stream, chunk)
                    to_send.put((fi, counter, end))
                    total += got
                    if progress is not None:
                        progress(total)
                    if got < step:
                        break
            finally:
                # Every sealed record must reach the wire before anyone else writes (or the
                # send fails and the writer is broken): wait for the send thread to drain.
                to_send.put(None)
                sender.join()
                if hasher is not None:
                    dig = hasher.finish()
                elif inline is not None:
                    dig = inline.digest()
        except RecordError:
            if failed:  # sealing saw the writer broken by the send thread: report why
                raise failed[0] from None
            raise
        if failed:
            raise failed[0]
        return total, dig

    def end(self, stream: int, total: int, digest: bytes = b"") -> None:
        """Send END for ``stream``: ``total`` bytes, SHA-256 ``digest`` (or b"" = not hashed)."""
        self.write(RecordType.END, stream, end_payload(total, digest))

    def ack(self, stream: int, received: int) -> None:
        """Send ACK: ``received`` bytes of ``stream`` arrived so far."""
        self.write(RecordType.ACK, stream, ACK_PAYLOAD.pack(received))

    def abort(self, stream: int, reason: str) -> None:
        """Send ABORT with a UTF-8 reason (cut to 4096 bytes at a character boundary)."""
        self.write(RecordType.ABORT, stream, abort_payload(reason))

    def close(self) -> None:
        """Send CLOSE: no more records in this direction.  Does not close the socket."""
        self.write(RecordType.CLOSE, 0, b"")


class RecordReader(RecordOpener):
    """Receives and verifies records from a blocking socket.  Single consumer.

    After any error the reader is unusable (the record sequence is lost) and every later
    call re-raises a RecordError.  A socket timeout at a record boundary is not an error
    of the stream: the ``TimeoutError`` propagates and ``read()`` may be called again."""

    def __init__(
        self,
        sock: socket.socket,
        key: bytes,
        *,
        max_record: int = MAX_RECORD,
        rekey_interval: int = REKEY_INTERVAL,
    ) -> None:
        super().__init__(key, max_record=max_record, rekey_interval=rekey_interval)
        self._sock = sock
        self._fview = memoryview(bytearray(HEADER.size + max_record + TAG))
        self._require_digest = False
        self.end_verified = False
        """The last receive_file compared the sender's SHA-256 with its own."""

    def _truncated(self, where: str, rec_no: int, nbytes: int) -> RecordError:
        # rec_no == number of records verified before it (the counter starts at 0).
        return self._fail(
            TruncatedStream(
                f"link ended {where} record {rec_no}, before CLOSE; "
                f"{rec_no} records / {nbytes} payload bytes verified so far"
            )
        )

    def _recv_exact(self, view: memoryview, n: int, what: str, rec_no: int, nbytes: int) -> None:
        recv_into = self._sock.recv_into
        got = 0
        while got < n:
            try:
                k = recv_into(view[got:n], n - got, socket.MSG_WAITALL)
            except TimeoutError:
                if got == 0 and what == "header":
                    raise  # clean boundary: the caller may retry
                # a silent link (idle timeout) or a dead one (ETIMEDOUT from
                # TCP_USER_TIMEOUT) mid-record: the stream is cut, as on any link failure
                raise self._fail(
                    TruncatedStream(
                        f"link timed out inside the {what} of record {rec_no}; "
                        f"{rec_no} records / {nbytes} payload bytes verified so far"
                    )
                ) from None
            except OSError as exc:
                raise self._fail(
                    TruncatedStream(
                        f"link failed ({exc!r}) in the {what} of record {rec_no}; "
                        f"{rec_no} records / {nbytes} payload bytes verified so far"
                    )
                ) from exc
            if k == 0:
                if what == "header" and got == 0:
                    raise self._truncated("at the start of", rec_no, nbytes)
                raise self._truncated(f"after {got}/{n} bytes of the {what} of", rec_no, nbytes)
            got += k

    def _fetch(self, frame: memoryview, rec_no: int, nbytes: int) -> tuple[int, int, int]:
        """Receive one record's header and body into ``frame`` (header at 0, body at 8),
        validating the header before the body is read.  Returns (type, stream, length)."""
        self._recv_exact(frame, HEADER.size, "header", rec_no, nbytes)
        rtype, stream, length = self._check_header(frame, rec_no)
        self._recv_exact(frame[HEADER.size :], length + TAG, "body", rec_no, nbytes)
        return rtype, stream, length

    def read(self, out: memoryview | None = None) -> Record:
        """Read and verify the next record.  The payload is decrypted into ``out`` (at
        least ``max_record`` bytes) when given, so a caller that queues payloads spares a
        copy; else into the reader's buffer, valid until the next read."""
        if out is not None and len(out) < self.max_record:
            raise ValueError(f"out holds {len(out)} bytes, max record is {self.max_record}")
        return self.read_into(lambda _type, _length: out)

    def read_into(self, take: Callable[[int, int], memoryview | None]) -> Record:
        """Read and verify the next record, decrypting it into ``take(type, length)``:
        called once the header is checked, so a caller that queues payloads can pick a
        buffer of the record's size (None: the reader's buffer, valid until the next
        read).  The buffer must hold ``length`` bytes."""
        self._check_usable()
        rtype, stream, length = self._fetch(self._fview, self._dir.counter, self.bytes_received)
        out = take(rtype, length)
        if out is not None and len(out) < length:
            raise ValueError(f"buffer of {len(out)} bytes for a {length}-byte record")
        return self._open(self._fview, rtype, stream, length, out)

    def _fetched(self) -> _Fetched:
        """Yield fetched (not yet verified) records ``(frame, type, stream, length)``, one
        at a time into the reader's frame; open each before asking for the next."""
        while True:
            self._check_usable()
            fetched = self._fetch(self._fview, self._dir.counter, self.bytes_received)
            yield (self._fview, *fetched)

    def _prefetched(self, stream: int, depth: int, stop: list[bool]) -> _Fetched:
        """Yield fetched records ``(frame, type, stream, length)`` (open each before
        asking for the next) while a helper thread receives the next ones into a ring
        of ``depth`` frames (socket I/O overlaps decryption/hashing/writing).  The helper
        only reads ahead past DATA of ``stream`` and ACK (cleartext header types), so it
        stops exactly after the END/ABORT/other record that ends receive_file: no byte
        beyond it is consumed from the socket on the success path."""
        self._check_usable()
        frames = [memoryview(bytearray(HEADER.size + self.max_record + TAG)) for _ in range(depth)]
        free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        ready: queue.SimpleQueue[tuple[int, int, int, int] | BaseException] = queue.SimpleQueue()
        for i in range(depth):
            free.put(i)
        rec_no0, nbytes0 = self._dir.counter, self.bytes_received

        def pump() -> None:
            rec_no, nbytes = rec_no0, nbytes0
            try:
                while True:
                    i = free.get()
                    if i is None or stop[0]:
                        return
                    rtype, st, length = self._fetch(frames[i], rec_no, nbytes)
                    ready.put((i, rtype, st, length))
                    rec_no += 1
                    nbytes += length
                    if not ((rtype == RecordType.DATA and st == stream) or rtype == RecordType.ACK):
                        return
            except BaseException as exc:
                ready.put(exc)

        t = threading.Thread(target=pump, name="records-recv", daemon=True)
        t.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                i, rtype, st, length = item
                yield frames[i], rtype, st, length
                free.put(i)
        finally:
            stop[0] = True
            free.put(None)
            # On the success path the helper has already returned; on an error path it may
            # be blocked in recv: the reader is then unusable anyway, so don't wait for it.
            if self._failed is None:
                t.join()

    def receive_file(
        self,
        stream: int,
        dst: BinaryIO,
        *,
        digest: bool = True,
        progress: Callable[[int], None] | None = None,
        prefetch: int | None = None,
        position: StreamPosition | None = None,
        require_digest: bool = False,
        algorithm: Algorithm = "sha256",
    ) -> tuple[int, bytes]:
        """Write the DATA of ``stream`` to ``dst`` until its END; verify END's byte count
        (and the ``algorithm`` digest, when both sides hashed).  Returns
        ``(count, digest or b"")``; :attr:`end_verified` then says whether both digests
        were compared (a sender's zero digest checks the count only).
        ``require_digest``: END without a digest fails (StreamMismatch).

        Only verified records reach ``dst``.  ACK records are skipped; ABORT raises
        PeerAborted; DATA/END of another stream, CLOSE or multiplexing records raise
        RecordError (use ``read()`` to demultiplex).

        ``prefetch`` >= 2 receives up to that many records ahead in a helper thread
        (ciphertext only: nothing is delivered before it is verified); 0 disables it;
        None: :data:`HASHED_PREFETCH` when ``digest``, else 0.

        ``position`` (resume): ``dst`` already holds ``position.offset`` bytes of the
        stream, hashed into ``position.sha256``; on return or failure ``position`` says
        how many bytes ``dst`` now holds (and their hash), see :class:`StreamPosition`."""
        _check_position(algorithm, position)
        if prefetch is None:
            prefetch = HASHED_PREFETCH if digest else 0
        stop = [False]
        records = self._prefetched(stream, prefetch, stop) if prefetch >= 2 else self._fetched()
        try:
            self._require_digest = require_digest
            return self._receive_loop(
                stream, dst, records, digest, progress, prefetch, position, algorithm
            )
        except BaseException as exc:
            # Records may have been fetched ahead and are lost: the link cannot go on.
            if self._failed is None and prefetch >= 2:
                self._failed = RecordError(f"receive_file of stream {stream} failed: {exc!r}")
            raise
        finally:
            records.close()

    def _receive_loop(
        self,
        stream: int,
        dst: BinaryIO,
        records: _Fetched,
        digest: bool,
        progress: Callable[[int], None] | None,
        depth: int,
        position: StreamPosition | None = None,
        algorithm: Algorithm = "sha256",
    ) -> tuple[int, bytes]:
        hasher: _HashThread | None = None
        hstate: Any = None
        inline: Any = None
        if digest and algorithm in INLINE_DIGESTS:
            inline = _continued_hash(algorithm, position)
            hstate = inline
        elif digest:
            # DATA is decrypted into a ring of plaintext buffers that a helper thread
            # hashes while the next record is opened and written.
            plains = [memoryview(bytearray(self.max_record)) for _ in range(max(2, depth) + 1)]
            free_plain: queue.SimpleQueue[int] = queue.SimpleQueue()
            for i in range(len(plains)):
                free_plain.put(i)
            hasher = _HashThread(
                plains,
                free_plain,
                None if position is None else position.sha256,
                algorithm=algorithm,
            )
            hstate = hasher.state
        write = dst.write
        open_ = self._open
        total = 0 if position is None else position.offset
        try:
            for frame, t, st, length in records:
                if t == RecordType.DATA and st == stream:
                    pi = -1
                    if hasher is not None:
                        pi = free_plain.get()
                        payload = open_(frame, t, st, length, plains[pi]).payload
                    else:
                        # opened in place: the body's ciphertext becomes its plaintext,
                        # sparing a buffer (only verified bytes are written out)
                        body = frame[HEADER.size : HEADER.size + length]
                        payload = open_(frame, t, st, length, body).payload
                    write(payload)
                    # hashed after the write, so a failed write leaves the state (a resume
                    # position's) covering exactly what dst holds
                    if hasher is not None:
                        hasher.put(pi, length)  # hashes while the next record is opened
                    elif inline is not None:
                        inline.update(payload)
                    total += length
                    if progress is not None:
                        progress(total)
                    continue
                rec = open_(frame, t, st, length)
                if t == RecordType.END and st == stream:
                    mine = b""
                    if hasher is not None:
                        mine, hasher = hasher.finish(), None
                    elif inline is not None:
                        mine = inline.digest()
                    self.end_verified = verify_end(
                        stream, rec.payload, total, mine, require_digest=self._require_digest
                    )
                    return total, mine
                elif t == RecordType.ABORT:
                    reason = printable(bytes(rec.payload).decode("utf-8"))
                    raise PeerAborted(
                        f"peer aborted stream {rec.stream}: {reason}", rec.stream, reason
                    )
                elif t == RecordType.ACK:
                    continue
                elif t == RecordType.CLOSE:
                    raise TruncatedStream(
                        f"peer sent CLOSE before END of stream {stream} ({total} bytes received)"
                    )
                else:
                    raise RecordError(
                        f"unexpected {record_type_name(t)} record for stream {rec.stream} while "
                        f"receiving stream {stream}"
                    )
        finally:
            if hasher is not None:
                hasher.finish()
            if position is not None:
                position.offset = total
                position.sha256 = hstate
        raise AssertionError("unreachable: record iterators end only by raising")
