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

Specs and presets are :mod:`holepunch_mig.lab.spec`; the commands, namespace and
nftables helpers :mod:`holepunch_mig.lab.netns`.  Only Linux, only as root.  See
docs/dev/lab-notes.md and docs/traversal.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from holepunch_mig.errors import LabError
from holepunch_mig.lab.netns import (
    MASQUERADE,
    MINIUPNPD_RULESET,
    call_in_netns,
    check_environment,
    delete_netns,
    host_ruleset,
    ip_batch,
    kill_netns_processes,
    list_netns,
    miniupnpd_config,
    pid_alive,
    proc_start_time,
    router_ruleset,
    run_cmd,
    select_line,
)
from holepunch_mig.lab.spec import (
    LabSpec,
    Side,
    SideSpec,
    spec_from_dict,
    spec_to_dict,
    validate_spec,
)

#: Every namespace the lab creates is named ``hpm-<pid>-<token>-<role>``.
NS_PREFIX = "hpm-"
#: One JSON state file per live lab: ``<STATE_DIR>/<pid>-<token>.json``.
STATE_DIR = Path("/run/holepunch-mig")
#: coturn's listening port (TCP and UDP) on the stun host.
STUN_PORT = 3478

_NS_RE = re.compile(r"^hpm-(\d+)-([0-9a-f]{6})-([a-z-]+)$")
_PUBLIC_HOST = "198.51.100.2"
_STUN_HOST = "198.51.100.3"
#: coturn's second address (same host, same port): a second "server" for mapping tests.
_STUN_HOST2 = "198.51.100.4"
_SIDE_WAN = {"left": "198.51.100.10", "right": "198.51.100.20"}
#: The public segment's IPv6 prefix in dual-stack labs (addresses ::2, ::3, ::10, ::20).
_PUBLIC6 = "2001:db8:100::"
_SIDE_INDEX = {"left": 1, "right": 2}

_T = TypeVar("_T")


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
    address6: str | None = None
    """Dual-stack labs: the host's routed IPv6 address (no NAT66: also its public one)."""


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
    addrs6: dict[str, list[str]] = field(default_factory=dict)  # host -> "CIDR dev IF"
    routes6: dict[str, list[str]] = field(default_factory=dict)  # host -> "PREFIX via GW"


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
        validate_spec(spec)
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

    def address6(self, host: str) -> str:
        """Dual-stack labs: the host's IPv6 address (routed, not NATed: also where the
        other side reaches it).  LabError in an IPv4-only lab."""
        addr = self._host(host).address6
        if addr is None:
            raise LabError(f"host {host!r} has no IPv6 address (the spec has ipv6 = false)")
        return addr

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
                plan.rulesets[side] = host_ruleset(
                    spec.firewall, spec.allow_inbound_tcp, ipv6=self.spec.ipv6
                )
                continue
            lan_gw, host_addr = f"10.{idx}.0.1", f"10.{idx}.0.2"
            rst = spec.nat == "rst"
            masq = MASQUERADE[spec.nat]
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
                plan.rulesets[cgn] = router_ruleset(
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
            plan.rulesets[router] = router_ruleset(
                spec.firewall,
                masq,
                rst,
                host_addr,
                spec.allow_inbound_tcp,
                stun_replies=(_STUN_HOST, _STUN_HOST2) if spec.port_mapping else (),
                own_address=wan if spec.port_mapping else None,
                ipv6=self.spec.ipv6,
            )
            if spec.port_mapping:
                plan.rulesets[router] += MINIUPNPD_RULESET
            plan.forwarding.add(router)
        if self.spec.ipv6:
            self._plan_ipv6(plan)
        return plan

    def _plan_ipv6(self, plan: _Plan) -> None:
        """The IPv6 half of a dual-stack lab: the public segment is 2001:db8:100::/64, a
        NATed side's LAN 2001:db8:1N::/64 behind its router (routed, firewalled by the
        same inet rules, never NATed); every namespace on the segment routes each LAN
        via its router."""
        seg = _PUBLIC6
        on_segment: dict[str, str] = {"public": f"{seg}2", "stun": f"{seg}3"}
        lans: list[tuple[str, str]] = []  # (LAN prefix, router WAN address)
        for side in ("left", "right"):
            idx = _SIDE_INDEX[side]
            wan6 = f"{seg}{idx}0"
            if self._side(side).nat == "none":
                on_segment[side] = wan6
                continue
            router, lan = f"{side}-router", f"2001:db8:1{idx}::"
            on_segment[router] = wan6
            plan.addrs6[router] = [f"{lan}1/64 dev lan"]
            plan.addrs6[side] = [f"{lan}2/64 dev eth0"]
            plan.routes6[side] = [f"::/0 via {lan}1"]
            plan.hosts[side] = replace(plan.hosts[side], address6=f"{lan}2")
            lans.append((f"{lan}/64", wan6))
        for name, addr in on_segment.items():
            if name not in plan.hosts:
                continue  # no stun host
            dev = "wan" if name.endswith("-router") else "eth0"
            plan.addrs6.setdefault(name, []).append(f"{addr}/64 dev {dev}")
            if name in ("public", "stun", "left", "right"):
                plan.hosts[name] = replace(plan.hosts[name], address6=addr)
            plan.routes6[name] = plan.routes6.get(name, []) + [
                f"{prefix} via {via}" for prefix, via in lans if via != addr
            ]

    # ---------------------------------------------------------------- build / teardown

    def build(self) -> Lab:
        """Create namespaces, links, addresses, routes, nftables rulesets and (optionally)
        coturn; wait until every link is up and coturn accepts.  On any failure (also
        KeyboardInterrupt) whatever was created is torn down before the error propagates."""
        if self.built:
            raise LabError(f"lab {self.spec.name!r} is already built")
        check_environment(
            need_stun=self.spec.stun,
            need_delay=self.spec.needs_queue,
            need_miniupnpd=bool(self.spec.left.port_mapping or self.spec.right.port_mapping),
        )
        try:
            self._write_state()
            self._build()
            self.hosts = dict(self._plan.hosts)
            self.built = True
            if self.spec.stun:
                self._start_stun()
            self._start_port_mapping()
            if self.spec.needs_queue:
                self._start_delay()
            self._start_rate_limits()
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
        namespace (before conntrack): each holds them rtt_ms / 2 and applies the side's
        loss, jitter and reordering."""
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
            spec = self._side(side)
            argv += ["--loss-pct", f"{spec.loss_pct:g}", "--jitter-ms", f"{spec.jitter_ms:g}"]
            argv += ["--reorder-pct", f"{spec.reorder_pct:g}"]
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
            # IPv6 (dual stack) goes through the same queue: nfnetlink_queue binds a
            # queue number, whatever the family
            for tool in ("iptables", "ip6tables") if self.spec.ipv6 else ("iptables",):
                run_cmd(
                    [
                        "ip", "netns", "exec", self.netns(edge),
                        tool, "-w", "5", "-t", "raw", "-A", "PREROUTING", "-i", ifname,
                        "-j", "NFQUEUE", "--queue-num", "0",
                    ]
                )  # fmt: skip

    def _start_port_mapping(self) -> None:
        """miniupnpd in the router of each side with ``port_mapping`` (the protocols it
        names); ready once its STUN test has enabled port forwarding and every protocol
        listens."""
        for side in ("left", "right"):
            mapping = self._side(side).port_mapping
            if not mapping:
                continue
            pcp, upnp = mapping in (True, "pcp"), mapping in (True, "upnp-igd")
            tmp = self._ensure_tmpdir()
            conf, log = tmp / f"miniupnpd-{side}.conf", tmp / f"miniupnpd-{side}.log"
            idx = _SIDE_INDEX[side]
            conf.write_text(
                miniupnpd_config(f"10.{idx}.0.0/24", _STUN_HOST, STUN_PORT, pcp=pcp, upnp=upnp)
            )
            ready = ["Port forwarding is now enabled"]
            ready += ["Listening for NAT-PMP/PCP"] if pcp else []
            ready += ["HTTP listening on port"] if upnp else []
            argv = [
                "miniupnpd", "-d", "-f", str(conf), "-P", str(tmp / f"miniupnpd-{side}.pid"),
            ]  # fmt: skip
            with open(log, "wb") as out:
                proc = self._service(f"{side}-router", argv, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 15.0
            while True:
                text = log.read_text(errors="replace")
                if all(line in text for line in ready):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(
                        f"miniupnpd in {side}-router did not enable port forwarding: {text[-1500:]}"
                    )
                time.sleep(0.05)

    def miniupnpd_log(self, side: str) -> str:
        """What the port-mapping daemon of `side` logged so far ("" without one)."""
        if self._tmpdir is None:
            return ""
        try:
            return (self._tmpdir / f"miniupnpd-{side}.log").read_text(errors="replace")
        except OSError:
            return ""

    def _start_rate_limits(self) -> None:
        """A token bucket (tc tbf) on both ends of a rate-limited side's outer link: the
        edge's outer interface (upload) and its bridge port on the segment (download)."""
        for side in ("left", "right"):
            rate = self._side(side).rate_kbit
            if not rate:
                continue
            edge = self.edge(side)
            # burst: at least one MTU and ~10 ms at the rate; latency bounds the queue
            burst = max(4000, rate * 1000 // 8 // 100)
            for ns, ifname in ((self.netns(edge), "eth0" if edge == side else "wan"),
                               (self.segment_netns, side)):  # fmt: skip
                run_cmd(
                    [
                        "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname,
                        "root", "tbf", "rate", f"{rate}kbit", "burst", str(burst),
                        "latency", "200ms",
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
            run_cmd(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            self._write_state()
        # sysctls: no IPv6 unless dual stack (keeps the segments quiet), forwarding in
        # routers, plain bridge.
        v6 = "0" if self.spec.ipv6 else "1"
        for name, host in plan.hosts.items():
            settings = [
                f"net.ipv6.conf.all.disable_ipv6={v6}",
                f"net.ipv6.conf.default.disable_ipv6={v6}",
                f"net.ipv4.ip_forward={1 if name in plan.forwarding else 0}",
            ]
            if self.spec.ipv6:
                settings += [
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_ra=0",
                    "net.ipv6.conf.default.accept_ra=0",
                    f"net.ipv6.conf.all.forwarding={1 if name in plan.forwarding else 0}",
                ]
            run_cmd(["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w", *settings])
        pub_settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            pub_settings += [
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ]
        run_cmd(["ip", "netns", "exec", self.segment_netns, "sysctl", "-q", "-w", *pub_settings])
        ip_batch(
            self.segment_netns,
            ["link set lo up", "link add br0 type bridge forward_delay 0 stp_state 0"],
        )
        # links (created from their first namespace, peer moved straight into the other)
        per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in names}
        for link in plan.links:
            run_cmd(
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
        for name, addrs in plan.addrs6.items():
            per_ns[plan.hosts[name].netns] += [f"addr add {a} nodad" for a in addrs]
        for name, routes in plan.routes6.items():
            per_ns[plan.hosts[name].netns] += [f"route add {r}" for r in routes]
        # routes need the gateway's link up first: hosts' batches run after their routers'
        order = [self.segment_netns] + [
            h.netns for h in plan.hosts.values() if h.role in ("cgn", "router", "public", "stun")
        ]
        order += [ns for ns in names if ns not in order]
        for ns in order:
            ip_batch(ns, per_ns[ns])
        for name, ruleset in plan.rulesets.items():
            run_cmd(
                ["ip", "netns", "exec", plan.hosts[name].netns, "nft", "-f", "-"],
                input_text=ruleset,
            )
        self._wait_links_up(names, deadline=time.monotonic() + 5.0)

    def _wait_links_up(self, names: Sequence[str], deadline: float) -> None:
        pending = list(names)
        while True:
            still = []
            for ns in pending:
                out = run_cmd(["ip", "-n", ns, "-o", "link", "show"]).stdout
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
            if run_cmd(argv).stdout.strip():
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
            if ns in self._namespaces and self.spec.needs_queue:
                kill_netns_processes(ns)
        self._delay_procs.clear()
        if self.spec.needs_queue:
            self._keep_stats()
        for ns in reversed(self._namespaces):
            try:
                delete_netns(ns)
            except LabError as exc:
                problems.append(str(exc))
        remaining = set(self._namespaces) & set(list_netns())
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
            "start_time": proc_start_time(self.pid),
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
        present = set(list_netns())
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
                alive = isinstance(pid, int) and pid_alive(
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
            return not pid_alive(pid, start if isinstance(start, int) else None)

        removed: list[str] = []
        seen_runs: set[str] = set()
        for ns in list_netns():
            m = _NS_RE.match(ns)
            if not m:
                continue
            run_id = f"{m.group(1)}-{m.group(2)}"
            seen_runs.add(run_id)
            if stale(run_id, int(m.group(1))):
                delete_netns(ns)
                removed.append(ns)
        for run_id, st in states.items():
            pid = st.get("pid")
            if isinstance(pid, int) and stale(run_id, pid):
                seen_runs.add(run_id)
        for tmp in Path(tempfile.gettempdir()).glob("hpm-*-turn-*"):
            m = re.match(r"^hpm-(\d+-[0-9a-f]{6})-turn-", tmp.name)
            if m:
                seen_runs.add(m.group(1))
        live = list_netns()
        for run_id in seen_runs:
            pid = int(run_id.split("-")[0])
            prefix = f"{NS_PREFIX}{run_id}-"
            if stale(run_id, pid) and not any(ns.startswith(prefix) for ns in live):
                with contextlib.suppress(FileNotFoundError):
                    (STATE_DIR / f"{run_id}.json").unlink()
                for tmp in Path(tempfile.gettempdir()).glob(f"hpm-{run_id}-turn-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
        return removed
