"""Bulk AEAD record layer, sans-IO: the record codec under the migration data's link.

After the Noise handshake, ``split()`` yields one raw 32-byte key per direction.
Each direction is an independent sequence of records::

    record = header(8) || AES-256-GCM ciphertext(payload) || tag(16)
    header = type u8 | reserved u8 (0) | stream u16 BE | length u32 BE (plaintext, <= 1 MiB)

The header is the associated data.  The nonce is ``4 zero bytes || u64 BE counter``; the
counter starts at 0, grows by one per record, is never reset and is never sent, so a
replayed, reordered, duplicated or dropped record fails authentication.  After every
``rekey_interval`` records the key becomes Noise ``REKEY(key)``.

:class:`RecordSealer` seals a record into a caller's preallocated frame (the header, then
the payload ``encrypt_into`` right after it); :class:`RecordOpener` validates a header
before its body is read and ``decrypt_into``\\ s a preallocated plaintext buffer.  The
blocking-socket reader and writer (``net.record_io``) are built on them.  Keys are never
logged or put in exception messages.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from holepunch_mig.errors import (
    RecordAuthError,
    RecordError,
    RecordTooLarge,
    StreamMismatch,
)

__all__ = [
    "ABORT_MAX",
    "HEADER",
    "MAX_RECORD",
    "OPEN_MAX",
    "REKEY_INTERVAL",
    "TAG",
    "Record",
    "RecordOpener",
    "RecordSealer",
    "RecordType",
    "StreamPosition",
    "abort_payload",
    "end_payload",
    "record_type_name",
    "rekey",
    "verify_end",
]

MAX_RECORD = 1 << 20
HEADER = struct.Struct(">BBHI")
TAG = 16
REKEY_INTERVAL = 65536
ABORT_MAX = 4096
OPEN_MAX = 32
"""Longest OPEN payload: a channel label (the multiplexer checks its characters)."""
KEY_LEN = 32
END_PAYLOAD = struct.Struct(">Q32s")
ACK_PAYLOAD = struct.Struct(">Q")
_NONCE = struct.Struct(">4xQ")
_REKEY_NONCE = b"\x00" * 4 + b"\xff" * 8
_MAX_COUNTER = (1 << 64) - 1  # nonce 2**64-1 is reserved for REKEY
_ZERO_DIGEST = bytes(32)


class RecordType(enum.IntEnum):
    DATA = 0x01
    END = 0x02
    ABORT = 0x03
    ACK = 0x04
    CLOSE = 0x05
    OPEN = 0x10
    """Multiplexing (``migration.mux``): a new stream.  0x11-0x1f are reserved for later
    multiplexing records and, like every other undefined type, rejected from the header."""


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)
# Fixed payload lengths; checked from the header, before the body is read.
_FIXED_LEN: dict[int, int] = {
    RecordType.END: END_PAYLOAD.size,
    RecordType.ACK: ACK_PAYLOAD.size,
    RecordType.CLOSE: 0,
}


@dataclass
class Record:
    """One verified record.  ``payload`` views the reader's buffer: it is valid only until
    the next ``read()``; copy it (``bytes(rec.payload)``) to keep it."""

    type: int
    stream: int
    payload: memoryview


@dataclass
class StreamPosition:
    """Where a resumable stream transfer stands (``send_file``/``receive_file``
    ``position=``).  Without it both start at byte 0 with a fresh SHA-256, as before.

    ``offset``: bytes of the stream that precede this call (the receiver's copy is updated
    on return *and* on failure to the bytes it handed to ``dst``); ``sha256``: a hashlib
    object covering exactly those bytes (None = a fresh hash; the call continues it in
    place); ``marks``: when not None, the sender appends ``(offset, sha256 copy)`` after
    every DATA record it hashed, so a resume can restart the digest at any record
    boundary without re-reading (hash objects are ~200 bytes; the caller prunes them)."""

    offset: int = 0
    sha256: Any = None
    marks: list[tuple[int, Any]] | None = field(default=None)


def rekey(key: bytes) -> bytes:
    """Noise REKEY(k): the first 32 bytes of ENCRYPT(k, 2**64-1, "", 32 zero bytes)."""
    return AESGCM(key).encrypt(_REKEY_NONCE, bytes(32), b"")[:32]


def _check_key(key: bytes) -> bytes:
    key = bytes(key)
    if len(key) != KEY_LEN:
        raise ValueError(f"record key must be {KEY_LEN} bytes, got {len(key)}")
    return key


def _check_params(max_record: int, rekey_interval: int) -> None:
    if not 1 <= max_record <= MAX_RECORD:
        raise ValueError(f"max_record must be in 1..{MAX_RECORD}, got {max_record}")
    if rekey_interval < 1:
        raise ValueError(f"rekey_interval must be >= 1, got {rekey_interval}")


def record_type_name(t: int) -> str:
    if t in _KNOWN_TYPES:
        return RecordType(t).name
    return f"0x{t:02x}"


class _Direction:
    """Key schedule of one direction: counter nonces and periodic REKEY."""

    __slots__ = ("aead", "counter", "interval", "key")

    def __init__(self, key: bytes, interval: int) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.counter = 0
        self.interval = interval

    def nonce(self) -> bytes:
        if self.counter >= _MAX_COUNTER:
            raise RecordError("record counter exhausted (2**64-1 records); open a new link")
        return _NONCE.pack(self.counter)

    def advance(self) -> None:
        self.counter += 1
        if self.counter % self.interval == 0:
            self.key = rekey(self.key)
            self.aead = AESGCM(self.key)


class RecordSealer:
    """Seals one direction's records into caller-provided frames: validation, counter
    nonces, REKEY, and the CLOSE/broken state that refuses every later record."""

    def __init__(
        self, key: bytes, *, max_record: int = MAX_RECORD, rekey_interval: int = REKEY_INTERVAL
    ) -> None:
        _check_params(max_record, rekey_interval)
        self._dir = _Direction(_check_key(key), rekey_interval)
        self.max_record = max_record
        self._closed = False
        self._broken: str | None = None

    def _check_record(self, type: int, stream: int, n: int) -> None:
        if type not in _KNOWN_TYPES:
            raise RecordError(f"cannot send record type 0x{type:02x}: not a defined type")
        if not 0 <= stream <= 0xFFFF:
            raise RecordError(f"stream id {stream} out of range 0..65535")
        if n > self.max_record:
            raise RecordTooLarge(f"payload of {n} bytes exceeds max record {self.max_record}")
        fixed = _FIXED_LEN.get(type)
        if fixed is not None and n != fixed:
            raise RecordError(f"{record_type_name(type)} payload must be {fixed} bytes, got {n}")
        if type == RecordType.ABORT and n > ABORT_MAX:
            raise RecordError(f"ABORT reason is {n} bytes, max {ABORT_MAX}")
        if type == RecordType.OPEN and n > OPEN_MAX:
            raise RecordError(f"OPEN channel label is {n} bytes, max {OPEN_MAX}")

    def _seal_into(
        self, frame: memoryview, type: int, stream: int, payload: bytes | memoryview | bytearray
    ) -> tuple[int, int]:
        """Seal one record into ``frame`` under the next counter.  Caller holds ``_lock``
        and validated the record.  Returns (counter, frame length)."""
        if self._broken is not None:
            raise RecordError(f"link unusable: {self._broken}")
        if self._closed:
            raise RecordError("CLOSE already sent on this link; no more records allowed")
        n = len(payload)
        end = HEADER.size + n + TAG
        d = self._dir
        HEADER.pack_into(frame, 0, type, 0, stream, n)
        d.aead.encrypt_into(d.nonce(), payload, frame[: HEADER.size], frame[HEADER.size : end])
        counter = d.counter
        d.advance()
        if type == RecordType.CLOSE:
            self._closed = True
        return counter, end


class RecordOpener:
    """Opens one direction's records: the header validator every reader uses (before
    the body is read), authentication and decryption into a preallocated buffer.

    After any error the opener is unusable (the record sequence is lost) and every later
    call re-raises a RecordError."""

    def __init__(
        self, key: bytes, *, max_record: int = MAX_RECORD, rekey_interval: int = REKEY_INTERVAL
    ) -> None:
        _check_params(max_record, rekey_interval)
        self._dir = _Direction(_check_key(key), rekey_interval)
        self.max_record = max_record
        self._plain = bytearray(max_record)
        self._pview = memoryview(self._plain)
        self._failed: RecordError | None = None
        self._peer_closed = False
        self.records_received = 0
        self.bytes_received = 0  # plaintext payload bytes of all verified records

    def _fail(self, exc: RecordError) -> RecordError:
        self._failed = exc
        return exc

    def _check_header(self, frame: memoryview, rec_no: int) -> tuple[int, int, int]:
        """Validate the header at the start of ``frame`` (record ``rec_no``) before the
        body is read, so a bogus length never makes a reader wait or allocate.  Returns
        (type, stream, length)."""
        rtype, reserved, stream, length = HEADER.unpack_from(frame)
        if reserved != 0:
            raise self._fail(
                RecordError(f"record {rec_no}: reserved header byte is 0x{reserved:02x}, not 0")
            )
        if rtype not in _KNOWN_TYPES:
            raise self._fail(RecordError(f"record {rec_no}: unknown record type 0x{rtype:02x}"))
        if length > self.max_record:
            raise self._fail(
                RecordTooLarge(
                    f"record {rec_no}: length {length} exceeds max record {self.max_record}"
                )
            )
        fixed = _FIXED_LEN.get(rtype)
        if fixed is not None and length != fixed:
            raise self._fail(
                RecordError(
                    f"record {rec_no}: {record_type_name(rtype)} payload must be {fixed} bytes, "
                    f"header says {length}"
                )
            )
        if rtype == RecordType.OPEN and length > OPEN_MAX:
            raise self._fail(
                RecordError(f"record {rec_no}: OPEN label of {length} bytes > {OPEN_MAX}")
            )
        if rtype == RecordType.ABORT and length > ABORT_MAX:
            raise self._fail(
                RecordError(f"record {rec_no}: ABORT reason of {length} bytes > {ABORT_MAX}")
            )
        return rtype, stream, length

    def _open(
        self,
        frame: memoryview,
        rtype: int,
        stream: int,
        length: int,
        out: memoryview | None = None,
    ) -> Record:
        """Authenticate and decrypt a fetched record into ``out`` (default: the reader's
        plaintext buffer)."""
        d = self._dir
        pview = (self._pview if out is None else out)[:length]
        try:
            d.aead.decrypt_into(
                d.nonce(), frame[HEADER.size : HEADER.size + length + TAG], frame[:8], pview
            )
        except InvalidTag:
            raise self._fail(
                RecordAuthError(
                    f"record {d.counter} failed authentication: tampered, replayed, "
                    "reordered or wrong key"
                )
            ) from None
        d.advance()
        self.records_received += 1
        self.bytes_received += length
        if rtype == RecordType.CLOSE:
            self._peer_closed = True
        elif rtype == RecordType.ABORT:
            try:
                bytes(pview).decode("utf-8")
            except UnicodeDecodeError:
                raise self._fail(
                    RecordError(f"record {d.counter - 1}: ABORT reason is not valid UTF-8")
                ) from None
        return Record(rtype, stream, pview)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RecordError(f"record reader unusable after earlier error: {self._failed}")
        if self._peer_closed:
            raise RecordError("peer sent CLOSE: no more records on this link")


def end_payload(total: int, digest: bytes = b"") -> bytes:
    """END's payload: ``total`` bytes, SHA-256 ``digest`` (b"" = not hashed: zeros)."""
    if digest and len(digest) != 32:
        raise ValueError(f"END digest must be 32 bytes or empty, got {len(digest)}")
    if not 0 <= total < 1 << 64:
        raise ValueError(f"END byte count {total} out of u64 range")
    return END_PAYLOAD.pack(total, digest or _ZERO_DIGEST)


def verify_end(
    stream: int, payload: memoryview, total: int, mine: bytes, *, require_digest: bool = False
) -> bool:
    """Check an END of ``stream`` against the ``total`` bytes that arrived and their
    SHA-256 ``mine`` (b"" = not hashed here); a zero digest means the sender did not hash.

    Returns True only when both digests were there and compared equal: a zero digest
    checks the count, never the content.  ``require_digest`` (resume) makes a missing
    digest on either side a StreamMismatch."""
    count, their = END_PAYLOAD.unpack(payload)
    if count != total:
        raise StreamMismatch(f"stream {stream}: END says {count} bytes but {total} arrived")
    if require_digest and (their == _ZERO_DIGEST or not mine):
        side = "the sender's END" if their == _ZERO_DIGEST else "this side"
        raise StreamMismatch(
            f"stream {stream}: {side} has no SHA-256 of the stream; it is mandatory here"
        )
    if mine and their != _ZERO_DIGEST and their != mine:
        raise StreamMismatch(
            f"stream {stream}: SHA-256 mismatch over {total} bytes "
            f"(sender {their.hex()}, received {mine.hex()})"
        )
    return bool(mine) and their != _ZERO_DIGEST


def abort_payload(reason: str) -> bytes:
    """ABORT's payload: the UTF-8 reason, cut to 4096 bytes at a character boundary."""
    raw = reason.encode("utf-8")
    if len(raw) > ABORT_MAX:
        raw = raw[:ABORT_MAX].decode("utf-8", "ignore").encode("utf-8")
    return raw
