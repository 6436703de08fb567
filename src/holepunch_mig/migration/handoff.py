"""Migration handoff mode: give the punched TCP socket to QEMU itself.

The mux mode (:mod:`~holepunch_mig.migration.mux_mode`) relays every byte of the migration
through Python threads (UNIX socket -> AES-256-GCM records -> link and back).  In
handoff mode the proxy only sets the migration up; the data path is QEMU's own:

1. the session punches and authenticates the link (Noise KK) as in mux mode;
2. both proxies derive the same 32-byte TLS pre-shared key from the session's Noise
   split keys (:func:`derive_psk`) and write it, as QEMU's ``tls-creds-psk`` wants it,
   to ``keys.psk`` (``identity:hexkey``, 0600) in a fresh private 0700 directory;
3. each proxy, over its own QMP connection to its QEMU: ``object-add
   tls-creds-psk`` (source ``endpoint=client username=IDENTITY``, destination
   ``endpoint=server``), ``migrate-set-parameters tls-creds=ID`` (source also
   ``tls-hostname``), ``getfd`` with the punched socket attached (SCM_RIGHTS);
4. destination: ``migrate-incoming fd:NAME``, then ``migrate-ready`` to the source;
   source: ``migrate fd:NAME``.  QEMU runs a TLS 1.3 PSK handshake over the socket
   and carries the whole migration (one channel) inside it;
5. both proxies watch their QEMU (``query-migrate``; destination also
   ``query-status``) until it is over, remove the credentials and the key file, and
   exchange ``migrate-result`` so each report says what both sides saw.

``fd:`` URIs carry one channel: QEMU 7.2 cannot do multifd over them, so a QEMU with
the ``multifd`` capability on is refused before anything is punched
(:class:`HandoffRefused`); use mux mode for multifd.  The tunnel path (no punched
socket) is refused too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HandoffRefused,
    HolepunchError,
    PeerAbort,
    ProtocolError,
    QmpError,
)
from holepunch_mig.migration.common import (
    MigrationError,
    MigrationProgress,
    MigrationReport,
    ProgressCallback,
    ProxyBase,
    StreamReport,
    receive_offer,
)
from holepunch_mig.migration.proxy import private_dir
from holepunch_mig.migration.qmp import QmpClient
from holepunch_mig.roles import Role
from holepunch_mig.session.link import Link
from holepunch_mig.session.resume import tune_link
from holepunch_mig.wire import messages
from holepunch_mig.wire.text import printable

log = logging.getLogger(__name__)

PSK_LABEL = b"holepunch_mig qemu tls-psk v1"
"""HKDF ``info``: binds the key to this use, so it never equals a record-layer key."""
PSK_IDENTITY = "holepunch-mig"
"""The TLS-PSK identity (sent in clear in the ClientHello: deliberately uninformative)."""
TLS_HOSTNAME = "holepunch-mig-peer"
"""QEMU's ``tls-hostname`` for the source; PSK credentials do not check it."""
TLS_PRIORITY: str | None = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM"
"""GnuTLS priority for both QEMUs (QEMU appends the PSK key exchanges, +ECDHE-PSK first).
TLS 1.3 only.  AES-128-GCM: GnuTLS binds an external PSK to SHA-256, so of the TLS 1.3
suites only TLS_AES_128_GCM_SHA256 and TLS_CHACHA20_POLY1305_SHA256 can use it
(AES-256-GCM-SHA384 fails the handshake); left to itself GnuTLS picked ChaCha20 here,
which took the 128 MiB loopback migration from ~0.4-1.0 s to ~1.1-1.5 s."""
POLL_INTERVAL = 0.05
PROGRESS_INTERVAL = 0.25
QMP_TIMEOUT = 30.0
TERMINAL = ("completed", "failed", "cancelled")


def derive_psk(source_to_destination: bytes, destination_to_source: bytes, session: str) -> bytes:
    """The 32-byte TLS-PSK both sides compute: HKDF-SHA256 over both Noise split keys
    (source->destination first), salted with the session id, ``info`` = PSK_LABEL.

    Only the two peers that completed this session's Noise KK handshake know the split
    keys, so only they can know the PSK; HKDF with its own label makes it independent of
    the record keys (which stay unused in handoff mode)."""
    if len(source_to_destination) != 32 or len(destination_to_source) != 32:
        raise ValueError("split keys must be 32 bytes each")
    try:
        salt = bytes.fromhex(session)
    except ValueError:
        salt = session.encode()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=PSK_LABEL)
    return hkdf.derive(source_to_destination + destination_to_source)


def link_psk(link: Link, role: Role) -> bytes:
    """Derive the PSK from the link's (still unused) Noise split keys."""
    if link.report.role != role:
        raise ValueError(f"link of the {link.report.role}, asked as the {role}")
    try:
        s2d, d2s = link.split_keys()
    except ValueError as exc:
        # A rekey would have moved the keys on one side only; handoff needs them fresh.
        raise HandoffRefused(f"{exc}; hand it off before any") from None
    return derive_psk(s2d, d2s, link.report.session)


def _default_psk_parent() -> Path | None:
    """/dev/shm (RAM, so the key never reaches a disk) when usable, else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


class PskFile:
    """``keys.psk`` for QEMU's ``tls-creds-psk``: a fresh 0700 directory (the object's
    ``dir=``) holding one 0600 line ``identity:hexkey``.  ``remove()`` deletes both;
    it is idempotent and always called when the migration ends."""

    def __init__(
        self, psk: bytes, *, parent: Path | None = None, identity: str = PSK_IDENTITY
    ) -> None:
        self._psk = psk
        self._parent = parent if parent is not None else _default_psk_parent()
        self.identity = identity
        self.dir: Path | None = None

    def create(self) -> Path:
        d = private_dir(self._parent, "hpm-psk-")
        try:
            fd = os.open(
                d / "keys.psk", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.identity}:{self._psk.hex()}\n")
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        self.dir = d
        return d

    def remove(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


async def refuse_multifd(qmp: QmpClient) -> None:
    """Raise HandoffRefused if QEMU has the multifd capability on (fd: URIs carry one
    channel in QEMU 7.2)."""
    caps = await qmp.execute("query-migrate-capabilities", timeout=QMP_TIMEOUT)
    for cap in caps:
        if cap.get("capability") == "multifd" and cap.get("state"):
            raise HandoffRefused(
                "handoff mode carries one channel (QEMU 7.2 does no multifd over fd: "
                "URIs) but this QEMU has multifd on: turn it off or use --mode mux"
            )


async def install_tls(
    qmp: QmpClient,
    *,
    endpoint: str,
    cred_id: str,
    psk: PskFile,
    priority: str | None = TLS_PRIORITY,
) -> None:
    """Create the ``tls-creds-psk`` object and make the migration use it."""
    assert psk.dir is not None
    args: dict[str, Any] = {
        "qom-type": "tls-creds-psk",
        "id": cred_id,
        "endpoint": endpoint,
        "dir": str(psk.dir),
    }
    if priority:
        args["priority"] = priority
    if endpoint == "client":
        args["username"] = psk.identity
    await qmp.execute("object-add", args, timeout=QMP_TIMEOUT)
    params: dict[str, Any] = {"tls-creds": cred_id}
    if endpoint == "client":
        params["tls-hostname"] = TLS_HOSTNAME
    await qmp.execute("migrate-set-parameters", params, timeout=QMP_TIMEOUT)


async def remove_tls(qmp: QmpClient, cred_id: str) -> None:
    """Best effort: stop using TLS for later migrations and delete the object."""
    with contextlib.suppress(QmpError):
        await qmp.execute(
            "migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""}, timeout=5
        )
    with contextlib.suppress(QmpError):
        await qmp.execute("object-del", {"id": cred_id}, timeout=5)


class HandoffProxy(ProxyBase):
    """One side of a handoff-mode migration; same surface as MigrationProxy
    (``uri``, ``wait()``, ``abort()``, ``report``, ``link``, ``done``).

    Source: after setup QEMU is already migrating (the proxy issued ``migrate
    fd:NAME`` on its own QMP connection: QEMU looks a ``getfd`` name up on the monitor
    that received it).  ``wait()`` returns when QEMU says completed, raises
    MigrationError otherwise."""

    def __init__(
        self,
        role: Role,
        link: Link,
        qmp: QmpClient,
        *,
        progress: ProgressCallback | None,
        expected_bytes: int | None,
        ready_timeout: float,
        timeout: float,
        link_timeout: float,
        psk_parent: Path | None = None,
    ) -> None:
        super().__init__(
            role, link, MigrationReport(role=role, link=link.report, mode="handoff", digest="tls")
        )
        self.qmp = qmp
        self._progress = progress
        self._expected = expected_bytes
        self._ready_timeout = ready_timeout
        self._timeout = timeout
        self._link_timeout = link_timeout
        self._psk_parent = psk_parent
        session = link.report.session
        self.fd_name = f"hpm-{session[:12]}"
        self._cred_id = f"hpm-tls-{session[:12]}"
        self._psk: PskFile | None = None
        self._tls_installed = False
        self._handed_off = False
        self._started: float | None = None
        self._last: dict[str, Any] = {}
        self._moved = 0
        self._abort_reason: str | None = None
        self._wake = trio.Event()
        self._running = False

    # -- public ------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The URI QEMU was given (``fd:NAME``)."""
        return f"fd:{self.fd_name}"

    @property
    def path(self) -> Path:
        raise HolepunchError("handoff mode has no UNIX socket: QEMU holds the link itself")

    def abort(self, reason: str) -> None:
        """Fail the migration: the source cancels it (its VM keeps running), both sides
        shut the link down under QEMU, and the peer is told why."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._wake.set()

    async def wait(self, timeout: float | None = None) -> MigrationReport:
        if not self._done.is_set() and not self._running:
            self._running = True
            ok, error = await self._watch_qemu(self._timeout if timeout is None else timeout)
            await self._conclude(ok, error)
        await self._done.wait()
        if not self.report.ok:
            raise MigrationError(self.report.verdict or "migration failed", self.report)
        return self.report

    # -- setup -------------------------------------------------------------------------

    async def _setup(self) -> None:
        control = self.link.control
        if self.link.path != "direct":
            raise HandoffRefused(
                f"handoff mode needs a punched TCP link, the session gave {self.link.path!r}"
            )
        # QEMU inherits these: a silent link fails its migration within link_timeout.
        tune_link(self.link.sock, self._link_timeout)
        if self.role == "source":
            await control.send(messages.MigrateOffer(digest=False, mode="handoff"))
            msg, _ = await control.receive(
                messages.MigrateReady,
                messages.MigrateResult,
                timeout=self._ready_timeout,
                step="waiting for the destination proxy to be ready",
            )
            if isinstance(msg, messages.MigrateResult):
                raise HandoffRefused(f"destination proxy refused: {printable(msg.error or '')}")
            if (msg.mode or "mux") != "handoff":
                raise ProtocolError("migrate-ready does not confirm handoff mode")
            await self._give_qemu("client")
            self._started = time.perf_counter()
            await self.qmp.execute("migrate", {"uri": self.uri}, timeout=QMP_TIMEOUT)
        else:
            await receive_offer(control, "handoff", self._ready_timeout, HandoffRefused)
            await self._give_qemu("server")
            self._started = time.perf_counter()
            await self.qmp.execute("migrate-incoming", {"uri": self.uri}, timeout=QMP_TIMEOUT)
            await control.send(messages.MigrateReady(digest=False, mode="handoff"))
        self.report.socket = self.uri

    async def _give_qemu(self, endpoint: str) -> None:
        psk = PskFile(link_psk(self.link, self.role), parent=self._psk_parent)
        self._psk = psk
        await trio.to_thread.run_sync(psk.create)
        await install_tls(self.qmp, endpoint=endpoint, cred_id=self._cred_id, psk=psk)
        self._tls_installed = True
        await self.qmp.execute_with_fd(
            "getfd", self.link.sock.fileno(), {"fdname": self.fd_name}, timeout=QMP_TIMEOUT
        )
        self._handed_off = True
        log.info("%s: link handed to QEMU as %s (TLS-PSK %s)", self.role, self.uri, endpoint)

    # -- watching QEMU -------------------------------------------------------------------

    async def _watch_peer(self) -> None:
        try:
            msg, _ = await self.link.control.receive(
                messages.MigrateResult, timeout=math.inf, step="waiting for the peer's result"
            )
            self._peer_result = msg
            if not msg.ok and not self._done.is_set():
                self.abort(f"peer reported failure: {printable(msg.error or '')}")
        except (PeerAbort, ChannelClosed, ControlTimeout, ProtocolError) as exc:
            self.report.notes.append(f"control channel: {exc}")
        finally:
            self._peer_seen.set()

    def _shutdown_link(self) -> None:
        """Shut the shared socket down under QEMU: its migration fails at once."""
        with contextlib.suppress(OSError):
            self.link.sock.shutdown(socket.SHUT_RDWR)

    async def _watch_qemu(self, timeout: float) -> tuple[bool, str | None]:
        try:
            with trio.fail_after(timeout):
                if self.role == "source":
                    return await self._watch_source()
                return await self._watch_destination()
        except trio.TooSlowError:
            reason = f"migration not over after {timeout} s"
            self.abort(reason)
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._cancel_source()
            return False, reason
        except trio.Cancelled:
            self._shutdown_link()
            raise

    async def _cancel_source(self) -> None:
        if self.role == "source":
            with contextlib.suppress(QmpError):
                await self.qmp.execute("migrate_cancel", timeout=5)
        self._shutdown_link()

    async def _sleep(self) -> None:
        with trio.move_on_after(POLL_INTERVAL):
            await self._wake.wait()

    async def _watch_source(self) -> tuple[bool, str | None]:
        cancelled = False
        last_progress = 0.0
        while True:
            try:
                info = await self.qmp.execute("query-migrate", timeout=QMP_TIMEOUT)
            except QmpError as exc:
                self._shutdown_link()
                return False, f"lost the source QEMU's QMP during the migration: {exc}"
            self._last = info
            status = info.get("status")
            moved = (info.get("ram") or {}).get("transferred")
            if moved:  # a cancelled or failed migration reports no ram stats
                self._moved = max(self._moved, int(moved))
            now = time.perf_counter()
            if now - last_progress >= PROGRESS_INTERVAL or status in TERMINAL:
                last_progress = now
                self._report_progress(info)
            if status in TERMINAL:
                if status == "completed":
                    return True, None
                reason = info.get("error-desc") or status
                if self._abort_reason is not None and status == "cancelled":
                    return False, f"migration cancelled by the proxy: {self._abort_reason}"
                why = f"source QEMU: migration {status}: {reason}"
                if self._abort_reason is not None:
                    why += f" ({self._abort_reason})"
                return False, why
            if self._abort_reason is not None and not cancelled:
                cancelled = True
                await self._cancel_source()
            await self._sleep()

    async def _watch_destination(self) -> tuple[bool, str | None]:
        while True:
            try:
                info = await self.qmp.execute("query-migrate", timeout=QMP_TIMEOUT)
            except QmpError as exc:
                self._shutdown_link()
                return False, (
                    "destination QEMU exited during the incoming migration (QEMU 7.2 exits "
                    f"when loading fails; {exc})"
                )
            self._last = info
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                self._shutdown_link()
                return False, f"destination QEMU: incoming migration {status}: " + str(
                    info.get("error-desc") or "no reason given"
                )
            if self._abort_reason is not None:
                self._shutdown_link()
                return False, self._abort_reason
            await self._sleep()
        # Completed: the VM resumes (``running``) unless QEMU was started with -S.
        state = "inmigrate"
        with trio.move_on_after(10):
            while state == "inmigrate":
                try:
                    ret = await self.qmp.execute("query-status", timeout=QMP_TIMEOUT)
                except QmpError as exc:
                    return False, f"destination QEMU gone right after the migration: {exc}"
                state = str(ret.get("status"))
                if state == "inmigrate":
                    await trio.sleep(POLL_INTERVAL)
        self.report.qemu_status = state
        return True, None

    def _report_progress(self, info: dict[str, Any]) -> None:
        if self._progress is None or self._started is None:
            return
        ram = info.get("ram") or {}
        moved = int(ram.get("transferred") or 0)
        seconds = time.perf_counter() - self._started
        rate = moved / seconds if seconds > 0 else 0.0
        total = self._expected or ram.get("total")
        eta = max(0.0, (total - moved) / rate) if total and rate > 0 else None
        try:
            self._progress(MigrationProgress(self.role, 1, moved, 0, seconds, rate, total, eta))
        except Exception:
            log.exception("progress callback failed")

    # -- the end ---------------------------------------------------------------------------

    async def _conclude(self, ok: bool, error: str | None) -> None:
        with trio.CancelScope(shield=True):
            rep = self.report
            info = self._last
            ram = info.get("ram") or {}
            if self.role == "source":
                rep.qemu_status = info.get("status")
                rep.bytes_sent = int(ram.get("transferred") or self._moved)
                if info.get("total-time") is not None:
                    rep.migration_seconds = info["total-time"] / 1000
            if rep.migration_seconds is None and self._started is not None:
                rep.migration_seconds = time.perf_counter() - self._started
            if not ok:
                rep.qemu_error = info.get("error-desc") or error
            peer = await self._exchange_results(ok, 1 if self._handed_off else 0, error)
            if peer is not None and self.role == "destination":
                rep.bytes_received = int(peer.sent)
                rep.notes.append("bytes_received is the source QEMU's ram.transferred")
            if self._handed_off:
                rep.streams = [StreamReport(0, rep.bytes_sent, rep.bytes_received)]
            if not ok:
                rep.ok = False
                rep.verdict = error
                theirs = peer.error if peer is not None and not peer.ok else None
                # one side's failure often makes the other fail "because the peer did":
                # name each reason once
                if theirs and error and theirs not in error and error not in theirs:
                    rep.verdict = f"{error}; peer: {theirs}"
            elif peer is not None and not peer.ok:
                rep.ok = False
                rep.verdict = f"peer reported failure: {printable(peer.error or '')}"
            else:
                rep.ok = True
                where = (
                    f"destination VM {rep.qemu_status}"
                    if self.role == "destination"
                    else f"{rep.bytes_sent} bytes"
                )
                rep.verdict = (
                    f"QEMU migrated over its own TLS-PSK channel on the punched link "
                    f"({self.uri}): completed, {where}"
                )
                if peer is None:
                    rep.notes.append("peer's migrate-result not received")
            self._done.set()
            log.info("migration %s (handoff): %s", self.role, rep.verdict)

    async def _cleanup(self, failed: bool) -> None:
        with trio.CancelScope(shield=True):
            if self._handed_off and failed:
                self._shutdown_link()
            if self._tls_installed:
                with trio.move_on_after(15):
                    await remove_tls(self.qmp, self._cred_id)
            if self._handed_off and self.role == "source" and failed:
                # ``migrate`` may not have consumed the fd; QEMU closes a named one here.
                with contextlib.suppress(QmpError), trio.move_on_after(5):
                    await self.qmp.execute("closefd", {"fdname": self.fd_name}, timeout=5)
            if self._psk is not None:
                self._psk.remove()
            if self._handed_off:
                # Drop our descriptor without shutdown(): QEMU's copy lives on, and
                # Link.aclose() (shutdown + close) must not touch QEMU's connection.
                with contextlib.suppress(OSError):
                    os.close(self.link.sock.detach())

    def _lifecycle(self) -> AbstractAsyncContextManager[None]:
        async def finish_aborted(reason: str) -> None:
            with trio.CancelScope(shield=True):
                if not self._running:
                    self._running = True
                    _, error = await self._watch_qemu(60.0)
                    await self._conclude(False, error or reason)
                else:
                    await self._done.wait()

        async def cleanup() -> None:
            await self._cleanup(failed=not self.report.ok)

        return self._run_lifecycle([self._watch_peer], finish_aborted, cleanup)


@asynccontextmanager
async def open_qmp(qmp: str | Path | QmpClient) -> AsyncIterator[QmpClient]:
    """Use a connected QmpClient as is, or connect to a QMP socket path (closed after)."""
    if isinstance(qmp, QmpClient):
        yield qmp
        return
    client = await QmpClient.connect(str(qmp), timeout=10.0)
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def check_destination_qemu(qmp: QmpClient) -> None:
    """The destination QEMU must wait for ``migrate-incoming`` (``-incoming defer``)."""
    ret = await qmp.execute("query-status", timeout=QMP_TIMEOUT)
    if ret.get("status") != "inmigrate":
        raise HandoffRefused(
            f"destination QEMU is {ret.get('status')!r}, not 'inmigrate': start it with "
            "-incoming defer and do not issue migrate-incoming (the proxy does, with fd:)"
        )
