"""Exception hierarchy: every failure a caller can see has its own class and a message
that names what was wrong, so a migration manager can branch on type, not on text.

Every exception class of the package is defined here, grouped by the layer that raises
it, so this base module stays importable from every layer.  Two exceptions carry a
result type of an upper layer and so live beside it, still subclassing these:
``MigrationError`` (holepunch_mig.migration.common, carries the MigrationReport) and
``MigrationFailed`` (holepunch_mig.migration.qemu, a QemuError carrying QEMU's result)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
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


class ControlAuthError(HolepunchError):
    """The control channel could not be authenticated: a key file, peers file, psk or
    pairing code is unusable, or the peer did not prove the identity or secret this side
    was told to expect.  Nothing of the session ran over such a channel."""


class CredentialError(ControlAuthError):
    """A key file, peers file, psk file or pairing code is malformed or unsafe (the
    message names the file, the line and what is wrong)."""


class UnknownPeer(ControlAuthError):
    """The peer proved a static key that is not among the pinned ones."""


class ControlRejected(ControlAuthError):
    """The peer refused the control handshake and said why (its text, escaped)."""


class PairingFailed(ControlAuthError):
    """A pairing code was wrong, used up, already used or expired."""


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


class ResumeFailed(TransferError):
    """A stream transfer lost its link and could not resume it: the resume attempts were
    used up, a re-punch found no path, or the peer refused.  ``attempts`` is how many
    re-negotiations were made; the report's ``interruptions`` list each one."""

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


# -- wire: Noise ---------------------------------------------------------------------------


class DecryptError(HandshakeError):
    """A CipherState failed to authenticate a ciphertext (wrong key, nonce, AD or tampering)."""


class NonceExhausted(HandshakeError):
    """A CipherState reached the reserved nonce 2**64-1; the key must not be used further."""


# -- wire: records -------------------------------------------------------------------------


class RecordAuthError(RecordError):
    """A record failed AEAD authentication: tampered, replayed, reordered, dropped or
    encrypted under another key."""


class RecordTooLarge(RecordError):
    """A record's length field exceeds the maximum record size."""


class StreamMismatch(RecordError, TransferError):
    """The END record's byte count or digest disagrees with what actually arrived."""


class PeerAborted(RecordError, PeerAbort):
    """The peer sent an ABORT record; ``reason`` is its UTF-8 explanation."""

    def __init__(self, message: str, stream: int, reason: str) -> None:
        super().__init__(message)
        self.stream = stream
        self.reason = reason


# -- net: tunnel ---------------------------------------------------------------------------


class TunnelRefused(NoDirectPath):
    """The policies of the two sides do not allow the tunnel (for example the source asked
    for ``auto`` or ``tunnel`` and the destination's policy is ``direct``)."""


class TunnelClosed(ChannelClosed):
    """The tunnel stopped (closed locally, or its control channel ended)."""


# -- session: signals inside a transfer's threads (never reach a caller) -------------------


class Interrupted(Exception):
    """Raised inside the sender's reader when the link was declared lost."""


class InputFailed(Exception):
    """The sender's own input failed (not the link): never resumed."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.error = exc


class OutputFailed(Exception):
    """The destination's own output failed (not the link): never resumed."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.error = exc


# -- session: resume state machine ---------------------------------------------------------


class IllegalTransition(RuntimeError):
    """The driver reported an event the transfer's state does not allow (a bug)."""

    def __init__(self, state: Enum, event: Enum) -> None:
        super().__init__(f"resume: {event.value} is not allowed in state {state.value}")
        self.state = state
        self.event = event


# -- migration -----------------------------------------------------------------------------


class ProxyError(HolepunchError):
    """The local migration socket could not be set up or connected."""


class ManagerAbort(HolepunchError):
    """Raised inside the proxy when the manager called ``abort()``."""


class MuxError(HolepunchError):
    """The multiplexed link failed; every local connection was shut down."""


class MuxPeerAbort(MuxError, PeerAbort):
    """The peer sent ABORT."""


class LibvirtMissing(HolepunchError):
    """The libvirt Python binding is not installed (the ``libvirt`` extra)."""


class MuxWindowExceeded(MuxError, FlowControlError):
    """The peer of the multiplexed link sent DATA beyond a stream's window (it ignored
    the ACKs), which would otherwise grow this side's memory with whatever it sends."""


class QemuError(HolepunchError):
    """QEMU could not be started, died, or a migration failed or timed out."""


class QmpError(HolepunchError):
    """QMP failed: the command returned an error, the socket closed, or a deadline passed.

    ``error_class`` and ``desc`` carry QEMU's error class (e.g. ``GenericError``) and
    description when QEMU answered with an error; both are ``None`` for transport
    failures.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        error_class: str | None = None,
        desc: str | None = None,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class HandoffRefused(HolepunchError):
    """Handoff mode cannot carry this migration (multifd on, no punched socket, the
    destination QEMU not waiting with ``-incoming defer``, or the peer runs mux mode)."""


# -- lab -----------------------------------------------------------------------------------


class LabError(HolepunchError):
    """The lab could not be built, used or torn down (message says what and why)."""


class LabUnsupported(LabError, NotImplementedError):
    """The spec asks for something the lab does not implement (e.g. ``rtt_ms`` above
    :data:`MAX_RTT_MS`)."""


class ProxyNotReady(LabError, RuntimeError):
    """A lab migration's source proxy exited (or said something else) instead of
    ``ready URI``; the message carries its verdict when its report has one."""


class DelayError(OSError):
    """The queue could not be bound or a netlink request failed."""


# -- bench ---------------------------------------------------------------------------------


class BenchError(Exception):
    """A measurement failed: a side crashed, timed out, or the payload did not verify."""


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
