"""Fuzz target: the record parser, a ``RecordReader`` on a socketpair fed the input.

Byte 0 picks the mode: bit 0 = ``receive_file`` (else a loop of ``read()``), bit 1 =
prefetch thread on, bit 2 = max_record 1 MiB (else 1024), bit 3 = digest off.  The rest
is written to the peer socket, which is then shut down (EOF), so a reader can never wait
for bytes that will not come: a hang is a bug.  Allowed outcomes: ``RecordError`` (or a
subclass), or a verified stream whose count and digest match what reached the sink.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["holepunch_mig"]):
        from holepunch_mig.errors import RecordError
        from holepunch_mig.net.record_io import RecordReader
        from holepunch_mig.wire.records import MAX_RECORD, RecordType
else:
    from holepunch_mig.errors import RecordError
    from holepunch_mig.net.record_io import RecordReader
    from holepunch_mig.wire.records import MAX_RECORD, RecordType

KEY = bytes(range(32))
SMALL = 1024
TIMEOUT = 10.0  # far above any legitimate run: EOF is always there


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, raw = data[0], data[1:]
    a, b = socket.socketpair()
    try:
        a.sendall(raw)  # inputs are small (libFuzzer -max_len): fits the socket buffer
        a.shutdown(socket.SHUT_WR)
        b.settimeout(TIMEOUT)  # a TimeoutError escaping below is a finding (a hang)
        reader = RecordReader(b, KEY, max_record=MAX_RECORD if mode & 4 else SMALL)
        if mode & 1:
            sink = io.BytesIO()
            try:
                count, digest = reader.receive_file(
                    0, sink, digest=not mode & 8, prefetch=3 if mode & 2 else 0
                )
            except RecordError:
                return
            got = sink.getvalue()
            assert count == len(got)
            if not mode & 8:
                assert digest == hashlib.sha256(got).digest()
            return
        for _ in range(len(raw) // 24 + 2):  # every record is >= 24 bytes on the wire
            try:
                rec = reader.read()
            except RecordError:
                return
            assert len(rec.payload) <= reader.max_record
            if rec.type == RecordType.CLOSE:
                try:
                    reader.read()
                except RecordError:
                    return
                raise AssertionError("read() after CLOSE did not raise")
        raise AssertionError("more records verified than the input can hold")
    finally:
        a.close()
        b.close()


if __name__ == "__main__":
    from _harness import main

    main(test_one_input)
