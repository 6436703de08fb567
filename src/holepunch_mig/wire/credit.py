"""Credit-based flow control of the fallback tunnel, sans-IO.

In the style of HTTP/2 and SSH windows: the receiver grants a window with a ``credit``
message when the tunnel opens and grants more in batches as it hands bytes on to the
link, never a reply per chunk; a sender never has more than the granted credit
outstanding, and a peer that sends beyond it breaks the protocol (ProtocolError).  Both
tunnel pumps (``net.tunnel``, ``net.tunnel_pump``) move bytes by these rules.
"""

from __future__ import annotations

from holepunch_mig.errors import FlowControlError, ProtocolError
from holepunch_mig.wire import messages

__all__ = [
    "DEFAULT_CREDIT_BATCH",
    "DEFAULT_WINDOW",
    "MAX_CHUNK",
    "ReceiveWindow",
    "SendCredit",
    "StreamWindow",
]

DEFAULT_WINDOW = 16 << 20
"""Bytes a receiver lets the sender have in flight; >= the bandwidth-delay product."""
DEFAULT_CREDIT_BATCH = 4 << 20
"""The receiver returns credit once this many bytes have been handed to the link."""
MAX_CHUNK = messages.MAX_MESSAGE - 1
"""Payload bytes of one TunnelData message (the kind byte takes the 65536th)."""

_CREDIT_MAX = 2**63 - 1


class SendCredit:
    """The sender's side of the window: how many bytes it may still send."""

    def __init__(self) -> None:
        self.available = 0
        self.granted_total = 0
        self.sent_total = 0

    def grant(self, n: int) -> None:
        if n <= 0:
            raise ProtocolError(f"credit message grants {n} bytes; a grant must be positive")
        if self.available + n > _CREDIT_MAX:
            raise ProtocolError(f"credit grant of {n} bytes overflows the window")
        self.available += n
        self.granted_total += n

    def take(self, limit: int) -> int:
        """How many bytes (at most ``limit``) may be sent now; 0 means wait for credit."""
        return min(limit, self.available)

    def spend(self, n: int) -> None:
        if n > self.available:
            raise ValueError(f"spending {n} bytes with only {self.available} of credit")
        self.available -= n
        self.sent_total += n


class ReceiveWindow:
    """The receiver's side: checks the peer stays inside the window, decides when to
    return credit (in batches of ``batch`` bytes, never per message)."""

    def __init__(self, window: int = DEFAULT_WINDOW, batch: int = DEFAULT_CREDIT_BATCH) -> None:
        if window < MAX_CHUNK:
            raise ValueError(f"tunnel window {window} is smaller than one chunk ({MAX_CHUNK})")
        if not 0 < batch <= window:
            raise ValueError(f"credit batch {batch} must be in 1..window ({window})")
        self.window = window
        self.batch = batch
        self.outstanding = 0
        """Bytes the peer may still send before it needs more credit."""
        self.buffered = 0
        """Bytes received and not yet handed to the link."""
        self.unreturned = 0
        """Bytes handed to the link whose credit has not been returned yet."""
        self.received_total = 0

    def initial_grant(self) -> int:
        """The first ``credit`` message's value: the whole window."""
        self.outstanding = self.window
        return self.window

    def on_data(self, n: int) -> None:
        """``n`` bytes of tunnel data arrived; raises if the peer overran its credit."""
        if n == 0:
            raise ProtocolError("empty tunnel data message")
        if n > self.outstanding:
            raise FlowControlError(
                f"peer sent {n} tunnel bytes with only {self.outstanding} bytes of credit "
                f"left (window {self.window}): it ignores flow control"
            )
        self.outstanding -= n
        self.buffered += n
        self.received_total += n

    def on_consumed(self, n: int) -> int:
        """``n`` buffered bytes were handed to the link; returns the credit to send now
        (0 = not yet)."""
        if n > self.buffered:
            raise ValueError(f"consumed {n} bytes but only {self.buffered} are buffered")
        self.buffered -= n
        self.unreturned += n
        if self.unreturned < self.batch:
            return 0
        grant, self.unreturned = self.unreturned, 0
        self.outstanding += grant
        return grant


class StreamWindow:
    """The receiving side of one multiplexed stream's window (docs/protocol.md section
    5): the peer may have at most ``window`` bytes of the stream unacknowledged; ACK
    records carry the bytes delivered so far.  Bytes beyond that are refused, so a peer
    that ignores the ACKs cannot grow this side's queue."""

    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError(f"stream window must be positive, got {window}")
        self.window = window
        self.received = 0
        """Bytes of the stream that arrived."""
        self.acked = 0
        """The highest count this side has put (or is putting) in an ACK."""

    def on_data(self, n: int) -> None:
        """``n`` bytes of DATA arrived; raises FlowControlError beyond the window."""
        if self.received + n - self.acked > self.window:
            raise FlowControlError(
                f"peer has {self.received + n - self.acked} bytes unacknowledged, beyond "
                f"the {self.window}-byte window: it ignores flow control"
            )
        self.received += n

    def ack_due(self, delivered: int, every: int) -> bool:
        """True (and the ACK counted) when ``delivered`` is ``every`` bytes past the last
        ACK: the caller sends ACK(``delivered``) now."""
        if delivered - self.acked < every:
            return False
        self.acked = delivered
        return True
