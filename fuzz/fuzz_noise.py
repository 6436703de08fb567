"""Fuzz target: the Noise handshake state machine (``HandshakeState``), KK as sessions use it.

Fixed static and ephemeral keys make valid messages reproducible, so the seed corpus
holds genuine message 1 / message 2 bytes that libFuzzer then mutates.  Byte 0 picks:

* 0: a responder reads the input as message 1; if it accepts, the payload must be what
  our initiator (same fixed keys) sends, byte for byte, and the handshake completes;
* 1: an initiator sends its message 1, then reads the input as message 2;
* 2: a script of calls (read/write/split/handshake_hash) on a state for either role
  (next byte, bit 0), each call two bytes (op, chunk size) then the chunk: every call
  returns or raises ``HandshakeError``, and after a failure every later call raises too.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["holepunch_mig"]):
        from holepunch_mig.errors import HandshakeError
        from holepunch_mig.wire.noise import HandshakeState, public_key
else:
    from holepunch_mig.errors import HandshakeError
    from holepunch_mig.wire.noise import HandshakeState, public_key

I_PRIV = bytes(range(1, 33))
R_PRIV = bytes(range(33, 65))
I_E = bytes(range(65, 97))
R_E = bytes(range(97, 129))
I_PUB = public_key(I_PRIV)
R_PUB = public_key(R_PRIV)
PROLOGUE = b"holepunch_mig/1\x00fuzz"


def initiator() -> HandshakeState:
    return HandshakeState("KK", True, PROLOGUE, s=I_PRIV, rs=R_PUB, e=I_E)


def responder() -> HandshakeState:
    return HandshakeState("KK", False, PROLOGUE, s=R_PRIV, rs=I_PUB, e=R_E)


def _read_message_1(data: bytes) -> None:
    r = responder()
    try:
        payload = r.read_message(data)
    except HandshakeError:
        return
    # only our fixed-key initiator can have produced it
    assert initiator().write_message(payload) == data
    i = initiator()
    i.write_message(payload)
    i.read_message(r.write_message(b"ok"))
    assert i.split() == r.split()


def _read_message_2(data: bytes) -> None:
    i = initiator()
    i.write_message(b"\x00\x00\x00\x01\x00\x00\x00\x01")
    try:
        payload = i.read_message(data)
    except HandshakeError:
        return
    r = responder()
    r.read_message(initiator().write_message(b"\x00\x00\x00\x01\x00\x00\x00\x01"))
    assert r.write_message(payload) == data
    assert i.split() == r.split()


def _script(data: bytes) -> None:
    hs = initiator() if data[0] & 1 else responder()
    failed = False
    pos = 1
    for _ in range(8):
        if pos >= len(data):
            return
        op, size = data[pos] & 3, data[pos + 1] if pos + 1 < len(data) else 0
        pos += 2
        chunk, pos = data[pos : pos + size], pos + size
        try:
            if op == 0:
                hs.read_message(chunk)
            elif op == 1:
                hs.write_message(chunk)
            elif op == 2:
                hs.split()
            else:
                _ = hs.handshake_hash
        except HandshakeError:
            failed = failed or "failed=True" in repr(hs)
            continue
        assert not failed, "a call succeeded on a failed handshake"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % 3
    if mode == 0:
        _read_message_1(data[1:])
    elif mode == 1:
        _read_message_2(data[1:])
    else:
        _script(data[1:] if len(data) > 1 else b"\x00")


if __name__ == "__main__":
    from _harness import main

    main(test_one_input)
