"""Put a QEMU migration through one multiplexed, encrypted link.

Source host: QEMU migrates to ``unix:PATH`` where PATH is a private socket of ours
(directory 0700, socket 0600); every connection QEMU opens there (main channel,
each multifd channel) becomes a :class:`~holepunch_mig.migration.mux.Mux` stream, in accept
order.  Destination host: for every stream the peer opens, one UNIX connection is
made to the destination QEMU's ``migrate-incoming unix:PATH`` socket, in the same
order (QEMU 7.2 takes the first connection as the main channel).

The link itself (a connected TCP socket with its record writer/reader) comes from
the session layer; this module only needs the three objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from holepunch_mig.errors import MuxError, ProxyError
from holepunch_mig.migration.mux import LinkReader, LinkWriter, Mux, MuxStats
from holepunch_mig.migration.qemu import MigrationResult, migrate, start_incoming
from holepunch_mig.migration.qmp import QmpClient

log = logging.getLogger(__name__)


class StreamSink(Protocol):
    """Where accepted QEMU connections go: a :class:`Mux` or a group of them."""

    def add_stream(self, sock: socket.socket, label: str = "") -> int: ...

    def abort(self, reason: str) -> None: ...


def private_dir(parent: Path | None = None, prefix: str = "hpm-") -> Path:
    """A fresh directory only we can enter (0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, 0o700)
    return d


class SourceProxy:
    """The UNIX socket the source QEMU migrates to; each accepted connection is handed
    to ``mux.add_stream``.  Use as a context manager, or ``start()``/``close()``.

    ``label``: the channel every accepted connection is announced as (see
    :meth:`~holepunch_mig.migration.mux.Mux.add_stream`; "" = the peer's one endpoint).

    Where the socket lives:

    * ``path=None`` (default): ``migrate.sock`` in a fresh private directory (0700) under
      ``parent_dir`` (default: the system temp dir); socket 0600; both removed on close.
    * ``path=PATH``: the socket is exactly PATH.  It is bound in a private 0700 scratch
      directory beside PATH, chmod'ed 0600 there and then hard-linked to PATH (which
      fails if PATH exists: nothing is ever replaced), so PATH never exists with other
      permissions.  The caller chooses PATH's directory and is responsible for who may
      enter it.  PATH is unlinked on close if it is still our socket.
    """

    def __init__(
        self,
        mux: StreamSink,
        *,
        parent_dir: Path | None = None,
        path: Path | None = None,
        label: str = "",
    ) -> None:
        self._mux = mux
        self._label = label
        self._parent = parent_dir
        self._exact = Path(path) if path is not None else None
        self._exact_ino: int | None = None
        self._dir: Path | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.accepted = 0

    @property
    def path(self) -> Path:
        if self._exact is not None:
            return self._exact
        if self._dir is None:
            raise ProxyError("proxy not started")
        return self._dir / "migrate.sock"

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def start(self) -> str:
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._exact is None:
                self._dir = private_dir(self._parent, "hpm-src-")
                # The directory is 0700, so the short window before chmod exposes nothing
                # (umask is process-wide and would race other threads).
                lst.bind(str(self.path))
                os.chmod(self.path, 0o600)
            else:
                self._bind_exact(lst, self._exact)
            lst.listen(64)
        except BaseException:
            lst.close()
            raise
        self._listener = lst
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()
        log.debug("source proxy listening on %s", self.path)
        return self.uri

    def _bind_exact(self, lst: socket.socket, path: Path) -> None:
        if path.exists() or path.is_symlink():
            raise ProxyError(f"{path} already exists; refusing to replace it")
        scratch = private_dir(path.parent, ".hpm-bind-")
        try:
            tmp = scratch / "s"
            lst.bind(str(tmp))
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)  # atomic, never replaces an existing name
            except FileExistsError:
                raise ProxyError(f"{path} already exists; refusing to replace it") from None
            except OSError as exc:
                raise ProxyError(f"cannot create the migration socket {path}: {exc}") from exc
            self._exact_ino = os.lstat(path).st_ino
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if not self._stopping:
                    log.exception("source proxy: accept failed")
                    self._mux.abort("local migration socket failed")
                return
            self.accepted += 1
            try:
                self._mux.add_stream(conn, self._label)
            except MuxError:
                log.warning("source proxy: stream refused", exc_info=True)
                return

    def stop_accepting(self) -> None:
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.stop_accepting()
        if self._exact is not None and self._exact_ino is not None:
            with contextlib.suppress(OSError):
                if os.lstat(self._exact).st_ino == self._exact_ino:
                    self._exact.unlink()
            self._exact_ino = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SourceProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unix_connector(path: Path, *, timeout: float = 10.0) -> Callable[[int], socket.socket]:
    """A ``connect`` callback for the destination mux: one connection to ``path`` per
    stream, retried while the socket is not there yet (up to ``timeout`` seconds)."""

    def connect(stream: int) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                s.close()
                if time.monotonic() >= deadline:
                    raise ProxyError(f"stream {stream}: {path} not accepting: {exc}") from exc
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    return connect


async def _finish(mux: Mux, timeout: float) -> MuxStats:
    try:
        return await trio.to_thread.run_sync(mux.finish, timeout, abandon_on_cancel=True)
    except trio.Cancelled:
        mux.abort("cancelled")
        raise


async def run_source(
    src: QmpClient,
    link: socket.socket,
    writer: LinkWriter,
    reader: LinkReader,
    *,
    multifd_channels: int = 0,
    max_bandwidth: int = 10**10,
    timeout: float = 300.0,
    digest: bool = True,
) -> tuple[MigrationResult, MuxStats]:
    """Migrate the VM behind ``src`` through the link.  The destination must already be
    listening (:func:`run_destination` started on the peer).  If QEMU reports failure
    the mux is aborted (the peer sees ABORT) and MigrationFailed is raised."""
    mux = Mux(link, writer, reader, digest=digest, name="src-mux")
    mux.start()
    try:
        with SourceProxy(mux) as proxy:
            result = await migrate(
                src,
                proxy.uri,
                multifd_channels=multifd_channels,
                max_bandwidth=max_bandwidth,
                timeout=timeout,
            )
            stats = await _finish(mux, min(timeout, 60.0))
        return result, stats
    except BaseException as exc:
        mux.abort(f"source side failed: {exc!r}")
        raise
    finally:
        mux.close()


async def run_destination(
    dst: QmpClient,
    link: socket.socket,
    writer: LinkWriter,
    reader: LinkReader,
    *,
    multifd_channels: int = 0,
    timeout: float = 300.0,
    digest: bool = True,
    ready: Callable[[], None] | None = None,
) -> MuxStats:
    """Make the ``-incoming defer`` QEMU behind ``dst`` listen on a private UNIX socket
    and feed it every stream the peer opens.  ``ready()`` is called once QEMU listens
    (tell the source to go).  Returns when the peer closed the link cleanly."""
    d = private_dir(None, "hpm-dst-")
    path = d / "incoming.sock"
    mux = Mux(link, writer, reader, connect=unix_connector(path), digest=digest, name="dst-mux")
    try:
        # QEMU creates the socket; the 0700 directory keeps everyone else out.
        await start_incoming(dst, f"unix:{path}", multifd_channels=multifd_channels)
        mux.start()
        if ready is not None:
            ready()
        return await _finish(mux, timeout)
    except BaseException as exc:
        mux.abort(f"destination side failed: {exc!r}")
        raise
    finally:
        mux.close()
        shutil.rmtree(d, ignore_errors=True)
