"""libvirt "hosts" in the lab: virtlogd + libvirtd per lab host, each in its own mount
namespace, so two daemons on one machine keep apart every path libvirt owns.

Each :class:`LibvirtHost` is

* a *holder* process that entered the host's network namespace, unshared a private
  mount namespace and mounted tmpfs on ``/run/libvirt``, ``/var/lib/libvirt``,
  ``/var/cache/libvirt``, ``/var/log/libvirt``, ``/etc/libvirt`` and the run directory
  of the migration proxies (``/run/holepunch-mig-libvirt``); it sleeps until it is
  killed, and the mount namespace lives as long as it does;
* virtlogd and libvirtd started inside both namespaces with ``nsenter -t HOLDER -m -n``
  (``ip netns exec`` would remount /sys and hide the cgroup mounts libvirt needs), with
  pid files under the private /run/libvirt (the default /run/libvirtd.pid is shared) and
  /dev/null as their stdio;
* a lab configuration: libvirtd listens on TCP :data:`LIBVIRT_TCP_PORT` without
  authentication (``auth_tcp = "none"``: a lab only), QEMU runs as root with no
  security driver and no dynamic ownership (or, with ``qemu_user``, as that user and
  group, libvirt handing the domain's files to it).

From outside the namespaces the daemon is reachable at :attr:`LibvirtHost.local_uri`
(``qemu+unix`` to the socket seen through ``/proc/HOLDER/root``); inside the host it is
plain ``qemu:///system``.  :meth:`LibvirtHost.argv` wraps a command so that it runs
inside the host (what ``holepunch-mig lab exec`` does for a libvirt lab).

Daemons are stopped through their pid files, never by name; killing the holder
releases the mounts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from holepunch_mig.errors import LabError
from holepunch_mig.lab.netns import pid_alive, proc_start_time, select_line
from holepunch_mig.lab.topology import STATE_DIR, Lab

log = logging.getLogger(__name__)

#: libvirtd's TCP port (``listen_tcp``); the only port a libvirt lab opens inbound
#: besides the control port.
LIBVIRT_TCP_PORT = 16509
#: Where the migration proxies keep their per-migration socket directories (tmpfs,
#: private to each lab host).
PROXY_RUN_DIR = Path("/run/holepunch-mig-libvirt")
#: The disk images of lab domains (inside the private /var/lib/libvirt).
IMAGE_DIR = Path("/var/lib/libvirt/images")

PRIVATE_DIRS = (
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
    "/etc/libvirt",
    str(PROXY_RUN_DIR),
)

LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 1
tcp_port = "{port}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
user = "{user}"
group = "{group}"
dynamic_ownership = {dynamic}
security_driver = "none"
remember_owner = 0
stdio_handler = "file"
"""
#: Where file-backed guest RAM lives (``<memoryBacking><source type='file'/>``; libvirt's
#: default ``memory_backing_dir``): QEMU maps ``RAM_DIR/<id>-<name>/pc.ram``, so a file
#: put there before the domain starts becomes its RAM (random RAM for benchmarks: zero
#: pages would migrate as nothing).
RAM_DIR = Path("/var/lib/libvirt/qemu/ram")

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  {backing}<vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def domain_xml(
    name: str, mem_mib: int, disk: Path, *, file_ram: bool = False, disk_format: str = "raw"
) -> str:
    """A small TCG domain (no OS: it sits in the firmware) with one virtio disk (raw, or
    ``disk_format``, e.g. a qcow2 overlay whose backing chain libvirt reads from it);
    ``file_ram``: RAM backed by a private file mapping under :data:`RAM_DIR`."""
    backing = (
        "<memoryBacking><source type='file'/><access mode='private'/></memoryBacking>\n  "
        if file_ram
        else ""
    )
    return DOMAIN_XML.format(
        name=name, mem=mem_mib, disk=disk, backing=backing, disk_format=disk_format
    )


VIRTLOGD_CONF = """\
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""

_START_TIMEOUT = 30.0


class LibvirtHost:
    """virtlogd + libvirtd of one lab host (see the module docstring)."""

    def __init__(self, lab: Lab, host: str, qemu_user: str | None = None) -> None:
        self.lab = lab
        self.host = host
        self.qemu_user = qemu_user
        """QEMU's user and group (qemu.conf) when not root, e.g. Debian's libvirt-qemu:
        libvirt then hands the domain's files to it (dynamic_ownership)."""
        self.address = lab.address(host)
        self.public_address = lab.public_address(host)
        self._holder: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._holder_start: int | None = None

    @classmethod
    def attach(cls, lab: Lab, host: str, pid: int, start_time: int | None) -> LibvirtHost:
        """The libvirt host of a detached lab (``lab up --libvirt``), from its holder's
        pid; LabError when that process is gone."""
        if not pid_alive(pid, start_time):
            raise LabError(f"libvirt host {host!r}: its holder process {pid} is gone")
        self = cls(lab, host)
        self._pid, self._holder_start = pid, start_time
        return self

    def state(self) -> dict[str, int | None]:
        """What :meth:`attach` needs (kept in the detached lab's state)."""
        return {"pid": self.holder_pid, "start_time": self._holder_start}

    # -- where things are ------------------------------------------------------------

    @property
    def holder_pid(self) -> int:
        if self._pid is None:
            raise LabError(f"libvirt host {self.host!r} is not started")
        return self._pid

    @property
    def root(self) -> Path:
        """The host's file system as this process sees it (its private mounts)."""
        return Path(f"/proc/{self.holder_pid}/root")

    def path(self, inside: str | Path) -> Path:
        """``inside`` (a path as the host sees it) from outside the host."""
        return self.root / str(inside).lstrip("/")

    @property
    def local_uri(self) -> str:
        """The host's libvirtd from outside its namespaces (this process)."""
        sock = self.path("/run/libvirt/libvirt-sock")
        return f"qemu+unix:///system?socket={sock}"

    def tcp_uri(self) -> str:
        """How the other lab host reaches this daemon (its public address; the lab
        forwards :data:`LIBVIRT_TCP_PORT` through a NAT)."""
        host, port = self.lab.control_endpoint(self.host, LIBVIRT_TCP_PORT)
        return f"qemu+tcp://{host}:{port}/system"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside the host: its network and its mount namespace."""
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-n", "--", *argv]

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host to completion (stdout/stderr captured)."""
        return subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a command inside the host (the caller owns the process)."""
        return subprocess.Popen(self.argv(argv), **kw)  # type: ignore[call-overload, no-any-return]

    # -- life cycle ------------------------------------------------------------------

    def start(self, prepare: Callable[[LibvirtHost], str] | None = None) -> None:
        """Hold the mount namespace, write the configuration, start virtlogd and
        libvirtd and wait until libvirtd answers on its UNIX socket.  ``prepare(host)``
        runs before the daemons start (files are reachable with :meth:`path`) and
        returns extra qemu.conf lines."""
        mounts = " && ".join(
            f"mkdir -p {d} && mount -t tmpfs -o mode=0755 tmpfs {d}" for d in PRIVATE_DIRS
        )
        script = f"{mounts} && mkdir -p {IMAGE_DIR} && echo ready && exec sleep infinity"
        netns = f"/var/run/netns/{self.lab.netns(self.host)}"
        self._holder = subprocess.Popen(
            [
                "nsenter",
                f"--net={netns}",
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._pid = self._holder.pid
        self._holder_start = proc_start_time(self._holder.pid)
        assert self._holder.stdout is not None
        line = select_line(self._holder.stdout, timeout=10.0)
        if line != b"ready\n":
            err = b""
            if self._holder.poll() is not None and self._holder.stderr is not None:
                err = self._holder.stderr.read()
            self.stop()
            raise LabError(
                f"libvirt host {self.host!r}: mount namespace not set up: {line!r} {err!r}"
            )
        # `sh` exec'ed sleep: the holder's pid is the namespace's process.
        etc = self.path("/etc/libvirt")
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(port=LIBVIRT_TCP_PORT))
        conf_extra = prepare(self) if prepare is not None else ""
        user = self.qemu_user or "root"
        conf = QEMU_CONF.format(user=user, group=user, dynamic=int(self.qemu_user is not None))
        (etc / "qemu.conf").write_text(conf + conf_extra)
        (etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        (etc / "qemu").mkdir(exist_ok=True)
        for daemon, extra in (("virtlogd", []), ("libvirtd", ["--listen"])):
            pidfile = f"/run/libvirt/{daemon}.pid"
            proc = subprocess.run(
                self.argv([daemon, "-d", *extra, "-p", pidfile]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=_START_TIMEOUT,
                check=False,
            )
            if proc.returncode != 0:
                self.stop()
                raise LabError(
                    f"libvirt host {self.host!r}: {daemon} did not start: "
                    f"{proc.stderr.decode(errors='replace').strip()}"
                )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            res = self.run(["virsh", "-c", "qemu:///system", "uri"], timeout=10)
            if res.returncode == 0:
                return
            last = res.stderr.strip()
            time.sleep(0.2)
        log_tail = self.log_tail()
        self.stop()
        raise LabError(f"libvirt host {self.host!r}: libvirtd not answering: {last}\n{log_tail}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of libvirtd's log (for error messages)."""
        with contextlib.suppress(OSError, LabError):
            return self.path("/var/log/libvirt/libvirtd.log").read_text(errors="replace")[-chars:]
        return "(no libvirtd log)"

    def _daemon_pid(self, daemon: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, LabError):
            return int(self.path(f"/run/libvirt/{daemon}.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """Destroy what QEMU the daemon still runs, stop libvirtd then virtlogd (by pid
        file), then the holder.  Idempotent."""
        if self._pid is None:
            return
        if pid_alive(self._pid, self._holder_start):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                names = self.run(["virsh", "-c", "qemu:///system", "list", "--name"], timeout=15)
                for name in names.stdout.split():
                    self.run(["virsh", "-c", "qemu:///system", "destroy", name], timeout=15)
            for daemon in ("libvirtd", "virtlogd"):
                pid = self._daemon_pid(daemon)
                if pid is not None:
                    _terminate(pid)
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=5)
            for pipe in (self._holder.stdout, self._holder.stderr):
                if pipe is not None:
                    pipe.close()
        elif pid_alive(self._pid, self._holder_start):
            _terminate(self._pid)
        self._holder = None
        self._pid = None


def _terminate(pid: int, timeout: float = 10.0) -> None:
    start = proc_start_time(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid, start):
        time.sleep(0.05)
    if pid_alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def libvirt_hosts(
    lab: Lab,
    hosts: Sequence[str] = ("left", "right"),
    prepare: Callable[[LibvirtHost], str] | None = None,
    qemu_user: str | None = None,
) -> Iterator[dict[str, LibvirtHost]]:
    """Start libvirt on each of ``hosts`` of a built lab (``prepare``: see
    :meth:`LibvirtHost.start`; ``qemu_user``: QEMU's user and group when not root);
    stop them all on exit."""
    started: dict[str, LibvirtHost] = {}
    try:
        for name in hosts:
            host = LibvirtHost(lab, name, qemu_user)
            started[name] = host
            host.start(prepare)
        yield started
    finally:
        for host in started.values():
            try:
                host.stop()
            except Exception:
                log.exception("stopping libvirt on %s", host.host)


def _state_path(lab: Lab) -> Path:
    return STATE_DIR / f"{lab.run_id}.libvirt.json"


def start_detached(lab: Lab, hosts: Sequence[str] = ("left", "right")) -> dict[str, LibvirtHost]:
    """``lab up --libvirt``: start libvirt on ``hosts`` of a detached lab and record the
    holders beside the lab's state, for ``lab exec`` and ``lab down``."""
    started: dict[str, LibvirtHost] = {}
    try:
        for name in hosts:
            started[name] = LibvirtHost(lab, name)
            started[name].start()
    except BaseException:
        for host in started.values():
            host.stop()
        raise
    for host in started.values():
        host._holder = None  # the holder outlives this process; stop() goes by pid
    _state_path(lab).write_text(json.dumps({n: h.state() for n, h in started.items()}))
    return started


def attached_hosts(lab: Lab) -> dict[str, LibvirtHost]:
    """The libvirt hosts a detached lab was brought up with ({} without --libvirt)."""
    try:
        data = json.loads(_state_path(lab).read_text())
    except (OSError, ValueError):
        return {}
    return {
        name: LibvirtHost.attach(lab, name, int(st["pid"]), st.get("start_time"))
        for name, st in data.items()
    }


def stop_detached(lab: Lab) -> None:
    """``lab down``: stop the daemons and holders of a detached libvirt lab."""
    with contextlib.suppress(LabError):
        for host in attached_hosts(lab).values():
            host.stop()
    _state_path(lab).unlink(missing_ok=True)
