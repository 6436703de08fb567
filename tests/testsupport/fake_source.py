"""A source played by the test itself, over an in-memory control channel: offer, pings,
sync, its own Noise KK initiator and nomination, so a test can then misbehave in ways
the library's source never would."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import trio

from holepunch_mig.session.handshake import LINK_PAYLOAD, prologue
from holepunch_mig.testing import MemoryChannel
from holepunch_mig.wire import messages
from holepunch_mig.wire.noise import HandshakeState, generate_keypair


def bound(port: int) -> socket.socket:
    """A socket on 127.0.0.1:``port`` that may share it (like a punch port)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


@dataclass
class FakeLink:
    sock: socket.socket
    send_key: bytes
    recv_key: bytes


async def fake_source_link(control: MemoryChannel, *, resume: bool = False) -> FakeLink:
    """Negotiate one direct link with a library destination on loopback."""
    priv, pub = generate_keypair()
    holder = bound(0)
    port = holder.getsockname()[1]
    holder.close()
    session = os.urandom(16)
    limits = {"max_record": 1 << 20, **({"resume": 1} if resume else {})}
    offer = messages.encode(
        messages.Offer(
            session=session.hex(),
            key=pub.hex(),
            port=port,
            candidates=[f"candidate:1 1 tcp 1 127.0.0.1 {port} typ host tcptype so"],
            policy="direct",
            limits=limits,
        )
    )
    await control.send_message(offer)
    answer_raw = await control.receive_message()
    answer = messages.decode(answer_raw)
    assert isinstance(answer, messages.Answer)
    for seq in range(3):
        await control.send_message(messages.encode(messages.Ping(seq=seq)))
        await control.receive_message()
    await control.send_message(messages.encode(messages.Sync(round=1)))
    hs = HandshakeState(
        "KK", True, prologue(session, offer, answer_raw), s=priv, rs=bytes.fromhex(answer.key)
    )

    def punch() -> socket.socket:
        s = bound(port)
        s.connect(("127.0.0.1", answer.port))
        msg1 = hs.write_message(LINK_PAYLOAD.pack(1, 1))
        s.sendall(len(msg1).to_bytes(2, "big") + msg1)
        hs.read_message(recv_exact(s, int.from_bytes(recv_exact(s, 2), "big")))
        return s

    sock = await trio.to_thread.run_sync(punch)
    nominate = messages.Nominate(round=1, link=1, handshake=hs.handshake_hash.hex())
    await control.send_message(messages.encode(nominate))
    k1, k2 = hs.split()
    return FakeLink(sock, k1, k2)
