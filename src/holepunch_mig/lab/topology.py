"""Traversal lab: reproducible firewall/NAT topologies in Linux network namespaces.

A declarative :class:`LabSpec` (two sides, each with a firewall and a NAT type) is built into
real network namespaces joined by a "public" bridge, with real nftables rulesets in the
hosts (no NAT) or in router namespaces (NAT).  Everything runs through ``ip netns exec`` (or,
in-process, through :meth:`Lab.socket` / :meth:`Lab.call_in_netns`, which ``setns()`` a fresh
thread), and everything is torn down again: :class:`Lab` is a context manager whose
``__exit__`` always tears down, and :meth:`Lab.cleanup_stale` removes what killed runs left.

Topology (addresses only exist inside the lab's namespaces)::

                       public segment 198.51.100.0/24  (bridge br0 in "<prefix>pub")
      ┌──────────────────────┬──────────────┬──────────────┬──────────────────────┐
  198.51.100.10         198.51.100.2   198.51.100.3           198.51.100.20
  left (nat none)          public      stun (coturn)          right (nat none)
  or left-router WAN                                          or right-router WAN
      │ LAN 10.1.0.1/24                                           │ LAN 10.2.0.1/24
  left 10.1.0.2                                              right 10.2.0.2

  double NAT:  left-cgn WAN 198.51.100.10, inside 100.64.1.1/24
               left-router WAN 100.64.1.2, LAN 10.1.0.1/24, left 10.1.0.2

Firewall policy ("open"/"drop"/"reject") is enforced on inbound NEW connections: in the
host's own input chain when it sits on the public segment, otherwise in the router's (and the
CGN's) input and forward chains for packets arriving on the WAN.  Established/related traffic
is always accepted.  ``allow_inbound_tcp`` ports are accepted (no NAT) or port-forwarded with
DNAT to the same port on the host (NAT; through both layers for double NAT).

Round-trip delay (``rtt_ms``): the kernels this project targets have no ``tc netem``, so
each side's outermost namespace sends packets arriving on its outer interface through
NFQUEUE to :mod:`holepunch_mig.lab.delay`, which holds each one ``rtt_ms / 2`` before letting it
continue (left <-> right sees ``rtt_ms``; a side <-> the public/stun hosts sees half).

Detached labs (``Lab(spec, detached=True)``, used by ``holepunch-mig lab up``) outlive the
process that built them: their state file says ``"detached": true``, :meth:`cleanup_stale`
leaves them alone, and :meth:`Lab.attach` (by name; default the newest) gives back a
:class:`Lab` whose :meth:`teardown` removes them.

Only Linux, only as root.  See docs/dev/lab-notes.md and docs/traversal.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from holepunch_mig.errors import HolepunchError

__all__ = [
    "CONTROL_PORT",
    "NS_PREFIX",
    "STATE_DIR",
    "STUN_PORT",
    "Firewall",
    "Lab",
    "LabError",
    "LabHost",
    "LabSpec",
    "LabUnsupported",
    "Nat",
    "SideSpec",
    "load_spec",
    "presets",
    "spec_from_dict",
    "spec_to_dict",
]

Firewall = Literal["open", "drop", "reject"]
Nat = Literal["none", "masquerade", "random", "fully-random", "rst", "double"]
Side = Literal["left", "right"]

_FIREWALLS: tuple[str, ...] = ("open", "drop", "reject")
_NATS: tuple[str, ...] = ("none", "masquerade", "random", "fully-random", "rst", "double")

#: Every namespace the lab creates is named ``hpm-<pid>-<token>-<role>``.
NS_PREFIX = "hpm-"
#: One JSON state file per live lab: ``<STATE_DIR>/<pid>-<token>.json``.
STATE_DIR = Path("/run/holepunch-mig")
#: The control port the presets open (firewall hole / port-forward) on the right side.
CONTROL_PORT = 7070
#: coturn's listening port (TCP and UDP) on the stun host.
STUN_PORT = 3478

_NS_RE = re.compile(r"^hpm-(\d+)-([0-9a-f]{6})-([a-z-]+)$")
_CLONE_NEWNET = 0x40000000

PUBLIC_PREFIXLEN = 24
PUBLIC_NET = "198.51.100.0/24"
_PUBLIC_HOST = "198.51.100.2"
_STUN_HOST = "198.51.100.3"
#: coturn's second address (same host, same port): a second "server" for mapping tests.
_STUN_HOST2 = "198.51.100.4"
#: Upper bound for rtt_ms (the delay queue holds at most 16384 packets).
MAX_RTT_MS = 2000
_SIDE_WAN = {"left": "198.51.100.10", "right": "198.51.100.20"}
_SIDE_INDEX = {"left": 1, "right": 2}


class LabError(HolepunchError):
    """The lab could not be built, used or torn down (message says what and why)."""


class LabUnsupported(LabError, NotImplementedError):
    """The spec asks for something the lab does not implement yet (e.g. ``rtt_ms > MAX_RTT_MS``)."""


@dataclass(frozen=True)
class SideSpec:
    """One side of the lab (a hypervisor host and what stands between it and the world).

    firewall: policy for inbound NEW connections (established/related always pass).
    nat: "none" puts the host on the public segment; "masquerade" is port-preserving,
        endpoint-independent NAT; "random"/"fully-random" are nft masquerade with those
        flags (symmetric-ish: ports not preserved); "rst" is a port-preserving NAT that
        answers unsolicited inbound TCP SYNs with RST; "double" is a carrier-grade NAT
        (masquerade) in front of a home NAT (masquerade).
    allow_inbound_tcp: ports accepted inbound (no NAT) or port-forwarded to the same port on
        the host (NAT), e.g. the receiver's control port.
    """

    firewall: Firewall = "drop"
    nat: Nat = "none"
    allow_inbound_tcp: tuple[int, ...] = ()


@dataclass(frozen=True)
class LabSpec:
    """A whole lab: two sides, an optional STUN server (coturn on two addresses) and a
    round-trip delay between the two sides in milliseconds (0 = none)."""

    left: SideSpec
    right: SideSpec
    stun: bool = False
    rtt_ms: int = 0
    name: str = "lab"


@dataclass(frozen=True)
class LabHost:
    """One namespace of a built lab.

    role: "host" (left/right hypervisor), "router" (home NAT), "cgn" (carrier-grade NAT),
        "public" (a plain host on the public segment) or "stun" (runs coturn).
    address: the host's own IPv4 address (a router's LAN-side address).
    public_address: where the other side reaches it (the outermost NAT's WAN address).
    wan_address: for routers and CGNs, the address on their outward interface.
    """

    name: str
    netns: str
    role: str
    address: str
    public_address: str
    side: Side | None = None
    wan_address: str | None = None


def presets() -> dict[str, LabSpec]:
    """Named lab cells.  The right side is the destination: it has the control port
    (:data:`CONTROL_PORT`) open / forwarded.  NAT presets run a STUN server."""
    ctl = (CONTROL_PORT,)

    def spec(
        name: str,
        left: tuple[Firewall, Nat],
        right: tuple[Firewall, Nat],
        stun: bool | None = None,
    ) -> LabSpec:
        natted = left[1] != "none" or right[1] != "none"
        return LabSpec(
            left=SideSpec(firewall=left[0], nat=left[1]),
            right=SideSpec(firewall=right[0], nat=right[1], allow_inbound_tcp=ctl),
            stun=natted if stun is None else stun,
            name=name,
        )

    cells = [
        spec("open-open", ("open", "none"), ("open", "none")),
        spec("fw-fw", ("drop", "none"), ("drop", "none")),
        spec("reject-reject", ("reject", "none"), ("reject", "none")),
        spec("fw-reject", ("drop", "none"), ("reject", "none")),
        spec("nat-open", ("drop", "masquerade"), ("open", "none")),
        spec("nat-fw", ("drop", "masquerade"), ("drop", "none")),
        spec("nat-nat", ("drop", "masquerade"), ("drop", "masquerade")),
        spec("rst-rst", ("drop", "rst"), ("drop", "rst")),
        spec("random-random", ("drop", "random"), ("drop", "random")),
        spec("symmetric-nat", ("drop", "fully-random"), ("drop", "masquerade")),
        spec("symmetric-symmetric", ("drop", "fully-random"), ("drop", "fully-random")),
        spec("double-nat", ("drop", "double"), ("drop", "masquerade")),
        spec("double-double", ("drop", "double"), ("drop", "double")),
    ]
    return {c.name: c for c in cells}


_SPEC_KEYS = ("name", "left", "right", "stun", "rtt_ms")
_SIDE_KEYS = ("firewall", "nat", "allow_inbound_tcp")


def spec_from_dict(data: Mapping[str, Any], *, default_name: str = "lab") -> LabSpec:
    """A :class:`LabSpec` from a parsed spec file (see docs/traversal.md).  Unknown keys and
    bad values raise LabError naming the key."""
    if not isinstance(data, Mapping):
        raise LabError("a lab spec is a table/object with keys " + ", ".join(_SPEC_KEYS))
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise LabError(f"unknown spec key(s) {unknown}; allowed: {', '.join(_SPEC_KEYS)}")

    def side(key: str) -> SideSpec:
        raw = data.get(key, {})
        if not isinstance(raw, Mapping):
            raise LabError(f"{key} must be a table/object with keys {', '.join(_SIDE_KEYS)}")
        bad = sorted(set(raw) - set(_SIDE_KEYS))
        if bad:
            raise LabError(f"unknown key(s) {bad} in {key}; allowed: {', '.join(_SIDE_KEYS)}")
        ports = raw.get("allow_inbound_tcp", [])
        if not isinstance(ports, list | tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in ports
        ):
            raise LabError(f"{key}.allow_inbound_tcp must be a list of port numbers")
        fw, nat = raw.get("firewall", "drop"), raw.get("nat", "none")
        if fw not in _FIREWALLS:
            raise LabError(f"{key}.firewall must be one of {', '.join(_FIREWALLS)}, not {fw!r}")
        if nat not in _NATS:
            raise LabError(f"{key}.nat must be one of {', '.join(_NATS)}, not {nat!r}")
        return SideSpec(firewall=fw, nat=nat, allow_inbound_tcp=tuple(ports))

    name = data.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name):
        raise LabError(f"name must be 1-40 letters, digits, '_', '.', '-', not {name!r}")
    stun = data.get("stun", False)
    rtt = data.get("rtt_ms", 0)
    if not isinstance(stun, bool):
        raise LabError(f"stun must be true or false, not {stun!r}")
    if not isinstance(rtt, int) or isinstance(rtt, bool):
        raise LabError(f"rtt_ms must be an integer number of milliseconds, not {rtt!r}")
    spec = LabSpec(left=side("left"), right=side("right"), stun=stun, rtt_ms=rtt, name=name)
    _validate(spec)
    return spec


def spec_to_dict(spec: LabSpec) -> dict[str, Any]:
    """The inverse of :func:`spec_from_dict` (JSON-friendly)."""

    def side(s: SideSpec) -> dict[str, Any]:
        return {
            "firewall": s.firewall,
            "nat": s.nat,
            "allow_inbound_tcp": list(s.allow_inbound_tcp),
        }

    return {
        "name": spec.name,
        "stun": spec.stun,
        "rtt_ms": spec.rtt_ms,
        "left": side(spec.left),
        "right": side(spec.right),
    }


def load_spec(path: str | os.PathLike[str]) -> LabSpec:
    """Read a lab spec file: TOML if it ends in ``.toml``, else JSON.  The name defaults to
    the file's stem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise LabError(f"cannot read spec file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise LabError(
            f"spec file {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    return spec_from_dict(data, default_name=re.sub(r"[^A-Za-z0-9_.-]", "-", p.stem)[:40] or "lab")


# --------------------------------------------------------------------------- helpers

_T = TypeVar("_T")


def _run_cmd(
    argv: Sequence[str], *, input_text: str | None = None, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
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


def _list_netns() -> list[str]:
    proc = _run_cmd(["ip", "netns", "list"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of pid, or None if it is gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pid_alive(pid: int, start_time: int | None = None) -> bool:
    current = _proc_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


def _wait_gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if _proc_start_time(pid) is None:
            return True
        time.sleep(0.02)
    return _proc_start_time(pid) is None


def _kill_netns_processes(netns: str, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process still inside a lab namespace."""
    try:
        proc = _run_cmd(["ip", "netns", "pids", netns])
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


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
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


def _host_ruleset(firewall: str, allowed: Sequence[int]) -> str:
    allow = f"    tcp dport {{ {', '.join(map(str, allowed))} }} accept\n" if allowed else ""
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


def _router_ruleset(
    firewall: str, masquerade: str, rst: bool, forward_to: str, allowed: Sequence[int]
) -> str:
    dnat = "".join(f'    iifname "wan" tcp dport {p} dnat to {forward_to}:{p}\n' for p in allowed)
    policy = _nft_policy(firewall, rst)
    guard = '    iifname != "wan" accept\n    ct state established,related accept\n'
    return (
        "table ip hpm_nat {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{dnat}"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan" {masquerade}\n'
        "  }\n"
        "}\n"
        "table inet hpm_filter {\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"{guard}"
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


_MASQUERADE = {
    "masquerade": "masquerade",
    "rst": "masquerade",
    "double": "masquerade",
    "random": "masquerade random",
    "fully-random": "masquerade fully-random",
}


@dataclass
class _Link:
    """A veth pair: `ifname` in `ns` (with `cidr`), peer `peer` in `peer_ns`."""

    ns: str
    ifname: str
    cidr: str
    peer_ns: str
    peer: str
    peer_cidr: str | None = None


@dataclass
class _Plan:
    hosts: dict[str, LabHost] = field(default_factory=dict)
    links: list[_Link] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # host -> default gateway
    rulesets: dict[str, str] = field(default_factory=dict)  # host -> nft ruleset
    forwarding: set[str] = field(default_factory=set)
    extra_addrs: dict[str, list[str]] = field(default_factory=dict)  # host -> more on eth0


# --------------------------------------------------------------------------- the lab


class Lab:
    """A built (or buildable) lab.  Use as a context manager, or build()/teardown().

    detached=True: the lab is meant to outlive this process (``holepunch-mig lab up``):
    its background services (coturn, delay queues) run in their own sessions, and once
    built its state file is marked detached so :meth:`cleanup_stale` never removes it;
    :meth:`attach` finds it again and ``teardown()`` removes it."""

    def __init__(
        self, spec: LabSpec, *, detached: bool = False, _run_id: str | None = None
    ) -> None:
        _validate(spec)
        self.spec = spec
        self.detached = detached
        if _run_id is None:
            self.pid = os.getpid()
            self.token = secrets.token_hex(3)
        else:
            pid, self.token = _run_id.split("-")
            self.pid = int(pid)
        self.run_id = f"{self.pid}-{self.token}"
        self.prefix = f"{NS_PREFIX}{self.run_id}-"
        self.segment_netns = f"{self.prefix}pub"
        self.hosts: dict[str, LabHost] = {}
        self.built = False
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stun_proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._delay_procs: list[subprocess.Popen[bytes]] = []
        self.created = time.time()
        self._state_file = STATE_DIR / f"{self.run_id}.json"
        self._plan = self._make_plan()

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def __repr__(self) -> str:
        state = "built" if self.built else "not built"
        return f"<Lab {self.spec.name!r} {self.run_id} {state}>"

    # ---------------------------------------------------------------- queries

    def _host(self, host: str) -> LabHost:
        try:
            return self.hosts[host] if self.built else self._plan.hosts[host]
        except KeyError:
            known = ", ".join(sorted(self._plan.hosts))
            raise LabError(f"no host {host!r} in lab {self.spec.name!r}; hosts: {known}") from None

    def netns(self, host: str) -> str:
        """Name of the network namespace of `host` (for ``ip netns exec``)."""
        return self._host(host).netns

    def address(self, host: str) -> str:
        """The host's own (inside) IPv4 address."""
        return self._host(host).address

    def public_address(self, host: str) -> str:
        """The address the other side reaches `host` at: its outermost NAT's public address
        when NATed, its own address otherwise."""
        return self._host(host).public_address

    def control_endpoint(self, host: str, port: int) -> tuple[str, int]:
        """Where the OTHER side connects to reach TCP `port` on `host` (the forwarded port on
        the public address when NATed).  Raises LabError if the port is not reachable from
        outside by construction (not in allow_inbound_tcp behind a firewall or NAT)."""
        h = self._host(host)
        if h.side is None or h.role != "host":
            return (h.public_address, port)
        side = self._side(h.side)
        if port not in side.allow_inbound_tcp and (side.nat != "none" or side.firewall != "open"):
            raise LabError(
                f"TCP port {port} on {host!r} is not in allow_inbound_tcp "
                f"{side.allow_inbound_tcp}; the other side cannot reach it "
                f"(firewall={side.firewall}, nat={side.nat})"
            )
        return (h.public_address, port)

    def stun_endpoint(self) -> tuple[str, int] | None:
        """coturn's (address, port) on the public segment, TCP and UDP; None without stun."""
        return (_STUN_HOST, STUN_PORT) if self.spec.stun else None

    def stun_endpoints(self) -> list[tuple[str, int]]:
        """Both of coturn's addresses (one process, two listening IPs, same port): two
        "servers" for comparing mappings (doctor, symmetric-NAT detection).  [] without
        stun."""
        return [(_STUN_HOST, STUN_PORT), (_STUN_HOST2, STUN_PORT)] if self.spec.stun else []

    def edge(self, side: str) -> str:
        """The outermost namespace of `side` (the host itself, its router, or its CGN):
        where the side's delay stage sits."""
        spec = self._side(side)
        if spec.nat == "none":
            return side
        return f"{side}-cgn" if spec.nat == "double" else f"{side}-router"

    @property
    def stun_process(self) -> subprocess.Popen[bytes] | None:
        """The running coturn process (None without stun or when not built)."""
        return self._stun_proc

    def namespaces(self) -> list[str]:
        """All namespaces this lab created (hosts plus the segment bridge namespace)."""
        return list(self._namespaces)

    def _side(self, side: str) -> SideSpec:
        return self.spec.left if side == "left" else self.spec.right

    # ---------------------------------------------------------------- running things

    def _require_built(self) -> None:
        if not self.built:
            raise LabError(f"lab {self.spec.name!r} is not built (use `with Lab(spec)` or build())")

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host`'s namespace (``ip netns exec NS argv...``).  The lab
        terminates it at teardown if it is still running."""
        self._require_built()
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns(host), *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def run(
        self, host: str, argv: Sequence[str], timeout: float, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `argv` inside `host`'s namespace to completion (killed after `timeout` s,
        raising subprocess.TimeoutExpired).  Extra keywords go to subprocess.run."""
        self._require_built()
        result: subprocess.CompletedProcess[bytes] = subprocess.run(
            ["ip", "netns", "exec", self.netns(host), *argv], timeout=timeout, **kw
        )
        return result

    def call_in_netns(self, host: str, fn: Callable[[], _T]) -> _T:
        """Run fn() in a fresh thread inside `host`'s namespace and return its result."""
        self._require_built()
        return call_in_netns(self.netns(host), fn)

    def socket(
        self,
        host: str,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket created inside `host`'s namespace (usable from any thread)."""
        return self.call_in_netns(host, lambda: socket.socket(family, type, proto))

    # ---------------------------------------------------------------- plan

    def _make_plan(self) -> _Plan:
        plan = _Plan()
        pub = self.segment_netns

        def add(name: str, **kw: Any) -> LabHost:
            host = LabHost(name=name, netns=self.prefix + name, **kw)
            plan.hosts[name] = host
            return host

        add("public", role="public", address=_PUBLIC_HOST, public_address=_PUBLIC_HOST)
        plan.links.append(
            _Link(self.prefix + "public", "eth0", f"{_PUBLIC_HOST}/24", pub, "public")
        )
        if self.spec.stun:
            add("stun", role="stun", address=_STUN_HOST, public_address=_STUN_HOST)
            plan.links.append(_Link(self.prefix + "stun", "eth0", f"{_STUN_HOST}/24", pub, "stun"))
            plan.extra_addrs["stun"] = [f"{_STUN_HOST2}/24"]

        for side_name in ("left", "right"):
            side: Side = "left" if side_name == "left" else "right"
            spec = self._side(side)
            wan = _SIDE_WAN[side]
            idx = _SIDE_INDEX[side]
            if spec.nat == "none":
                h = add(side, role="host", address=wan, public_address=wan, side=side)
                plan.links.append(_Link(h.netns, "eth0", f"{wan}/24", pub, side))
                plan.rulesets[side] = _host_ruleset(spec.firewall, spec.allow_inbound_tcp)
                continue
            lan_gw, host_addr = f"10.{idx}.0.1", f"10.{idx}.0.2"
            rst = spec.nat == "rst"
            masq = _MASQUERADE[spec.nat]
            router = f"{side}-router"
            if spec.nat == "double":
                cgn = f"{side}-cgn"
                cgn_in, home_wan = f"100.64.{idx}.1", f"100.64.{idx}.2"
                c = add(
                    cgn, role="cgn", address=cgn_in, public_address=wan, side=side, wan_address=wan
                )
                plan.links.append(_Link(c.netns, "wan", f"{wan}/24", pub, side))
                r = add(
                    router,
                    role="router",
                    address=lan_gw,
                    public_address=wan,
                    side=side,
                    wan_address=home_wan,
                )
                plan.links.append(
                    _Link(r.netns, "wan", f"{home_wan}/24", c.netns, "lan", f"{cgn_in}/24")
                )
                plan.routes[router] = cgn_in
                plan.rulesets[cgn] = _router_ruleset(
                    spec.firewall, masq, rst, home_wan, spec.allow_inbound_tcp
                )
                plan.forwarding.add(cgn)
            else:
                r = add(
                    router,
                    role="router",
                    address=lan_gw,
                    public_address=wan,
                    side=side,
                    wan_address=wan,
                )
                plan.links.append(_Link(r.netns, "wan", f"{wan}/24", pub, side))
            h = add(side, role="host", address=host_addr, public_address=wan, side=side)
            plan.links.append(
                _Link(h.netns, "eth0", f"{host_addr}/24", r.netns, "lan", f"{lan_gw}/24")
            )
            plan.routes[side] = lan_gw
            plan.rulesets[router] = _router_ruleset(
                spec.firewall, masq, rst, host_addr, spec.allow_inbound_tcp
            )
            plan.forwarding.add(router)
        return plan

    # ---------------------------------------------------------------- build / teardown

    def build(self) -> Lab:
        """Create namespaces, links, addresses, routes, nftables rulesets and (optionally)
        coturn; wait until every link is up and coturn accepts.  On any failure (also
        KeyboardInterrupt) whatever was created is torn down before the error propagates."""
        if self.built:
            raise LabError(f"lab {self.spec.name!r} is already built")
        _check_environment(need_stun=self.spec.stun, need_delay=self.spec.rtt_ms > 0)
        try:
            self._write_state()
            self._build()
            self.hosts = dict(self._plan.hosts)
            self.built = True
            if self.spec.stun:
                self._start_stun()
            if self.spec.rtt_ms > 0:
                self._start_delay()
            if self.detached:
                # from here on no process owns the lab: only `lab down` removes it
                self._procs.clear()
                self._write_state(detached=True)
        except BaseException:
            self.teardown()
            raise
        return self

    def _service(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A background process of the lab itself (coturn, delay queue).  In a detached lab
        it gets its own session, so the terminal's ^C does not reach it; teardown (or
        deleting its namespace) stops it."""
        if self.detached:
            kw.setdefault("start_new_session", True)
        return self.popen(host, argv, **kw)

    def _start_delay(self) -> None:
        """One NFQUEUE delay stage per side, on packets entering the side's outermost
        namespace (before conntrack): each holds them rtt_ms / 2."""
        tmp = self._ensure_tmpdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._delay_stats = {}
        for side in ("left", "right"):
            edge = self.edge(side)
            stats = tmp / f"delay-{side}.json"
            self._delay_stats[side] = str(stats)
            argv = [
                sys.executable,
                "-m",
                "holepunch_mig.lab.delay",
                "--queue",
                "0",
                "--delay-ms",
                f"{self.spec.rtt_ms / 2:g}",
                "--stats",
                str(stats),
            ]
            with open(tmp / f"delay-{side}.log", "wb") as log:
                proc = self._service(edge, argv, stdout=subprocess.PIPE, stderr=log, env=env)
            self._delay_procs.append(proc)
            assert proc.stdout is not None
            ready = select_line(proc.stdout, timeout=10.0)
            proc.stdout.close()
            if ready != b"ready\n":
                log_text = (tmp / f"delay-{side}.log").read_text(errors="replace")[-1000:]
                raise LabError(f"delay stage in {edge} did not start: {ready!r} {log_text}")
            ifname = "eth0" if edge == side else "wan"
            _run_cmd(
                [
                    "ip", "netns", "exec", self.netns(edge),
                    "iptables", "-w", "5", "-t", "raw", "-A", "PREROUTING", "-i", ifname,
                    "-j", "NFQUEUE", "--queue-num", "0",
                ]
            )  # fmt: skip

    def _ensure_tmpdir(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"hpm-{self.run_id}-turn-"))
            self._write_state()
        return self._tmpdir

    def _build(self) -> None:
        plan = self._plan
        names = [self.segment_netns] + [h.netns for h in plan.hosts.values()]
        for ns in names:
            _run_cmd(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            self._write_state()
        # sysctls: no IPv6 (keeps the segments quiet), forwarding in routers, plain bridge.
        for name, host in plan.hosts.items():
            settings = [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                f"net.ipv4.ip_forward={1 if name in plan.forwarding else 0}",
            ]
            _run_cmd(["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w", *settings])
        pub_settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            pub_settings += [
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ]
        _run_cmd(["ip", "netns", "exec", self.segment_netns, "sysctl", "-q", "-w", *pub_settings])
        _ip_batch(
            self.segment_netns,
            ["link set lo up", "link add br0 type bridge forward_delay 0 stp_state 0"],
        )
        # links (created from their first namespace, peer moved straight into the other)
        per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in names}
        for link in plan.links:
            _run_cmd(
                [
                    "ip",
                    "-n",
                    link.ns,
                    "link",
                    "add",
                    link.ifname,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    link.peer,
                    "netns",
                    link.peer_ns,
                ]
            )
            per_ns[link.ns] += [
                f"addr add {link.cidr} dev {link.ifname}",
                f"link set {link.ifname} up",
            ]
            if link.peer_cidr is not None:
                per_ns[link.peer_ns] += [
                    f"addr add {link.peer_cidr} dev {link.peer}",
                    f"link set {link.peer} up",
                ]
            elif link.peer_ns == self.segment_netns:
                per_ns[link.peer_ns] += [
                    f"link set {link.peer} master br0",
                    f"link set {link.peer} up",
                ]
            else:
                per_ns[link.peer_ns] += [f"link set {link.peer} up"]
        per_ns[self.segment_netns].append("link set br0 up")
        for name, addrs in plan.extra_addrs.items():
            per_ns[plan.hosts[name].netns] += [f"addr add {a} dev eth0" for a in addrs]
        for name, gw in plan.routes.items():
            per_ns[plan.hosts[name].netns].append(f"route add default via {gw}")
        # routes need the gateway's link up first: hosts' batches run after their routers'
        order = [self.segment_netns] + [
            h.netns for h in plan.hosts.values() if h.role in ("cgn", "router", "public", "stun")
        ]
        order += [ns for ns in names if ns not in order]
        for ns in order:
            _ip_batch(ns, per_ns[ns])
        for name, ruleset in plan.rulesets.items():
            _run_cmd(
                ["ip", "netns", "exec", plan.hosts[name].netns, "nft", "-f", "-"],
                input_text=ruleset,
            )
        self._wait_links_up(names, deadline=time.monotonic() + 5.0)

    def _wait_links_up(self, names: Sequence[str], deadline: float) -> None:
        pending = list(names)
        while True:
            still = []
            for ns in pending:
                out = _run_cmd(["ip", "-n", ns, "-o", "link", "show"]).stdout
                for line in out.splitlines():
                    ifname = line.split(":")[1].strip().split("@")[0]
                    if ifname != "lo" and "state UP" not in line:
                        still.append(ns)
                        break
            if not still:
                return
            if time.monotonic() > deadline:
                raise LabError(f"links not up in time in namespaces: {', '.join(still)}")
            pending = still
            time.sleep(0.02)

    def _start_stun(self) -> None:
        tmp = self._ensure_tmpdir()
        self._stun_log = tmp / "turnserver.log"
        argv = [
            "turnserver",
            "-n",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--listening-ip",
            _STUN_HOST,
            "--listening-ip",
            _STUN_HOST2,
            "--listening-port",
            str(STUN_PORT),
            "--log-file",
            str(self._stun_log),
            "--simple-log",
            "--no-stdout-log",
            "--pidfile",
            str(tmp / "turnserver.pid"),
            "--userdb",
            str(tmp / "turndb"),
            "--no-software-attribute",
        ]
        self._stun_proc = self._service(
            "stun", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp
        )
        for endpoint in self.stun_endpoints():
            self.wait_tcp("stun", endpoint, timeout=5.0, proc=self._stun_proc)

    def wait_tcp(
        self,
        host: str,
        endpoint: tuple[str, int],
        timeout: float,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """Poll until `endpoint` accepts a TCP connection made from `host`'s namespace
        (each probe connects and closes: not for one-shot listeners, see wait_listening).
        If `proc` is given and exits first, fail at once.  Raises LabError at the deadline."""
        self._require_built()
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            self._check_alive(proc, f"accepting on {endpoint}")
            s = self.socket(host)
            try:
                s.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
                s.connect(endpoint)
                return
            except OSError as exc:
                last = exc
            finally:
                s.close()
            if time.monotonic() >= deadline:
                raise LabError(
                    f"nothing accepted on {endpoint} from {host} within {timeout} s ({last})"
                    + self._log_hint(proc)
                )
            time.sleep(0.02)

    def wait_listening(
        self,
        host: str,
        port: int,
        timeout: float,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """Poll (with ``ss``, without connecting) until some socket in `host`'s namespace
        listens on TCP `port`; safe for one-shot listeners such as a receiver's control
        port.  If `proc` is given and exits first, fail at once."""
        self._require_built()
        deadline = time.monotonic() + timeout
        argv = ["ip", "netns", "exec", self.netns(host), "ss", "-Hltn", f"sport = :{port}"]
        while True:
            self._check_alive(proc, f"listening on port {port}")
            if _run_cmd(argv).stdout.strip():
                return
            if time.monotonic() >= deadline:
                raise LabError(
                    f"nothing listens on TCP port {port} in {host} after {timeout} s"
                    + self._log_hint(proc)
                )
            time.sleep(0.02)

    def _check_alive(self, proc: subprocess.Popen[bytes] | None, what: str) -> None:
        if proc is not None and proc.poll() is not None:
            raise LabError(
                f"{proc.args!r} exited with {proc.returncode} before {what}" + self._log_hint(proc)
            )

    def _log_hint(self, proc: subprocess.Popen[bytes] | None) -> str:
        if proc is not None and proc is self._stun_proc:
            return f"; coturn log: {self._stun_log_tail()}"
        return ""

    def _stun_log_tail(self) -> str:
        path = getattr(self, "_stun_log", None)
        if path is None:
            return "(none)"
        try:
            return Path(path).read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log file)"

    def teardown(self) -> None:
        """Stop every process the lab started, delete every namespace, remove the state
        file.  Idempotent; keeps going past individual failures and raises LabError at the
        end if anything could not be removed."""
        problems: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    try:
                        proc.wait(timeout=3.0)
                    except subprocess.TimeoutExpired:
                        problems.append(f"pid {proc.pid} ({proc.args!r}) would not die")
        self._procs.clear()
        self._stun_proc = None
        # delay stages first (SIGTERM: they release what they hold and write their stats)
        for ns in [self.netns(self.edge(side)) for side in ("left", "right")]:
            if ns in self._namespaces and self.spec.rtt_ms > 0:
                _kill_netns_processes(ns)
        self._delay_procs.clear()
        if self.spec.rtt_ms > 0:
            self._keep_stats()
        for ns in reversed(self._namespaces):
            try:
                _delete_netns(ns)
            except LabError as exc:
                problems.append(str(exc))
        remaining = set(self._namespaces) & set(_list_netns())
        if remaining:
            problems.append(f"namespaces still present: {', '.join(sorted(remaining))}")
        else:
            self._namespaces.clear()
            with contextlib.suppress(FileNotFoundError):
                self._state_file.unlink()
        if self._tmpdir is not None and not problems:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.built = False
        self.hosts = {}
        if problems:
            raise LabError("lab teardown incomplete: " + "; ".join(problems))

    def _keep_stats(self) -> None:
        """Read the delay stages' counters before their temp dir goes away."""
        kept: dict[str, Any] = {}
        for side, path in getattr(self, "_delay_stats", {}).items():
            with contextlib.suppress(OSError, ValueError):
                kept[side] = json.loads(Path(path).read_text())
        self._kept_stats = kept

    def delay_counters(self) -> dict[str, Any]:
        """After teardown: what each side's delay stage counted (packets, batches,
        max_held, max_late_ms).  {} without delay."""
        return dict(getattr(self, "_kept_stats", {}))

    def _write_state(self, detached: bool = False) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "run_id": self.run_id,
            "pid": self.pid,
            "start_time": _proc_start_time(self.pid),
            "name": self.spec.name,
            "namespaces": self._namespaces,
            "detached": detached,
            "created": self.created,
            "tmpdir": str(self._tmpdir) if self._tmpdir else None,
            "spec": spec_to_dict(self.spec),
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_file)

    # ---------------------------------------------------------------- detached labs

    @staticmethod
    def list_labs() -> list[dict[str, Any]]:
        """Every lab with a state file, oldest first: its state plus ``status``
        ("detached", "running" (owned by a live process), "stale" (owner dead) or
        "broken" (detached but namespaces missing))."""
        out: list[dict[str, Any]] = []
        if not STATE_DIR.is_dir():
            return out
        present = set(_list_netns())
        for path in STATE_DIR.glob("*.json"):
            try:
                st = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(st, dict):
                continue
            st.setdefault("run_id", path.stem)
            nss = st.get("namespaces") or []
            if st.get("detached"):
                st["status"] = "detached" if nss and set(nss) <= present else "broken"
            else:
                pid, start = st.get("pid"), st.get("start_time")
                alive = isinstance(pid, int) and _pid_alive(
                    pid, start if isinstance(start, int) else None
                )
                st["status"] = "running" if alive else "stale"
            out.append(st)
        out.sort(key=lambda st: float(st.get("created") or 0.0))
        return out

    @classmethod
    def attach(cls, name: str | None = None) -> Lab:
        """The detached lab called `name` (or with that run id); default: the newest.
        Raises LabError if there is none."""
        if os.geteuid() != 0:
            raise LabError("lab needs root (network namespaces); run as root")
        labs = [st for st in cls.list_labs() if st.get("detached")]
        if name is not None:
            labs = [st for st in labs if name in (st.get("name"), st.get("run_id"))]
        if not labs:
            known = ", ".join(str(st.get("name")) for st in cls.list_labs() if st.get("detached"))
            raise (
                LabError(f"no detached lab named {name!r}" if name else "no detached lab is up")
                if not known
                else LabError(f"no detached lab named {name!r}; labs: {known}")
            )
        st = labs[-1]
        lab = cls(spec_from_dict(st["spec"]), detached=True, _run_id=str(st["run_id"]))
        lab.created = float(st.get("created") or 0.0)
        lab._namespaces = [str(ns) for ns in st.get("namespaces") or []]
        lab._tmpdir = Path(st["tmpdir"]) if st.get("tmpdir") else None
        lab.hosts = dict(lab._plan.hosts)
        lab.built = True
        return lab

    # ---------------------------------------------------------------- stale runs

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Delete namespaces (and kill processes in them) left by lab runs whose owning
        process is dead; remove their state files.  Returns the deleted namespace names.
        Namespaces of live labs (any process) are never touched."""
        if os.geteuid() != 0:
            raise LabError("lab needs root (network namespaces); run as root")
        states: dict[str, dict[str, Any]] = {}
        if STATE_DIR.is_dir():
            for path in STATE_DIR.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    states[path.stem] = json.loads(path.read_text())

        def stale(run_id: str, pid: int) -> bool:
            st = states.get(run_id)
            if st and st.get("detached"):
                return False  # owned by nobody on purpose: only `lab down` removes it
            start = st.get("start_time") if st else None
            return not _pid_alive(pid, start if isinstance(start, int) else None)

        removed: list[str] = []
        seen_runs: set[str] = set()
        for ns in _list_netns():
            m = _NS_RE.match(ns)
            if not m:
                continue
            run_id = f"{m.group(1)}-{m.group(2)}"
            seen_runs.add(run_id)
            if stale(run_id, int(m.group(1))):
                _delete_netns(ns)
                removed.append(ns)
        for run_id, st in states.items():
            pid = st.get("pid")
            if isinstance(pid, int) and stale(run_id, pid):
                seen_runs.add(run_id)
        for tmp in Path(tempfile.gettempdir()).glob("hpm-*-turn-*"):
            m = re.match(r"^hpm-(\d+-[0-9a-f]{6})-turn-", tmp.name)
            if m:
                seen_runs.add(m.group(1))
        live = _list_netns()
        for run_id in seen_runs:
            pid = int(run_id.split("-")[0])
            prefix = f"{NS_PREFIX}{run_id}-"
            if stale(run_id, pid) and not any(ns.startswith(prefix) for ns in live):
                with contextlib.suppress(FileNotFoundError):
                    (STATE_DIR / f"{run_id}.json").unlink()
                for tmp in Path(tempfile.gettempdir()).glob(f"hpm-{run_id}-turn-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
        return removed


def select_line(pipe: Any, timeout: float) -> bytes:
    """Read one line (up to 200 bytes) from a pipe, giving up at the deadline; returns what
    arrived (b"" on EOF or timeout)."""
    import select

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


def _ip_batch(netns: str, commands: Sequence[str]) -> None:
    _run_cmd(["ip", "-n", netns, "-batch", "-"], input_text="\n".join(commands) + "\n")


def _validate(spec: LabSpec) -> None:
    for side_name, side in (("left", spec.left), ("right", spec.right)):
        if side.firewall not in _FIREWALLS:
            raise LabError(
                f"{side_name}.firewall must be one of {_FIREWALLS}, not {side.firewall!r}"
            )
        if side.nat not in _NATS:
            raise LabError(f"{side_name}.nat must be one of {_NATS}, not {side.nat!r}")
        for port in side.allow_inbound_tcp:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise LabError(f"{side_name}.allow_inbound_tcp: bad port {port!r}")
    if spec.rtt_ms < 0:
        raise LabError(f"rtt_ms must be >= 0, not {spec.rtt_ms}")
    if spec.rtt_ms > MAX_RTT_MS:
        raise LabUnsupported(f"rtt_ms={spec.rtt_ms}: at most {MAX_RTT_MS} ms is supported")


def _check_environment(need_stun: bool, need_delay: bool = False) -> None:
    if os.geteuid() != 0:
        raise LabError("lab needs root (network namespaces); run as root")
    needed = ["ip", "nft", "sysctl"] + (["turnserver"] if need_stun else [])
    needed += ["iptables"] if need_delay else []
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"lab needs {', '.join(missing)} on PATH (apt-get install --no-install-recommends "
            "iproute2 nftables procps coturn iptables)"
        )
    if not Path("/proc/self/ns/net").exists():
        raise LabError("this kernel has no network namespaces (/proc/self/ns/net missing)")
