"""The record layer on blocking sockets (holepunch_mig.net.record_io).

Real sockets (socket.socketpair) with timeouts, so a bug shows up as a failure, never a
hang.  Raw records are captured with a fake socket whose sendall() appends to a list (the
writer makes exactly one sendall per record), then re-injected, cut, tampered with."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holepunch_mig.errors import (
    PeerAbort,
    PeerAborted,
    RecordAuthError,
    RecordError,
    RecordTooLarge,
    StreamMismatch,
    TruncatedStream,
)
from holepunch_mig.net.record_io import RecordReader, RecordWriter
from holepunch_mig.wire.digests import new_hash
from holepunch_mig.wire.records import HEADER, MAX_RECORD, RecordType, StreamPosition, rekey

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TIMEOUT = 10.0
MiB = 1 << 20


class Capture:
    """Stands in for a socket: one entry per sendall() call."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: Any) -> None:
        self.sent.append(bytes(data))


def capture_writer(**kw: Any) -> tuple[RecordWriter, Capture]:
    cap = Capture()
    return RecordWriter(cast(socket.socket, cap), kw.pop("key", KEY), **kw), cap


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


class Feeder:
    """Sends raw bytes from a thread (so big inputs cannot deadlock), then optionally
    closes the sending side (EOF for the reader)."""

    def __init__(self, sock: socket.socket, data: bytes, *, close: bool = True) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                sock.sendall(data)
                if close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError as exc:  # reader gave up early and closed: fine
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def in_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """Run fn in a thread; return a join() that re-raises its exception or returns result."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> object:
        t.join(TIMEOUT * 3)
        assert not t.is_alive(), "writer thread hung"
        if "error" in box:
            raise cast(BaseException, box["error"])
        return box.get("result")

    return join


def file_records(data: bytes, *, max_record: int = 1000, digest: bool = True) -> list[bytes]:
    """Raw records of send_file(data) on stream 1 followed by CLOSE."""
    w, cap = capture_writer(max_record=max_record)
    w.send_file(1, io.BytesIO(data), digest=digest)
    w.close()
    return cap.sent


PREFETCH = 3


def receive_raw(raw: bytes, *, max_record: int = 1000, close: bool = True, **kw: Any):
    """Feed raw bytes into a reader; returns (dst, exception or result)."""
    dst = io.BytesIO()
    digest = kw.pop("digest", True)
    with pair() as (a, b):
        feeder = Feeder(a, raw, close=close)
        r = RecordReader(b, kw.pop("key", KEY), max_record=max_record, **kw)
        try:
            out: object = r.receive_file(1, dst, prefetch=PREFETCH, digest=digest)
        except Exception as exc:
            out = exc
        feeder.join()
    return dst, out


DATA5 = os.urandom(5 * 1000)  # five full DATA records at max_record=1000


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 5 * MiB])
def test_round_trip_sizes_with_digest(size: int) -> None:
    data = os.urandom(size)
    with pair() as (a, b):
        w = RecordWriter(a, KEY)
        join = in_thread(lambda: w.send_file(7, io.BytesIO(data)))
        r = RecordReader(b, KEY)
        dst = io.BytesIO()
        seen: list[int] = []
        count, dig = r.receive_file(7, dst, progress=seen.append)
        sent_count, sent_dig = cast(tuple[int, bytes], join())
    expect = hashlib.sha256(data).digest()
    assert dst.getvalue() == data
    assert (count, dig) == (size, expect) == (sent_count, sent_dig)
    n_data = -(-size // MiB)
    assert w.records_sent == r.records_received == n_data + 1  # + END
    assert w.bytes_sent == size + 40
    assert seen == [min((i + 1) * MiB, size) for i in range(n_data)]


def test_round_trip_without_digest_and_write_data() -> None:
    data = os.urandom(3 * MiB + 5)
    with pair() as (a, b):
        w = RecordWriter(a, KEY)

        def send() -> None:
            w.write_data(2, data)
            w.end(2, len(data))

        join = in_thread(send)
        dst = io.BytesIO()
        assert RecordReader(b, KEY).receive_file(2, dst, digest=False) == (len(data), b"")
        join()
    assert dst.getvalue() == data


def test_one_sendall_per_record_and_wire_layout() -> None:
    w, cap = capture_writer(max_record=1000)
    w.write(RecordType.DATA, 0x1234, b"abc")
    w.send_file(3, io.BytesIO(b"x" * 2500), digest=False)
    assert len(cap.sent) == 1 + 3 + 1
    assert [len(r) for r in cap.sent] == [8 + 3 + 16, 1024, 1024, 8 + 500 + 16, 8 + 40 + 16]
    assert cap.sent[0][:8] == bytes([1, 0, 0x12, 0x34, 0, 0, 0, 3])
    # Independent check of the nonce/AD layout for record 0 and record 1.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert AESGCM(KEY).decrypt(bytes(12), cap.sent[0][8:], cap.sent[0][:8]) == b"abc"
    n1 = bytes(4) + (1).to_bytes(8, "big")
    assert AESGCM(KEY).decrypt(n1, cap.sent[1][8:], cap.sent[1][:8]) == b"x" * 1000


def test_shared_writer_is_thread_safe() -> None:
    blobs = {s: os.urandom(200_000 + s) for s in range(1, 5)}
    with pair() as (a, b):
        w = RecordWriter(a, KEY, max_record=4096)

        def pump(s: int) -> Callable[[], None]:
            return lambda: w.write_data(s, blobs[s])

        def send_all() -> None:
            threads = [threading.Thread(target=pump(s)) for s in blobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            w.close()

        join = in_thread(send_all)
        r = RecordReader(b, KEY, max_record=4096)
        got: dict[int, bytearray] = {s: bytearray() for s in blobs}
        while True:
            rec = r.read()
            if rec.type == RecordType.CLOSE:
                break
            got[rec.stream] += rec.payload
        join()
    assert {s: bytes(v) for s, v in got.items()} == blobs


def test_mux_types_pass_through_and_close_ends_link() -> None:
    with pair() as (a, b):
        w = RecordWriter(a, KEY)
        w.write(0x10, 9, b"")
        with pytest.raises(RecordError, match="0x1f: not a defined type"):
            w.write(0x1F, 9, b"reserved")
        w.ack(9, 12345)
        w.close()
        with pytest.raises(RecordError, match="CLOSE already sent"):
            w.write(RecordType.DATA, 1, b"late")
        r = RecordReader(b, KEY)
        recs = [r.read() for _ in range(3)]
        assert [(x.type, x.stream) for x in recs] == [(0x10, 9), (4, 9), (5, 0)]
        with pytest.raises(RecordError, match="CLOSE"):
            r.read()


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("n", [0, 2, 4])
@pytest.mark.parametrize("where", ["ciphertext", "tag", "header"])
def test_flipped_bit_names_record_and_nothing_after_is_delivered(n: int, where: str) -> None:
    recs = file_records(DATA5)
    rec = bytearray(recs[n])
    # header: flip a bit of the stream id (keeps length sane so the tag check runs)
    pos = {"ciphertext": 8 + 500, "tag": len(rec) - 3, "header": 3}[where]
    rec[pos] ^= 0x10
    recs[n] = bytes(rec)
    dst, out = receive_raw(b"".join(recs))
    assert isinstance(out, RecordAuthError)
    assert f"record {n} failed authentication" in str(out)
    assert dst.getvalue() == DATA5[: n * 1000]


@pytest.mark.parametrize("n", [0, 3])
def test_flipped_bit_without_digest_opened_in_place_delivers_nothing_of_it(n: int) -> None:
    # without a digest a record is decrypted in its own frame: a forged one must still
    # deliver none of its (garbage) plaintext
    recs = file_records(DATA5, digest=False)
    rec = bytearray(recs[n])
    rec[8 + 10] ^= 0x01
    recs[n] = bytes(rec)
    dst, out = receive_raw(b"".join(recs), digest=False)
    assert isinstance(out, RecordAuthError)
    assert dst.getvalue() == DATA5[: n * 1000]


def test_wrong_key() -> None:
    dst, out = receive_raw(b"".join(file_records(DATA5)), key=OTHER_KEY)
    assert isinstance(out, RecordAuthError) and "record 0 " in str(out)
    assert dst.getvalue() == b""


@pytest.mark.parametrize(
    "order, bad",
    [
        ([0, 1, 1, 2, 3, 4, 5, 6], 2),  # duplicated
        ([0, 1, 0, 2, 3, 4, 5, 6], 2),  # replayed earlier record
        ([0, 2, 1, 3, 4, 5, 6], 1),  # reordered
        ([0, 1, 3, 4, 5, 6], 2),  # dropped
        ([0, 1, 2, 3, 4, 0, 5, 6], 5),  # replayed first record later
    ],
)
def test_replay_reorder_duplicate_drop(order: list[int], bad: int) -> None:
    recs = file_records(DATA5)
    assert len(recs) == 7  # 5 DATA + END + CLOSE
    dst, out = receive_raw(b"".join(recs[i] for i in order))
    assert isinstance(out, RecordAuthError), out
    assert f"record {bad} " in str(out)
    assert dst.getvalue() == DATA5[: bad * 1000]


def test_replay_from_other_link_fails() -> None:
    # Every link has fresh split() keys: a record captured on another link (same position,
    # same header) does not authenticate here.  (Reusing a key for two links WOULD be nonce
    # reuse; the record layer relies on the handshake never doing that.)
    w, cap = capture_writer(key=OTHER_KEY, max_record=1000)
    w.send_file(1, io.BytesIO(DATA5))
    spliced = file_records(DATA5)
    spliced[2] = cap.sent[2]
    dst, out = receive_raw(b"".join(spliced))
    assert isinstance(out, RecordAuthError)
    assert "record 2 " in str(out)
    assert dst.getvalue() == DATA5[:2000]


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 500, 1023])
def test_truncated_mid_record(cut: int) -> None:
    recs = file_records(DATA5)
    raw = b"".join(recs[:3]) + recs[3][:cut]
    dst, out = receive_raw(raw)
    assert isinstance(out, TruncatedStream), out
    assert "record 3" in str(out)
    assert dst.getvalue() == DATA5[:3000]


@pytest.mark.parametrize("keep", [0, 1, 5])
def test_truncated_between_records(keep: int) -> None:
    recs = file_records(DATA5)
    dst, out = receive_raw(b"".join(recs[:keep]))
    assert isinstance(out, TruncatedStream), out
    assert f"start of record {keep}" in str(out)
    assert f"{keep} records" in str(out)
    assert dst.getvalue() == DATA5[: keep * 1000]


def test_eof_after_close_is_not_reported_as_truncation_but_read_refused() -> None:
    recs = file_records(b"abc")
    with pair() as (a, b):
        Feeder(a, b"".join(recs)).join()
        r = RecordReader(b, KEY, max_record=1000)
        assert r.receive_file(1, io.BytesIO()) == (3, hashlib.sha256(b"abc").digest())
        assert r.read().type == RecordType.CLOSE
        with pytest.raises(RecordError, match="peer sent CLOSE") as ei:
            r.read()
        assert not isinstance(ei.value, TruncatedStream)


def test_close_before_end_is_truncation() -> None:
    w, cap = capture_writer(max_record=1000)
    w.write_data(1, b"partial")
    w.close()
    dst, out = receive_raw(b"".join(cap.sent))
    assert isinstance(out, TruncatedStream) and "CLOSE before END" in str(out)
    assert dst.getvalue() == b"partial"


# ---------------------------------------------------------------- header validation


def _header_only(t: int, reserved: int, length: int) -> bytes:
    return HEADER.pack(t, reserved, 1, length)


def test_length_over_max_rejected_before_body() -> None:
    # Send only the header and keep the socket open: a reader that tried to read the body
    # would time out instead of raising RecordTooLarge.
    for max_record, length in [(1000, 1001), (MAX_RECORD, MAX_RECORD + 1), (MAX_RECORD, 2**32 - 1)]:
        with pair() as (a, b):
            a.sendall(_header_only(1, 0, length))
            b.settimeout(2)
            r = RecordReader(b, KEY, max_record=max_record)
            with pytest.raises(RecordTooLarge, match=f"length {length} exceeds"):
                r.read()


def test_length_at_max_is_accepted() -> None:
    w, cap = capture_writer(max_record=1000)
    w.write(RecordType.DATA, 1, b"z" * 1000)
    with pytest.raises(RecordTooLarge):
        w.write(RecordType.DATA, 1, b"z" * 1001)
    with pair() as (a, b):
        a.sendall(cap.sent[0])
        assert bytes(RecordReader(b, KEY, max_record=1000).read().payload) == b"z" * 1000


def test_nonzero_reserved_byte() -> None:
    rec = bytearray(file_records(b"hello")[0])
    rec[1] = 0x80
    with pair() as (a, b):
        a.sendall(bytes(rec[:8]))  # header only: must fail without waiting for the body
        b.settimeout(2)
        with pytest.raises(RecordError, match="reserved header byte is 0x80"):
            RecordReader(b, KEY, max_record=1000).read()


@pytest.mark.parametrize("t", [0x00, 0x06, 0x0F, 0x20, 0x80, 0xFF])
def test_unknown_type(t: int) -> None:
    with pair() as (a, b):
        a.sendall(_header_only(t, 0, 5))
        b.settimeout(2)
        with pytest.raises(RecordError, match=f"unknown record type 0x{t:02x}"):
            RecordReader(b, KEY).read()
    w, _ = capture_writer()
    with pytest.raises(RecordError, match="not a defined type"):
        w.write(t, 1, b"")


@pytest.mark.parametrize(
    "t, length", [(RecordType.END, 39), (RecordType.ACK, 9), (RecordType.CLOSE, 1)]
)
def test_fixed_length_types_checked_from_header(t: int, length: int) -> None:
    with pair() as (a, b):
        a.sendall(_header_only(t, 0, length))
        b.settimeout(2)
        with pytest.raises(RecordError, match="payload must be"):
            RecordReader(b, KEY).read()


def test_reader_unusable_after_error() -> None:
    with pair() as (a, b):
        a.sendall(_header_only(0x42, 0, 0))
        r = RecordReader(b, KEY)
        with pytest.raises(RecordError):
            r.read()
        with pytest.raises(RecordError, match="unusable"):
            r.read()


# ---------------------------------------------------------------- rekey


def test_rekey_across_interval_and_reader_without_rekey_fails() -> None:
    w, cap = capture_writer(max_record=100, rekey_interval=3)
    payloads = [os.urandom(50) for _ in range(10)]
    for p in payloads:
        w.write(RecordType.DATA, 1, p)
    raw = b"".join(cap.sent)
    # Record 3 is under rekey(KEY), record 6 under rekey(rekey(KEY)).
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n3 = bytes(4) + (3).to_bytes(8, "big")
    assert AESGCM(rekey(KEY)).decrypt(n3, cap.sent[3][8:], cap.sent[3][:8]) == payloads[3]
    n6 = bytes(4) + (6).to_bytes(8, "big")
    k2 = rekey(rekey(KEY))
    assert AESGCM(k2).decrypt(n6, cap.sent[6][8:], cap.sent[6][:8]) == payloads[6]

    with pair() as (a, b):
        a.sendall(raw)
        r = RecordReader(b, KEY, max_record=100, rekey_interval=3)
        assert [bytes(r.read().payload) for _ in range(10)] == payloads

    with pair() as (a, b):
        a.sendall(raw)
        r = RecordReader(b, KEY, max_record=100)  # default interval: never rekeys here
        assert [bytes(r.read().payload) for _ in range(3)] == payloads[:3]
        with pytest.raises(RecordAuthError, match="record 3 failed"):
            r.read()


# ---------------------------------------------------------------- END / ABORT semantics


def _end_case(end_total_delta: int, digest: bytes | None, *, recv_digest: bool = True):
    w, cap = capture_writer(max_record=1000)
    w.write_data(1, DATA5)
    real = hashlib.sha256(DATA5).digest()
    w.end(1, len(DATA5) + end_total_delta, real if digest is None else digest)
    dst = io.BytesIO()
    with pair() as (a, b):
        a.sendall(b"".join(cap.sent))
        r = RecordReader(b, KEY, max_record=1000)
        try:
            return r.receive_file(1, dst, digest=recv_digest)
        except Exception as exc:
            return exc


def test_end_count_mismatch() -> None:
    for delta in (1, -1):
        out = _end_case(delta, None)
        assert isinstance(out, StreamMismatch), out
        assert f"END says {len(DATA5) + delta} bytes but {len(DATA5)} arrived" in str(out)


def test_digest_mismatch() -> None:
    out = _end_case(0, hashlib.sha256(b"other").digest())
    assert isinstance(out, StreamMismatch) and "SHA-256 mismatch" in str(out)
    assert isinstance(out, RecordError)


def test_digest_skipped_when_one_side_did_not_hash() -> None:
    real = hashlib.sha256(DATA5).digest()
    assert _end_case(0, b"") == (len(DATA5), real)  # sender sent zero digest
    assert _end_case(0, hashlib.sha256(b"x").digest(), recv_digest=False) == (len(DATA5), b"")
    assert _end_case(0, None) == (len(DATA5), real)


def test_abort_surfaces_reason() -> None:
    w, cap = capture_writer(max_record=1000)
    w.write_data(1, DATA5[:2500])
    w.abort(1, "source disk read error: EIO at sector 42 ✗")
    dst, out = receive_raw(b"".join(cap.sent))
    assert isinstance(out, PeerAborted) and isinstance(out, RecordError)
    assert isinstance(out, PeerAbort)
    assert out.reason == "source disk read error: EIO at sector 42 ✗"
    assert out.stream == 1 and "EIO at sector 42" in str(out)
    assert dst.getvalue() == DATA5[:2500]


def test_abort_reason_is_limited() -> None:
    w, cap = capture_writer()
    w.abort(1, "é" * 5000)
    assert struct.unpack(">I", cap.sent[0][4:8])[0] <= 4096
    with pytest.raises(RecordError, match="ABORT reason is"):
        w.write(RecordType.ABORT, 1, b"x" * 4097)


def test_other_stream_during_receive_file_is_error() -> None:
    w, cap = capture_writer(max_record=1000)
    w.write_data(2, b"wrong stream")
    _, out = receive_raw(b"".join(cap.sent))
    assert isinstance(out, RecordError) and "stream 2" in str(out)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RecordWriter(cast(socket.socket, Capture()), b"short")
    with pytest.raises(ValueError):
        RecordReader(cast(socket.socket, Capture()), KEY, max_record=MAX_RECORD + 1)
    with pytest.raises(ValueError):
        RecordReader(cast(socket.socket, Capture()), KEY, rekey_interval=0)


# ---------------------------------------------------------------- fuzz

_valid = file_records(os.urandom(300), max_record=128)
_valid_decoded = [(r[0], int.from_bytes(r[2:4], "big"), b"") for r in _valid]


def _decode_valid() -> None:
    with pair() as (a, b):
        a.sendall(b"".join(_valid))
        r = RecordReader(b, KEY, max_record=128)
        for i in range(len(_valid)):
            rec = r.read()
            _valid_decoded[i] = (rec.type, rec.stream, bytes(rec.payload))


_decode_valid()


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "header", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "header":
        t = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0x10, 0x1F, 0x20, 0xFF]))
        res = draw(st.sampled_from([0, 0, 1]))
        length = draw(st.one_of(st.integers(0, 200), st.integers(0, 2**32 - 1)))
        return HEADER.pack(t, res, draw(st.integers(0, 0xFFFF)), length) + draw(
            st.binary(max_size=300)
        )
    raw = bytearray(b"".join(_valid))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[:cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams())
def test_fuzz_reader_only_raises_record_errors(raw: bytes) -> None:
    with pair() as (a, b):
        feeder = Feeder(a, raw)
        r = RecordReader(b, KEY, max_record=128)
        delivered: list[tuple[int, int, bytes]] = []
        with pytest.raises(RecordError):
            for _ in range(100):
                rec = r.read()
                delivered.append((rec.type, rec.stream, bytes(rec.payload)))
                if rec.type == RecordType.CLOSE:
                    r.read()  # must raise
        feeder.join()
    # Whatever got through must be a prefix of the genuine records, untouched.
    assert delivered == _valid_decoded[: len(delivered)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_without_and_with_small_prefetch(prefetch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PREFETCH", prefetch)
    test_flipped_bit_names_record_and_nothing_after_is_delivered(3, "tag")
    test_truncated_mid_record(500)
    test_truncated_between_records(5)
    test_replay_reorder_duplicate_drop([0, 2, 1, 3, 4, 5, 6], 1)
    test_abort_surfaces_reason()
    data = os.urandom(3 * MiB + 7)
    with pair() as (a, b):
        w = RecordWriter(a, KEY)
        join = in_thread(lambda: (w.send_file(1, io.BytesIO(data)), w.close()))
        r = RecordReader(b, KEY)
        dst = io.BytesIO()
        assert r.receive_file(1, dst, prefetch=prefetch)[0] == len(data)
        assert r.read().type == RecordType.CLOSE  # nothing after END was swallowed
        join()
    assert dst.getvalue() == data


@pytest.mark.parametrize(("digest", "prefetching"), [(False, False), (True, True)])
def test_default_prefetch_only_for_hashed_streams(digest: bool, prefetching: bool) -> None:
    """prefetch=None: a helper thread receives ahead when the stream is hashed (the rest
    of each record's work is large), none for a bare stream (it would only cost a
    hand-off per record)."""
    data = os.urandom(2 * MiB + 3)
    seen: list[bool] = []
    # (a helper of an earlier test's failure path may still be on its way out)
    before = {t.ident for t in threading.enumerate() if t.name == "records-recv"}

    class Watching(io.BytesIO):
        def write(self, b: Any) -> int:
            helpers = [t for t in threading.enumerate() if t.name == "records-recv"]
            seen.append(any(t.ident not in before for t in helpers))
            return super().write(b)

    with pair() as (a, b):
        w = RecordWriter(a, KEY)
        join = in_thread(lambda: (w.send_file(1, io.BytesIO(data), digest=digest), w.close()))
        dst = Watching()
        assert RecordReader(b, KEY).receive_file(1, dst, digest=digest)[0] == len(data)
        join()
    assert dst.getvalue() == data
    assert seen and seen[0] is prefetching, seen


def test_prefetch_stops_at_end_so_next_stream_can_follow() -> None:
    a_data, b_data = os.urandom(2 * MiB + 1), os.urandom(MiB // 2)
    with pair() as (a, b):
        w = RecordWriter(a, KEY)

        def send() -> None:
            w.send_file(1, io.BytesIO(a_data))
            w.ack(1, 5)
            w.send_file(2, io.BytesIO(b_data))

        join = in_thread(send)
        r = RecordReader(b, KEY)
        d1, d2 = io.BytesIO(), io.BytesIO()
        r.receive_file(1, d1)
        r.receive_file(2, d2)  # the ACK in between is skipped
        join()
    assert d1.getvalue() == a_data and d2.getvalue() == b_data


def test_sink_failure_poisons_reader() -> None:
    class Broken(io.BytesIO):
        def write(self, b: Any) -> int:
            raise OSError("disk full")

    with pair() as (a, b):
        w = RecordWriter(a, KEY)
        # Big enough that read-ahead (reader prefetch, writer pipeline, socket buffers)
        # cannot swallow it all: the sender must still be sending when the link goes.
        join = in_thread(lambda: w.send_file(1, io.BytesIO(os.urandom(16 * MiB))))
        r = RecordReader(b, KEY)
        with pytest.raises(OSError, match="disk full"):
            r.receive_file(1, Broken())
        with pytest.raises(RecordError, match="unusable"):
            r.read()
        a.close()
        b.close()
        with pytest.raises(OSError):
            join()


# ---------------------------------------------------------------- pipelined send_file


@pytest.mark.parametrize("digest", [False, True])
def test_pipelined_send_file_is_byte_identical_to_serial(digest: bool) -> None:
    data = os.urandom(7 * 1000 + 123)
    wires = []
    for pipeline in (0, 2, 3):
        w, cap = capture_writer(max_record=1000)
        w.write(RecordType.ACK, 1, (5).to_bytes(8, "big"))
        assert w.send_file(1, io.BytesIO(data), digest=digest, pipeline=pipeline)[0] == len(data)
        w.close()
        wires.append(cap.sent)
        assert w.records_sent == 1 + 8 + 1 + 1
    assert wires[0] == wires[1] == wires[2]


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
@pytest.mark.parametrize("pipeline", [0, 3])
def test_send_file_digest_and_resume_marks_cover_each_record(algorithm: Any, pipeline: int) -> None:
    """BLAKE3 is hashed inline (in the sealing thread, before the record is sealed over
    its plaintext), SHA-256 in a thread of its own: either way the digest is the
    algorithm's over the bytes, continued from a resume position, with a mark per record."""
    data = os.urandom(5 * 1000 + 77)
    head = os.urandom(300)
    h = new_hash(algorithm)
    h.update(head)
    pos = StreamPosition(offset=len(head), sha256=h, marks=[])
    w, _cap = capture_writer(max_record=1000)
    count, dig = w.send_file(
        1, io.BytesIO(data), pipeline=pipeline, position=pos, algorithm=algorithm
    )
    want = new_hash(algorithm)
    want.update(head + data)
    assert (count, dig) == (len(head) + len(data), want.digest())
    assert pos.marks is not None
    ends = [m[0] for m in pos.marks]
    assert ends == [len(head) + min(len(data), (i + 1) * 1000) for i in range(6)]
    for end, state in pos.marks:
        part = new_hash(algorithm)
        part.update((head + data)[:end])
        assert state.digest() == part.digest()


def test_a_resume_position_of_another_algorithm_is_refused_before_any_record() -> None:
    """The position's hash and ``algorithm`` must agree: ``algorithm`` picks the inline or
    the threaded path, so a BLAKE3 position told "sha256" would silently run slower."""
    with pair() as (a, b):
        w, r = RecordWriter(a, KEY, max_record=1000), RecordReader(b, KEY, max_record=1000)
        pos = StreamPosition(sha256=new_hash("blake3"))
        with pytest.raises(ValueError, match="holds a blake3 hash, not sha256"):
            w.send_file(1, io.BytesIO(b"x" * 3000), position=pos, algorithm="sha256")
        assert w.records_sent == 0
        with pytest.raises(ValueError, match="holds a blake3 hash, not sha256"):
            r.receive_file(1, io.BytesIO(), position=pos, algorithm="sha256")
        w.send_file(1, io.BytesIO(b"y" * 10), algorithm="blake3")  # both still usable
        out = io.BytesIO()
        assert r.receive_file(1, out, algorithm="blake3")[0] == 10 and out.getvalue() == b"y" * 10


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_receive_file_digest_and_position_cover_what_dst_holds(
    algorithm: Any, prefetch: int
) -> None:
    data = os.urandom(4 * 1000 + 5)
    with pair() as (a, b):
        w = RecordWriter(a, KEY, max_record=1000)
        r = RecordReader(b, KEY, max_record=1000)
        w.send_file(1, io.BytesIO(data), algorithm=algorithm)
        out = io.BytesIO()
        pos = StreamPosition()
        count, dig = r.receive_file(1, out, prefetch=prefetch, position=pos, algorithm=algorithm)
        want = new_hash(algorithm)
        want.update(data)
        assert (count, dig, out.getvalue()) == (len(data), want.digest(), data)
        assert r.end_verified and pos.offset == len(data)
        assert pos.sha256.digest() == want.digest()

        class FullAfterTwo(io.RawIOBase):
            def __init__(self) -> None:
                self.held = b""

            def writable(self) -> bool:
                return True

            def write(self, b: Any) -> int:
                if len(self.held) >= 2000:
                    raise OSError(28, "No space left on device")
                self.held += bytes(b)
                return len(b)

        w.send_file(2, io.BytesIO(data), algorithm=algorithm)
        sink, pos = FullAfterTwo(), StreamPosition()
        with pytest.raises(OSError, match="No space"):
            r.receive_file(2, sink, prefetch=prefetch, position=pos, algorithm=algorithm)
        held = new_hash(algorithm)
        held.update(sink.held)
        assert pos.offset == len(sink.held) == 2000
        assert pos.sha256.digest() == held.digest()  # not the record that failed to land


def test_writes_from_other_threads_during_pipelined_send_file_keep_counter_order() -> None:
    data = os.urandom(4 * MiB + 5)
    with pair() as (a, b):
        w = RecordWriter(a, KEY, max_record=64 * 1024)
        stop = threading.Event()

        def acker() -> None:
            n = 0
            while not stop.is_set():
                w.ack(9, n)
                n += 1

        def send() -> None:
            t = threading.Thread(target=acker)
            t.start()
            try:
                w.send_file(1, io.BytesIO(data), pipeline=3)
            finally:
                stop.set()
                t.join()
            w.close()

        join = in_thread(send)
        r = RecordReader(b, KEY, max_record=64 * 1024)
        got = bytearray()
        acks = []
        while True:
            rec = r.read()
            if rec.type == RecordType.CLOSE:
                break
            if rec.type == RecordType.ACK:
                acks.append(int.from_bytes(rec.payload, "big"))
            elif rec.type == RecordType.DATA:
                got += rec.payload
        join()
    assert bytes(got) == data
    assert acks == list(range(len(acks)))


def test_pipelined_send_failure_breaks_writer() -> None:
    class Boom(Capture):
        def sendall(self, data: Any) -> None:
            if len(self.sent) == 2:
                raise OSError("connection reset")
            super().sendall(data)

    cap = Boom()
    w = RecordWriter(cast(socket.socket, cap), KEY, max_record=1000)
    with pytest.raises(OSError, match="reset"):
        w.send_file(1, io.BytesIO(os.urandom(10_000)), pipeline=3)
    assert len(cap.sent) == 2
    with pytest.raises(RecordError, match="unusable"):
        w.close()


def test_pipelined_source_failure_still_sends_sealed_records() -> None:
    class Flaky(io.BytesIO):
        def readinto(self, b: Any) -> int:
            if self.tell() >= 3000:
                raise OSError("disk error")
            return super().readinto(b)

    w, cap = capture_writer(max_record=1000)
    with pytest.raises(OSError, match="disk error"):
        w.send_file(1, Flaky(os.urandom(10_000)), pipeline=3)
    assert len(cap.sent) == 3  # everything sealed went out, in order
    w.abort(1, "source failed")  # the link is still consistent: the peer can read this
    raw = b"".join(cap.sent)
    with pair() as (x, y):
        feeder = Feeder(x, raw)
        r = RecordReader(y, KEY, max_record=1000)
        with pytest.raises(PeerAborted, match="source failed"):
            r.receive_file(1, io.BytesIO())
        feeder.join()


# ---------------------------------------------------------------- sealing in place


def test_write_data_in_place_keeps_counter_order_with_other_writers() -> None:
    chunks = [os.urandom(64 * 1024 - i) for i in range(40)]
    with pair() as (a, b):
        w = RecordWriter(a, KEY, max_record=64 * 1024)
        stop = threading.Event()

        def acker() -> None:
            n = 0
            while not stop.is_set():
                w.ack(9, n)
                n += 1

        def send() -> None:
            t = threading.Thread(target=acker)
            t.start()
            frame = w.new_frame()
            try:
                for c in chunks:
                    frame[HEADER.size : HEADER.size + len(c)] = c
                    w.write_data_in_place(1, frame, len(c))
            finally:
                stop.set()
                t.join()
            w.close()

        join = in_thread(send)
        r = RecordReader(b, KEY, max_record=64 * 1024)
        got: list[bytes] = []
        acks = []
        while True:
            rec = r.read()
            if rec.type == RecordType.CLOSE:
                break
            if rec.type == RecordType.ACK:
                acks.append(int.from_bytes(rec.payload, "big"))
            else:
                got.append(bytes(rec.payload))
        join()
    assert got == chunks
    assert acks == list(range(len(acks)))


def test_write_data_in_place_is_the_same_record_as_write() -> None:
    data = os.urandom(777)
    w1, cap1 = capture_writer()
    w1.write_data(3, data)
    w2, cap2 = capture_writer()
    frame = w2.new_frame()
    frame[HEADER.size : HEADER.size + len(data)] = data
    w2.write_data_in_place(3, frame, len(data))
    assert cap1.sent == cap2.sent


def test_write_data_in_place_refuses_what_does_not_fit() -> None:
    w, cap = capture_writer(max_record=1000)
    with pytest.raises(RecordTooLarge):
        w.write_data_in_place(1, w.new_frame(), 1001)
    with pytest.raises(RecordError, match="cannot hold"):
        w.write_data_in_place(1, memoryview(bytearray(100)), 90)
    assert cap.sent == []
