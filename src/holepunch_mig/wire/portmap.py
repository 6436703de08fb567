"""Router port mapping without I/O: PCP (RFC 6887) MAP and ANNOUNCE, NAT-PMP (RFC 6886).

A gateway that speaks either protocol forwards a public port to our punch port on
request, which makes a side behind even a symmetric NAT reachable: the peer dials the
mapped address and the router DNATs the SYN to us.  Both protocols run over UDP to the
default gateway's port 5351; this module only builds requests and checks responses
(:mod:`holepunch_mig.net.portmap` sends them).

Only TCP mappings of IPv4 addresses are built (what the punch port needs behind NAT44).
Every parser checks lengths, version, opcode, the echoed nonce/port, and turns a
non-zero result code into :class:`PortMapError` naming it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from holepunch_mig.errors import HolepunchError

PORT: Final = 5351
"""The server port of both protocols on the gateway."""

PCP_VERSION: Final = 2
NATPMP_VERSION: Final = 0
PCP_OP_ANNOUNCE: Final = 0
PCP_OP_MAP: Final = 1
NATPMP_OP_ADDRESS: Final = 0
NATPMP_OP_MAP_TCP: Final = 2
IPPROTO_TCP: Final = 6

_PCP_HEADER = struct.Struct("!BBHI16s")  # version, opcode, reserved, lifetime, client ip
_PCP_RESPONSE = struct.Struct("!BBBBII12s")  # version, R|op, reserved, result, life, epoch
_PCP_MAP = struct.Struct("!12sB3sHH16s")  # nonce, protocol, reserved, int port, ext port, ext ip
_NATPMP_MAP = struct.Struct("!BBHHHI")
_NATPMP_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_NATPMP_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")

PCP_RESULTS: Final[dict[int, str]] = {
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS: Final[dict[int, str]] = {
    0: "Success",
    1: "Unsupported Version",
    2: "Not Authorized/Refused",
    3: "Network Failure",
    4: "Out of resources",
    5: "Unsupported opcode",
}

Protocol = Literal["pcp", "nat-pmp", "upnp-igd"]
"""The three ways a gateway is asked (UPnP-IGD's codec is :mod:`holepunch_mig.wire.upnp`)."""


class PortMapError(HolepunchError):
    """The gateway answered with an error, or something that is not a valid answer."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PortMapping:
    """A mapping the gateway granted: ``external_ip:external_port`` -> our
    ``internal_port`` for ``lifetime`` seconds.  ``nonce`` (PCP) identifies it for
    renewal and deletion; ``control_url`` and ``service_type`` (UPnP-IGD) say where it
    is deleted.  A UPnP lifetime of 0 is a permanent mapping: it must be deleted."""

    protocol: Protocol
    internal_port: int
    external_ip: str
    external_port: int
    lifetime: int
    epoch: int
    nonce: bytes = b""
    control_url: str = ""
    service_type: str = ""


def _mapped(ip: str) -> bytes:
    """An IPv4 address as the IPv4-mapped IPv6 address PCP carries (RFC 6887 5)."""
    return ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(ip)}").packed


def _unmapped(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    v4 = addr.ipv4_mapped
    return str(v4) if v4 is not None else str(addr)


def _check_port(port: int, what: str, *, zero: bool = False) -> None:
    if not (0 if zero else 1) <= port <= 65535:
        raise ValueError(f"{what} {port} out of range")


def pcp_map_request(
    client_ip: str, internal_port: int, lifetime: int, nonce: bytes, suggested_port: int = 0
) -> bytes:
    """A PCP MAP request for TCP ``internal_port`` (lifetime 0 deletes the mapping)."""
    if len(nonce) != 12:
        raise ValueError("a PCP mapping nonce is 12 bytes")
    _check_port(internal_port, "internal port")
    _check_port(suggested_port, "suggested port", zero=True)
    if not 0 <= lifetime < 1 << 32:
        raise ValueError(f"lifetime {lifetime} out of range")
    header = _PCP_HEADER.pack(PCP_VERSION, PCP_OP_MAP, 0, lifetime, _mapped(client_ip))
    body = _PCP_MAP.pack(
        nonce, IPPROTO_TCP, b"\0\0\0", internal_port, suggested_port, _mapped("0.0.0.0")
    )
    return header + body


def pcp_announce_request(client_ip: str) -> bytes:
    """A PCP ANNOUNCE request: asks whether a PCP server is there, maps nothing."""
    return _PCP_HEADER.pack(PCP_VERSION, PCP_OP_ANNOUNCE, 0, 0, _mapped(client_ip))


def _pcp_header(data: bytes, opcode: int) -> tuple[int, int, int]:
    """(result, lifetime, epoch) of a PCP response header for ``opcode``."""
    if len(data) < _PCP_RESPONSE.size:
        if len(data) >= 4 and data[0] == NATPMP_VERSION:
            code = struct.unpack_from("!H", data, 2)[0]
            raise PortMapError(
                f"gateway speaks NAT-PMP, not PCP ({NATPMP_RESULTS.get(code, f'result {code}')})",
                code=1,
            )
        raise PortMapError(f"PCP response of {len(data)} bytes, shorter than its header")
    version, op, _res, result, lifetime, epoch, _zero = _PCP_RESPONSE.unpack_from(data)
    if version != PCP_VERSION:
        if result == 1 or version == NATPMP_VERSION:
            raise PortMapError(f"gateway does not speak PCP version 2 (version {version})", code=1)
        raise PortMapError(f"PCP response of version {version}, expected {PCP_VERSION}")
    if op != 0x80 | opcode:
        raise PortMapError(f"PCP response opcode {op:#x}, expected {0x80 | opcode:#x}")
    if result != 0:
        name = PCP_RESULTS.get(result, f"result {result}")
        raise PortMapError(f"gateway refused the PCP request: {name}", code=result)
    return result, lifetime, epoch


def parse_pcp_map_response(data: bytes, nonce: bytes, internal_port: int) -> PortMapping:
    """The mapping in a PCP MAP response to our request (``nonce``, ``internal_port``)."""
    _result, lifetime, epoch = _pcp_header(data, PCP_OP_MAP)
    if len(data) < _PCP_RESPONSE.size + _PCP_MAP.size:
        raise PortMapError(f"PCP MAP response of {len(data)} bytes, expected at least 60")
    got_nonce, proto, _r, port, ext_port, ext_ip = _PCP_MAP.unpack_from(data, _PCP_RESPONSE.size)
    if got_nonce != nonce:
        raise PortMapError("PCP MAP response for another request (nonce differs)")
    if proto != IPPROTO_TCP or port != internal_port:
        raise PortMapError(
            f"PCP MAP response for protocol {proto} port {port}, asked TCP {internal_port}"
        )
    if lifetime and not ext_port:
        raise PortMapError("PCP MAP response grants external port 0")
    return PortMapping("pcp", port, _unmapped(ext_ip), ext_port, lifetime, epoch, nonce)


def parse_pcp_announce_response(data: bytes) -> int:
    """The server's epoch from a PCP ANNOUNCE response (raises when it is no PCP)."""
    return _pcp_header(data, PCP_OP_ANNOUNCE)[2]


def natpmp_address_request() -> bytes:
    """A NAT-PMP request for the gateway's external address."""
    return bytes([NATPMP_VERSION, NATPMP_OP_ADDRESS])


def natpmp_map_request(internal_port: int, lifetime: int, suggested_port: int = 0) -> bytes:
    """A NAT-PMP TCP mapping request (lifetime 0 and suggested port 0 delete it)."""
    _check_port(internal_port, "internal port")
    _check_port(suggested_port, "suggested port", zero=True)
    if not 0 <= lifetime < 1 << 32:
        raise ValueError(f"lifetime {lifetime} out of range")
    return _NATPMP_MAP.pack(
        NATPMP_VERSION, NATPMP_OP_MAP_TCP, 0, internal_port, suggested_port, lifetime
    )


def _natpmp_result(data: bytes, opcode: int, size: int) -> None:
    if len(data) < 4:
        raise PortMapError(f"NAT-PMP response of {len(data)} bytes")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != NATPMP_VERSION:
        raise PortMapError(f"NAT-PMP response of version {version}")
    if op != 128 + opcode:
        raise PortMapError(f"NAT-PMP response opcode {op}, expected {128 + opcode}")
    if result != 0:
        name = NATPMP_RESULTS.get(result, f"result {result}")
        raise PortMapError(f"gateway refused the NAT-PMP request: {name}", code=result)
    if len(data) < size:
        raise PortMapError(f"NAT-PMP response of {len(data)} bytes, expected {size}")


def parse_natpmp_address_response(data: bytes) -> tuple[str, int]:
    """(external IPv4 address, epoch) from a NAT-PMP address response."""
    _natpmp_result(data, NATPMP_OP_ADDRESS, _NATPMP_ADDRESS_RESPONSE.size)
    *_, epoch, raw = _NATPMP_ADDRESS_RESPONSE.unpack_from(data)
    return str(ipaddress.IPv4Address(raw)), epoch


def parse_natpmp_map_response(data: bytes, internal_port: int, external_ip: str) -> PortMapping:
    """The mapping in a NAT-PMP TCP mapping response (the address comes from the
    separate address request)."""
    _natpmp_result(data, NATPMP_OP_MAP_TCP, _NATPMP_MAP_RESPONSE.size)
    *_, epoch, port, ext_port, lifetime = _NATPMP_MAP_RESPONSE.unpack_from(data)
    if port != internal_port:
        raise PortMapError(f"NAT-PMP response for port {port}, asked {internal_port}")
    if lifetime and not ext_port:
        raise PortMapError("NAT-PMP response grants external port 0")
    return PortMapping("nat-pmp", port, external_ip, ext_port, lifetime, epoch)
