"""The per-link Noise KK handshake: length-framed messages, bound to the session by the
prologue; the same on a punched link and on the tunnel."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import trio

from holepunch_mig.errors import HandshakeError
from holepunch_mig.session.options import Role
from holepunch_mig.wire.noise import HandshakeState

NOISE_PATTERN = "KK"
PROLOGUE_LABEL = b"holepunch_mig/1\x00"
MAX_HANDSHAKE_MESSAGE = 1024
LINK_PAYLOAD = struct.Struct(">II")  # round, link id
_FRAME = struct.Struct(">H")


def prologue(session_id: bytes, offer: bytes, answer: bytes, binding: bytes = b"") -> bytes:
    """Binds every handshake to this session, to both sides' exact offers and, when the
    control channel was authenticated by the control handshake, to that handshake's hash
    (``binding``): a key swapped between two control sessions cannot work."""
    return (
        PROLOGUE_LABEL
        + session_id
        + hashlib.sha256(offer).digest()
        + hashlib.sha256(answer).digest()
        + binding
    )


async def _send_hs(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(_FRAME.pack(len(data)) + data)


async def _receive_exact(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise HandshakeError(f"link closed during the handshake after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _receive_hs(stream: trio.SocketStream) -> bytes:
    (length,) = _FRAME.unpack(await _receive_exact(stream, _FRAME.size))
    if not 0 < length <= MAX_HANDSHAKE_MESSAGE:
        raise HandshakeError(
            f"handshake message length {length} out of range 1-{MAX_HANDSHAKE_MESSAGE}"
        )
    return await _receive_exact(stream, length)


def make_authenticator(
    role: Role,
    round_no: int,
    static_private: bytes,
    remote_public: bytes,
    pro: bytes,
    seen: set[int] | None = None,
) -> Any:
    """The per-link Noise KK handshake; the source always initiates.  Returns
    ``(link id, send key, recv key, handshake hash)``.

    In KK the responder completes the handshake of a *replayed* message 1 as well (that
    message proves the initiator's key, not that it is fresh), so the responder's side
    of a link is not yet proof of anything: it counts only once the source nominates it
    by its handshake hash (``rounds``).  ``seen`` (responder) holds the link ids
    already answered in this negotiation; a repeated one -- a replay -- is refused
    before message 2, so it can never take the genuine link's place."""
    answered = set() if seen is None else seen

    async def initiate(stream: trio.SocketStream, link_id: int) -> tuple[int, bytes, bytes, bytes]:
        hs = HandshakeState(NOISE_PATTERN, True, pro, s=static_private, rs=remote_public)
        await _send_hs(stream, hs.write_message(LINK_PAYLOAD.pack(round_no, link_id)))
        hs.read_message(await _receive_hs(stream))
        k1, k2 = hs.split()
        return link_id, k1, k2, hs.handshake_hash

    async def respond(stream: trio.SocketStream, _proposed: int) -> tuple[int, bytes, bytes, bytes]:
        hs = HandshakeState(NOISE_PATTERN, False, pro, s=static_private, rs=remote_public)
        payload = hs.read_message(await _receive_hs(stream))
        if len(payload) != LINK_PAYLOAD.size:
            raise HandshakeError(f"handshake payload of {len(payload)} bytes, expected 8")
        their_round, link_id = LINK_PAYLOAD.unpack(payload)
        if their_round != round_no:
            raise HandshakeError(f"handshake for round {their_round}, this is round {round_no}")
        if link_id in answered:
            raise HandshakeError(f"duplicate link id {link_id} (a replayed first message)")
        answered.add(link_id)
        await _send_hs(stream, hs.write_message(b""))
        k1, k2 = hs.split()
        return link_id, k2, k1, hs.handshake_hash

    return initiate if role == "source" else respond
