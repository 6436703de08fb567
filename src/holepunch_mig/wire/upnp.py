"""UPnP-IGD port mapping without I/O: SSDP search, the device description, SOAP actions.

A home router that speaks neither PCP nor NAT-PMP often speaks UPnP's Internet Gateway
Device protocol: SSDP (HTTP-over-UDP multicast) finds it, its device description (XML
over HTTP) names the WANIPConnection (or WANPPPConnection) service's control URL, and
SOAP calls there map a port.  This module builds every request and checks every answer;
:mod:`holepunch_mig.net.upnp` moves the bytes.

Everything the gateway sends is untrusted: sizes are bounded (:data:`MAX_DESCRIPTION`,
:data:`MAX_SOAP`), XML with a DTD or entity declarations is refused before it can
expand, and only ``http://`` URLs on the private or link-local address that answered
SSDP are followed (a LOCATION elsewhere would make us fetch arbitrary URLs: SSRF).  Every
malformed answer raises :class:`UpnpError` saying what was wrong.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urljoin, urlsplit
from xml.parsers import expat
from xml.sax.saxutils import escape

from holepunch_mig.wire.portmap import PortMapError, PortMapping

SSDP_ADDRESS: Final = "239.255.255.250"
SSDP_PORT: Final = 1900
SEARCH_TARGET: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
"""What we search for; gateways of every IGD version answer a search for version 1."""

#: The services that can map a port, most preferred first.
SERVICE_TYPES: Final = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)

MAX_SSDP: Final = 2048
"""Bytes of one SSDP answer we read (they are a few hundred)."""
MAX_HEADER: Final = 8192
"""Bytes of an HTTP response header."""
MAX_DESCRIPTION: Final = 64 * 1024
"""Bytes of a device description body (miniupnpd's is about 4 KiB)."""
MAX_SOAP: Final = 16 * 1024
"""Bytes of a SOAP response body."""
MAX_DEPTH: Final = 32
MAX_ELEMENTS: Final = 4096
MAX_ATTEMPTS: Final = 4
"""AddPortMapping calls one mapping may take (conflicts and lease retries included)."""

_SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
_CONTROL_NS = "urn:schemas-upnp-org:control-1-0"

#: UPnP error codes of WANIPConnection (UPnP-gw-WANIPConnection v1/v2, section 2.5).
ERRORS: Final[dict[int, str]] = {
    401: "InvalidAction",
    402: "InvalidArgs",
    501: "ActionFailed",
    606: "ActionNotAuthorized",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    732: "WildCardNotPermittedInIntPort",
}
CONFLICT: Final = 718
PERMANENT_ONLY: Final = 725
SAME_PORT: Final = 724
NO_SUCH_ENTRY: Final = 714


class UpnpError(PortMapError):
    """A UPnP-IGD answer that is an error, malformed, or refused as unsafe.  ``code`` is
    the gateway's UPnP error code when it sent one (None otherwise)."""

    def __init__(self, message: str, *, code: int | None = None, description: str = "") -> None:
        super().__init__(message, code=code)
        self.description = description


# -- URLs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpUrl:
    """An ``http://`` URL on the gateway: host (an IPv4 literal), port, path with query."""

    host: str
    port: int
    path: str

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


def check_url(url: str, gateway: str) -> HttpUrl:
    """``url`` if it is safe to fetch: ``http://``, no user info, and its host the
    literal address ``gateway`` (the one that answered SSDP), itself private or
    link-local.  Anything else is refused: the gateway must not make us fetch elsewhere."""
    if len(url) > 1024:
        raise UpnpError(f"URL of {len(url)} characters refused (at most 1024)")
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in url):
        raise UpnpError(f"URL {url[:80]!r} has spaces or control characters; refused")
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise UpnpError(f"URL {url[:80]!r} is malformed: {exc}") from None
    if parts.scheme.lower() != "http":
        raise UpnpError(f"URL {url[:80]!r} refused: only http:// on the gateway is followed")
    if parts.username is not None or parts.password is not None:
        raise UpnpError(f"URL {url[:80]!r} refused: it carries user info")
    host = parts.hostname or ""
    try:
        addr = ipaddress.IPv4Address(host)
        gw = ipaddress.IPv4Address(gateway)
    except ValueError:
        raise UpnpError(
            f"URL {url[:80]!r} refused: its host must be the gateway's address {gateway}, "
            "not a name"
        ) from None
    if addr != gw:
        raise UpnpError(
            f"URL {url[:80]!r} refused: it points at {addr}, not at the gateway {gw} that "
            "answered (SSRF guard)"
        )
    if not (addr.is_private or addr.is_link_local) or addr.is_loopback or addr.is_unspecified:
        raise UpnpError(
            f"URL {url[:80]!r} refused: the gateway {gw} is not a private or link-local "
            "address, so it is not on our LAN"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return HttpUrl(str(addr), port, path)


# -- SSDP -----------------------------------------------------------------------------


def msearch(target: str = SEARCH_TARGET, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for ``target`` (answers within ``mx`` seconds)."""
    if not 1 <= mx <= 5:
        raise ValueError(f"MX {mx} out of range 1..5")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_ADDRESS}:{SSDP_PORT}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {target}\r\n"
        "\r\n"
    ).encode("ascii")


@dataclass(frozen=True)
class SsdpResponse:
    """A gateway's answer to our search: where its description is, and what it is."""

    location: HttpUrl
    st: str
    usn: str
    server: str = ""


def _header_lines(head: bytes, what: str) -> tuple[str, dict[str, str]]:
    """(status line, headers with lower-case names) of an HTTP-style header block."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise UpnpError(f"{what} header is not ASCII") from None
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise UpnpError(f"{what} header line {line[:60]!r} is malformed")
        headers[name.lower()] = value.strip()
    return lines[0], headers


def parse_ssdp_response(data: bytes, source: str) -> SsdpResponse:
    """An SSDP answer from ``source`` (the address it came from): ``HTTP/1.1 200``, with
    LOCATION (checked by :func:`check_url` against ``source``), ST and USN."""
    if len(data) > MAX_SSDP:
        raise UpnpError(f"SSDP answer of {len(data)} bytes (at most {MAX_SSDP})")
    head, sep, _rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise UpnpError("SSDP answer without the blank line that ends its header")
    status, headers = _header_lines(head, "SSDP answer")
    if status.split(" ")[:2] not in (["HTTP/1.1", "200"], ["HTTP/1.0", "200"]):
        raise UpnpError(f"SSDP answer status {status[:60]!r}, expected HTTP/1.1 200")
    for name in ("location", "st", "usn"):
        if not headers.get(name):
            raise UpnpError(f"SSDP answer without {name.upper()}")
    return SsdpResponse(
        check_url(headers["location"], source),
        headers["st"],
        headers["usn"],
        headers.get("server", "")[:200],
    )


# -- HTTP -----------------------------------------------------------------------------


def http_get(url: HttpUrl) -> bytes:
    """A GET request for ``url`` (the connection closes after the answer)."""
    return (
        f"GET {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        "Connection: close\r\nUser-Agent: holepunch_mig UPnP/1.1\r\n\r\n"
    ).encode("ascii")


def _dechunk(body: bytes, limit: int) -> bytes:
    out = b""
    rest = body
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise UpnpError("HTTP chunked body is truncated")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise UpnpError(f"HTTP chunk size {size_line[:20]!r} is not hex") from None
        if size < 0 or len(out) + size > limit:
            raise UpnpError(f"HTTP body over {limit} bytes refused")
        if size == 0:
            return out
        if len(rest) < size + 2 or rest[size : size + 2] != b"\r\n":
            raise UpnpError("HTTP chunked body is truncated")
        out += rest[:size]
        rest = rest[size + 2 :]


def response_complete(data: bytes) -> bool:
    """Whether ``data`` already holds a whole response that says its own length
    (Content-Length, or a chunked body's last chunk), so the reader need not wait for the
    server to close; False when unsure (the reader then reads to the close)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    try:
        _status, headers = _header_lines(head, "HTTP")
    except UpnpError:
        return True  # malformed: let the parser say so now
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return body.endswith(b"0\r\n\r\n")
    length = headers.get("content-length", "")
    return length.isdigit() and len(body) >= int(length)


def parse_http_response(data: bytes, limit: int) -> tuple[int, bytes]:
    """(status code, body) of a whole HTTP/1.x response (read until the server closed);
    a body over ``limit`` bytes is refused."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        if len(data) > MAX_HEADER:
            raise UpnpError(f"HTTP header over {MAX_HEADER} bytes refused")
        raise UpnpError("HTTP response ended before its header did")
    if len(head) > MAX_HEADER:
        raise UpnpError(f"HTTP header over {MAX_HEADER} bytes refused")
    status, headers = _header_lines(head, "HTTP")
    parts = status.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].isdigit():
        raise UpnpError(f"HTTP status line {status[:60]!r} is malformed")
    code = int(parts[1])
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return code, _dechunk(body, limit)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise UpnpError(f"HTTP Content-Length {length[:20]!r} is not a number")
        if int(length) > limit:
            raise UpnpError(f"HTTP body of {length} bytes refused (at most {limit})")
        if len(body) < int(length):
            raise UpnpError(f"HTTP body of {len(body)} bytes, Content-Length says {length}")
        body = body[: int(length)]
    if len(body) > limit:
        raise UpnpError(f"HTTP body over {limit} bytes refused")
    return code, body


# -- XML ------------------------------------------------------------------------------


@dataclass
class Element:
    """A parsed XML element: namespace URI, local name, text, children."""

    ns: str
    name: str
    text: str = ""
    children: list[Element] = field(default_factory=list)

    def child(self, name: str) -> Element | None:
        return next((c for c in self.children if c.name == name), None)

    def iter(self, name: str) -> list[Element]:
        out = [self] if self.name == name else []
        for c in self.children:
            out.extend(c.iter(name))
        return out


def parse_xml(data: bytes, limit: int, what: str) -> Element:
    """``data`` as a tree, refusing DTDs, entity declarations, deep or huge documents."""
    if len(data) > limit:
        raise UpnpError(f"{what} of {len(data)} bytes refused (at most {limit})")
    parser = expat.ParserCreate(namespace_separator=" ")
    stack: list[Element] = []
    root: list[Element] = []
    count = [0]

    def refuse_dtd(*_args: object) -> None:
        raise UpnpError(f"{what} has a DTD (<!DOCTYPE>); refused (entity expansion attack)")

    def refuse_entity(*_args: object) -> None:
        raise UpnpError(f"{what} declares entities; refused (entity expansion attack)")

    def start(tag: str, _attrs: dict[str, str]) -> None:
        count[0] += 1
        if count[0] > MAX_ELEMENTS or len(stack) >= MAX_DEPTH:
            raise UpnpError(
                f"{what} is deeper than {MAX_DEPTH} or has over {MAX_ELEMENTS} elements"
            )
        ns, _sp, name = tag.rpartition(" ")
        el = Element(ns, name)
        if stack:
            stack[-1].children.append(el)
        else:
            root.append(el)
        stack.append(el)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack and len(stack[-1].text) < 4096:
            stack[-1].text += text

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_entity  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise UpnpError(f"{what} is not well-formed XML: {exc}") from None
    except RecursionError:
        raise UpnpError(f"{what} is nested too deeply") from None
    if not root:
        raise UpnpError(f"{what} has no root element")
    return root[0]


# -- the device description -------------------------------------------------------------


@dataclass(frozen=True)
class IgdService:
    """The gateway's port-mapping service: its type and where to POST actions."""

    service_type: str
    control: HttpUrl


def parse_description(data: bytes, location: HttpUrl) -> IgdService:
    """The most preferred port-mapping service (:data:`SERVICE_TYPES`) of a device
    description fetched from ``location``; its control URL resolved against URLBase (or
    the location) and checked like the location."""
    root = parse_xml(data, MAX_DESCRIPTION, "device description")
    if root.name != "root":
        raise UpnpError(f"device description root element is <{root.name[:40]}>, not <root>")
    base_el = root.child("URLBase")
    base = base_el.text.strip() if base_el is not None and base_el.text.strip() else str(location)
    check_url(base, location.host)
    found: dict[str, str] = {}
    for svc in root.iter("service"):
        st_el, url_el = svc.child("serviceType"), svc.child("controlURL")
        if st_el is None or url_el is None:
            continue
        st = st_el.text.strip()
        if st in SERVICE_TYPES and st not in found and url_el.text.strip():
            found[st] = url_el.text.strip()
    for st in SERVICE_TYPES:
        if st in found:
            return IgdService(st, check_url(urljoin(base, found[st]), location.host))
    raise UpnpError(
        "the gateway's device description has no WANIPConnection or WANPPPConnection "
        "service: it cannot map ports over UPnP"
    )


# -- SOAP -----------------------------------------------------------------------------


def soap_request(service: IgdService, action: str, args: list[tuple[str, str]]) -> bytes:
    """The HTTP POST of SOAP ``action`` with ``args`` (names and values, escaped)."""
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_NS}" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{service.service_type}">{inner}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()
    url = service.control
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        'Content-Type: text/xml; charset="utf-8"\r\n'
        f"Content-Length: {len(body)}\r\n"
        f'SOAPAction: "{service.service_type}#{action}"\r\n'
        "Connection: close\r\nUser-Agent: holepunch_mig UPnP/1.1\r\n\r\n"
    ).encode("ascii")
    return head + body


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """The out-arguments of ``action``'s response; a SOAP fault raises
    :class:`UpnpError` with the UPnP error code and description."""
    root = parse_xml(body, MAX_SOAP, f"{action} response")
    if root.name != "Envelope" or root.ns != _SOAP_NS:
        raise UpnpError(f"{action} response is not a SOAP envelope (<{root.name[:40]}>)")
    soap_body = root.child("Body")
    if soap_body is None or not soap_body.children:
        raise UpnpError(f"{action} response has an empty SOAP body")
    first = soap_body.children[0]
    if first.name == "Fault":
        raise _fault(first, action, status)
    if status != 200:
        raise UpnpError(f"{action} answered HTTP {status} without a SOAP fault")
    if first.name != f"{action}Response":
        raise UpnpError(f"{action} answered with <{first.name[:40]}>, not <{action}Response>")
    return {c.name: c.text.strip() for c in first.children}


def _fault(fault: Element, action: str, status: int) -> UpnpError:
    errors = [e for e in fault.iter("UPnPError")]
    if not errors:
        return UpnpError(f"{action} failed (HTTP {status}): a SOAP fault without a UPnP error")
    code_el, desc_el = errors[0].child("errorCode"), errors[0].child("errorDescription")
    text = code_el.text.strip() if code_el is not None else ""
    if not text.isdigit() or len(text) > 6:
        return UpnpError(f"{action} failed: SOAP fault with error code {text[:20]!r}")
    code = int(text)
    desc = desc_el.text.strip()[:200] if desc_el is not None else ""
    name = ERRORS.get(code, "unknown error")
    return UpnpError(
        f"gateway refused {action}: UPnP error {code} {name}" + (f" ({desc})" if desc else ""),
        code=code,
        description=desc,
    )


# -- the actions we use ---------------------------------------------------------------


def get_external_ip_request(service: IgdService) -> bytes:
    return soap_request(service, "GetExternalIPAddress", [])


def parse_external_ip(status: int, body: bytes) -> str:
    """The gateway's external IPv4 address (an empty or unusable one is an error)."""
    out = parse_soap_response(status, body, "GetExternalIPAddress")
    text = out.get("NewExternalIPAddress", "")
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise UpnpError(
            f"gateway's external address {text[:40]!r} is not an IPv4 address (not connected?)"
        ) from None
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        raise UpnpError(f"gateway's external address {addr} is unusable")
    return str(addr)


@dataclass(frozen=True)
class MappingAttempt:
    """One AddPortMapping call: which external port, which lease (0: permanent)."""

    external_port: int
    lease: int
    number: int = 1


def add_port_mapping_request(
    service: IgdService,
    attempt: MappingAttempt,
    internal_client: str,
    internal_port: int,
    description: str,
) -> bytes:
    """AddPortMapping of TCP ``attempt.external_port`` to ``internal_client:internal_port``."""
    ipaddress.IPv4Address(internal_client)
    if not 1 <= internal_port <= 65535 or not 1 <= attempt.external_port <= 65535:
        raise ValueError("ports must be in 1..65535")
    return soap_request(
        service,
        "AddPortMapping",
        [
            ("NewRemoteHost", ""),
            ("NewExternalPort", str(attempt.external_port)),
            ("NewProtocol", "TCP"),
            ("NewInternalPort", str(internal_port)),
            ("NewInternalClient", internal_client),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", description[:64]),
            ("NewLeaseDuration", str(attempt.lease)),
        ],
    )


def parse_add_port_mapping(
    status: int,
    body: bytes,
    attempt: MappingAttempt,
    internal_port: int,
    external_ip: str,
    service: IgdService,
) -> PortMapping:
    """The mapping an AddPortMapping success grants (the protocol has no out-arguments:
    it is the port and lease we asked for)."""
    parse_soap_response(status, body, "AddPortMapping")
    return PortMapping(
        "upnp-igd",
        internal_port,
        external_ip,
        attempt.external_port,
        attempt.lease,
        0,
        control_url=str(service.control),
        service_type=service.service_type,
    )


def next_attempt(attempt: MappingAttempt, error: UpnpError, rng: random.Random) -> MappingAttempt:
    """What to try after ``error``: another external port on a conflict (718), lease 0
    when only permanent leases are allowed (725); anything else is final (re-raised)."""
    if attempt.number >= MAX_ATTEMPTS:
        raise UpnpError(f"{error} (after {attempt.number} attempts)", code=error.code)
    if error.code == CONFLICT:
        return MappingAttempt(rng.randint(1024, 65535), attempt.lease, attempt.number + 1)
    if error.code == PERMANENT_ONLY and attempt.lease != 0:
        return MappingAttempt(attempt.external_port, 0, attempt.number + 1)
    raise error


def delete_port_mapping_request(service: IgdService, external_port: int) -> bytes:
    return soap_request(
        service,
        "DeletePortMapping",
        [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP")],
    )


def parse_delete_port_mapping(status: int, body: bytes) -> None:
    parse_soap_response(status, body, "DeletePortMapping")


def get_specific_entry_request(service: IgdService, external_port: int) -> bytes:
    """GetSpecificPortMappingEntry of TCP ``external_port`` (to check a mapping exists)."""
    return soap_request(
        service,
        "GetSpecificPortMappingEntry",
        [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP")],
    )


def parse_specific_entry(status: int, body: bytes) -> dict[str, str] | None:
    """The entry's fields, or None when the gateway has no such entry (714)."""
    try:
        return parse_soap_response(status, body, "GetSpecificPortMappingEntry")
    except UpnpError as exc:
        if exc.code == NO_SUCH_ENTRY:
            return None
        raise


def service_of(mapping: PortMapping) -> IgdService:
    """The service a UPnP mapping was made on (to delete it there)."""
    if mapping.protocol != "upnp-igd":
        raise ValueError(f"a {mapping.protocol} mapping is no UPnP-IGD mapping")
    parts = urlsplit(mapping.control_url)
    return IgdService(mapping.service_type, check_url(mapping.control_url, parts.hostname or ""))
