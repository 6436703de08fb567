"""Authentication of the resume negotiation (docs/protocol.md section 7.2), sans-IO.

A ``resume-offer`` introduces a fresh static key and fresh candidates for the next link
of the session; the control channel alone does not prove who sent it.  So both resume
messages carry a MAC under a key only the two ends of the session's last nominated link
hold: HKDF-SHA256 over that link's two Noise ``split()`` keys, with the session id as
salt.  A party that can write on the control channel but holds no link keys cannot
make either message, so it can neither splice a link of its own into the stream nor
move the resume offset.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from holepunch_mig.errors import ProtocolError

__all__ = ["RESUME_KEY_INFO", "check_resume_mac", "resume_key", "resume_mac"]

RESUME_KEY_INFO = b"holepunch_mig resume-mac v1"
_LABELS = {
    "resume-offer": b"holepunch_mig/1 resume-offer\x00",
    "resume-answer": b"holepunch_mig/1 resume-answer\x00",
}
_FIXED = struct.Struct(">16sQ32sHQH")  # session, epoch, key, port, bytes, candidate count
_LINE = struct.Struct(">H")


def resume_key(
    k_source_to_destination: bytes, k_destination_to_source: bytes, session: bytes
) -> bytes:
    """The MAC key of the resume messages that follow a link: HKDF-SHA256(ikm = both
    split keys, source -> destination first; salt = session id; info = label).  Secret."""
    if len(k_source_to_destination) != 32 or len(k_destination_to_source) != 32:
        raise ValueError("resume_key needs the two 32-byte split keys")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=RESUME_KEY_INFO)
    return hkdf.derive(k_source_to_destination + k_destination_to_source)


def _transcript(
    type_: str,
    session: str,
    epoch: int,
    key: str,
    port: int,
    candidates: Sequence[str],
    offset: int,
) -> bytes:
    parts = [
        _LABELS[type_],
        _FIXED.pack(
            bytes.fromhex(session), epoch, bytes.fromhex(key), port, offset, len(candidates)
        ),
    ]
    for line in candidates:
        raw = line.encode("utf-8")
        parts.append(_LINE.pack(len(raw)) + raw)
    return b"".join(parts)


def resume_mac(
    mac_key: bytes,
    type_: str,
    *,
    session: str,
    epoch: int,
    key: str,
    port: int,
    candidates: Sequence[str],
    offset: int = 0,
) -> str:
    """The ``mac`` field (hex) of a ``resume-offer`` (``offset`` 0) or ``resume-answer``
    (``offset`` = its ``bytes``)."""
    data = _transcript(type_, session, epoch, key, port, candidates, offset)
    return hmac.new(mac_key, data, hashlib.sha256).hexdigest()


def check_resume_mac(
    mac_key: bytes,
    type_: str,
    mac: str,
    *,
    session: str,
    epoch: int,
    key: str,
    port: int,
    candidates: Sequence[str],
    offset: int = 0,
) -> None:
    """Raise ProtocolError unless ``mac`` authenticates the message (constant time)."""
    want = resume_mac(
        mac_key,
        type_,
        session=session,
        epoch=epoch,
        key=key,
        port=port,
        candidates=candidates,
        offset=offset,
    )
    if not hmac.compare_digest(want, mac):
        raise ProtocolError(
            f"{type_} for epoch {epoch} is not authenticated by the session's last link "
            "(its mac does not verify): refusing to resume with it"
        )
