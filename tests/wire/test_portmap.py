"""PCP (RFC 6887) and NAT-PMP (RFC 6886) codecs, against the RFCs' field layouts."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from holepunch_mig.wire.portmap import (
    PortMapError,
    natpmp_address_request,
    natpmp_map_request,
    parse_natpmp_address_response,
    parse_natpmp_map_response,
    parse_pcp_announce_response,
    parse_pcp_map_response,
    pcp_announce_request,
    pcp_map_request,
)

NONCE = bytes(range(12))
V4MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def _pcp_response(
    *, result: int = 0, lifetime: int = 120, nonce: bytes = NONCE, port: int = 4000,
    ext_port: int = 4000, ext_ip: str = "198.51.100.10", opcode: int = 0x81, version: int = 2,
) -> bytes:  # fmt: skip
    # RFC 6887 7.2 response header, 11.1 MAP opcode payload
    header = bytes([version, opcode, 0, result]) + struct.pack("!II", lifetime, 77) + b"\0" * 12
    ip = V4MAPPED_PREFIX + ipaddress.IPv4Address(ext_ip).packed
    return header + nonce + bytes([6, 0, 0, 0]) + struct.pack("!HH", port, ext_port) + ip


def test_pcp_map_request_layout() -> None:
    req = pcp_map_request("10.1.0.2", 4000, 300, NONCE, 4000)
    assert len(req) == 60  # 24-byte header + 36-byte MAP payload
    assert req[0] == 2 and req[1] == 1  # version 2, R=0 opcode MAP
    assert struct.unpack("!I", req[4:8])[0] == 300
    assert req[8:24] == V4MAPPED_PREFIX + bytes([10, 1, 0, 2])  # client address
    assert req[24:36] == NONCE
    assert req[36] == 6 and req[37:40] == b"\0\0\0"  # TCP, reserved
    assert struct.unpack("!HH", req[40:44]) == (4000, 4000)
    assert req[44:60] == V4MAPPED_PREFIX + b"\0\0\0\0"  # any external IPv4 address
    announce = pcp_announce_request("10.1.0.2")
    assert len(announce) == 24 and announce[1] == 0
    with pytest.raises(ValueError, match="nonce"):
        pcp_map_request("10.1.0.2", 4000, 300, b"short")
    with pytest.raises(ValueError, match="internal port"):
        pcp_map_request("10.1.0.2", 0, 300, NONCE)


def test_pcp_map_response() -> None:
    m = parse_pcp_map_response(_pcp_response(ext_port=40001), NONCE, 4000)
    assert (m.protocol, m.external_ip, m.external_port, m.lifetime, m.epoch) == (
        "pcp", "198.51.100.10", 40001, 120, 77,
    )  # fmt: skip
    assert m.nonce == NONCE and m.internal_port == 4000
    # deletion answer: lifetime 0, port may be 0
    assert parse_pcp_map_response(_pcp_response(lifetime=0, ext_port=0), NONCE, 4000).lifetime == 0


@pytest.mark.parametrize(
    ("raw", "message", "code"),
    [
        (_pcp_response(result=2), "NOT_AUTHORIZED", 2),
        (_pcp_response(result=8), "NO_RESOURCES", 8),
        (_pcp_response(result=1), "UNSUPP_VERSION", 1),
        (_pcp_response(nonce=b"x" * 12), "nonce differs", None),
        (_pcp_response(port=4001), "port 4001", None),
        (_pcp_response(opcode=0x80), "opcode 0x80", None),
        (_pcp_response(version=3), "version 3", None),
        (_pcp_response()[:40], "at least 60", None),
        (b"\x02\x81", "shorter than its header", None),
        # a NAT-PMP-only gateway answers a PCP request with "unsupported version"
        (bytes([0, 0x81, 0, 1]) + struct.pack("!I", 5), "speaks NAT-PMP", 1),
        (_pcp_response(ext_port=0), "external port 0", None),
    ],
)
def test_pcp_bad_answers(raw: bytes, message: str, code: int | None) -> None:
    with pytest.raises(PortMapError, match=message) as info:
        parse_pcp_map_response(raw, NONCE, 4000)
    assert info.value.code == code


def test_pcp_announce_response() -> None:
    raw = bytes([2, 0x80, 0, 0]) + struct.pack("!II", 0, 1234) + b"\0" * 12
    assert parse_pcp_announce_response(raw) == 1234
    with pytest.raises(PortMapError, match="opcode"):
        parse_pcp_announce_response(_pcp_response())


def test_natpmp() -> None:
    assert natpmp_address_request() == b"\0\0"
    req = natpmp_map_request(4000, 300, 4000)
    # RFC 6886 3.3: version, opcode 2 (TCP), reserved, internal, suggested external, lifetime
    assert req == struct.pack("!BBHHHI", 0, 2, 0, 4000, 4000, 300)
    assert natpmp_map_request(4000, 0) == struct.pack("!BBHHHI", 0, 2, 0, 4000, 0, 0)
    addr = struct.pack("!BBHI", 0, 128, 0, 99) + bytes([198, 51, 100, 10])
    assert parse_natpmp_address_response(addr) == ("198.51.100.10", 99)
    resp = struct.pack("!BBHIHHI", 0, 130, 0, 99, 4000, 40002, 300)
    m = parse_natpmp_map_response(resp, 4000, "198.51.100.10")
    assert (m.protocol, m.external_port, m.lifetime, m.epoch) == ("nat-pmp", 40002, 300, 99)
    with pytest.raises(PortMapError, match="Network Failure") as info:
        parse_natpmp_map_response(struct.pack("!BBHI", 0, 130, 3, 99), 4000, "x")
    assert info.value.code == 3
    with pytest.raises(PortMapError, match="opcode 128"):
        parse_natpmp_map_response(addr, 4000, "x")
    with pytest.raises(PortMapError, match="expected 16"):
        parse_natpmp_map_response(resp[:12], 4000, "x")
    with pytest.raises(PortMapError, match="port 4000, asked 4001"):
        parse_natpmp_map_response(resp, 4001, "x")
    with pytest.raises(PortMapError, match="version 2"):
        parse_natpmp_address_response(b"\x02" + addr[1:])
