"""Low-level helpers of the lab: commands (``ip``, ``nft``), namespaces and the
processes in them, ``setns()`` threads and the nftables rulesets of hosts and routers.

Each helper raises :class:`~holepunch_mig.lab.spec.LabError` saying what failed; the
:class:`~holepunch_mig.lab.topology.Lab` strings them together.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from holepunch_mig.errors import LabError

_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


def run_cmd(
    argv: Sequence[str], *, input_text: str | None = None, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    """Run a lab command to completion; any failure is a LabError quoting its stderr."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"lab needs {argv[0]!r} installed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        where = f"\n--- input ---\n{input_text}" if input_text else ""
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}{where}")
    return proc


def list_netns() -> list[str]:
    """Every named network namespace on the machine (the lab's and others')."""
    proc = run_cmd(["ip", "netns", "list"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def proc_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of pid, or None if it is gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    current = proc_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


def _wait_gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc_start_time(pid) is None:
            return True
        time.sleep(0.02)
    return proc_start_time(pid) is None


def kill_netns_processes(netns: str, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process still inside a lab namespace."""
    try:
        proc = run_cmd(["ip", "netns", "pids", netns])
    except LabError:
        return
    pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + timeout
        pids = [pid for pid in alive if not _wait_gone(pid, deadline)]
        if not pids:
            return


def delete_netns(netns: str) -> None:
    kill_netns_processes(netns)
    proc = subprocess.run(
        ["ip", "netns", "delete", netns], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 and Path("/run/netns", netns).exists():
        raise LabError(f"could not delete namespace {netns}: {proc.stderr.strip()}")


_libc: ctypes.CDLL | None = None


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Run fn() in a fresh thread that has joined network namespace `netns`; return its
    result (or raise its exception).  Sockets created there stay in that namespace."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: _T = box["value"]
    return result


def _nft_policy(firewall: str, rst: bool) -> str:
    lines = []
    if rst:
        lines.append("meta l4proto tcp reject with tcp reset")
    if firewall == "drop":
        lines.append("drop")
    elif firewall == "reject":
        lines.append("meta l4proto tcp reject with tcp reset")
        lines.append("reject with icmpx type port-unreachable")
    return "\n".join(f"    {line}" for line in lines)


#: IPv6 neighbour discovery, which a dual-stack firewall must let in (RFC 4890).
_ND = (
    "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
    "nd-router-advert } accept\n"
)


def host_ruleset(firewall: str, allowed: Sequence[int], ipv6: bool = False) -> str:
    """nft ruleset of a host on the public segment: its own input policy, no NAT (the
    inet table covers IPv6 too; ``ipv6`` lets neighbour discovery in)."""
    allow = f"    tcp dport {{ {', '.join(map(str, allowed))} }} accept\n" if allowed else ""
    allow += _ND if ipv6 else ""
    return (
        "table inet hpm {\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        '    iifname "lo" accept\n'
        "    ct state established,related accept\n"
        f"{allow}"
        f"{_nft_policy(firewall, rst=False)}\n"
        "  }\n"
        "}\n"
    )


def router_ruleset(
    firewall: str,
    masquerade: str,
    rst: bool,
    forward_to: str,
    allowed: Sequence[int],
    stun_replies: Sequence[str] = (),
    own_address: str | None = None,
    ipv6: bool = False,
) -> str:
    """nft ruleset of a NAT router: masquerade out of ``wan``, DNAT of the allowed ports
    to ``forward_to``, the firewall policy on what arrives on ``wan``.  ``stun_replies``:
    addresses whose STUN answers (UDP from 3478/3479) the router itself accepts, so a
    port-mapping daemon's filtering test (RFC 5780) sees an open router.  ``own_address``:
    the router's WAN address, whose own packets (that daemon's STUN) are not masqueraded
    (with ``fully-random`` they would get random ports)."""
    dnat = "".join(f'    iifname "wan" tcp dport {p} dnat to {forward_to}:{p}\n' for p in allowed)
    policy = _nft_policy(firewall, rst)
    guard = '    iifname != "wan" accept\n    ct state established,related accept\n'
    own = f"ip saddr != {own_address} " if own_address else ""
    nd = _ND if ipv6 else ""
    stun = (
        f"    ip saddr {{ {', '.join(stun_replies)} }} udp sport {{ 3478, 3479 }} accept\n"
        if stun_replies
        else ""
    )
    return (
        "table ip hpm_nat {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{dnat}"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan" {own}{masquerade}\n'
        "  }\n"
        "}\n"
        "table inet hpm_filter {\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"{guard}"
        f"{stun}"
        f"{nd}"
        f"{policy}\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"{guard}"
        "    ct status dnat accept\n"
        f"{policy}\n"
        "  }\n"
        "}\n"
    )


#: The tables and chains miniupnpd (nftables backend) fills with its DNAT and accept
#: rules; their names go into its config.  They run just before the lab's own chains.
MINIUPNPD_RULESET = """table inet miniupnpd {
  chain forward {
    type filter hook forward priority filter - 5; policy accept;
    jump forward_miniupnpd
  }
  chain forward_miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority dstnat - 5; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority srcnat - 5; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
"""


def miniupnpd_config(
    lan_cidr: str, stun_host: str, stun_port: int, *, pcp: bool = True, upnp: bool = True
) -> str:
    """miniupnpd's config for a lab router: PCP and NAT-PMP (``pcp``) and UPnP-IGD
    (``upnp``, SSDP and its HTTP server on a free port) on ``lan``, mappings only for the
    LAN's own addresses (secure mode: a host maps only to itself, ports 1024-65535), the
    public address learnt by STUN."""
    return (
        "ext_ifname=wan\n"
        "listening_ip=lan\n"
        f"enable_natpmp={'yes' if pcp else 'no'}\n"
        f"enable_upnp={'yes' if upnp else 'no'}\n"
        "http_port=0\n"
        "secure_mode=yes\n"
        "ext_perform_stun=yes\n"
        f"ext_stun_host={stun_host}\n"
        f"ext_stun_port={stun_port}\n"
        "upnp_table_name=miniupnpd\n"
        "upnp_nat_table_name=miniupnpd\n"
        "upnp_forward_chain=forward_miniupnpd\n"
        "upnp_nat_chain=prerouting_miniupnpd\n"
        "upnp_nat_postrouting_chain=postrouting_miniupnpd\n"
        "min_lifetime=60\n"
        "max_lifetime=86400\n"
        f"allow 1024-65535 {lan_cidr} 1024-65535\n"
        "deny 0-65535 0.0.0.0/0 0-65535\n"
    )


#: The nft masquerade statement of each NAT type.
MASQUERADE = {
    "masquerade": "masquerade",
    "rst": "masquerade",
    "double": "masquerade",
    "random": "masquerade random",
    "fully-random": "masquerade fully-random",
}


def select_line(pipe: Any, timeout: float) -> bytes:
    """Read one line (up to 200 bytes) from a pipe, giving up at the deadline; returns what
    arrived (b"" on EOF or timeout)."""
    fd = pipe.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 200:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf


def ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Many ``ip`` commands in one process (``ip -batch``): a lab build runs hundreds."""
    run_cmd(["ip", "-n", netns, "-batch", "-"], input_text="\n".join(commands) + "\n")


def check_environment(
    need_stun: bool, need_delay: bool = False, need_miniupnpd: bool = False
) -> None:
    """Fail before building anything when root or a needed tool is missing."""
    if os.geteuid() != 0:
        raise LabError("lab needs root (network namespaces); run as root")
    needed = ["ip", "nft", "sysctl"] + (["turnserver"] if need_stun else [])
    needed += ["iptables"] if need_delay else []
    needed += ["miniupnpd"] if need_miniupnpd else []
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"lab needs {', '.join(missing)} on PATH (apt-get install --no-install-recommends "
            "iproute2 nftables procps coturn iptables miniupnpd-nftables)"
        )
    if not Path("/proc/self/ns/net").exists():
        raise LabError("this kernel has no network namespaces (/proc/self/ns/net missing)")
