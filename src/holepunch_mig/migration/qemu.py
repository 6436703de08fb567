"""Launch throw-away QEMU guests and migrate them, for tests, benchmarks and demos.

:class:`QemuVM` starts ``qemu-system-x86_64`` (TCG, no devices, no display) whose RAM
is a private mapping of a file filled from /dev/urandom, so a migration really has
to move every byte (zero pages would be skipped).  :func:`migrate` drives one
migration through QMP on both sides and reports QEMU's own figures.

The guest runs no OS: the CPU sits in the firmware.  That is enough to exercise the
migration stream, which is all this module is for.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from holepunch_mig.errors import QemuError, QmpError
from holepunch_mig.migration.qmp import QmpClient

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
MiB = 1024 * 1024


class MigrationFailed(QemuError):
    """QEMU reported the migration as failed or cancelled."""

    def __init__(self, message: str, result: MigrationResult) -> None:
        super().__init__(message)
        self.result = result


def qemu_available(binary: str = QEMU_BINARY) -> bool:
    return shutil.which(binary) is not None


def make_ram_image(path: Path, size_mib: int) -> Path:
    """Fill ``path`` with ``size_mib`` MiB from /dev/urandom (blocking; run in a thread).

    Several VMs may share one image: QEMU maps it with ``share=off`` (MAP_PRIVATE), so
    the file itself is never written.
    """
    chunk = MiB
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(chunk))
    return path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from
    /proc/PID/stat (fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # the command name (field 2) is in parentheses and may contain spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class QemuVM:
    """A QEMU process with a QMP connection, as a trio async context manager.

    ``incoming="defer"`` starts a destination waiting for ``migrate-incoming``.
    ``netns`` runs QEMU under ``ip netns exec NS`` (the QMP socket is a filesystem
    path, so it is reachable from the host namespace).  ``ram_image`` reuses an
    existing random image instead of writing a fresh one.  QEMU is always killed on
    exit, also on cancellation.
    """

    workdir: Path
    name: str = "vm"
    mem_mib: int = 512
    incoming: str | None = None
    netns: str | None = None
    ram_image: Path | None = None
    extra_args: Sequence[str] = ()
    binary: str = QEMU_BINARY
    start_timeout: float = 20.0
    proxy_monitor: bool = False
    """Add a second QMP monitor at :attr:`proxy_qmp_path` for a migrate-proxy in handoff
    mode (QEMU's QMP socket serves one client at a time; the manager keeps ``qmp``)."""
    qmp_path: Path = field(init=False)
    proxy_qmp_path: Path = field(init=False)
    log_path: Path = field(init=False)
    _proc: trio.Process | None = field(init=False, default=None)
    _qmp: QmpClient | None = field(init=False, default=None)
    _own_image: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.qmp_path = self.workdir / f"{self.name}.qmp"
        self.log_path = self.workdir / f"{self.name}.log"
        self.proxy_qmp_path = self.workdir / f"{self.name}-proxy.qmp"

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise QemuError(f"VM {self.name} is not running")
        return self._qmp

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) QEMU used so far, from /proc."""
        if self.pid is None:
            raise QemuError(f"VM {self.name} is not running")
        return process_cpu_seconds(self.pid)

    def command(self, ram_image: Path) -> list[str]:
        argv: list[str] = []
        if self.netns is not None:
            argv += ["ip", "netns", "exec", self.netns]
        argv += [
            self.binary,
            "-nodefaults",
            "-nographic",
            "-accel",
            "tcg",
            "-m",
            f"{self.mem_mib}M",
            "-object",
            f"memory-backend-file,id=ram0,size={self.mem_mib}M,mem-path={ram_image},share=off",
            "-machine",
            "pc,memory-backend=ram0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.proxy_monitor:
            argv += ["-qmp", f"unix:{self.proxy_qmp_path},server=on,wait=off"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        argv += list(self.extra_args)
        return argv

    async def __aenter__(self) -> QemuVM:
        self.workdir.mkdir(parents=True, exist_ok=True)
        image = self.ram_image
        if image is None:
            image = self.workdir / f"{self.name}.ram"
            await trio.to_thread.run_sync(make_ram_image, image, self.mem_mib)
            self._own_image = True
        self.qmp_path.unlink(missing_ok=True)
        self.proxy_qmp_path.unlink(missing_ok=True)
        argv = self.command(image)
        log.info("starting %s: %s", self.name, " ".join(argv))
        with open(self.log_path, "wb") as logf:
            self._proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
            )
        try:
            with trio.fail_after(self.start_timeout):
                while not self.qmp_path.exists():
                    if self._proc.returncode is not None:
                        raise QemuError(
                            f"QEMU {self.name} exited with {self._proc.returncode} during "
                            f"start: {self.log_tail()}"
                        )
                    await trio.sleep(0.02)
            self._qmp = await QmpClient.connect(str(self.qmp_path), timeout=self.start_timeout)
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, trio.TooSlowError):
                raise QemuError(f"QEMU {self.name}: no QMP within {self.start_timeout} s") from exc
            if isinstance(exc, QmpError):
                raise QemuError(f"QEMU {self.name}: {exc}; log: {self.log_tail()}") from exc
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def _shutdown(self) -> None:
        with trio.CancelScope(shield=True):
            if self._qmp is not None:
                try:
                    await self._qmp.aclose()
                except Exception:  # best effort: QEMU is killed below anyway
                    log.debug("closing QMP of %s", self.name, exc_info=True)
                self._qmp = None
            if self._proc is not None:
                if self._proc.returncode is None:
                    self._proc.kill()
                with trio.move_on_after(10):
                    await self._proc.wait()
                self._proc = None
            if self._own_image:
                (self.workdir / f"{self.name}.ram").unlink(missing_ok=True)
                self._own_image = False
            self.qmp_path.unlink(missing_ok=True)
            self.proxy_qmp_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class MigrationResult:
    """What QEMU reported at the end of one migration."""

    status: str
    total_time_ms: int | None
    wall_seconds: float
    transferred: int | None
    ram: dict[str, Any]
    error_desc: str | None = None

    @property
    def mb_per_s(self) -> float:
        """Transferred bytes / wall time, in MB/s (10**6)."""
        if not self.transferred or self.wall_seconds <= 0:
            return math.nan
        return self.transferred / self.wall_seconds / 1e6


async def set_migration_options(
    qmp: QmpClient,
    *,
    multifd_channels: int = 0,
    max_bandwidth: int | None = None,
) -> None:
    """Set the multifd capability (on or off) and the parameters this module uses."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "multifd", "state": multifd_channels > 0}]},
    )
    params: dict[str, Any] = {}
    if multifd_channels > 0:
        params["multifd-channels"] = multifd_channels
    if max_bandwidth is not None:
        params["max-bandwidth"] = max_bandwidth
    if params:
        await qmp.execute("migrate-set-parameters", params)


async def query_status(qmp: QmpClient) -> str:
    """The VM's run state (``running``, ``inmigrate``, ``postmigrate``, ``paused``...)."""
    ret = await qmp.execute("query-status")
    return str(ret["status"])


async def wait_status(qmp: QmpClient, wanted: str, *, timeout: float) -> None:
    """Poll ``query-status`` until it says ``wanted``; QemuError after ``timeout``."""
    last = "?"
    try:
        with trio.fail_after(timeout):
            while True:
                last = await query_status(qmp)
                if last == wanted:
                    return
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise QemuError(f"VM status is {last!r}, not {wanted!r}, after {timeout} s") from None


async def start_incoming(
    dst: QmpClient, uri: str, *, multifd_channels: int = 0, timeout: float = 30.0
) -> None:
    """Prepare a ``-incoming defer`` destination and make it listen on ``uri``."""
    with trio.fail_after(timeout):
        await set_migration_options(dst, multifd_channels=multifd_channels)
        await dst.execute("migrate-incoming", {"uri": uri})


async def migrate(
    src: QmpClient,
    uri: str,
    *,
    dst: QmpClient | None = None,
    dst_uri: str | None = None,
    multifd_channels: int = 0,
    max_bandwidth: int = 10**10,
    timeout: float = 120.0,
    poll_interval: float = 0.02,
    check: bool = True,
) -> MigrationResult:
    """Migrate the VM behind ``src`` to ``uri``.

    If ``dst`` is given, it is prepared first (same multifd settings) and told to
    listen on ``dst_uri`` (default: ``uri``); pass ``dst=None`` when the destination
    is prepared elsewhere (another host, or :func:`start_incoming`).  The source then
    gets ``max-bandwidth`` (QEMU's default is 128 MiB/s) and ``migrate``, and
    ``query-migrate`` is polled until ``completed``/``failed``/``cancelled``.

    On timeout the migration is cancelled (the source keeps running) and QemuError is
    raised.  With ``check`` a failed migration raises MigrationFailed; otherwise the
    result carries the status.
    """
    if dst is not None:
        await start_incoming(
            dst, dst_uri or uri, multifd_channels=multifd_channels, timeout=min(timeout, 30.0)
        )
    await set_migration_options(src, multifd_channels=multifd_channels, max_bandwidth=max_bandwidth)
    t0 = time.perf_counter()
    try:
        with trio.fail_after(timeout):
            await src.execute("migrate", {"uri": uri})
    except trio.TooSlowError:
        raise QemuError(f"migrate to {uri}: no answer within {timeout} s") from None
    result = await wait_migration(
        src,
        timeout=max(0.1, timeout - (time.perf_counter() - t0)),
        poll_interval=poll_interval,
        started=t0,
        what=f"to {uri}",
    )
    if check and result.status != "completed":
        raise MigrationFailed(
            f"migration to {uri} {result.status}: {result.error_desc or 'no reason given'}",
            result,
        )
    return result


async def wait_migration(
    src: QmpClient,
    *,
    timeout: float,
    poll_interval: float = 0.02,
    started: float | None = None,
    what: str = "",
    cancel_on_timeout: bool = True,
) -> MigrationResult:
    """Poll the source's ``query-migrate`` until ``completed``/``failed``/``cancelled``
    (a migration not started yet, status absent or ``none``, is waited for too).
    ``wall_seconds`` counts from ``started`` (a ``time.perf_counter()`` value; default:
    now).  On timeout the migration is cancelled (unless ``cancel_on_timeout`` is false)
    and QemuError is raised."""
    t0 = time.perf_counter() if started is None else started
    info: dict[str, Any] = {}
    try:
        with trio.fail_after(timeout):
            while True:
                info = await src.execute("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                await trio.sleep(poll_interval)
    except trio.TooSlowError:
        if cancel_on_timeout:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await src.execute("migrate_cancel", timeout=5)
                except QmpError:
                    log.warning("migrate_cancel failed after timeout", exc_info=True)
        raise QemuError(
            f"migration {what} not finished after {timeout} s "
            f"(last status {info.get('status')!r}){'; cancelled' if cancel_on_timeout else ''}"
        ) from None
    wall = time.perf_counter() - t0
    ram = info.get("ram", {})
    result = MigrationResult(
        status=str(info["status"]),
        total_time_ms=info.get("total-time"),
        wall_seconds=wall,
        transferred=ram.get("transferred"),
        ram=ram,
        error_desc=info.get("error-desc"),
    )
    log.info(
        "migration %s: %s in %.3f s (QEMU %s ms), %s bytes",
        what,
        result.status,
        wall,
        result.total_time_ms,
        result.transferred,
    )
    return result
