"""The mux reader's buffer pool: size classes, recycling, and its memory budget."""

from __future__ import annotations

import pytest

from holepunch_mig.migration.buffer_pool import BufferPool


def test_classes_are_four_times_apart_up_to_the_largest() -> None:
    pool = BufferPool(1 << 20, budget=16 << 20)
    assert pool.sizes == (64 << 10, 256 << 10, 1 << 20)
    assert [pool.size_for(n) for n in (1, 64 << 10, (64 << 10) + 1, 300_000, 1 << 20)] == [
        64 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        1 << 20,
    ]
    with pytest.raises(ValueError, match="exceed the pool's largest"):
        pool.size_for((1 << 20) + 1)
    # a link whose records are smaller than the smallest class has one class
    assert BufferPool(1000, budget=1 << 20).sizes == (1000,)


def test_every_taken_buffer_is_at_least_a_quarter_full() -> None:
    pool = BufferPool(1 << 20, budget=64 << 20)
    for n in range(pool.smallest, (1 << 20) + 1, 4093):
        buf = pool.take(n)
        assert n <= len(buf) <= 4 * n
        pool.give(buf)


def test_given_back_buffers_are_reused_not_made_again() -> None:
    pool = BufferPool(1 << 20, budget=16 << 20)
    bufs = [pool.take(200_000) for _ in range(5)]
    for b in bufs:
        pool.give(b)
    again = [pool.take(150_000) for _ in range(5)]
    assert pool.made == 5 and pool.reused == 5
    assert {id(b.obj) for b in again} == {id(b.obj) for b in bufs}
    assert pool.held == 5 * (256 << 10)


def test_free_buffers_of_other_classes_are_dropped_to_stay_in_budget() -> None:
    pool = BufferPool(1 << 20, budget=4 << 20)
    big = [pool.take(1 << 20) for _ in range(4)]
    for b in big:
        pool.give(b)
    assert pool.held == 4 << 20
    # records shrink: the free 1 MiB buffers make way for 256 KiB ones
    small = [pool.take(100_000) for _ in range(8)]
    assert pool.held <= 4 << 20
    assert pool.held == 8 * (256 << 10) + 2 * (1 << 20)
    # buffers in use are never dropped: past the budget, new ones are still made
    more = [pool.take(1 << 20) for _ in range(4)]
    assert len(more) == 4 and pool.held > 4 << 20
    assert len(small) == 8


def test_a_buffer_not_from_the_pool_is_refused() -> None:
    pool = BufferPool(1 << 20, budget=4 << 20)
    with pytest.raises(ValueError, match="not a buffer of this pool's"):
        pool.give(memoryview(bytearray(12345)))
    with pytest.raises(ValueError, match="not a buffer of this pool's"):
        pool.give(memoryview(bytes(64 << 10)))
