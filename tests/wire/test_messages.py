"""The control-message codec and framing: every malformed input gets a ProtocolError that
names what was wrong; nothing else escapes."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from holepunch_mig.errors import ProtocolError
from holepunch_mig.wire import messages
from holepunch_mig.wire.messages import FrameDecoder, decode, encode, frame

KEY = "ab" * 32
SESSION = "cd" * 16


def _offer(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "v": 2,
        "type": "offer",
        "session": SESSION,
        "key": KEY,
        "port": 4000,
        "candidates": ["1 1 tcp 1 10.0.0.1 4000 typ host tcptype so"],
        "policy": "direct",
        "limits": {"max_record": 1 << 20},
    }
    body.update(over)
    return body


def _raw(body: object) -> bytes:
    return b"\x01" + json.dumps(body).encode()


def test_round_trip_every_type() -> None:
    samples: list[messages.Message] = [
        messages.Offer(**{k: v for k, v in _offer().items() if k not in ("v", "type")}),  # type: ignore[arg-type]
        messages.Ping(seq=3),
        messages.Pong(seq=3),
        messages.Sync(round=1),
        messages.Nominate(round=2, link=7, handshake="ef" * 32),
        messages.RoundFailed(round=1, retry=True, reason="2 timed out"),
        messages.Result(ok=True, bytes=10, sha256="00" * 32, error=None),
        messages.Abort(reason="disk full"),
        messages.Credit(bytes=1 << 20),
        messages.Path(path="direct", reason="ok"),
    ]
    for msg in samples:
        assert decode(encode(msg)) == msg
        assert type(decode(encode(msg))) is type(msg)
    assert decode(encode(messages.TunnelData(b"\x00\xff"))) == messages.TunnelData(b"\x00\xff")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty message"),
        (b"\x07{}", "unknown message kind 0x07"),
        (b"\x01\xff\xfe", "not UTF-8"),
        (b"\x01{not json", "not JSON"),
        (b"\x01[1,2]", "JSON list, not an object"),
        (_raw({"type": "ping", "seq": 1}), 'no "v"'),
        (_raw({"v": 1, "type": "ping", "seq": 1}), "unsupported protocol version 1"),
        (_raw({"v": 2, "seq": 1}), 'no string "type"'),
        (_raw({"v": 2, "type": "teleport"}), "unknown message type 'teleport'"),
        (_raw({"v": 2, "type": "ping"}), "ping message lacks field 'seq'"),
        (_raw({"v": 2, "type": "ping", "seq": "1"}), "field 'seq' must be an unsigned"),
        (_raw({"v": 2, "type": "ping", "seq": -1}), "field 'seq' must be an unsigned"),
        (_raw({"v": 2, "type": "ping", "seq": True}), "field 'seq' must be an unsigned"),
        (_raw({"v": 2, "type": "ping", "seq": 1, "x": 0}), "unknown field 'x'"),
        (_raw(_offer(key="AB" * 32)), "field 'key' must be 64 lowercase hex"),
        (_raw(_offer(port=0)), "field 'port' must be a TCP port"),
        (_raw(_offer(port=70000)), "field 'port' must be a TCP port"),
        (_raw(_offer(candidates=["x"] * 65)), "at most 64 candidate lines"),
        (_raw(_offer(candidates=[1])), "field 'candidates'"),
        (_raw(_offer(policy="plaintext")), "field 'policy'"),
        (_raw(_offer(session="00")), "field 'session'"),
        (b"\x01" + b"[" * 100000, "exceeds the 65536-byte limit"),
    ],
)
def test_bad_messages_name_the_problem(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle.replace("(", r"\(").replace("'", "'")):
        decode(data)


def test_deep_nesting_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(b"\x01" + b"[" * 30000 + b"]" * 30000)


def test_constructors_refuse_what_decode_would_refuse() -> None:
    with pytest.raises(ProtocolError, match="field 'round' must be an unsigned"):
        messages.Sync(round=-1)
    with pytest.raises(ProtocolError, match="field 'policy'"):
        messages.Answer(session=SESSION, key=KEY, port=1, candidates=[], limits={}, policy="x")  # type: ignore[arg-type]


def test_one_class_per_schema_type_with_the_schema_fields() -> None:
    assert set(messages.MESSAGE_TYPES) == set(messages.SCHEMAS)
    for name, cls in messages.MESSAGE_TYPES.items():
        assert name == cls.TYPE
        schema = messages.SCHEMAS[name]
        declared = dataclasses.fields(cls)
        assert [f.name for f in declared] == list(schema), name
        for f in declared:
            required = schema[f.name][2]
            # required fields have no default; optional ones default to None (= absent)
            assert (f.default is dataclasses.MISSING) is required, (name, f.name)
            if not required:
                assert f.default is None, (name, f.name)


def test_wire_bytes_are_the_schema_order_json() -> None:
    offer = messages.Offer(
        session=SESSION,
        key=KEY,
        port=4000,
        candidates=["c"],
        policy="direct",
        limits={"resume": 1},
    )
    assert (
        encode(offer)
        == b"\x01"
        + json.dumps(
            {"v": 2, "type": "offer", "session": SESSION, "key": KEY, "port": 4000}
            | {"candidates": ["c"], "policy": "direct", "limits": {"resume": 1}},
            separators=(",", ":"),
        ).encode()
    )
    assert encode(messages.RoundFailed(round=1, retry=False, reason="r")) == (
        b'\x01{"v":2,"type":"round-failed","round":1,"retry":false,"reason":"r"}'
    )
    # an absent optional field stays absent on the wire; a null required one is sent
    assert encode(messages.MigrateOffer(digest=True)) == (
        b'\x01{"v":2,"type":"migrate-offer","digest":true}'
    )
    assert encode(messages.Result(ok=True, bytes=0, sha256=None, error=None)) == (
        b'\x01{"v":2,"type":"result","ok":true,"bytes":0,"sha256":null,"error":null}'
    )
    answer = decode(
        _raw(
            {
                "v": 2,
                "type": "answer",
                **{k: v for k, v in _offer().items() if k not in ("v", "type", "policy")},
            }
        )
    )
    assert isinstance(answer, messages.Answer) and answer.policy is None


def test_encode_refuses_oversize() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(messages.TunnelData(b"x" * messages.MAX_MESSAGE))


def test_frame_decoder_splits_and_joins() -> None:
    dec = FrameDecoder()
    stream = frame(b"\x01a") + frame(b"\x02bc") + frame(b"\x02d")
    for i in range(len(stream)):  # byte by byte
        dec.feed(stream[i : i + 1])
    assert [dec.next_message(), dec.next_message(), dec.next_message()] == [
        b"\x01a",
        b"\x02bc",
        b"\x02d",
    ]
    assert dec.next_message() is None
    assert dec.pending == 0


def test_frame_decoder_refuses_oversize_before_buffering() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="frame of 65554 bytes exceeds"):
        dec.feed((65554).to_bytes(4, "big"))


def test_frame_decoder_refuses_zero_length() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="zero-length frame"):
        dec.feed(b"\x00\x00\x00\x00")


def test_second_frame_oversize_detected() -> None:
    dec = FrameDecoder()
    dec.feed(frame(b"\x01{}") + (1 << 30).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_message()


@given(st.binary(max_size=2048))
def test_random_bytes_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


@given(
    st.dictionaries(
        st.sampled_from(["v", "type", "seq", "round", "link", "ok", "bytes", "reason"]),
        st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none()),
    )
)
def test_random_objects_only_protocol_errors(body: dict[str, object]) -> None:
    with contextlib.suppress(ProtocolError):
        decode(_raw(body))
