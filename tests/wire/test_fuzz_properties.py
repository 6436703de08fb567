"""Property tests that fill the gaps of the per-module hypothesis tests: streams of frames
cut at random points, mutated valid control messages, mutated candidate lines, the record
parser through receive_file (with and without the prefetch thread), mutated genuine Noise
messages and random call sequences on the handshake state machine.  Each decoder must give
a correct result or its specific error, nothing else.

The fuzz/ targets are the oracles here too: hypothesis drives them with its own inputs.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holepunch_mig.errors import CandidateError, ProtocolError
from holepunch_mig.wire import messages
from holepunch_mig.wire.candidates import Candidate, parse_endpoint

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))
fuzz_messages = importlib.import_module("fuzz_messages")
fuzz_candidates = importlib.import_module("fuzz_candidates")
fuzz_records = importlib.import_module("fuzz_records")
fuzz_noise = importlib.import_module("fuzz_noise")


def _seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((FUZZ / "corpus" / target).iterdir())]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes replaced, inserted, deleted or the tail cut."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def inputs(target: str) -> st.SearchStrategy[bytes]:
    seeds = _seeds(target)
    return st.one_of(st.binary(max_size=600), mutated(seeds), st.sampled_from(seeds))


# ------------------------------------------------------------------ control messages


@settings(max_examples=400)
@given(inputs("messages"))
def test_messages_target(data: bytes) -> None:
    fuzz_messages.test_one_input(data)


VALID = [
    messages.encode(messages.Ping(seq=7)),
    messages.encode(messages.Nominate(round=2, link=1001, handshake="ef" * 32)),
    messages.encode(messages.Result(ok=True, bytes=3, sha256="ab" * 32, error=None)),
]


@settings(max_examples=300)
@given(
    msgs=st.lists(st.sampled_from(VALID), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_frame_stream_cut_anywhere_yields_the_same_messages(
    msgs: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages.frame(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = messages.FrameDecoder()
    out = []
    for a, b in itertools.pairwise(points):
        dec.feed(stream[a:b])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert dec.pending == 0


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["v", "type", "seq", "round", "link", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**70), 2**70),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.sampled_from(["ping", "sync", "nominate", 1]),
        ),
    )
)
def test_json_objects_decode_or_protocol_error(obj: dict[str, object]) -> None:
    raw = b"\x01" + json.dumps(obj).encode()
    try:
        event = messages.decode(raw)
    except ProtocolError:
        return
    assert isinstance(event, messages.Message)
    assert messages.decode(messages.encode(event)) == event


def test_huge_integer_is_a_protocol_error() -> None:
    raw = b'\x01{"v":2,"type":"ping","seq":' + b"9" * 5000 + b"}"
    with pytest.raises(ProtocolError):
        messages.decode(raw)


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_an_integer(version: str) -> None:
    raw = b'\x01{"v":' + version.encode() + b',"type":"ping","seq":1}'
    with pytest.raises(ProtocolError, match="version"):
        messages.decode(raw)


# ------------------------------------------------------------------ candidates


@settings(max_examples=400)
@given(inputs("candidates"))
def test_candidates_target(data: bytes) -> None:
    fuzz_candidates.test_one_input(data)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_is_a_candidate_or_candidate_error(text: str) -> None:
    try:
        cand = Candidate.from_line(text)
    except CandidateError:
        return
    assert Candidate.from_line(cand.to_line()) == cand


def test_hostname_check_is_not_exponential() -> None:
    # 20 characters already take ~0.2 s and every 2 more multiply that by ~4-5
    started = time.monotonic()
    with pytest.raises(CandidateError):
        parse_endpoint("stun" * 5 + "_:3478", allow_hostname=True)
    assert time.monotonic() - started < 0.05


# ------------------------------------------------------------------ records


@settings(max_examples=250)
@given(inputs("records"))
def test_records_target(data: bytes) -> None:
    fuzz_records.test_one_input(data)


# ------------------------------------------------------------------ noise


@settings(max_examples=400)
@given(inputs("noise"))
def test_noise_target(data: bytes) -> None:
    fuzz_noise.test_one_input(data)


@settings(max_examples=200)
@given(script=st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=120)), max_size=8))
def test_noise_call_sequences(script: list[tuple[int, bytes]]) -> None:
    for role in (0, 1):
        raw = bytes([2, role])
        for op, chunk in script:
            raw += bytes([op, len(chunk)]) + chunk
        fuzz_noise.test_one_input(raw)
