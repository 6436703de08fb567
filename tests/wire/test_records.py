"""The record codec without sockets: sealing into and opening from caller buffers,
the header validator, REKEY, and the END / ABORT payloads."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from holepunch_mig.errors import RecordAuthError, RecordError, RecordTooLarge, StreamMismatch
from holepunch_mig.wire.records import (
    ABORT_MAX,
    HEADER,
    TAG,
    RecordOpener,
    RecordSealer,
    RecordType,
    abort_payload,
    end_payload,
    record_type_name,
    rekey,
    verify_end,
)

KEY = bytes(range(32))


def _frame(max_record: int = 100) -> memoryview:
    return memoryview(bytearray(HEADER.size + max_record + TAG))


def test_rekey_function_matches_aes_ctr_keystream() -> None:
    # GCM encrypts with AES-CTR starting at counter block nonce || 00000002; so REKEY(k) is
    # the first 32 bytes of that keystream.  Computed here without AESGCM.
    iv = bytes(4) + b"\xff" * 8 + (2).to_bytes(4, "big")
    enc = Cipher(algorithms.AES(KEY), modes.CTR(iv)).encryptor()
    assert rekey(KEY) == enc.update(bytes(32)) + enc.finalize()
    assert rekey(KEY) != KEY and len(rekey(KEY)) == 32


def test_sealed_records_open_in_order_across_rekeys() -> None:
    sealer = RecordSealer(KEY, max_record=100, rekey_interval=3)
    opener = RecordOpener(KEY, max_record=100, rekey_interval=3)
    frame = _frame()
    for i in range(8):
        payload = bytes([i]) * (10 + i)
        counter, end = sealer._seal_into(frame, RecordType.DATA, 7, payload)
        assert counter == i and end == HEADER.size + len(payload) + TAG
        rtype, stream, length = opener._check_header(frame, i)
        assert (rtype, stream, length) == (RecordType.DATA, 7, len(payload))
        rec = opener._open(frame, rtype, stream, length)
        assert bytes(rec.payload) == payload
    assert (opener.records_received, opener.bytes_received) == (8, sum(range(10, 18)))


def test_opener_refuses_tampering_and_stays_failed() -> None:
    sealer = RecordSealer(KEY, max_record=100)
    opener = RecordOpener(KEY, max_record=100)
    frame = _frame()
    _, end = sealer._seal_into(frame, RecordType.DATA, 1, b"payload")
    frame[end - 1] ^= 1
    with pytest.raises(RecordAuthError, match="record 0 failed authentication"):
        opener._open(frame, *opener._check_header(frame, 0))
    with pytest.raises(RecordError, match="unusable after earlier error"):
        opener._check_usable()


@pytest.mark.parametrize(
    ("header", "error", "message"),
    [
        (HEADER.pack(1, 1, 0, 0), RecordError, "reserved header byte is 0x01"),
        (HEADER.pack(0x20, 0, 0, 0), RecordError, "unknown record type 0x20"),
        (HEADER.pack(1, 0, 0, 101), RecordTooLarge, "length 101 exceeds max record 100"),
        (HEADER.pack(2, 0, 0, 3), RecordError, "END payload must be 40 bytes, header says 3"),
        (HEADER.pack(0x10, 0, 1, 33), RecordError, "OPEN label of 33 bytes > 32"),
    ],
)
def test_header_validator(header: bytes, error: type[RecordError], message: str) -> None:
    opener = RecordOpener(KEY, max_record=100)
    frame = _frame()
    frame[: HEADER.size] = header
    with pytest.raises(error, match=message):
        opener._check_header(frame, 4)


def test_open_carries_a_channel_label_of_at_most_32_bytes() -> None:
    sealer, opener = RecordSealer(KEY, max_record=100), RecordOpener(KEY, max_record=100)
    frame = _frame()
    sealer._seal_into(frame, RecordType.OPEN, 1, b"nbd")
    rec = opener._open(frame, *opener._check_header(frame, 0))
    assert (rec.type, rec.stream, bytes(rec.payload)) == (RecordType.OPEN, 1, b"nbd")
    with pytest.raises(RecordError, match="OPEN channel label is 33 bytes, max 32"):
        sealer._check_record(RecordType.OPEN, 2, 33)
    sealer._check_record(RecordType.OPEN, 2, 32)


def test_sealer_refuses_records_after_close() -> None:
    sealer = RecordSealer(KEY, max_record=100)
    sealer._seal_into(_frame(), RecordType.CLOSE, 0, b"")
    with pytest.raises(RecordError, match="CLOSE already sent"):
        sealer._seal_into(_frame(), RecordType.DATA, 0, b"x")


def test_end_payload_round_trip_and_mismatches() -> None:
    digest = hashlib.sha256(b"abc").digest()
    verify_end(3, memoryview(end_payload(3, digest)), 3, digest)
    verify_end(3, memoryview(end_payload(3)), 3, digest)  # sender did not hash
    with pytest.raises(StreamMismatch, match="END says 3 bytes but 4 arrived"):
        verify_end(3, memoryview(end_payload(3, digest)), 4, digest)
    with pytest.raises(StreamMismatch, match="SHA-256 mismatch over 3 bytes"):
        verify_end(3, memoryview(end_payload(3, digest)), 3, bytes(31) + b"\x01")
    with pytest.raises(ValueError, match="32 bytes or empty"):
        end_payload(1, b"short")


def test_abort_payload_is_cut_at_a_character_boundary() -> None:
    raw = abort_payload("é" * ABORT_MAX)
    assert len(raw) <= ABORT_MAX and raw.decode("utf-8") == "é" * (ABORT_MAX // 2)


def test_mux_open_is_a_record_type() -> None:
    assert RecordType.OPEN == 0x10 and record_type_name(0x10) == "OPEN"
    assert record_type_name(0x1F) == "0x1f"
