"""The tunnel's credit accounting without I/O: grants, batches, overruns, invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from holepunch_mig.errors import FlowControlError, ProtocolError
from holepunch_mig.wire.credit import MAX_CHUNK, ReceiveWindow, SendCredit, StreamWindow

KiB, MiB = 1 << 10, 1 << 20


def test_send_credit_accounting() -> None:
    credit = SendCredit()
    assert credit.take(MAX_CHUNK) == 0
    credit.grant(100_000)
    assert credit.take(MAX_CHUNK) == MAX_CHUNK
    credit.spend(MAX_CHUNK)
    assert credit.take(MAX_CHUNK) == 100_000 - MAX_CHUNK
    with pytest.raises(ValueError, match="credit"):
        credit.spend(100_000)
    with pytest.raises(ProtocolError, match="positive"):
        credit.grant(0)


def test_receive_window_returns_credit_in_batches_not_per_chunk() -> None:
    win = ReceiveWindow(window=16 * MiB, batch=4 * MiB)
    assert win.initial_grant() == 16 * MiB
    grants = []
    for _ in range((64 * MiB) // MAX_CHUNK):
        win.on_data(MAX_CHUNK)
        grant = win.on_consumed(MAX_CHUNK)
        if grant:
            grants.append(grant)
    # 1024 chunks, 15 credit messages: one per 4 MiB consumed
    assert len(grants) == (64 * MiB // MAX_CHUNK * MAX_CHUNK) // (4 * MiB)
    assert all(g >= 4 * MiB for g in grants)


def test_receive_window_refuses_overrun() -> None:
    win = ReceiveWindow(window=128 * KiB, batch=64 * KiB)
    win.initial_grant()
    win.on_data(100 * KiB)
    with pytest.raises(ProtocolError, match="ignores flow control"):
        win.on_data(29 * KiB)
    with pytest.raises(ProtocolError, match="empty"):
        win.on_data(0)


def test_receive_window_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="smaller than one chunk"):
        ReceiveWindow(window=1000, batch=500)
    with pytest.raises(ValueError, match="batch"):
        ReceiveWindow(window=MiB, batch=2 * MiB)


@given(st.lists(st.tuples(st.integers(1, MAX_CHUNK), st.booleans()), max_size=300))
def test_window_invariants(steps: list[tuple[int, bool]]) -> None:
    """Whatever the pattern of arrivals and consumption, an honest sender (spending only
    its credit) never overruns, buffered bytes never exceed the window, and credit in
    flight + buffered + not yet returned always adds up to the window."""
    window, batch = 256 * KiB, 64 * KiB
    win, credit = ReceiveWindow(window, batch), SendCredit()
    credit.grant(win.initial_grant())
    for size, consume in steps:
        n = credit.take(size)
        if n:
            credit.spend(n)
            win.on_data(n)
        if consume and win.buffered:
            grant = win.on_consumed(win.buffered)
            if grant:
                credit.grant(grant)
        assert win.buffered <= window
        assert credit.available + win.buffered + win.unreturned == window
        assert credit.available == win.outstanding


def test_stream_window_refuses_bytes_beyond_the_window() -> None:
    w = StreamWindow(4)
    w.on_data(3)
    w.on_data(1)
    with pytest.raises(FlowControlError, match="5 bytes unacknowledged, beyond the 4-byte"):
        w.on_data(1)
    assert not w.ack_due(1, 2) and w.ack_due(2, 2)
    w.on_data(2)  # two bytes acknowledged: two more fit
    with pytest.raises(FlowControlError):
        w.on_data(1)
