"""UPnP-IGD port mapping over the network: SSDP over UDP, HTTP/1.1 over TCP (thin driver).

The codec and every check of what the gateway sends are in :mod:`holepunch_mig.wire.upnp`;
this module only moves bytes, each step under the caller's deadline.  Only the default
gateway is believed: SSDP answers from any other address are ignored, and the codec
refuses URLs that leave it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket

import trio

from holepunch_mig.wire.portmap import PortMapping
from holepunch_mig.wire.upnp import (
    MAX_DESCRIPTION,
    MAX_HEADER,
    MAX_SOAP,
    MAX_SSDP,
    SSDP_ADDRESS,
    SSDP_PORT,
    HttpUrl,
    IgdService,
    MappingAttempt,
    UpnpError,
    add_port_mapping_request,
    delete_port_mapping_request,
    get_external_ip_request,
    get_specific_entry_request,
    http_get,
    msearch,
    next_attempt,
    parse_add_port_mapping,
    parse_delete_port_mapping,
    parse_description,
    parse_external_ip,
    parse_http_response,
    parse_specific_entry,
    parse_ssdp_response,
    response_complete,
    service_of,
)

__all__ = [
    "delete_upnp_mapping",
    "discover",
    "external_address",
    "request_upnp_mapping",
    "specific_entry",
]

logger = logging.getLogger("holepunch_mig")


async def _search(gateway: str, deadline: float) -> HttpUrl:
    """The description URL of the gateway's IGD: an M-SEARCH to the SSDP group and to
    the gateway itself (a unicast search is answered at once, a multicast one within
    MX seconds), repeated at 0.25 s, 0.5 s, ...; answers from elsewhere are ignored."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("0.0.0.0", 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        data = msearch()
        wait = 0.25
        last: UpnpError | None = None
        while True:
            for dest in ((gateway, SSDP_PORT), (SSDP_ADDRESS, SSDP_PORT)):
                # no multicast route, or the unicast port refused: the other may still work
                with contextlib.suppress(OSError):
                    await sock.sendto(data, dest)
            with trio.move_on_at(min(deadline, trio.current_time() + wait)):
                while True:
                    try:
                        answer, source = await sock.recvfrom(MAX_SSDP + 1)
                    except OSError:
                        continue  # ICMP port unreachable of the unicast search
                    if source[0] != gateway:
                        logger.debug("ignored an SSDP answer from %s (not the gateway)", source[0])
                        continue
                    try:
                        return parse_ssdp_response(answer, source[0]).location
                    except UpnpError as exc:
                        last = exc
            if trio.current_time() >= deadline:
                why = f" (its answer: {last})" if last else ""
                raise UpnpError(f"no UPnP-IGD answer to SSDP from the gateway {gateway}{why}")
            wait *= 2


async def _http(
    url: HttpUrl, request: bytes, limit: int, deadline: float
) -> tuple[int, bytes, str]:
    """Send ``request`` to ``url``'s host and read the whole response (the request says
    Connection: close); (status, body, our address on that connection)."""
    with trio.move_on_at(deadline) as scope:
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            raise UpnpError(f"cannot reach the gateway's UPnP server {url}: {exc}") from None
        async with stream:
            local = str(stream.socket.getsockname()[0])
            try:
                await stream.send_all(request)
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > limit + MAX_HEADER:
                        raise UpnpError(f"answer from {url} over {limit} bytes refused")
                    if response_complete(data):
                        break  # a server that keeps the connection open anyway
            except trio.BrokenResourceError as exc:
                raise UpnpError(f"the gateway's UPnP server {url} broke off: {exc}") from None
        status, body = parse_http_response(data, limit)
        return status, body, local
    assert scope.cancelled_caught
    raise UpnpError(f"the gateway's UPnP server {url} did not answer in time")


async def discover(gateway: str, deadline: float) -> IgdService:
    """The gateway's port-mapping service: SSDP, then its device description."""
    location = await _search(gateway, deadline)
    status, body, _local = await _http(location, http_get(location), MAX_DESCRIPTION, deadline)
    if status != 200:
        raise UpnpError(f"the gateway's device description {location} answered HTTP {status}")
    return parse_description(body, location)


async def external_address(service: IgdService, deadline: float) -> tuple[str, str]:
    """(the gateway's external IPv4 address, our address towards it)."""
    status, body, local = await _http(
        service.control, get_external_ip_request(service), MAX_SOAP, deadline
    )
    return parse_external_ip(status, body), local


async def request_upnp_mapping(
    service: IgdService,
    internal_port: int,
    lifetime: int,
    description: str,
    deadline: float,
    *,
    rng: random.Random | None = None,
) -> PortMapping:
    """AddPortMapping of TCP ``internal_port`` (external port the same, if free) to our
    own address, retried as :func:`wire.upnp.next_attempt` says (conflict: another port;
    only permanent leases: lease 0)."""
    rng = rng or random.Random()
    external_ip, local = await external_address(service, deadline)
    logger.debug("UPnP-IGD %s: mapping TCP %d for %s", service.control, internal_port, description)
    attempt = MappingAttempt(internal_port, lifetime)
    while True:
        request = add_port_mapping_request(service, attempt, local, internal_port, description)
        status, body, _local = await _http(service.control, request, MAX_SOAP, deadline)
        try:
            return parse_add_port_mapping(
                status, body, attempt, internal_port, external_ip, service
            )
        except UpnpError as exc:
            attempt = next_attempt(attempt, exc, rng)
            logger.info("UPnP AddPortMapping (%s): %s; trying %s", description, exc, attempt)


async def delete_upnp_mapping(mapping: PortMapping, deadline: float) -> None:
    """DeletePortMapping where the mapping was made (raises UpnpError when refused)."""
    service = service_of(mapping)
    request = delete_port_mapping_request(service, mapping.external_port)
    status, body, _local = await _http(service.control, request, MAX_SOAP, deadline)
    parse_delete_port_mapping(status, body)


async def specific_entry(
    service: IgdService, external_port: int, deadline: float
) -> dict[str, str] | None:
    """The gateway's entry for TCP ``external_port`` (None: no such mapping)."""
    request = get_specific_entry_request(service, external_port)
    status, body, _local = await _http(service.control, request, MAX_SOAP, deadline)
    return parse_specific_entry(status, body)
