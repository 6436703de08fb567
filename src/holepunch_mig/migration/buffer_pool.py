"""Plaintext buffers the mux reader decrypts DATA into, in size classes.

The reader learns a DATA record's length from its cleartext header before it decrypts,
so it can decrypt straight into a buffer of about that size and queue the buffer itself
for the stream's deliverer, which gives it back once written.  With one buffer size
for every record, a small record would pin a buffer many times its size (the window
bounds queued bytes, not records); copying small records out instead costs a fresh,
page-faulting allocation and a copy each, and most records are "small": QEMU's writes
reach the source proxy in pieces of its socket buffer (~200-300 KiB), not 1 MiB.

Classes four times apart keep every queued buffer at least a quarter full, so the
buffers in use hold at most four times the bytes queued; records below the smallest
class are copied by the caller (small allocations come from the heap, not fresh pages).
Free buffers of other classes are dropped when a new one would take the pool past its
budget, so a change in record sizes does not leave a pool of every size behind.
"""

from __future__ import annotations

import threading

__all__ = ["BufferPool"]

#: The smallest class: below it a record is cheaper to copy than to keep a buffer for.
SMALLEST = 64 << 10


class BufferPool:
    """Buffers of a few sizes; thread-safe (one reader takes, any deliverer gives back)."""

    def __init__(self, largest: int, *, budget: int, smallest: int = SMALLEST) -> None:
        if largest <= 0 or budget <= 0:
            raise ValueError("largest and budget must be positive")
        sizes: list[int] = []
        size = min(smallest, largest)
        while size < largest:
            sizes.append(size)
            size *= 4
        sizes.append(largest)
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.smallest = self.sizes[0]
        self._free: dict[int, list[bytearray]] = {s: [] for s in self.sizes}
        self._lock = threading.Lock()
        self._budget = budget
        self.held = 0
        """Bytes of the buffers this pool made and has not dropped (free or in use)."""
        self.made = 0
        """Buffers allocated so far (a pool that recycles well makes few)."""
        self.reused = 0
        """Takes served from a free buffer."""

    def size_for(self, n: int) -> int:
        """The class a record of ``n`` bytes (``smallest <= n <= largest``) goes into."""
        for size in self.sizes:
            if n <= size:
                return size
        raise ValueError(f"{n} bytes exceed the pool's largest buffer ({self.sizes[-1]})")

    def take(self, n: int) -> memoryview:
        """A buffer of at least ``n`` bytes (its class's size)."""
        size = self.size_for(n)
        with self._lock:
            free = self._free[size]
            if free:
                self.reused += 1
                return memoryview(free.pop())
            self._make_room(size)
            self.held += size
            self.made += 1
        return memoryview(bytearray(size))

    def give(self, view: memoryview) -> None:
        """Hand back (a view of) a buffer :meth:`take` gave out, once nothing refers to
        its bytes."""
        buf = view.obj
        if not isinstance(buf, bytearray) or len(buf) not in self._free:
            raise ValueError("not a buffer of this pool's")
        free = self._free[len(buf)]
        with self._lock:
            free.append(buf)

    def _make_room(self, size: int) -> None:
        # Under the lock: drop free buffers of other classes, largest first, while a new
        # one would exceed the budget.  Buffers in use are never counted out.
        for other in reversed(self.sizes):
            free = self._free[other]
            while other != size and free and self.held + size > self._budget:
                free.pop()
                self.held -= other
