"""Asking the gateway to map the punch port: PCP first, then NAT-PMP (thin UDP driver).

The codecs are :mod:`holepunch_mig.wire.portmap`; this module finds the default gateway
(``/proc/net/route``), sends a request with the protocols' retransmission schedule
(250 ms, doubling) within a deadline, and deletes the mapping again.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from holepunch_mig.wire.portmap import (
    PORT,
    PortMapError,
    PortMapping,
    Protocol,
    natpmp_address_request,
    natpmp_map_request,
    parse_natpmp_address_response,
    parse_natpmp_map_response,
    parse_pcp_announce_response,
    parse_pcp_map_response,
    pcp_announce_request,
    pcp_map_request,
)

__all__ = ["default_gateway", "delete_mapping", "probe_gateway", "request_mapping"]


def default_gateway(route_file: str | None = None) -> str | None:
    """The IPv4 default gateway of this thread's network namespace (None without one).
    /proc/thread-self, not /proc/self: a thread may have joined another namespace."""
    paths = [route_file] if route_file else ["/proc/thread-self/net/route", "/proc/net/route"]
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()[1:]
            break
        except OSError:
            continue
    else:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


async def _exchange(
    gateway: str,
    request: Callable[[str], bytes],
    parse: Callable[[bytes], object],
    deadline: float,
) -> tuple[object, str]:
    """Send ``request(our address)`` until ``parse`` accepts an answer or the deadline
    passes; (parsed answer, our address)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.connect((gateway, PORT))
        local = sock.getsockname()[0]
        data = request(local)
        wait = 0.25
        last: PortMapError | None = None
        while True:
            await sock.send(data)
            with trio.move_on_at(min(deadline, trio.current_time() + wait)):
                while True:
                    try:
                        answer = await sock.recv(1100)
                    except ConnectionRefusedError:
                        raise PortMapError(
                            f"nothing answers PCP/NAT-PMP on {gateway}:{PORT} (ICMP port "
                            "unreachable)"
                        ) from None
                    try:
                        return parse(answer), local
                    except PortMapError as exc:
                        if exc.code is not None:
                            raise  # a real answer: an error result
                        last = exc  # garbage: keep listening
            if trio.current_time() >= deadline:
                why = f" (last answer: {last})" if last else ""
                raise PortMapError(f"no PCP/NAT-PMP answer from {gateway}:{PORT}{why}")
            wait *= 2


async def request_mapping(
    internal_port: int,
    lifetime: int,
    *,
    gateway: str | None = None,
    timeout: float = 1.0,
    protocols: Sequence[Protocol] = ("pcp", "nat-pmp"),
) -> PortMapping:
    """Map TCP ``internal_port`` on the gateway for ``lifetime`` seconds: PCP MAP, and
    NAT-PMP when the gateway does not speak PCP (``protocols`` narrows that down).
    Raises PortMapError saying why not."""
    gw = gateway or default_gateway()
    if gw is None:
        raise PortMapError("no IPv4 default gateway to ask for a port mapping")
    if not protocols or set(protocols) - {"pcp", "nat-pmp"}:
        raise ValueError(f"protocols must name 'pcp' and/or 'nat-pmp', not {protocols!r}")
    deadline = trio.current_time() + timeout
    nonce = os.urandom(12)
    if "pcp" in protocols:
        try:
            mapping, _local = await _exchange(
                gw,
                lambda ip: pcp_map_request(ip, internal_port, lifetime, nonce, internal_port),
                lambda raw: parse_pcp_map_response(raw, nonce, internal_port),
                deadline,
            )
            assert isinstance(mapping, PortMapping)
            return mapping
        except PortMapError as exc:
            # only "unsupported version" sends us on to NAT-PMP
            if exc.code != 1 or "nat-pmp" not in protocols:
                raise
    address, _local = await _exchange(
        gw, lambda _ip: natpmp_address_request(), parse_natpmp_address_response, deadline
    )
    assert isinstance(address, tuple)
    mapping, _local = await _exchange(
        gw,
        lambda _ip: natpmp_map_request(internal_port, lifetime, internal_port),
        lambda raw: parse_natpmp_map_response(raw, internal_port, str(address[0])),
        deadline,
    )
    assert isinstance(mapping, PortMapping)
    return mapping


async def delete_mapping(
    mapping: PortMapping, *, gateway: str | None = None, timeout: float = 1.0
) -> None:
    """Delete a mapping (lifetime 0).  Raises PortMapError when the gateway says no."""
    gw = gateway or default_gateway()
    if gw is None:
        raise PortMapError("no IPv4 default gateway")
    deadline = trio.current_time() + timeout
    port = mapping.internal_port
    if mapping.protocol == "pcp":
        await _exchange(
            gw,
            lambda ip: pcp_map_request(ip, port, 0, mapping.nonce),
            lambda raw: parse_pcp_map_response(raw, mapping.nonce, port),
            deadline,
        )
    else:
        await _exchange(
            gw,
            lambda _ip: natpmp_map_request(port, 0, 0),
            lambda raw: parse_natpmp_map_response(raw, port, mapping.external_ip),
            deadline,
        )


async def probe_gateway(*, gateway: str | None = None, timeout: float = 1.0) -> dict[str, object]:
    """What the gateway offers, without mapping anything (for ``doctor``): a PCP
    ANNOUNCE, then a NAT-PMP address request.  JSON-friendly."""
    gw = gateway or default_gateway()
    out: dict[str, object] = {"gateway": gw, "protocol": None, "external_address": None}
    if gw is None:
        out["detail"] = "no IPv4 default gateway"
        return out
    deadline = trio.current_time() + timeout
    problems: list[str] = []
    try:
        await _exchange(gw, pcp_announce_request, parse_pcp_announce_response, deadline)
    except PortMapError as exc:
        problems.append(f"PCP: {exc}")
    else:
        out["protocol"] = "pcp"
    try:
        address, _local = await _exchange(
            gw, lambda _ip: natpmp_address_request(), parse_natpmp_address_response, deadline
        )
    except PortMapError as exc:
        problems.append(f"NAT-PMP: {exc}")
    else:
        assert isinstance(address, tuple)
        out["external_address"] = address[0]
        out["protocol"] = out["protocol"] or "nat-pmp"
    if out["protocol"] is None:
        out["detail"] = "; ".join(problems)
    else:
        where = f", external address {out['external_address']}" if out["external_address"] else ""
        out["detail"] = f"{out['protocol']} on {gw}:{PORT}{where}"
    return out
