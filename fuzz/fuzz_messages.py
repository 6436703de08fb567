"""Fuzz target: control-message codec (``messages.decode``) and ``FrameDecoder``.

Input byte 0 picks the path:

* even: ``decode(data[1:])`` must return an event or raise ``ProtocolError``; a decoded
  control message must survive ``encode`` -> ``decode`` unchanged;
* odd: the rest is fed to a ``FrameDecoder`` in chunks whose sizes come from byte 0;
  every message it yields must be the exact frame body found at that offset of the
  stream, it must raise nothing but ``ProtocolError``, and after draining it may hold
  less than one maximal frame (bounded memory).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["holepunch_mig"]):
        from holepunch_mig.errors import ProtocolError
        from holepunch_mig.wire import messages
else:
    from holepunch_mig.errors import ProtocolError
    from holepunch_mig.wire import messages

SMALL_MAX = 64


def _decode(data: bytes) -> None:
    try:
        event = messages.decode(data)
    except ProtocolError:
        return
    if isinstance(event, messages.TunnelData):
        assert bytes([messages.KIND_TUNNEL]) + event.data == data
        return
    again = messages.decode(messages.encode(event))
    assert again == event, (again, event)


def _frames(selector: int, data: bytes) -> None:
    # a small limit sometimes, so the oversize paths are reachable with short inputs
    limit = SMALL_MAX if selector & 2 else messages.MAX_MESSAGE
    chunk = 1 + (selector >> 2)  # 1..64
    dec = messages.FrameDecoder(limit)
    out: list[bytes] = []
    pos = 0
    try:
        while pos < len(data):
            dec.feed(data[pos : pos + chunk])
            pos += chunk
            while (msg := dec.next_message()) is not None:
                out.append(msg)
            assert dec.pending < 4 + limit, dec.pending
    except ProtocolError:
        pass
    # what came out is exactly the frames at the start of the stream
    off = 0
    for msg in out:
        length = int.from_bytes(data[off : off + 4], "big")
        assert 1 <= length <= limit
        assert data[off + 4 : off + 4 + length] == msg
        off += 4 + length


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        _frames(data[0], data[1:])
    else:
        _decode(data[1:])


if __name__ == "__main__":
    from _harness import main

    main(test_one_input)
