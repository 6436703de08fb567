"""Several muxes, one per parallel link, failing and finishing as one.

QEMU opens one connection per migration channel; with one link per connection every
stream has its own TCP connection, its own reader thread (decrypting only that
stream's records) and its own pump, and TCP's own flow control per link replaces the
head-of-line problem of a shared link.  Streams are numbered across the group in
accept order (1, 2, ...) and stream ``k`` rides link ``(k - 1) % len(links)``, so more
connections than links still work (they share links round-robin) and fewer leave the
remaining links idle (they only exchange CLOSE at the end).

The destination must connect its local endpoint in the source's accept order (QEMU
takes the first connection as the main channel) although OPENs now arrive on different
links: :class:`OrderedConnector` holds each connect until every lower stream id has
been connected.

Any mux failing (a link cut, a digest mismatch, the peer's ABORT) aborts every other
mux, so every local connection on both sides is shut down at once and each link's peer
sees ABORT or a dead link: the migration fails cleanly as one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from holepunch_mig.errors import MuxError
from holepunch_mig.migration.mux import (
    LinkReader,
    LinkWriter,
    Mux,
    MuxStats,
    check_coalesce_wait,
)
from holepunch_mig.wire.digests import Algorithm

log = logging.getLogger(__name__)

ORDER_TIMEOUT = 30.0
"""How long the destination waits for a lower stream's OPEN before failing."""


class OrderedConnector:
    """Wrap a destination ``connect(sid)`` so connections are made in stream-id order,
    whichever link's reader asks first."""

    def __init__(self, connect: Callable[[int], socket.socket], timeout: float = ORDER_TIMEOUT):
        self._connect = connect
        self._timeout = timeout
        self._next = 1
        self._cond = threading.Condition()
        self._failed = False

    def fail(self) -> None:
        """Release every waiter (the group failed)."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def __call__(self, sid: int) -> socket.socket:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._failed or self._next >= sid, self._timeout)
            if self._failed:
                raise MuxError(f"stream {sid}: the migration failed before it was connected")
            if not ok:
                raise MuxError(
                    f"stream {sid}: no OPEN for stream {self._next} within {self._timeout} s"
                )
            if self._next != sid:
                raise MuxError(f"stream {sid} opened twice or out of order")
        try:
            return self._connect(sid)
        finally:
            with self._cond:
                self._next = sid + 1
                self._cond.notify_all()


LinkTriple = tuple[socket.socket, LinkWriter, LinkReader]


class MuxGroup:
    """The mux API (start, add_stream, wait_idle, finish, abort, progress, stats,
    close) over one :class:`Mux` per link."""

    def __init__(
        self,
        links: Sequence[LinkTriple],
        *,
        connect: Callable[[int], socket.socket] | None = None,
        digest: bool = True,
        algorithm: Algorithm = "sha256",
        name: str = "mux",
        coalesce_wait: float = 0.0,
    ) -> None:
        if not links:
            raise ValueError("a mux group needs at least one link")
        check_coalesce_wait(coalesce_wait)
        # Only the multifd channels wait (stream 1, the main channel, streams as fast as
        # the pump when alone, and waiting there measured slower: docs/migration.md).
        self._coalesce_wait = coalesce_wait
        self.name = name
        self._ordered = OrderedConnector(connect) if connect is not None else None
        self._lock = threading.Lock()
        self._failed: MuxError | None = None
        self._next_sid = 1
        self.muxes = [
            Mux(
                sock,
                writer,
                reader,
                connect=self._ordered,
                digest=digest,
                algorithm=algorithm,
                name=f"{name}{i}" if len(links) > 1 else name,
                on_fail=self._member_failed,
            )
            for i, (sock, writer, reader) in enumerate(links)
        ]

    @property
    def failed(self) -> MuxError | None:
        return self._failed

    @property
    def first_open(self) -> float | None:
        opened = [m.first_open for m in self.muxes if m.first_open is not None]
        return min(opened) if opened else None

    @property
    def last_close(self) -> float | None:
        """When the last stream of the group closed (None while any is open)."""
        used = [m for m in self.muxes if m.first_open is not None]
        closes = [m.last_close for m in used]
        if not used or any(c is None for c in closes):
            return None
        return max(c for c in closes if c is not None)

    def start(self) -> None:
        for mux in self.muxes:
            mux.start()

    def add_stream(self, sock: socket.socket, label: str = "") -> int:
        """The next QEMU connection: stream ``k`` on link ``(k - 1) % links``."""
        with self._lock:
            if self._failed is not None:
                sock.close()
                raise MuxError(f"{self.name}: cannot add a stream: {self._failed}")
            sid = self._next_sid
            self._next_sid += 1
            mux = self.muxes[(sid - 1) % len(self.muxes)]
            # under the group lock: OPENs leave in accept order (each on its own link)
            wait = self._coalesce_wait if sid > 1 else 0.0
            return mux.add_stream(sock, label, sid, wait)

    def _member_failed(self, exc: MuxError) -> None:
        with self._lock:
            if self._failed is not None:
                return
            self._failed = exc
        if self._ordered is not None:
            self._ordered.fail()
        others = [m for m in self.muxes if m.failed is None]
        if others:
            # each abort may wait up to 2 s for its link's writer: not in this thread
            threading.Thread(
                target=self._abort_all,
                args=(others, str(exc)),
                name=f"{self.name}-group-abort",
                daemon=True,
            ).start()

    @staticmethod
    def _abort_all(muxes: Sequence[Mux], reason: str) -> None:
        threads = [
            threading.Thread(target=m.abort, args=(f"another link failed: {reason}",), daemon=True)
            for m in muxes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)

    def abort(self, reason: str) -> None:
        """Fail every mux from outside (the migration was cancelled or failed)."""
        first = next((m for m in self.muxes if m.failed is None), None)
        if first is None:
            return
        first.abort(reason)  # its on_fail aborts the rest

    def wait_idle(self, timeout: float | None) -> bool:
        """True once a stream was opened and every stream of every link closed in both
        directions, or the group failed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._failed is not None:
                return True
            used = [m for m in self.muxes if m.first_open is not None]
            if used and all(m.wait_idle(0) for m in used):
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            waiting = next((m for m in used if not m.wait_idle(0)), None)
            step = 0.05 if left is None else min(0.05, left)
            if waiting is not None:
                waiting.wait_idle(step)
            else:
                time.sleep(step)

    def progress(self) -> tuple[int, int, int]:
        streams = sent = received = 0
        for mux in self.muxes:
            s, a, b = mux.progress()
            streams += s
            sent += a
            received += b
        return streams, sent, received

    def finish(self, timeout: float) -> MuxStats:
        """Finish every mux at once (each exchanges CLOSE on its link); raise the first
        failure of the group."""
        errors: list[BaseException] = []

        def one(mux: Mux) -> None:
            try:
                mux.finish(timeout)
            except MuxError as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(m,), name=f"{m.name}-finish", daemon=True)
            for m in self.muxes[1:]
        ]
        for t in threads:
            t.start()
        one(self.muxes[0])
        for t in threads:
            t.join(timeout + 5)
        if self._failed is not None:
            raise self._failed
        if errors:
            raise errors[0]
        return self.stats()

    def stats(self) -> MuxStats:
        streams = sorted((s for m in self.muxes for s in m.stats().streams), key=lambda s: s.stream)
        first, last = self.first_open, self.last_close
        seconds = max(m.stats().seconds for m in self.muxes)
        active = last - first if first is not None and last is not None else None
        return MuxStats(streams=streams, seconds=seconds, active_seconds=active)

    def close(self) -> None:
        for mux in self.muxes:
            mux.close()
