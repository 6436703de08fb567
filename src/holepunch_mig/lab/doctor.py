"""``holepunch-mig doctor``: what this host's NAT does, and whether a direct link is likely.

From one local TCP port it sends a STUN Binding request (over TCP, like the punch code)
to each given server in turn and compares what they saw (:func:`stun.probe_mapping`):

* **NAT**: none if the mapped address is one of this host's own addresses;
* **mapping** (RFC 4787): endpoint-independent if every server saw the same public
  address and port, endpoint-dependent ("symmetric") if they differ.  Two servers on
  different *addresses* are needed to see address-dependent mapping; two ports of one
  address only reveal address-and-port-dependent mapping;
* **port preservation**: whether the public port equals the local port;
* **filtering**: TCP STUN cannot measure it — a STUN server over TCP never opens a
  connection *to* us (RFC 5780's CHANGE-REQUEST is UDP only).  It also matters less for
  TCP simultaneous open: each side's own SYN creates the state the peer's SYN matches.

It also asks the default gateway, without mapping anything, whether it offers router
port mapping (a PCP ANNOUNCE, a NAT-PMP address request, UPnP-IGD discovery and
GetExternalIPAddress): with it even a symmetric
NAT is crossed, because holepunch-mig asks the gateway to forward the punch port.

Then it says in plain words whether a direct link is likely and what to change if not.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

import trio

from holepunch_mig.net.gather import host_candidates
from holepunch_mig.net.portmap import probe_gateway
from holepunch_mig.net.stun import probe_mapping
from holepunch_mig.wire.endpoints import format_endpoint

EXIT_LIKELY = 0
EXIT_UNKNOWN = 1
EXIT_UNLIKELY = 3

FILTERING_NOTE = (
    "not measurable over TCP: a STUN server never connects back to us over TCP "
    "(RFC 5780 filtering tests are UDP only). TCP simultaneous open does not need inbound "
    "filtering to be open: each side's own SYN creates the state the peer's SYN matches; "
    "a NAT/firewall that answers unsolicited SYNs with RST costs retries, not the link"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


def _same_address_servers(servers: Sequence[tuple[str, int]]) -> bool:
    return len({h for h, _p in servers}) < 2


async def diagnose(
    servers: Sequence[tuple[str, int]], *, local_port: int = 0, timeout: float = 3.0
) -> dict[str, Any]:
    """Probe and interpret; a JSON-friendly dict (see ``holepunch-mig doctor --json``).
    A server given twice is probed once (two bindings to one server from one port prove
    nothing about the mapping) and the advice says so."""
    unique = list(dict.fromkeys(servers))
    repeated = [format_endpoint(*s) for s in unique if list(servers).count(s) > 1]
    servers = unique
    port = local_port or _free_port()
    probe = await probe_mapping(servers, port, timeout=timeout)
    gateway = await probe_gateway(timeout=min(timeout, 2.0))
    local_addrs = {c.host for c in host_candidates(port, include_loopback=False, ipv6=True)}
    mapped = [r["mapped"] for r in probe["results"]]
    nat: str
    if not mapped:
        nat = "unknown"
    elif all(m in {format_endpoint(a, port) for a in local_addrs} for m in mapped):
        nat = "none"
    else:
        nat = "present"
    mapping = probe["mapping"]
    preserving = probe["port_preserving"]
    advice: list[str] = []
    if nat == "none":
        likely = "yes"
        summary = (
            "No NAT: STUN saw this host's own address and port. A direct link is likely; a "
            "stateful firewall here is fine for simultaneous open."
        )
    elif mapping == "endpoint-independent":
        likely = "yes"
        if preserving:
            summary = (
                "NAT with endpoint-independent, port-preserving mapping (like default nft/"
                "iptables masquerade). A direct link is likely, even without STUN: the peer's "
                "view of our address plus our announced port is our public endpoint."
            )
        else:
            summary = (
                "NAT with endpoint-independent mapping that rewrites ports. A direct link is "
                "likely if both sides pass --stun: the STUN-reflected port is the one the NAT "
                "uses towards the peer too."
            )
            advice.append("pass --stun HOST:PORT to both send and recv")
    elif mapping == "endpoint-dependent":
        likely = "no"
        summary = (
            "Symmetric NAT: the mapping depends on the destination (servers saw different "
            "public endpoints), so the peer cannot know where to send its SYN. A direct link "
            "is unlikely unless the peer is reachable without punching (open or forwarded "
            "port) — and never if the peer is behind symmetric NAT too."
        )
        advice += [
            "make the NAT map endpoint-independently: nft `masquerade` without `random`/"
            "`fully-random`; iptables MASQUERADE without --random/--random-fully; on "
            "consumer or cloud NAT gateways look for 'endpoint-independent mapping' / "
            "'full cone' / static port allocation",
            "or forward a TCP port to this host and use it: "
            "send/recv --port P --candidate PUBLIC_IP:P",
            "or run the peer with an open/forwarded port (it can then reach us through our "
            "SYN's mapping)",
        ]
        summary += (
            " If the peer's NAT is endpoint-independent (or it has none), birthday punching "
            "(--hard-nat birthday, the default) still gets through in about 98 % of tries "
            "with the default budget."
        )
        if gateway["protocol"] is not None:
            likely = "yes"
            summary = (
                f"Symmetric NAT, but the gateway offers port mapping ({gateway['protocol']}): "
                "holepunch-mig asks it to forward the punch port (--port-mapping auto with "
                "--stun, the default), which makes this host reachable. A direct link is likely."
            )
            advice = []
    else:
        likely = "unknown"
        if not mapped:
            summary = "No STUN server answered: cannot tell anything about the NAT."
            advice.append("check that the STUN servers are reachable over TCP from here")
        else:
            summary = "Only one STUN server answered: cannot compare mappings."
        advice.append("give two STUN servers on different addresses (--stun A --stun B)")
    if repeated:
        advice.insert(
            0,
            f"the same STUN server was given more than once ({', '.join(repeated)}): "
            "probed once; give two different servers",
        )
    if len(servers) >= 2 and _same_address_servers(servers) and mapping != "endpoint-dependent":
        advice.append(
            "all servers share one address: address-dependent mapping would go unnoticed; "
            "prefer two server addresses"
        )
    return {
        **probe,
        "servers": [format_endpoint(*s) for s in servers],
        "local_addresses": sorted(local_addrs),
        "nat": nat,
        "filtering": "unknown",
        "filtering_note": FILTERING_NOTE,
        "port_mapping": gateway,
        "direct_link_likely": likely,
        "summary": summary,
        "advice": advice,
    }


def render(result: dict[str, Any]) -> str:
    """Plain lines for people."""
    lines = [f"local port {result['local_port']}, servers {', '.join(result['servers'])}"]
    for r in result["results"]:
        lines.append(f"  {r['server']} saw {r['mapped']}")
    for err in result["errors"]:
        lines.append(f"  error: {err}")
    pp = result["port_preserving"]
    lines += [
        f"NAT:        {result['nat']}",
        f"mapping:    {result['mapping']} ({result['explanation']})",
        "ports:      " + ("unknown" if pp is None else "preserved" if pp else "rewritten"),
        "filtering:  unknown over TCP (see --json filtering_note)",
        "port mapping: "
        + (
            str(result["port_mapping"]["detail"])
            if result["port_mapping"]["protocol"]
            else f"none ({result['port_mapping'].get('detail', '')})"
        ),
        f"direct link likely: {result['direct_link_likely']}",
        f"  {result['summary']}",
    ]
    lines += [f"  - {a}" for a in result["advice"]]
    return "\n".join(lines)


def run(args: Any) -> int:
    """The ``doctor`` subcommand."""
    if not args.stun:
        sys.stderr.write(
            "holepunch-mig doctor: give at least one --stun HOST:PORT (two is better)\n"
        )
        return 2
    result = trio.run(lambda: diagnose(args.stun, local_port=args.port, timeout=args.timeout))
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(render(result) + "\n")
    return {"yes": EXIT_LIKELY, "no": EXIT_UNLIKELY}.get(result["direct_link_likely"], EXIT_UNKNOWN)
