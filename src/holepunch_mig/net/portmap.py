"""Asking the gateway to map the punch port: PCP, then NAT-PMP, then UPnP-IGD.

The codecs are :mod:`holepunch_mig.wire.portmap` and :mod:`holepunch_mig.wire.upnp`;
this module finds the default gateway (``/proc/net/route``), sends a request with the
protocols' retransmission schedule (250 ms, doubling) within a deadline, and deletes the
mapping again.  UPnP-IGD's discovery (SSDP and the device description, which change
nothing on the router) runs beside PCP/NAT-PMP, so a gateway that only speaks UPnP costs
no extra time; its AddPortMapping is sent only once PCP and NAT-PMP have failed, so a
gateway that speaks several never holds two mappings of one port.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from holepunch_mig.net.upnp import (
    delete_upnp_mapping,
    discover,
    external_address,
    request_upnp_mapping,
)
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
from holepunch_mig.wire.upnp import IgdService, UpnpError

ALL_PROTOCOLS: tuple[Protocol, ...] = ("pcp", "nat-pmp", "upnp-igd")
PCP_GRACE = 0.3
"""Seconds PCP/NAT-PMP may still answer once UPnP-IGD discovery has found the gateway."""

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
    protocols: Sequence[Protocol] = ALL_PROTOCOLS,
    description: str = "holepunch_mig",
) -> PortMapping:
    """Map TCP ``internal_port`` on the gateway for ``lifetime`` seconds: PCP MAP,
    NAT-PMP when the gateway does not speak PCP, UPnP-IGD AddPortMapping (named
    ``description``) when neither maps (``protocols`` narrows that down).  Raises
    PortMapError saying why not, per protocol."""
    gw = gateway or default_gateway()
    if gw is None:
        raise PortMapError("no IPv4 default gateway to ask for a port mapping")
    if not protocols or set(protocols) - set(ALL_PROTOCOLS):
        raise ValueError(f"protocols must name some of {ALL_PROTOCOLS}, not {protocols!r}")
    deadline = trio.current_time() + timeout
    problems: list[str] = []
    found: list[IgdService | UpnpError] = []
    done = trio.Event()

    pcp_scope = trio.CancelScope(deadline=deadline)

    async def find_igd() -> None:
        try:
            found.append(await discover(gw, deadline))
            # a gateway that answered UPnP and not yet PCP most likely never will
            pcp_scope.deadline = min(pcp_scope.deadline, trio.current_time() + PCP_GRACE)
        except UpnpError as exc:
            found.append(exc)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        if "upnp-igd" in protocols:
            nursery.start_soon(find_igd)
        if {"pcp", "nat-pmp"} & set(protocols):
            with pcp_scope:
                try:
                    mapping = await _pcp_or_natpmp(gw, internal_port, lifetime, protocols, deadline)
                except PortMapError as exc:
                    problems.append(str(exc))
                else:
                    nursery.cancel_scope.cancel()
                    return mapping
            if pcp_scope.cancelled_caught:
                problems.append(f"no PCP/NAT-PMP answer from {gw}:{PORT} before UPnP-IGD's")
        if "upnp-igd" not in protocols:
            raise PortMapError("; ".join(problems))
        await done.wait()
    result = found[0]
    try:
        if isinstance(result, UpnpError):
            raise result
        return await request_upnp_mapping(result, internal_port, lifetime, description, deadline)
    except UpnpError as exc:
        problems.append(f"UPnP-IGD: {exc}")
        raise PortMapError("; ".join(problems)) from None


async def _pcp_or_natpmp(
    gw: str, internal_port: int, lifetime: int, protocols: Sequence[Protocol], deadline: float
) -> PortMapping:
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
    if mapping.protocol == "upnp-igd":
        await delete_upnp_mapping(mapping, deadline)
    elif mapping.protocol == "pcp":
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
    ANNOUNCE, a NAT-PMP address request and (beside them) UPnP-IGD discovery with
    GetExternalIPAddress.  ``protocol`` is the one a session would map with first,
    ``protocols`` every one that answered.  JSON-friendly."""
    gw = gateway or default_gateway()
    out: dict[str, object] = {
        "gateway": gw,
        "protocol": None,
        "protocols": [],
        "external_address": None,
    }
    if gw is None:
        out["detail"] = "no IPv4 default gateway"
        return out
    deadline = trio.current_time() + timeout
    problems: list[str] = []
    answered: list[Protocol] = []
    upnp: list[tuple[IgdService, str]] = []

    async def probe_upnp() -> None:
        try:
            service = await discover(gw, deadline)
            address, _local = await external_address(service, deadline)
        except UpnpError as exc:
            problems.append(f"UPnP-IGD: {exc}")
        else:
            upnp.append((service, address))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_upnp)
        try:
            await _exchange(gw, pcp_announce_request, parse_pcp_announce_response, deadline)
        except PortMapError as exc:
            problems.append(f"PCP: {exc}")
        else:
            answered.append("pcp")
        try:
            address, _local = await _exchange(
                gw, lambda _ip: natpmp_address_request(), parse_natpmp_address_response, deadline
            )
        except PortMapError as exc:
            problems.append(f"NAT-PMP: {exc}")
        else:
            assert isinstance(address, tuple)
            out["external_address"] = address[0]
            answered.append("nat-pmp")
    if upnp:
        service, address = upnp[0]
        answered.append("upnp-igd")
        out["external_address"] = out["external_address"] or address
        out["upnp_igd"] = {"service": service.service_type, "control_url": str(service.control)}
    out["protocols"] = answered
    if not answered:
        out["detail"] = "; ".join(problems)
        return out
    out["protocol"] = answered[0]
    where = {"pcp": f"{gw}:{PORT}", "nat-pmp": f"{gw}:{PORT}"}
    if upnp:
        where["upnp-igd"] = f"{upnp[0][0].control} ({upnp[0][0].service_type.split(':')[-2]})"
    spoken = ", ".join(f"{p} on {where[p]}" for p in answered)
    ext = f", external address {out['external_address']}" if out["external_address"] else ""
    out["detail"] = f"{spoken}{ext}"
    return out
