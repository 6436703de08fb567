"""STUN Binding over TCP from the punch port: the client (the codec is ``wire.stun``).

:func:`stun_binding_tcp` sends one request from a chosen local port with
``SO_REUSEADDR`` + ``SO_REUSEPORT`` set, because the same port is also listening and
punching.  It closes with ``SO_LINGER`` 0 (an RST, no TIME_WAIT) so a later binding from
the same port to the same server is not refused with ``EADDRNOTAVAIL``.

:func:`probe_mapping` (for ``doctor``) asks several servers from one local port and
classifies the mappings they saw.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio

from holepunch_mig.errors import StunError
from holepunch_mig.wire.endpoints import format_endpoint
from holepunch_mig.wire.stun import (
    HEADER_LENGTH,
    MappingProbe,
    binding_request,
    classify_mapping,
    parse_binding_response,
    stun_body_length,
)


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
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else exc
        raise StunError(f"cannot resolve STUN server name {host!r}: {reason}") from None
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
    stage = "resolving the name"
    try:
        with trio.fail_after(timeout):
            family, sockaddr = await _resolve(server)
            stage = "connecting"
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
        if stage == "resolving the name":
            raise StunError(
                f"cannot resolve STUN server name {server[0]!r}: no DNS answer within {timeout:g} s"
            ) from None
        raise StunError(f"{who}: no answer within {timeout:g} s ({stage})") from None


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


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
