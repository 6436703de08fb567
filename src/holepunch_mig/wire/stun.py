"""STUN Binding messages over TCP (RFC 5389/8489 framing, RFC 6544 usage), sans-IO.

Uses aioice's STUN message codec (``aioice.stun``): :func:`binding_request` builds a
request, :func:`stun_body_length` reads the 20-byte header (STUN over TCP needs no extra
framing: the header carries the body length), and :func:`parse_binding_response` checks
a whole response and returns the mapped address.  :func:`classify_mapping` (for
``doctor``) compares the mappings several servers saw for one local port.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aioice import stun as aiostun

from holepunch_mig.errors import StunError
from holepunch_mig.wire.endpoints import format_endpoint

HEADER_LENGTH: Final = aiostun.HEADER_LENGTH  # 20
MAGIC_COOKIE: Final = aiostun.COOKIE  # 0x2112A442
_HEADER = struct.Struct("!HHI12s")


def binding_request(transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """Return ``(wire bytes, transaction id)`` of a Binding request with FINGERPRINT."""
    if transaction_id is not None and len(transaction_id) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    msg = aiostun.Message(
        message_method=aiostun.Method.BINDING,
        message_class=aiostun.Class.REQUEST,
        transaction_id=transaction_id,
    )
    msg.add_fingerprint()
    return bytes(msg), msg.transaction_id


def stun_body_length(header: bytes, *, who: str = "peer") -> int:
    """Validate a 20-byte STUN header and return the body length that follows it.

    Raises :class:`StunError` if the bytes are not a STUN header (top two bits set, wrong
    magic cookie, or a length that is not a multiple of 4).
    """
    if len(header) != HEADER_LENGTH:
        raise ValueError("a STUN header is 20 bytes")
    mtype, length, cookie, _tid = _HEADER.unpack(header)
    if mtype & 0xC000 or cookie != MAGIC_COOKIE:
        raise StunError(
            f"{who} answered with something that is not a STUN message "
            f"(first bytes {header[:8].hex()}, {_printable(header[:8])!r})"
        )
    if length % 4:
        raise StunError(
            f"{who} sent a malformed STUN header: body length {length} is not a multiple of 4"
        )
    return int(length)


def parse_binding_response(
    data: bytes, transaction_id: bytes, *, who: str = "peer"
) -> tuple[str, int]:
    """Check a complete STUN message answering ``transaction_id``; return the mapped address.

    XOR-MAPPED-ADDRESS is preferred, MAPPED-ADDRESS is the RFC 3489 fallback.  Error
    responses, wrong transaction ids, other methods/classes and undecodable messages raise
    :class:`StunError` naming the problem.
    """
    body_len = stun_body_length(data[:HEADER_LENGTH], who=who) if len(data) >= HEADER_LENGTH else -1
    if body_len < 0 or len(data) != HEADER_LENGTH + body_len:
        raise StunError(f"{who} sent a truncated STUN message ({len(data)} bytes)")
    try:
        msg = aiostun.parse_message(data)
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
        raise StunError(f"{who} sent a malformed STUN message: {exc}") from None
    if msg.transaction_id != transaction_id:
        raise StunError(
            f"{who} answered with the wrong transaction id "
            f"({msg.transaction_id.hex()}, expected {transaction_id.hex()})"
        )
    if msg.message_method != aiostun.Method.BINDING:
        raise StunError(f"{who} answered with a {msg.message_method.name} message, not BINDING")
    if msg.message_class == aiostun.Class.ERROR:
        err = msg.attributes.get("ERROR-CODE")
        detail = f"{err[0]} {err[1]}".strip() if err else "without ERROR-CODE"
        raise StunError(f"{who} sent a Binding error response: {detail}")
    if msg.message_class != aiostun.Class.RESPONSE:
        raise StunError(f"{who} sent a Binding {msg.message_class.name.lower()}, not a response")
    addr: Any = msg.attributes.get("XOR-MAPPED-ADDRESS") or msg.attributes.get("MAPPED-ADDRESS")
    if addr is None:
        raise StunError(
            f"{who} sent a Binding response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"
        )
    host, port = str(addr[0]), int(addr[1])
    if not 1 <= port <= 65535:
        raise StunError(f"{who} reported an invalid mapped port {port}")
    return host, port


def _printable(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data)


MappingBehaviour = Literal["endpoint-independent", "endpoint-dependent", "unknown"]


@dataclass(frozen=True)
class MappingProbe:
    """Outcome of STUN bindings from one local port to several servers."""

    local_port: int
    results: tuple[tuple[tuple[str, int], tuple[str, int]], ...]
    """``(server, mapped address)`` for each server that answered."""
    errors: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class MappingVerdict:
    mapping: MappingBehaviour
    port_preserving: bool | None
    public_addresses: tuple[str, ...]
    explanation: str


def classify_mapping(probe: MappingProbe) -> MappingVerdict:
    """Classify NAT mapping behaviour (RFC 4787 terms) from a :class:`MappingProbe`.

    * endpoint-independent: every server saw the same mapped address and port (what TCP
      simultaneous open across NATs needs; default nft/iptables masquerade does this);
    * endpoint-dependent: servers saw different mappings (symmetric NAT: punching via the
      srflx candidate will not work);
    * unknown: fewer than two answers.

    ``port_preserving`` is whether every mapped port equals the local port (``None`` if
    no answers).  Distinct server *addresses* detect address-dependent mapping; distinct
    ports on one address only detect address-and-port-dependent mapping.
    """
    mapped = [m for _s, m in probe.results]
    addrs = tuple(sorted({h for h, _p in mapped}))
    if not mapped:
        return MappingVerdict("unknown", None, (), "no STUN server answered")
    preserving = all(p == probe.local_port for _h, p in mapped)
    if len(mapped) < 2:
        return MappingVerdict(
            "unknown",
            preserving,
            addrs,
            "only one STUN server answered; need two to compare mappings",
        )
    if len(set(mapped)) == 1:
        kind: MappingBehaviour = "endpoint-independent"
        why = f"all {len(mapped)} servers saw {format_endpoint(*mapped[0])}"
    else:
        kind = "endpoint-dependent"
        why = "servers saw different mappings: " + ", ".join(
            f"{format_endpoint(*s)} saw {format_endpoint(*m)}" for s, m in probe.results
        )
    if not preserving:
        why += f"; mapped port differs from local port {probe.local_port}"
    return MappingVerdict(kind, preserving, addrs, why)
