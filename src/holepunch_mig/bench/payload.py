"""The payload every throughput row moves, and the sink that checks it on arrival.

A 1 MiB random pattern whose every 1 MiB chunk starts with its own index, so the
receiver sees drops, duplicates and reordering as the bytes arrive, without holding a
copy: fast and wrong must fail.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from typing import Any

from holepunch_mig.wire.digests import Algorithm, new_hash

__all__ = ["CHUNK", "CheckingSink", "PatternSource", "expected_sha256"]

CHUNK = 1 << 20
_STAMP = struct.Struct(">Q")


def _address(view: memoryview) -> int:
    """Address of a writable contiguous buffer (for the GIL-free memmove)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class PatternSource:
    """``readinto`` yields ``total`` bytes: a fixed 1 MiB random pattern, the first 8
    bytes of chunk k (offset k * CHUNK) replaced by k as u64 BE.  Content does not affect
    AES or TCP speed; the stamps make drops, duplicates and reordering visible.

    The copy is a ctypes memmove, which releases the GIL like a real source's
    ``readinto`` (a file, QEMU's socket) does, instead of a slice assignment holding it."""

    def __init__(self, total: int, seed: bytes) -> None:
        self.total = total
        self.pos = 0
        self._pattern = bytearray(hashlib.shake_256(seed).digest(CHUNK))
        self.pattern = memoryview(self._pattern)
        self._pattern_addr = _address(self.pattern)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self.total - self.pos)
        done = 0
        while done < n:
            pos = self.pos + done
            k, off = divmod(pos, CHUNK)
            take = min(n - done, CHUNK - off)
            if take >= 4096 and not view.readonly:
                ctypes.memmove(_address(view[done:]), self._pattern_addr + off, take)
            else:
                view[done : done + take] = self.pattern[off : off + take]
            if off < _STAMP.size:  # (part of) the stamp of chunk k is in this piece
                stamp = _STAMP.pack(k)[off : min(_STAMP.size, off + take)]
                view[done : done + len(stamp)] = stamp
            done += take
        self.pos += n
        return n

    # Seekable like the file a migration manager would send (resume re-reads from an
    # offset instead of keeping a replay copy of every byte, as it must for a pipe).
    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or not 0 <= offset <= self.total:
            raise ValueError(f"PatternSource.seek({offset}, {whence}): absolute 0..total only")
        self.pos = offset
        return self.pos


def expected_sha256(total: int, seed: bytes, algorithm: Algorithm = "sha256") -> str:
    """The digest (SHA-256 unless ``algorithm`` says otherwise) of what a
    PatternSource(total, seed) yields, computed independently of any transport."""
    src = PatternSource(total, seed)
    buf = memoryview(bytearray(CHUNK))
    h = new_hash(algorithm)
    while True:
        n = src.readinto(buf)
        if not n:
            hexdigest: str = h.hexdigest()
            return hexdigest
        h.update(buf[:n])


class CheckingSink:
    """``write`` checks every chunk stamp and the last byte of every chunk against the
    pattern as the bytes arrive, counts them, and with ``full_hash`` hashes them all."""

    def __init__(
        self, seed: bytes, *, full_hash: bool = False, algorithm: Algorithm = "sha256"
    ) -> None:
        self.pattern = hashlib.shake_256(seed).digest(CHUNK)
        self.pos = 0
        self.bad: str | None = None
        self.hash = new_hash(algorithm) if full_hash else None

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        pos = self.pos
        if self.hash is not None:
            self.hash.update(view)
        if self.bad is None and n:
            for k in range(pos // CHUNK, (pos + n - 1) // CHUNK + 1):
                base = k * CHUNK
                lo, hi = max(pos, base), min(pos + n, base + _STAMP.size)
                if lo < hi and view[lo - pos : hi - pos] != _STAMP.pack(k)[lo - base : hi - base]:
                    self.bad = f"chunk stamp at offset {base} is wrong (dropped/reordered data)"
                    break
                last = base + CHUNK - 1
                if pos <= last < pos + n and view[last - pos] != self.pattern[-1]:
                    self.bad = f"byte at offset {last} is wrong"
                    break
        self.pos = pos + n
        return n

    def flush(self) -> None:
        """Nothing is buffered; resumable receives flush at every acknowledgement."""
