"""STUN Binding over TCP from the punch port (RFC 5389/8489 framing, RFC 6544 usage).

The codec half is sans-IO and uses aioice's STUN message codec (``aioice.stun``):
:func:`binding_request` builds a request, :func:`stun_body_length` reads the 20-byte
header (STUN over TCP needs no extra framing: the header carries the body length), and
:func:`parse_binding_response` checks a whole response and returns the mapped address.

The I/O half, :func:`stun_binding_tcp`, sends one request from a chosen local port with
``SO_REUSEADDR`` + ``SO_REUSEPORT`` set, because the same port is also listening and
punching.  It closes with ``SO_LINGER`` 0 (an RST, no TIME_WAIT) so a later binding from
the same port to the same server is not refused with ``EADDRNOTAVAIL``.

:func:`probe_mapping` / :func:`classify_mapping` (for ``doctor``) compare the mappings
seen by several servers for one local port.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import trio
from aioice import stun as aiostun

from holepunch_mig.errors import StunError

HEADER_LENGTH: Final = aiostun.HEADER_LENGTH  # 20
MAGIC_COOKIE: Final = aiostun.COOKIE  # 0x2112A442
_HEADER = struct.Struct("!HHI12s")


# --------------------------------------------------------------------------- sans-IO


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


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- I/O


async def _recv_exactly(sock: trio.socket.SocketType, n: int, who: str, got: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise StunError(
                f"{who} closed the connection after {got + len(buf)} bytes of its answer"
                if got + len(buf)
                else f"{who} closed the connection without answering"
            )
        buf += chunk
    return bytes(buf)


async def _resolve(server: tuple[str, int]) -> tuple[int, tuple[Any, ...]]:
    host, port = server
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 6:
            return socket.AF_INET6, (str(ip), port, 0, 0)
        return socket.AF_INET, (str(ip), port)
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise StunError(f"cannot resolve STUN server {host!r}: {exc}") from None
    if not infos:
        raise StunError(f"cannot resolve STUN server {host!r}: no addresses")
    family, _t, _p, _c, sockaddr = infos[0]
    return int(family), tuple(sockaddr)


async def stun_binding_tcp(
    server: tuple[str, int],
    local_port: int,
    *,
    local_host: str = "0.0.0.0",
    timeout: float = 3.0,
) -> tuple[str, int]:
    """Ask ``server`` over TCP which address and port it sees for ``local_host:local_port``.

    Returns the XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS).  Every failure — bind error,
    refused or failed connect, timeout, garbage, wrong transaction id, error response —
    raises :class:`StunError` whose message names the server and what happened.
    ``local_port`` 0 lets the kernel choose.  For an IPv6 server the default
    ``local_host`` ``"0.0.0.0"`` is replaced by ``"::"``.
    """
    who = f"STUN server {format_endpoint(*server)}"
    if not 0 <= local_port <= 65535:
        raise StunError(f"local port {local_port} is out of range 0-65535")
    stage = "connecting"
    try:
        with trio.fail_after(timeout):
            family, sockaddr = await _resolve(server)
            if family == socket.AF_INET6 and local_host == "0.0.0.0":
                local_host = "::"
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    await sock.bind((local_host, local_port))
                except OSError as exc:
                    raise StunError(
                        f"cannot bind {format_endpoint(local_host, local_port)} for STUN "
                        f"to {format_endpoint(*server)}: {exc.strerror or exc}"
                    ) from None
                try:
                    try:
                        await sock.connect(sockaddr)
                    except OSError as exc:
                        if exc.errno == errno.ECONNREFUSED:
                            raise StunError(
                                f"{who} refused the TCP connection (nothing listening there?)"
                            ) from None
                        raise StunError(f"cannot connect to {who}: {exc.strerror or exc}") from None
                    request, tid = binding_request()
                    stage = "waiting for the answer"
                    await _send_all(sock, request)
                    header = await _recv_exactly(sock, HEADER_LENGTH, who, 0)
                    body_len = stun_body_length(header, who=who)
                    body = await _recv_exactly(sock, body_len, who, HEADER_LENGTH)
                    return parse_binding_response(header + body, tid, who=who)
                except OSError as exc:
                    raise StunError(f"{who}: {exc.strerror or exc} while {stage}") from None
                finally:
                    # Abortive close: no TIME_WAIT on (local_port, server), so the next
                    # binding from this port to this server can reuse the 4-tuple.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
    except trio.TooSlowError:
        raise StunError(f"{who}: no answer within {timeout:g} s ({stage})") from None


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# --------------------------------------------------------------------------- doctor

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


async def probe_mapping(
    servers: Sequence[tuple[str, int]],
    local_port: int,
    *,
    local_host: str = "0.0.0.0",
    timeout: float = 3.0,
) -> dict[str, Any]:
    """Bind from ``local_port`` to each server in turn and classify the mapping.

    Sequential on purpose: the same local port cannot hold two connections to the same
    server at once, and NAT behaviour is easier to read one binding at a time.  Returns a
    JSON-friendly dict: ``local_port``, ``mapping``, ``port_preserving``,
    ``public_addresses``, ``explanation``, ``results`` and ``errors``.
    """
    results: list[tuple[tuple[str, int], tuple[str, int]]] = []
    errors: list[str] = []
    for server in servers:
        try:
            mapped = await stun_binding_tcp(
                server, local_port, local_host=local_host, timeout=timeout
            )
        except StunError as exc:
            errors.append(str(exc))
        else:
            results.append((server, mapped))
    probe = MappingProbe(local_port, tuple(results), tuple(errors))
    verdict = classify_mapping(probe)
    return {
        "local_port": local_port,
        "mapping": verdict.mapping,
        "port_preserving": verdict.port_preserving,
        "public_addresses": list(verdict.public_addresses),
        "explanation": verdict.explanation,
        "results": [
            {"server": format_endpoint(*s), "mapped": format_endpoint(*m)} for s, m in results
        ],
        "errors": errors,
    }
