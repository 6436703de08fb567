"""Exception hierarchy: every failure a caller can see has its own class and a message
that names what was wrong, so a migration manager can branch on type, not on text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from holepunch_mig.report import Report


class HolepunchError(Exception):
    """Base class for every error raised by holepunch_mig.

    ``report`` carries the session report when the failure happened after the offer, so
    a caller can see every pair that was tried without parsing the message.
    """

    report: Report | None = None


class ProtocolError(HolepunchError):
    """A control message or frame broke the wire format (see docs/protocol.md)."""


class FlowControlError(ProtocolError):
    """The peer sent more than the window it was granted: it ignores flow control (the
    tunnel's credit, the multiplexer's per-stream window)."""


class ChannelClosed(HolepunchError):
    """The control channel ended (peer vanished or closed it) while a message was expected."""


class ControlTimeout(HolepunchError):
    """The peer did not send the expected control message before the deadline."""


class CandidateError(HolepunchError):
    """A candidate line could not be parsed or is not usable (wrong transport, bad address)."""


class StunError(HolepunchError):
    """A STUN exchange failed: no answer, malformed answer, or an error response."""


class HandshakeError(HolepunchError):
    """A Noise handshake failed: wrong key, tampered message, or the peer is not who the
    offer said it would be."""


class RecordError(HolepunchError):
    """A bulk record failed authentication or violated the record layer's rules."""


class TruncatedStream(RecordError):
    """The link ended before the authenticated end-of-stream record."""


class NoDirectPath(HolepunchError):
    """No candidate pair produced an authenticated link within the allowed rounds."""

    def __init__(self, message: str, verdict: str | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict or message


class TransferError(HolepunchError):
    """A transfer ended without verification: byte count or digest mismatch, or peer abort."""


class CommitFailed(TransferError):
    """The destination verified the stream but could not commit its output (flush,
    fsync, rename, directory fsync, or the caller's commit step failed); it told the
    source ``ok: false`` with this reason."""


class PeerAbort(TransferError):
    """The peer reported a failure and stopped the session."""


class MuxError(HolepunchError):
    """The multiplexed migration link failed; every local connection was shut down."""


class MuxPeerAbort(MuxError, PeerAbort):
    """The peer of the multiplexed link sent ABORT."""


class MuxWindowExceeded(MuxError, FlowControlError):
    """The peer of the multiplexed link sent DATA beyond a stream's window (it ignored
    the ACKs), which would otherwise grow this side's memory with whatever it sends."""


class ResumeFailed(TransferError):
    """A stream transfer lost its link and could not resume it: the resume attempts were
    used up, a re-punch found no path, or the peer refused.  ``attempts`` is how many
    re-negotiations were made; the report's ``interruptions`` list each one."""

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


@contextmanager
def single_exception() -> Iterator[None]:
    """Unwrap a one-exception group from an internal nursery, so callers catch
    NoDirectPath, TransferError... (or see the bug) as raised, not as an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            only = group.exceptions[0]
            raise only from only.__cause__
        raise
