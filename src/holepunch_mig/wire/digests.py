"""The end-to-end digests of stream transfers: BLAKE3 (default when both sides have it)
and SHA-256 (for comparing with ``sha256sum``, and with peers without BLAKE3).

Measured on the 2-core bench machine with 1 MiB buffers: SHA-256 (OpenSSL, SHA-NI)
~2.0 GB/s per core, BLAKE3 (the ``blake3`` package, AVX-512, one thread) ~8 GB/s per core;
both release the GIL.  The record layer already hashes in a thread of its own, overlapped
with sealing and socket I/O, so the digest costs CPU, not latency: on a machine where
CPU is the bottleneck BLAKE3's quarter of SHA-256's cost is what keeps verification from
halving the rate.  BLAKE3's own multithreading (``max_threads``) is not used: the other
threads of the transfer already occupy the cores, and on 1 MiB updates it measured slower.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, Literal

Algorithm = Literal["blake3", "sha256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("blake3", "sha256")
DIGEST_SIZE: Final = 32
"""Both algorithms give 32 bytes, so END records and result messages are the same size."""

_blake3: Any
try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; a broken install falls back
    _blake3 = None


def blake3_available() -> bool:
    return _blake3 is not None


def new_hash(algorithm: Algorithm) -> Any:
    """A fresh hash object with ``update``, ``copy`` and ``digest`` (32 bytes)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        if _blake3 is None:
            raise ValueError("BLAKE3 is not available (install the blake3 package)")
        return _blake3.blake3()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def hexdigest(algorithm: str, data: bytes) -> str:
    """Hex digest of ``data`` with a report's ``digest`` algorithm ("sha256" when absent)."""
    h = new_hash("blake3" if algorithm == "blake3" else "sha256")
    h.update(data)
    out: str = h.hexdigest()
    return out


Preference = Literal["auto", "blake3", "sha256"]
PREFERENCES: Final[tuple[Preference, ...]] = ("auto", "blake3", "sha256")


def offers_blake3(preference: Preference) -> bool:
    """Whether this side announces BLAKE3 in its offer/answer ``limits``."""
    return preference != "sha256" and blake3_available()


def choose(preference: Preference, peer_offers_blake3: bool) -> Algorithm:
    """The session's digest from this side's preference and the peer's announcement:
    BLAKE3 when both announce it, else SHA-256.  Both sides compute the same answer from
    the same two announcements.  Raises ValueError when this side insists on BLAKE3 and
    the session cannot have it."""
    if offers_blake3(preference) and peer_offers_blake3:
        return "blake3"
    if preference == "blake3":
        why = (
            "this side lacks the blake3 package"
            if not blake3_available()
            else ("the peer does not offer it")
        )
        raise ValueError(f"digest blake3 was required but cannot be used: {why}")
    return "sha256"
