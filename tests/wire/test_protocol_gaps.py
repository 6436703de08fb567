"""Gaps a second implementation hit in the wire format, closed in the codecs: duplicate
JSON member names, reserved record types, zero END digests."""

from __future__ import annotations

import hashlib

import pytest

from holepunch_mig.errors import ProtocolError
from holepunch_mig.wire.messages import decode
from holepunch_mig.wire.records import (
    HEADER,
    TAG,
    RecordError,
    RecordOpener,
    StreamMismatch,
    end_payload,
    verify_end,
)

KEY = bytes(range(32))


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":2,"type":"ping","seq":1,"seq":2}',
        b'{"v":2,"v":2,"type":"ping","seq":1}',
        b'{"v":2,"type":"pong","type":"ping","seq":1}',
        b'{"v":2,"type":"result","ok":true,"ok":false,"bytes":1,"sha256":null,"error":null}',
        (
            b'{"v":2,"type":"offer","session":"'
            + b"cd" * 16
            + b'","key":"'
            + b"ab" * 32
            + b'","port":4000,"candidates":[],"policy":"direct",'
            b'"limits":{"max_record":1,"max_record":2}}'
        ),
    ],
)
def test_duplicate_json_member_names_are_rejected(body: bytes) -> None:
    # the prologue hashes the raw bytes: a codec that keeps the last of two members would
    # let two implementations read one signed offer differently
    with pytest.raises(ProtocolError, match="duplicate member"):
        decode(b"\x01" + body)


@pytest.mark.parametrize("rtype", range(0x11, 0x20))
def test_reserved_record_types_are_rejected_from_the_header(rtype: int) -> None:
    opener = RecordOpener(KEY, max_record=100)
    frame = memoryview(bytearray(HEADER.size + 100 + TAG))
    frame[: HEADER.size] = HEADER.pack(rtype, 0, 1, 0)
    with pytest.raises(RecordError, match=f"unknown record type 0x{rtype:02x}"):
        opener._check_header(frame, 0)


def test_zero_end_digest_is_never_verified() -> None:
    digest = hashlib.sha256(b"abc").digest()
    assert verify_end(3, memoryview(end_payload(3, digest)), 3, digest) is True
    # a sender that did not hash: the count was checked, the content was not
    assert verify_end(3, memoryview(end_payload(3)), 3, digest) is False
    with pytest.raises(StreamMismatch, match="no SHA-256"):
        verify_end(3, memoryview(end_payload(3)), 3, digest, require_digest=True)
    with pytest.raises(StreamMismatch, match="no SHA-256"):
        verify_end(3, memoryview(end_payload(3, digest)), 3, b"", require_digest=True)
