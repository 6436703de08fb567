"""STUN Binding codec over TCP, sans-IO: requests, responses and mapping verdicts."""

from __future__ import annotations

import struct

import pytest
from aioice import stun as aiostun
from testsupport.stun import binding_response as _response

from holepunch_mig.errors import StunError
from holepunch_mig.wire.stun import (
    MappingProbe,
    binding_request,
    classify_mapping,
    parse_binding_response,
    stun_body_length,
)


def test_binding_request_is_valid_stun() -> None:
    data, tid = binding_request()
    assert len(tid) == 12 and stun_body_length(data[:20]) == len(data) - 20
    msg = aiostun.parse_message(data)  # FINGERPRINT verified by aioice
    assert msg.message_method == aiostun.Method.BINDING
    assert msg.message_class == aiostun.Class.REQUEST
    assert msg.transaction_id == tid and "FINGERPRINT" in msg.attributes
    assert binding_request(b"x" * 12)[1] == b"x" * 12


def test_parse_binding_response_variants() -> None:
    tid = b"t" * 12
    both = _response(tid, XOR_MAPPED_ADDRESS=("198.51.100.2", 4242), MAPPED_ADDRESS=("10.0.0.1", 1))
    assert parse_binding_response(both, tid) == ("198.51.100.2", 4242)
    mapped_only = _response(tid, MAPPED_ADDRESS=("198.51.100.3", 7))
    assert parse_binding_response(mapped_only, tid) == ("198.51.100.3", 7)
    v6 = _response(tid, XOR_MAPPED_ADDRESS=("2001:db8::5", 65535))
    assert parse_binding_response(v6, tid) == ("2001:db8::5", 65535)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_response(b"u" * 12, XOR_MAPPED_ADDRESS=("192.0.2.1", 1)), "wrong transaction id"),
        (
            _response(b"t" * 12, aiostun.Class.ERROR, ERROR_CODE=(420, "Unknown Attribute")),
            "error response: 420 Unknown Attribute",
        ),
        (_response(b"t" * 12, aiostun.Class.ERROR), "error response: without ERROR-CODE"),
        (_response(b"t" * 12), "without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"),
        (_response(b"t" * 12, aiostun.Class.INDICATION), "Binding indication, not a response"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a STUN message"),
        (_response(b"t" * 12, XOR_MAPPED_ADDRESS=("192.0.2.1", 1))[:-2], "truncated"),
        (
            # attribute claims IPv4 family but carries 2 bytes of address
            struct.pack("!HHI12s", 0x0101, 8, aiostun.COOKIE, b"t" * 12)
            + struct.pack("!HHBBH", 0x0020, 4, 0, 1, 0),
            "malformed STUN message",
        ),
        (
            struct.pack("!HHI12s", 0x0101, 2, aiostun.COOKIE, b"t" * 12) + b"\0\0",
            "not a multiple of 4",
        ),
        (
            struct.pack("!HHI12s", 0x0102, 0, aiostun.COOKIE, b"t" * 12),
            "SHARED_SECRET message, not BINDING",
        ),
    ],
)
def test_parse_binding_response_errors(data: bytes, message: str) -> None:
    with pytest.raises(StunError) as info:
        parse_binding_response(data, b"t" * 12, who="S")
    assert message in str(info.value), str(info.value)


def test_classify_mapping() -> None:
    a, b = ("192.0.2.1", 3478), ("198.51.100.1", 3478)
    v = classify_mapping(
        MappingProbe(5000, ((a, ("203.0.113.1", 5000)), (b, ("203.0.113.1", 5000))))
    )
    assert (v.mapping, v.port_preserving) == ("endpoint-independent", True)
    v = classify_mapping(
        MappingProbe(5000, ((a, ("203.0.113.1", 6000)), (b, ("203.0.113.1", 6001))))
    )
    assert (v.mapping, v.port_preserving) == ("endpoint-dependent", False)
    assert "saw different mappings" in v.explanation
    v = classify_mapping(MappingProbe(5000, ((a, ("203.0.113.1", 6000)),)))
    assert (v.mapping, v.port_preserving) == ("unknown", False)
    v = classify_mapping(MappingProbe(5000, (), ("boom",)))
    assert (v.mapping, v.port_preserving) == ("unknown", None)
