"""Carry a libvirt live migration through the punched link.

libvirt (6.8 or later) can run a whole migration over UNIX sockets: the migration
stream (``VIR_MIGRATE_PARAM_URI = unix:///DIR/migration.sock``; with ``--parallel N``
the source QEMU opens the main connection plus one per multifd channel on that same
path) and the NBD storage copy (``VIR_MIGRATE_PARAM_DISKS_URI =
unix:///DIR/nbd.sock``).  On the destination host that path is where the destination
QEMU (or its NBD server) listens; on the source host it is where the source QEMU
connects.  A proxy on each host joins the two:

* the destination proxy makes a fresh directory ``DIR`` (0700) under its socket parent
  and tells the source its name (``migrate-ready{mode: "libvirt", socket_dir}``); for
  each stream the source opens it connects one connection to ``DIR/<channel>.sock``
  (``migration`` or ``nbd``: the OPEN record's label) and to nothing else;
* the source proxy creates the same ``DIR`` on its host (it must not exist; its parent
  must be the same socket parent as the destination's), listens on both sockets and
  announces every connection its QEMU opens as a labelled stream of the link;
* the manager calls libvirt's migrate API with those two URIs; when it returns
  (success or error) the source closes the link's streams and both sides exchange
  ``migrate-result``.

Failure semantics are the mux's: a dead link, a peer ABORT or a local error shuts down
every QEMU socket on both hosts, so libvirt's job fails (the source domain keeps
running, the destination drops its half-made domain) and both proxies report it.
Cancelling :func:`migrate_domain` (Ctrl-C in the command) aborts the libvirt job
(``virDomainAbortJob``) and waits for libvirt to say it is over.

The libvirt Python binding is an optional extra (``pip install 'holepunch_mig[libvirt]'``
or Debian's python3-libvirt); only the source needs it, and only :func:`migrate_domain`
imports it.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from holepunch_mig.errors import (
    HolepunchError,
    LibvirtMissing,
    MuxError,
    ProtocolError,
    ProxyError,
)
from holepunch_mig.migration.common import MigrationError, MigrationReport, receive_offer
from holepunch_mig.migration.mux import Mux
from holepunch_mig.migration.mux_mode import FINISH_TIMEOUT, MigrationProxy
from holepunch_mig.migration.proxy import SourceProxy, unix_connector
from holepunch_mig.net.control import ControlChannel, StreamChannel
from holepunch_mig.roles import Role
from holepunch_mig.session import api
from holepunch_mig.session.link import Link
from holepunch_mig.session.resume import tune_link
from holepunch_mig.wire import messages

log = logging.getLogger(__name__)

#: The channels a libvirt migration opens, and their socket names in the directory.
CHANNELS: Mapping[str, str] = {"migration": "migration.sock", "nbd": "nbd.sock"}
#: Where both proxies make the per-migration socket directory (must be the same path on
#: both hosts: libvirt gives the source QEMU the destination's path).
DEFAULT_SOCKET_PARENT = Path("/run/holepunch-mig-libvirt")
DEFAULT_TIMEOUT = 3600.0
DEFAULT_LINK_TIMEOUT = 15.0
#: How long an aborted libvirt job may take to end before we stop waiting for it.
ABORT_WAIT = 60.0
PROGRESS_INTERVAL = 0.5
POSTCOPY_WATCH_INTERVAL = 0.02

CopyStorage = Literal["all", "inc"]

POSTCOPY_PARALLEL = (
    "post-copy cannot be combined with parallel (multifd) connections: QEMU supports "
    "post-copy with multifd only from 10.0; migrate with one stream (drop --parallel)"
)


def _libvirt() -> Any:
    try:
        import libvirt
    except ModuleNotFoundError as exc:
        raise LibvirtMissing(
            "libvirt migrations need the libvirt Python binding: "
            "pip install 'holepunch_mig[libvirt]' (or Debian's python3-libvirt)"
        ) from exc
    return libvirt


# -- progress and report -------------------------------------------------------------


@dataclass(frozen=True)
class LibvirtProgress:
    """One sample of libvirt's job info on the source (``virDomainGetJobStats``)."""

    seconds: float
    processed: int
    remaining: int
    total: int
    rate: float
    """bytes per second (memory + disk, libvirt's own figures)."""
    dirty_rate: float
    """guest pages dirtied per second, as bytes."""
    iteration: int
    eta: float | None

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> LibvirtProgress:
        def num(key: str) -> int:
            value = stats.get(key, 0)
            return int(value) if isinstance(value, int | float) else 0

        page = num("memory_page_size") or 4096
        rate = float(num("memory_bps") + num("disk_bps"))
        remaining = num("data_remaining")
        return cls(
            seconds=num("time_elapsed") / 1000.0,
            processed=num("data_processed"),
            remaining=remaining,
            total=num("data_total"),
            rate=rate,
            dirty_rate=float(num("memory_dirty_rate") * page),
            iteration=num("memory_iteration"),
            eta=remaining / rate if rate > 0 else None,
        )


LibvirtProgressCallback = Callable[[LibvirtProgress], None]


@dataclass
class LibvirtReport:
    """What :func:`migrate_domain` saw: libvirt's verdict, the source proxy's report
    (streams by channel, byte counts, the link) and the destination proxy's totals."""

    domain: str
    ok: bool = False
    verdict: str = ""
    libvirt_ok: bool = False
    libvirt_error: str | None = None
    flags: list[str] = field(default_factory=list)
    parallel: int = 0
    postcopy: bool = False
    """The migration switched to post-copy (libvirt showed the source paused for it)."""
    postcopy_seconds: float | None = None
    """When the switch was seen, seconds after the libvirt call started."""
    postcopy_request_seconds: float | None = None
    """How long ``virDomainMigrateStartPostCopy`` took to return once it was due: libvirt
    sometimes holds it until precopy is nearly done, and then no switch happens."""
    copy_storage: CopyStorage | None = None
    migrate_uri: str | None = None
    disks_uri: str | None = None
    seconds: float | None = None
    """The libvirt migrate call, start to return."""
    job: dict[str, Any] = field(default_factory=dict)
    """libvirt's last job statistics (the completed job's when libvirt keeps them)."""
    destination_ok: bool | None = None
    destination_sent: int | None = None
    destination_received: int | None = None
    proxy: MigrationReport | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["proxy"] = self.proxy.to_dict() if self.proxy is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [f"libvirt migration of {self.domain}: {'OK' if self.ok else 'FAILED'}"]
        if self.seconds is not None:
            lines.append(
                f"  libvirt: {'completed' if self.libvirt_ok else 'failed'} "
                f"in {self.seconds:.2f} s ({', '.join(self.flags)})"
            )
        if self.postcopy_seconds is not None:
            lines.append(f"  post-copy: switched after {self.postcopy_seconds:.2f} s")
        held = self.postcopy_request_seconds
        if held is not None and held >= 1.0:
            lines.append(f"  post-copy: libvirt took {held:.1f} s to accept the switch request")
        if "POSTCOPY" in self.flags and not self.postcopy and self.libvirt_ok:
            when = "took effect" if held is not None else "was due"
            lines.append(f"  post-copy: not switched (precopy completed before the switch {when})")
        if self.libvirt_error:
            lines.append(f"  libvirt error: {self.libvirt_error}")
        if self.proxy is not None:
            lines.extend("  " + line for line in self.proxy.summary().splitlines())
        lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


# -- the proxies ------------------------------------------------------------------------


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ProxyError(f"no group {group!r} (the group QEMU runs as)") from None


class LibvirtProxy(MigrationProxy):
    """One side of a libvirt migration (mux mode with labelled streams into a socket
    directory).  Made by :func:`libvirt_source` / :func:`libvirt_destination`."""

    def __init__(
        self,
        role: Role,
        link: Link,
        *,
        socket_parent: Path,
        socket_group: str | None,
        ready_timeout: float,
        timeout: float,
        link_timeout: float,
    ) -> None:
        super().__init__(
            role,
            link,
            digest=False,
            listen_unix=None,
            connect_unix=None,
            progress=None,
            expected_bytes=None,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
        )
        self.report.mode = "libvirt"
        self._parent = socket_parent
        self._gid = _group_id(socket_group)
        self._dir: Path | None = None
        self._listeners: list[SourceProxy] = []

    # -- public ------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        if self._dir is None:
            raise HolepunchError("the socket directory is not set up yet")
        return self._dir

    @property
    def migrate_uri(self) -> str:
        """``VIR_MIGRATE_PARAM_URI``: the migration stream (and its multifd channels)."""
        return f"unix://{self.socket_dir / CHANNELS['migration']}"

    @property
    def disks_uri(self) -> str:
        """``VIR_MIGRATE_PARAM_DISKS_URI``: the NBD storage copy."""
        return f"unix://{self.socket_dir / CHANNELS['nbd']}"

    @property
    def failure(self) -> str | None:
        """Why the link's streams failed (this side or the peer's report), or None."""
        mux = self._mux
        if mux is not None and mux.failed is not None:
            return str(mux.failed)
        peer = self._peer_result
        if peer is not None and not peer.ok:
            return f"peer reported failure: {peer.error}"
        return None

    def close_local(self) -> None:
        """After a failure: make sure QEMU's sockets are closed, not only shut down (a
        failing mux closes them itself; this covers a failure seen only here).  A QEMU
        NBD client blocked writing to a socket whose peer shut down but still holds the
        unread bytes is never woken (its write space stays taken); closing frees it, so
        its write fails and libvirt's job can end."""
        if self._mux is not None:
            self._mux.close()

    @property
    def peer_result(self) -> messages.MigrateResult | None:
        """The peer's migrate-result (after the end), or None."""
        return self._peer_result

    # -- setup -------------------------------------------------------------------------

    async def _setup(self) -> None:
        control = self.link.control
        tune_link(self.link.sock, self._link_timeout)
        self.report.digest = "count-only"
        if self.role == "source":
            await control.send(messages.MigrateOffer(digest=False, mode="libvirt"))
            msg, _ = await control.receive(
                messages.MigrateReady,
                messages.MigrateResult,
                timeout=self._ready_timeout,
                step="waiting for the destination proxy to be ready",
            )
            if isinstance(msg, messages.MigrateResult):
                raise ProtocolError(f"destination proxy refused: {msg.error}")
            if msg.mode != "libvirt" or msg.socket_dir is None:
                raise ProtocolError("migrate-ready is not for libvirt mode (no socket_dir)")
            if msg.digest:
                raise ProtocolError("migrate-ready does not echo the offered digest mode")
            try:
                self._dir = self._make_source_dir(Path(msg.socket_dir))
            except (ProtocolError, ProxyError, OSError) as exc:
                with contextlib.suppress(HolepunchError, OSError):  # tell the peer why
                    await control.send(
                        messages.MigrateResult(
                            ok=False, streams=0, sent=0, received=0, error=str(exc)[:4000]
                        )
                    )
                raise
            mux = Mux(
                self.link.sock, self.link.writer, self.link.reader, digest=False, name="src-mux"
            )
            self._mux = mux
            mux.start()
            for label, name in CHANNELS.items():
                listener = SourceProxy(mux, path=self._dir / name, label=label)
                self._listeners.append(listener)
                await trio.to_thread.run_sync(listener.start)
                self._share(self._dir / name, 0o660)
            self.report.socket = str(self._dir)
        else:
            offer = await receive_offer(control, "libvirt", self._ready_timeout, ProtocolError)
            if offer.digest:
                raise ProtocolError("libvirt mode does not hash streams (digest must be false)")
            self._dir = self._make_destination_dir()
            self.report.socket = str(self._dir)
            mux = Mux(
                self.link.sock,
                self.link.writer,
                self.link.reader,
                connect_channel=self._connect_channel,
                digest=False,
                name="dst-mux",
            )
            self._mux = mux
            mux.start()
            await control.send(
                messages.MigrateReady(digest=False, mode="libvirt", socket_dir=str(self._dir))
            )

    def _share(self, path: Path, mode: int) -> None:
        """Let QEMU's group in (``socket_group``); without it only our user may."""
        if self._gid is not None:
            os.chown(path, -1, self._gid)
            os.chmod(path, mode)

    def _prepare_parent(self) -> None:
        """The socket parent: made 0700 (0710 for QEMU's group, which must pass through
        it); an existing one must already let that group through: it is not ours to
        widen."""
        try:
            self._parent.mkdir(mode=0o700, parents=True)
            self._share(self._parent, 0o710)
        except FileExistsError:
            pass
        if self._gid is None:
            return
        st = self._parent.stat()
        passes = st.st_mode & 0o001 or (st.st_gid == self._gid and st.st_mode & 0o010)
        if not passes:
            raise ProxyError(
                f"QEMU's group cannot enter the socket parent {self._parent} "
                f"(mode {st.st_mode & 0o777:o}, group {st.st_gid}): "
                f"chgrp {self._gid} {self._parent} && chmod g+x {self._parent}, "
                "or give another --socket-dir"
            )

    def _make_source_dir(self, wanted: Path) -> Path:
        if wanted.parent != self._parent:
            raise ProtocolError(
                f"the destination's socket directory {wanted} is not in ours ({self._parent}); "
                "both proxies need the same --socket-dir (libvirt uses one path on both hosts)"
            )
        self._prepare_parent()
        try:
            wanted.mkdir(mode=0o700)
        except FileExistsError:
            raise ProxyError(f"{wanted} already exists on this host; refusing to use it") from None
        self._share(wanted, 0o710)
        return wanted

    def _make_destination_dir(self) -> Path:
        self._prepare_parent()
        for _ in range(16):
            name = self._parent / f"m-{os.urandom(6).hex()}"
            try:
                name.mkdir(mode=0o700)
            except FileExistsError:
                continue
            # The destination QEMU creates its sockets here.
            self._share(name, 0o770)
            return name
        raise ProxyError(f"cannot make a fresh directory in {self._parent}")

    def _connect_channel(self, stream: int, label: str) -> Any:
        name = CHANNELS.get(label)
        if name is None:
            raise MuxError(
                f"stream {stream}: unknown channel {label!r} (not one of {', '.join(CHANNELS)})"
            )
        return unix_connector(self.socket_dir / name)(stream)

    # -- the end -------------------------------------------------------------------------

    def _finish_blocking(self, timeout: float) -> None:
        mux = self._mux
        assert mux is not None
        if self.role == "source":
            # libvirt's call has returned: QEMU opens no more connections.
            for listener in self._listeners:
                listener.stop_accepting()
            mux.finish(min(timeout, FINISH_TIMEOUT))
        else:
            mux.finish(timeout)

    def _lifecycle(self) -> AbstractAsyncContextManager[None]:
        async def finish_aborted(reason: str) -> None:
            with trio.CancelScope(shield=True):
                await self._run_to_end(FINISH_TIMEOUT)
            await self._conclude(False, reason)

        async def cleanup() -> None:
            if self._mux is not None:
                self._mux.close()
            for listener in self._listeners:
                listener.close()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

        return self._run_lifecycle([self._watch_peer], finish_aborted, cleanup)


@asynccontextmanager
async def libvirt_destination(
    channel: ControlChannel,
    *,
    socket_parent: str | Path = DEFAULT_SOCKET_PARENT,
    socket_group: str | None = None,
    ready_timeout: float = 60.0,
    timeout: float = DEFAULT_TIMEOUT,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    **options: Any,
) -> AsyncIterator[LibvirtProxy]:
    """The destination host's proxy: punch the link (role destination), make the socket
    directory, and feed every stream the source opens to the socket its channel names
    (where libvirt's destination QEMU or NBD server listens).  ``await proxy.wait()`` in
    the block (leaving it does the same); a failure raises MigrationError.

    ``socket_group``: the group the destination QEMU runs as, when not root (qemu.conf
    ``group``): the directory is then group-writable for it.  Other options are
    :class:`~holepunch_mig.ConnectOptions` fields."""
    async with api.connect(channel, role="destination", **options) as link:
        proxy = LibvirtProxy(
            "destination",
            link,
            socket_parent=Path(socket_parent),
            socket_group=socket_group,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
        )
        async with proxy._lifecycle():
            yield proxy


@asynccontextmanager
async def libvirt_source(
    channel: ControlChannel,
    *,
    socket_parent: str | Path = DEFAULT_SOCKET_PARENT,
    socket_group: str | None = None,
    ready_timeout: float = 60.0,
    timeout: float = DEFAULT_TIMEOUT,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    **options: Any,
) -> AsyncIterator[LibvirtProxy]:
    """The source host's proxy without the libvirt call: yields once ``proxy.migrate_uri``
    and ``proxy.disks_uri`` serve; give them to libvirt, then leave the block (normally:
    wait for the streams to end; with an exception: abort both sides).  Most callers
    want :func:`migrate_domain`, which does all of it."""
    async with api.connect(channel, role="source", **options) as link:
        proxy = LibvirtProxy(
            "source",
            link,
            socket_parent=Path(socket_parent),
            socket_group=socket_group,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
        )
        async with proxy._lifecycle():
            yield proxy


# -- the libvirt side ---------------------------------------------------------------------


def migration_flags(
    libvirt: Any,
    *,
    parallel: int,
    copy_storage: CopyStorage | None,
    postcopy: bool,
    persistent: bool,
    undefine_source: bool,
    peer2peer: bool,
    unsafe: bool = False,
) -> tuple[int, list[str]]:
    """libvirt's migrate flags for these choices, and their names (for the report)."""
    chosen = ["LIVE"]
    if parallel:
        chosen.append("PARALLEL")
    if copy_storage == "all":
        chosen.append("NON_SHARED_DISK")
    elif copy_storage == "inc":
        chosen.append("NON_SHARED_INC")
    if postcopy:
        chosen.append("POSTCOPY")
    if persistent:
        chosen.append("PERSIST_DEST")
    if undefine_source:
        chosen.append("UNDEFINE_SOURCE")
    if peer2peer:
        chosen.append("PEER2PEER")
    if unsafe:
        chosen.append("UNSAFE")
    flags = 0
    for name in chosen:
        flags |= getattr(libvirt, f"VIR_MIGRATE_{name}")
    return flags, chosen


class PostcopySwitch:
    """When to call ``virDomainMigrateStartPostCopy`` (the migration was started with
    ``VIR_MIGRATE_POSTCOPY``), decided from libvirt's job samples.

    ``after=None``: once the first pass over guest memory is done (libvirt's
    ``memory_iteration`` reaches 2) and precopy has not completed by then: what is left
    is what the guest dirtied, which is exactly what post-copy fetches on demand.
    ``after=S``: S seconds after the migrate call started, as soon as memory is being
    sent (``memory_iteration`` >= 1; during the NBD storage copy QEMU's migration has
    not started and refuses the switch).  A refused request is retried at the next
    sample.  ``seen`` is set once libvirt shows the source paused for post-copy
    (``VIR_DOMAIN_PAUSED_POSTCOPY``): only then did the switch happen (a request that
    races the end of precopy is accepted and ignored)."""

    def __init__(self, after: float | None = None) -> None:
        if after is not None and after < 0:
            raise ValueError("postcopy_after must be >= 0 seconds")
        self.after = after
        self.requested: float | None = None
        self.seen: float | None = None
        self.call_seconds: float | None = None
        """How long the accepted request took to return."""

    def due(self, stats: Mapping[str, Any], elapsed: float) -> bool:
        if self.requested is not None:
            return False
        iteration = stats.get("memory_iteration", 0)
        if not isinstance(iteration, int):
            return False
        if self.after is None:
            return iteration >= 2
        return iteration >= 1 and elapsed >= self.after


def _watch_handle(libvirt: Any, domain: Any) -> tuple[Any, Any | None]:
    """``domain`` again, through a connection of its own, for the calls made while the
    migrate call is in flight (job stats, the post-copy switch, the state, abort).

    libvirt's client (9.0 here) loses a call made on a connection whose reply thread is
    between releasing its lock and polling again: the call waits, unsent, until the other
    call (the migrate call: the whole migration) returns.  A post-copy request made right
    after a job-stats sample hit that window most of the time in the lab, and an abort
    would too.  A second connection has its own socket and no other call in flight.
    Returns (handle, connection to close) or, when libvirt refuses a second connection
    (a URI that needs credentials), (``domain``, None) with a warning."""
    conn = None
    try:
        conn = libvirt.open(domain.connect().getURI())
        return conn.lookupByUUID(domain.UUID()), conn
    except libvirt.libvirtError as exc:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        log.warning(
            "cannot open a second libvirt connection for the job (%s): job calls share the "
            "migrate call's connection, where libvirt may hold them until it returns",
            exc,
        )
        return domain, None


async def _libvirt_job(
    domain: Any,
    call: Callable[[], object],
    progress: LibvirtProgressCallback | None,
    last: dict[str, Any],
    failure: Callable[[], str | None],
    release: Callable[[], None],
    postcopy: PostcopySwitch | None = None,
) -> str | None:
    """Run libvirt's (blocking) migrate call in a thread, sampling its job info through
    ``domain`` (a handle on a connection of its own, see :func:`_watch_handle`); returns
    libvirt's error message or None.  When ``failure()`` says the link failed, abort the
    libvirt job (QEMU's NBD client may not notice a dead socket by itself and the job
    would wait forever); cancelled (Ctrl-C): the same, then re-raise.  ``postcopy``:
    switch to post-copy when it says so (and watch for the switch to happen)."""
    libvirt = _libvirt()
    done = threading.Event()
    error: list[str | None] = []
    started = time.monotonic()

    def work() -> None:
        try:
            call()
            error.append(None)
        except libvirt.libvirtError as exc:
            error.append(str(exc))
        except Exception as exc:
            error.append(f"{type(exc).__name__}: {exc}")
        finally:
            done.set()

    def sample() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            stats = domain.jobStats()
            if stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                last.clear()
                last.update(stats)
                if progress is not None:
                    try:
                        progress(LibvirtProgress.from_stats(stats))
                    except Exception:
                        log.exception("progress callback failed")
                if postcopy is not None and postcopy.due(stats, time.monotonic() - started):
                    switch()

    def switch() -> None:
        assert postcopy is not None
        asked = time.monotonic()
        try:
            domain.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            log.debug("post-copy switch refused (retrying at the next sample): %s", exc)
            return
        postcopy.requested = time.monotonic() - started
        postcopy.call_seconds = time.monotonic() - asked
        log.info(
            "post-copy requested %.2f s into the migration (libvirt took %.2f s to accept)",
            postcopy.requested,
            postcopy.call_seconds,
        )

    def watch_switch() -> None:
        assert postcopy is not None
        with contextlib.suppress(libvirt.libvirtError):
            state, reason = domain.state()
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY:
                postcopy.seen = time.monotonic() - started
                log.info("migration in post-copy since %.2f s", postcopy.seen)

    def abort() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            domain.abortJob()

    thread = threading.Thread(target=work, name="libvirt-migrate", daemon=True)
    thread.start()
    aborted = False
    next_sample = 0.0
    try:
        while not done.is_set():
            # Between a post-copy request and its sight, look often: the post-copy phase
            # of a small guest is short, and the state is the only witness of it.
            watching = (
                postcopy is not None and postcopy.requested is not None and postcopy.seen is None
            )
            wait = POSTCOPY_WATCH_INTERVAL if watching else PROGRESS_INTERVAL
            await trio.to_thread.run_sync(done.wait, wait)
            if done.is_set():
                break
            reason = failure()
            if reason is not None and not aborted:
                aborted = True
                log.warning("link failed (%s): aborting the libvirt job", reason)
                await trio.to_thread.run_sync(release)
                await trio.to_thread.run_sync(abort)
            if watching:
                await trio.to_thread.run_sync(watch_switch)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + PROGRESS_INTERVAL
                await trio.to_thread.run_sync(sample)
    except BaseException:
        with trio.CancelScope(shield=True):
            log.warning("aborting the libvirt migration job of %s", domain.name())
            await trio.to_thread.run_sync(abort)
            await trio.to_thread.run_sync(done.wait, ABORT_WAIT)
        raise
    return error[0] if error else "the libvirt call ended without a result"


async def migrate_domain(
    domain: Any,
    dest: Any,
    channel: ControlChannel,
    *,
    parallel: int = 0,
    copy_storage: CopyStorage | None = None,
    bandwidth: int | None = None,
    postcopy: bool = False,
    postcopy_after: float | None = None,
    persistent: bool = False,
    undefine_source: bool = False,
    unsafe: bool = False,
    progress: LibvirtProgressCallback | None = None,
    socket_parent: str | Path = DEFAULT_SOCKET_PARENT,
    socket_group: str | None = None,
    ready_timeout: float = 60.0,
    timeout: float = DEFAULT_TIMEOUT,
    link_timeout: float = DEFAULT_LINK_TIMEOUT,
    **options: Any,
) -> LibvirtReport:
    """Live-migrate ``domain`` (a ``libvirt.virDomain`` on the source host) through a
    link punched over ``channel`` to the peer running :func:`libvirt_destination`.

    ``dest``: a ``libvirt.virConnect`` to the destination (managed direct migration,
    ``virDomainMigrate3``) or the destination's libvirt URI as a string (peer to peer,
    ``virDomainMigrateToURI3``: the source libvirtd connects there itself).
    ``parallel``: multifd connections (each a stream of the link); ``copy_storage``:
    "all" or "inc" to copy non-shared disks over NBD (the destination's images must
    exist with the right size); ``bandwidth``: MiB/s cap (libvirt's); ``unsafe``:
    libvirt's ``VIR_MIGRATE_UNSAFE`` (e.g. memory only with a disk libvirt cannot see
    is shared).  ``progress``
    gets libvirt's job info about twice a second.

    ``postcopy``: start with ``VIR_MIGRATE_POSTCOPY`` and switch to post-copy after the
    first pass over memory, or ``postcopy_after`` seconds into the call (see
    :class:`PostcopySwitch`); ``report.postcopy`` says whether it happened.  Not with
    ``parallel`` (QEMU 7.2's post-copy does not drive multifd channels: ValueError).
    Once switched, a lost link cannot be rolled back: libvirt leaves the domain paused
    (post-copy failed) and only libvirt's ``VIR_MIGRATE_POSTCOPY_RESUME`` recovers it.

    Returns the report; never raises for a failed migration (``report.ok`` is False and
    ``report.verdict`` says why) except for errors before the link exists (control
    channel, no direct path: HolepunchError).  Cancelling aborts the libvirt job: the
    source domain keeps running."""
    if postcopy and parallel:
        raise ValueError(POSTCOPY_PARALLEL)
    if postcopy_after is not None and not postcopy:
        raise ValueError("postcopy_after needs postcopy=True")
    switch = PostcopySwitch(postcopy_after) if postcopy else None
    libvirt = _libvirt()
    report = LibvirtReport(domain=domain.name(), parallel=parallel, copy_storage=copy_storage)
    p2p = isinstance(dest, str)
    flags, report.flags = migration_flags(
        libvirt,
        parallel=parallel,
        copy_storage=copy_storage,
        postcopy=postcopy,
        persistent=persistent,
        undefine_source=undefine_source,
        peer2peer=p2p,
        unsafe=unsafe,
    )
    last: dict[str, Any] = {}
    proxy: LibvirtProxy | None = None
    try:
        async with libvirt_source(
            channel,
            socket_parent=socket_parent,
            socket_group=socket_group,
            ready_timeout=ready_timeout,
            timeout=timeout,
            link_timeout=link_timeout,
            **options,
        ) as proxy:
            params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: proxy.migrate_uri}
            report.migrate_uri = proxy.migrate_uri
            if copy_storage is not None:
                params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = proxy.disks_uri
                report.disks_uri = proxy.disks_uri
            if parallel:
                params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = parallel
            if bandwidth:
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth

            def call() -> object:
                if p2p:
                    return domain.migrateToURI3(dest, params, flags)
                return domain.migrate3(dest, params, flags)

            watched, watch_conn = await trio.to_thread.run_sync(_watch_handle, libvirt, domain)
            started = time.perf_counter()
            try:
                error = await _libvirt_job(
                    watched,
                    call,
                    progress,
                    last,
                    lambda: proxy.failure,
                    proxy.close_local,
                    switch,
                )
            finally:
                report.seconds = time.perf_counter() - started
                if watch_conn is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        await trio.to_thread.run_sync(watch_conn.close)
            report.libvirt_ok = error is None
            if error is not None and socket_group is None and "ermission denied" in error:
                error += (
                    f" (QEMU cannot use the sockets in {proxy.socket_dir}: when it does not "
                    "run as root, give its group (qemu.conf's group, e.g. libvirt-qemu) as "
                    "--socket-group GROUP to both proxies)"
                )
            report.libvirt_error = error
            if error is not None:
                proxy.abort(f"libvirt migration failed: {error}")
    except MigrationError:
        pass  # the proxy's report says it; combined below
    finally:
        report.job = _final_job(libvirt, domain, last)
        if switch is not None:
            # The state witness, or the destination's page requests (a post-copy phase
            # shorter than the watch interval).
            requests = report.job.get("memory_postcopy_requests", 0)
            report.postcopy = switch.seen is not None or (
                switch.requested is not None and isinstance(requests, int) and requests > 0
            )
            if report.postcopy:
                report.postcopy_seconds = switch.seen or switch.requested
            report.postcopy_request_seconds = switch.call_seconds
        if proxy is not None:
            report.proxy = proxy.report
            peer = proxy.peer_result
            if peer is not None:
                report.destination_ok = bool(peer.ok)
                report.destination_sent = peer.sent
                report.destination_received = peer.received
    _verdict(report)
    log.info("libvirt migration of %s: %s", report.domain, report.verdict)
    return report


def _final_job(libvirt: Any, domain: Any, last: dict[str, Any]) -> dict[str, Any]:
    """The completed job's statistics if libvirt still has them, else the last sample."""
    with contextlib.suppress(libvirt.libvirtError, AttributeError):
        stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if stats and stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
            return dict(stats)
    return dict(last)


def _verdict(report: LibvirtReport) -> None:
    proxy = report.proxy
    if not report.libvirt_ok:
        report.ok = False
        report.verdict = f"libvirt: {report.libvirt_error or 'not started'}"
        if proxy is not None and proxy.verdict and not proxy.ok:
            report.verdict += f"; link: {proxy.verdict}"
    elif proxy is None or not proxy.ok:
        report.ok = False
        report.verdict = (
            "libvirt completed but the link reported a failure: "
            f"{proxy.verdict if proxy is not None else 'no proxy'}"
        )
    else:
        report.ok = True
        channels = sorted({s.channel for s in proxy.streams})
        report.verdict = (
            f"libvirt completed; {len(proxy.streams)} stream(s) ({', '.join(channels)}) "
            f"carried intact, {proxy.bytes_sent} bytes sent, {proxy.bytes_received} received"
        )


def migrate_domain_blocking(domain: Any, dest: Any, control: Any, **kwargs: Any) -> LibvirtReport:
    """Threads: :func:`migrate_domain` from a connected control socket (a
    ``socket.socket``, owned from here on), in this thread; returns the report."""

    async def main() -> LibvirtReport:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(control))
        channel = StreamChannel(stream)
        try:
            return await migrate_domain(domain, dest, channel, **kwargs)
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    return trio.run(main)


def libvirt_destination_blocking(control: Any, **kwargs: Any) -> MigrationReport:
    """Threads: run :func:`libvirt_destination` to the end from a connected control
    socket; returns the report, raises MigrationError on failure."""

    async def main() -> MigrationReport:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(control))
        channel = StreamChannel(stream)
        try:
            async with libvirt_destination(channel, **kwargs) as proxy:
                return await proxy.wait()
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    return trio.run(main)
