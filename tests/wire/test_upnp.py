"""The UPnP-IGD codec without sockets: SSDP, the device description, SOAP, and what a
hostile gateway (or a stranger on the LAN) can send."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holepunch_mig.wire.upnp import (
    MAX_DESCRIPTION,
    MAX_SOAP,
    HttpUrl,
    IgdService,
    MappingAttempt,
    UpnpError,
    add_port_mapping_request,
    check_url,
    delete_port_mapping_request,
    get_external_ip_request,
    http_get,
    msearch,
    next_attempt,
    parse_add_port_mapping,
    parse_description,
    parse_external_ip,
    parse_http_response,
    parse_soap_response,
    parse_specific_entry,
    parse_ssdp_response,
    response_complete,
    service_of,
)

GW = "10.1.0.1"
LOCATION = HttpUrl(GW, 40000, "/rootDesc.xml")

SSDP = (
    b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:1234::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
    b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.1.0.1:40000/rootDesc.xml\r\n\r\n"
)


def description(services: str, base: str = "") -> bytes:
    return (
        '<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">'
        f"{base}<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2"
        "</deviceType><deviceList><device><deviceList><device><serviceList>"
        f"{services}</serviceList></device></deviceList></device></deviceList></device></root>"
    ).encode()


def service(st_: str, url: str) -> str:
    return f"<service><serviceType>{st_}</serviceType><controlURL>{url}</controlURL></service>"


WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
PPP = "urn:schemas-upnp-org:service:WANPPPConnection:1"
SVC = IgdService(WANIP2, HttpUrl(GW, 40000, "/ctl/IPConn"))


def soap(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f"<s:Body>{inner}</s:Body></s:Envelope>"
    ).encode()


def fault(code: str, desc: str = "") -> bytes:
    return soap(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{desc}</errorDescription>"
        "</UPnPError></detail></s:Fault>"
    )


# -- SSDP -----------------------------------------------------------------------------


def test_msearch_is_a_well_formed_search() -> None:
    data = msearch()
    assert data.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'MAN: "ssdp:discover"\r\n' in data and b"MX: 1\r\n" in data
    assert b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n" in data
    assert data.endswith(b"\r\n\r\n")
    with pytest.raises(ValueError):
        msearch(mx=0)


def test_ssdp_answer_is_parsed() -> None:
    got = parse_ssdp_response(SSDP, GW)
    assert got.location == LOCATION
    assert got.st.endswith("InternetGatewayDevice:1") and got.usn.startswith("uuid:1234")
    assert "MiniUPnPd" in got.server


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (SSDP.replace(b"200 OK", b"404 Not Found"), "status"),
        (SSDP.replace(b"\r\n\r\n", b"\r\n"), "blank line"),
        (SSDP.replace(b"LOCATION", b"X-LOC"), "without LOCATION"),
        (SSDP.replace(b"USN:", b"USX:"), "without USN"),
        (SSDP.replace(b"EXT:", b"\xff\xfe:"), "not ASCII"),
        (SSDP.replace(b"EXT:", b"EXT"), "malformed"),
        (SSDP + b"x" * 3000, "bytes"),
    ],
)
def test_bad_ssdp_answers_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(UpnpError, match=why):
        parse_ssdp_response(data, GW)


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("http://10.1.0.9:40000/rootDesc.xml", "not at the gateway"),  # another host
        ("http://169.254.169.254/latest/meta-data/", "not at the gateway"),  # cloud metadata
        ("https://10.1.0.1:40000/rootDesc.xml", "only http://"),
        ("file:///etc/passwd", "only http://"),
        ("http://router.lan:40000/rootDesc.xml", "not a name"),
        ("http://admin:pw@10.1.0.1:40000/", "user info"),
        ("http://10.1.0.1:99999/", "malformed"),
        ("http://10.1.0.1:40000/a b", "spaces or control"),
    ],
)
def test_location_elsewhere_is_refused_ssrf(location: str, why: str) -> None:
    data = SSDP.replace(b"http://10.1.0.1:40000/rootDesc.xml", location.encode())
    with pytest.raises(UpnpError, match=why):
        parse_ssdp_response(data, GW)


def test_a_public_answerer_is_refused() -> None:
    """A LOCATION on the public address that answered is still no LAN gateway."""
    data = SSDP.replace(b"10.1.0.1", b"8.8.8.8")
    with pytest.raises(UpnpError, match="not a private or link-local"):
        parse_ssdp_response(data, "8.8.8.8")
    data = SSDP.replace(b"10.1.0.1", b"127.0.0.1")
    with pytest.raises(UpnpError, match="not a private or link-local"):
        parse_ssdp_response(data, "127.0.0.1")


def test_link_local_gateway_is_accepted() -> None:
    assert check_url("http://169.254.1.1:5000/d.xml", "169.254.1.1") == HttpUrl(
        "169.254.1.1", 5000, "/d.xml"
    )
    assert check_url("http://10.1.0.1/", GW).port == 80


# -- HTTP -----------------------------------------------------------------------------


def test_http_get_and_responses() -> None:
    assert http_get(LOCATION).startswith(
        b"GET /rootDesc.xml HTTP/1.1\r\nHost: 10.1.0.1:40000\r\nConnection: close\r\n"
    )
    assert parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", 10) == (
        200,
        b"abc",
    )
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert parse_http_response(chunked, 10) == (200, b"abcde")
    assert parse_http_response(b"HTTP/1.0 500 Err\r\n\r\nbody", 10) == (500, b"body")


def test_response_complete_without_waiting_for_the_close() -> None:
    assert response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert not response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab")
    assert not response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n")
    assert not response_complete(b"HTTP/1.1 200 OK\r\n\r\nno length: read to the close")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert not response_complete(chunked) and response_complete(chunked + b"0\r\n\r\n")
    assert response_complete(b"HTTP/1.1 200 OK\r\n\xff\r\n\r\n")  # the parser says why


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", "refused"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "Content-Length says"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "not a number"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 11, "over 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\n", "refused"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not hex"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", "truncated"),
        (b"HTTP/1.1 200 OK\r\n", "ended before"),
        (b"SIP/2.0 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 2000 + b"\r\n", "header over"),
    ],
)
def test_bad_http_responses(data: bytes, why: str) -> None:
    with pytest.raises(UpnpError, match=why):
        parse_http_response(data, 10)


# -- the device description ---------------------------------------------------------


def test_description_prefers_wanip2_and_resolves_against_location() -> None:
    data = description(service(WANIP1, "/ctl/v1") + service(WANIP2, "/ctl/IPConn"))
    assert parse_description(data, LOCATION) == SVC
    ppp = parse_description(description(service(PPP, "ctl/ppp")), LOCATION)
    assert ppp == IgdService(PPP, HttpUrl(GW, 40000, "/ctl/ppp"))


def test_description_urlbase_is_used_and_checked() -> None:
    base = "<URLBase>http://10.1.0.1:5555/</URLBase>"
    got = parse_description(description(service(WANIP1, "/c"), base), LOCATION)
    assert got.control == HttpUrl(GW, 5555, "/c")
    evil = "<URLBase>http://10.9.9.9/</URLBase>"
    with pytest.raises(UpnpError, match="not at the gateway"):
        parse_description(description(service(WANIP1, "/c"), evil), LOCATION)


def test_absolute_control_url_elsewhere_is_refused() -> None:
    data = description(service(WANIP1, "http://192.168.7.7/admin/reset"))
    with pytest.raises(UpnpError, match="SSRF"):
        parse_description(data, LOCATION)


def test_description_without_a_mapping_service() -> None:
    data = description(service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3f"))
    with pytest.raises(UpnpError, match="no WANIPConnection or WANPPPConnection"):
        parse_description(data, LOCATION)


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><root>&lol2;</root>'
)
XXE = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><root>&x;</root>'


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (BILLION_LAUGHS, "DTD"),
        (XXE, "DTD"),
        (BILLION_LAUGHS.decode().encode("utf-16"), "DTD"),  # an encoding does not hide it
        (b"<root>" * 40 + b"</root>" * 40, "deeper than"),
        (b"<root>" + b"<a/>" * 5000 + b"</root>", "elements"),
        (b"<root><device>", "not well-formed"),
        (b"", "not well-formed"),
        (b"<html><body>login</body></html>", "not <root>"),
        (b" " * (MAX_DESCRIPTION + 1), "refused"),
    ],
)
def test_hostile_descriptions_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(UpnpError, match=why):
        parse_description(data, LOCATION)


# -- SOAP -----------------------------------------------------------------------------


def test_soap_request_is_escaped_and_complete() -> None:
    data = add_port_mapping_request(
        SVC, MappingAttempt(45123, 300), "10.1.0.2", 45123, "holepunch_mig <a&b>"
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /ctl/IPConn HTTP/1.1\r\nHost: 10.1.0.1:40000\r\n")
    assert f'SOAPAction: "{WANIP2}#AddPortMapping"'.encode() in head
    assert f"Content-Length: {len(body)}".encode() in head
    for part in (
        b"<NewExternalPort>45123</NewExternalPort>",
        b"<NewProtocol>TCP</NewProtocol>",
        b"<NewInternalClient>10.1.0.2</NewInternalClient>",
        b"<NewLeaseDuration>300</NewLeaseDuration>",
        b"<NewPortMappingDescription>holepunch_mig &lt;a&amp;b&gt;</NewPortMappingDescription>",
    ):
        assert part in body
    with pytest.raises(ValueError):
        add_port_mapping_request(SVC, MappingAttempt(1, 0), "not-an-ip", 1, "x")
    assert b"<NewExternalPort>45123</NewExternalPort>" in delete_port_mapping_request(SVC, 45123)
    assert b"#GetExternalIPAddress" in get_external_ip_request(SVC)


def test_external_ip_and_mapping_answers() -> None:
    ok = soap(
        f'<u:GetExternalIPAddressResponse xmlns:u="{WANIP2}">'
        "<NewExternalIPAddress>198.51.100.10</NewExternalIPAddress>"
        "</u:GetExternalIPAddressResponse>"
    )
    assert parse_external_ip(200, ok) == "198.51.100.10"
    empty = ok.replace(b"198.51.100.10", b"")
    with pytest.raises(UpnpError, match="not an IPv4 address"):
        parse_external_ip(200, empty)
    with pytest.raises(UpnpError, match="unusable"):
        parse_external_ip(200, ok.replace(b"198.51.100.10", b"0.0.0.0"))
    added = soap(f'<u:AddPortMappingResponse xmlns:u="{WANIP2}"/>')
    mapping = parse_add_port_mapping(
        200, added, MappingAttempt(45123, 300), 45123, "198.51.100.10", SVC
    )
    assert (mapping.protocol, mapping.external_port, mapping.lifetime) == ("upnp-igd", 45123, 300)
    assert service_of(mapping) == SVC
    with pytest.raises(UpnpError, match="not <AddPortMappingResponse>"):
        parse_add_port_mapping(200, ok, MappingAttempt(1, 0), 1, "198.51.100.10", SVC)
    with pytest.raises(UpnpError, match="HTTP 500 without a SOAP fault"):
        parse_soap_response(500, added, "AddPortMapping")


@pytest.mark.parametrize(
    ("code", "name"),
    [("718", "ConflictInMappingEntry"), ("725", "OnlyPermanentLeasesSupported"),
     ("606", "ActionNotAuthorized"), ("799", "unknown error")],
)  # fmt: skip
def test_faults_name_the_upnp_error(code: str, name: str) -> None:
    with pytest.raises(UpnpError, match=f"UPnP error {code} {name} \\(why\\)") as info:
        parse_soap_response(500, fault(code, "why"), "AddPortMapping")
    assert info.value.code == int(code) and info.value.description == "why"


def test_malformed_faults() -> None:
    with pytest.raises(UpnpError, match="error code 'x1'") as info:
        parse_soap_response(500, fault("x1"), "AddPortMapping")
    assert info.value.code is None
    with pytest.raises(UpnpError, match="without a UPnP error"):
        parse_soap_response(500, soap("<s:Fault><faultcode>s:Client</faultcode></s:Fault>"), "A")
    with pytest.raises(UpnpError, match="not a SOAP envelope"):
        parse_soap_response(200, b"<Envelope/>", "A")
    with pytest.raises(UpnpError, match="empty SOAP body"):
        parse_soap_response(200, soap(""), "A")
    with pytest.raises(UpnpError, match="refused"):
        parse_soap_response(200, b" " * (MAX_SOAP + 1), "A")


def test_specific_entry_714_means_gone() -> None:
    assert parse_specific_entry(500, fault("714", "NoSuchEntryInArray")) is None
    entry = soap(
        f'<u:GetSpecificPortMappingEntryResponse xmlns:u="{WANIP2}"><NewInternalPort>45123'
        "</NewInternalPort><NewInternalClient>10.1.0.2</NewInternalClient>"
        "</u:GetSpecificPortMappingEntryResponse>"
    )
    assert parse_specific_entry(200, entry) == {
        "NewInternalPort": "45123",
        "NewInternalClient": "10.1.0.2",
    }
    with pytest.raises(UpnpError, match="606"):
        parse_specific_entry(500, fault("606"))


def test_retry_plan() -> None:
    rng = random.Random(1)
    first = MappingAttempt(45123, 300)
    conflict = UpnpError("c", code=718)
    second = next_attempt(first, conflict, rng)
    assert second.lease == 300 and second.number == 2 and second.external_port != 45123
    assert 1024 <= second.external_port <= 65535
    permanent = next_attempt(first, UpnpError("p", code=725), rng)
    assert permanent == MappingAttempt(45123, 0, 2)
    with pytest.raises(UpnpError, match="p"):  # lease 0 already: final
        next_attempt(permanent, UpnpError("p", code=725), rng)
    with pytest.raises(UpnpError, match="no"):
        next_attempt(first, UpnpError("no", code=606), rng)
    with pytest.raises(UpnpError, match="after 4 attempts"):
        next_attempt(MappingAttempt(1, 300, 4), conflict, rng)


# -- properties: any bytes give a value or UpnpError ---------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_every_parser_fails_only_with_upnp_error(data: bytes) -> None:
    for call in (
        lambda: parse_ssdp_response(data, GW),
        lambda: parse_http_response(data, 1000),
        lambda: parse_description(data, LOCATION),
        lambda: parse_soap_response(500, data, "AddPortMapping"),
        lambda: parse_external_ip(200, data),
        lambda: parse_specific_entry(200, data),
    ):
        with contextlib.suppress(UpnpError):
            call()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SSDP)), st.binary(max_size=40))
def test_mutated_ssdp_answers(at: int, junk: bytes) -> None:
    data = SSDP[:at] + junk + SSDP[at:]
    try:
        got = parse_ssdp_response(data, GW)
    except UpnpError:
        return
    assert got.location.host == GW  # whatever got through still points at the gateway
