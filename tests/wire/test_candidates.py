"""Candidate lines, endpoint parsing, observed candidates (gathering: tests/net)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holepunch_mig.errors import CandidateError
from holepunch_mig.wire.candidates import (
    MAX_LINE,
    Candidate,
    CandidateKind,
    make_candidate,
    observed_candidates,
    parse_endpoint,
    priority_for,
)

# --------------------------------------------------------------------------- lines

KIND_LIST: list[CandidateKind] = ["host", "srflx", "observed", "given"]


def _usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_unspecified or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip != ipaddress.IPv4Address("255.255.255.255") and not ip.is_link_local
    return not ip.is_link_local and ip.ipv4_mapped is None


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(_usable).map(str)
ice_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    kind = draw(st.sampled_from(KIND_LIST))
    foundation = "".join(draw(st.lists(ice_chars, min_size=1, max_size=31)))
    if kind == "given":
        foundation = "g" + foundation
    elif kind == "host":
        foundation = foundation.lstrip("g") or "0"
    return Candidate(
        host=draw(addresses),
        port=draw(st.integers(1, 65535)),
        kind=kind,
        priority=draw(st.integers(1, 2**31 - 1)),
        foundation=foundation,
    )


@settings(max_examples=400)
@given(candidates())
def test_line_round_trip(cand: Candidate) -> None:
    line = cand.to_line()
    assert len(line) <= MAX_LINE
    assert line.startswith("candidate:")
    assert " 1 tcp " in line and line.endswith(" tcptype so")
    assert Candidate.from_line(line) == cand
    # without the prefix too
    assert Candidate.from_line(line.removeprefix("candidate:")) == cand


def test_line_format_and_sdp_types() -> None:
    host = make_candidate("192.0.2.7", 5000, "host")
    assert host.to_line() == (
        f"candidate:{host.foundation} 1 tcp {host.priority} 192.0.2.7 5000 typ host tcptype so"
    )
    assert " typ host " in make_candidate("198.51.100.1", 1, "given").to_line()
    assert make_candidate("198.51.100.1", 1, "given").foundation.startswith("g")
    assert " typ prflx " in make_candidate("198.51.100.1", 1, "observed").to_line()
    assert " typ srflx " in make_candidate("2001:db8::1", 1, "srflx").to_line()


def test_priorities_follow_rfc6544_so_preferences() -> None:
    # type preference dominates: host/given (126) > prflx (110) > srflx (100)
    assert priority_for("host") >> 24 == 126
    assert priority_for("given") >> 24 == 126
    assert priority_for("observed") >> 24 == 110
    assert priority_for("srflx") >> 24 == 100
    # local preference: direction-pref for S-O is 2 (host types) and 6 (reflexive)
    assert (priority_for("host", 0) >> 8) & 0xFFFF == 2 << 13
    assert (priority_for("srflx", 0) >> 8) & 0xFFFF == 6 << 13
    assert priority_for("host", 5) & 0xFF == 255  # component 1
    assert all(1 <= priority_for(k) < 2**31 for k in KIND_LIST)


def test_from_line_accepts_foreign_lines() -> None:
    c = Candidate.from_line("candidate:abc 1 TCP 2105524479 10.0.0.1 9 typ host tcptype so")
    assert (c.host, c.port, c.kind, c.priority, c.foundation) == (
        "10.0.0.1",
        9,
        "host",
        2105524479,
        "abc",
    )
    c = Candidate.from_line(
        "1 1 tcp 1 203.0.113.9 4000 typ srflx raddr 0.0.0.0 rport 0 tcptype so generation 0"
    )
    assert c.kind == "srflx"
    assert Candidate.from_line("x 1 tcp 7 2001:DB8::1 1 typ prflx tcptype so").host == "2001:db8::1"
    with pytest.raises(CandidateError, match="IPv4-mapped"):  # one endpoint, one spelling
        Candidate.from_line("x 1 tcp 7 ::ffff:192.0.2.1 1 typ prflx tcptype so")
    assert Candidate.from_line("  candidate:x 1 tcp 7 192.0.2.1 1 typ host tcptype so\n").port == 1


GOOD = "candidate:abc 1 tcp 100 192.0.2.1 4000 typ host tcptype so"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (GOOD.replace(" tcp ", " udp "), "transport 'udp' is not tcp"),
        (GOOD.replace("tcptype so", "tcptype active"), "tcptype 'active' is not supported"),
        (GOOD.replace("tcptype so", "tcptype passive"), "tcptype 'passive' is not supported"),
        (GOOD.replace(" tcptype so", ""), "no tcptype"),
        (GOOD.replace("192.0.2.1", "example.com"), "not an IPv4/IPv6 literal"),
        (GOOD.replace("192.0.2.1", "3f2a.local"), "mDNS name"),
        (GOOD.replace("192.0.2.1", "fe80::1%eth0"), "scope id"),
        (GOOD.replace("192.0.2.1", "fe80::1"), "link-local"),
        (GOOD.replace("192.0.2.1", "0.0.0.0"), "unspecified"),
        (GOOD.replace("192.0.2.1", "224.0.0.1"), "multicast"),
        (GOOD.replace("192.0.2.1", "999.1.1.1"), "not an IPv4/IPv6 literal"),
        (GOOD.replace(" 4000 ", " 0 "), "port '0' is not an integer 1-65535"),
        (GOOD.replace(" 4000 ", " 70000 "), "port '70000' is not an integer 1-65535"),
        (GOOD.replace(" 4000 ", " -1 "), "port '-1'"),
        (GOOD.replace(" 4000 ", " 4_000 "), "port '4_000'"),
        (GOOD.replace(" 1 tcp", " 2 tcp"), "component '2' is not 1"),
        (GOOD.replace(" 100 ", " 0 "), "priority '0'"),
        (GOOD.replace(" 100 ", " 4294967295 "), "priority '4294967295'"),
        (GOOD.replace(" 100 ", " +100 "), "priority '+100'"),
        (GOOD.replace("typ host", "typ relay"), "relay candidates are not supported"),
        (GOOD.replace("typ host", "typ weird"), "type 'weird'"),
        (GOOD.replace("typ host", "type host"), "expected 'typ'"),
        (GOOD.replace("abc", "a-b"), "foundation 'a-b'"),
        (GOOD + " ufrag x", "attribute 'ufrag' is not supported"),
        (GOOD + " tcptype so", "'tcptype' appears twice"),
        (GOOD + " generation", "has no value"),
        (GOOD + " rport 99999", "rport '99999' is out of range"),
        (GOOD + " raddr host.example", "raddr"),
        ("candidate:abc 1 tcp 100 192.0.2.1", "missing fields"),
        ("candidate:", "missing fields"),
        ("", "missing fields"),
        ("garbage", "missing fields"),
        ("\x00\x01\x02 garbage \xff" * 3, "non-ASCII or control"),
        (GOOD.replace(" typ", "  typ"), "empty fields"),
        (GOOD + " generation " + "0" * 230, "too long"),
        ("x" * 300, "too long"),
    ],
)
def test_malformed_lines(line: str, message: str) -> None:
    with pytest.raises(CandidateError, match=None) as info:
        Candidate.from_line(line)
    assert message in str(info.value), str(info.value)


def test_from_line_rejects_non_str() -> None:
    with pytest.raises(CandidateError, match="must be str"):
        Candidate.from_line(b"candidate:x" * 2)  # type: ignore[arg-type]


def test_max_line_is_inclusive() -> None:
    head = "candidate:abc 1 tcp 100 192.0.2.1 4000 typ host tcptype so generation "
    ok = head + "1" * (MAX_LINE - len(head))
    assert len(ok) == MAX_LINE
    with pytest.raises(CandidateError, match=r"is not a number|too long") as info:
        Candidate.from_line(ok + "1")
    assert "too long" in str(info.value)
    # exactly MAX_LINE passes the length check (then fails generation, a digit run > 10)
    with pytest.raises(CandidateError, match="generation"):
        Candidate.from_line(ok)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "example.com"}, "not an IPv4/IPv6 literal"),
        ({"host": "2001:DB8::1"}, "canonical form"),
        ({"port": 0}, "out of range"),
        ({"port": True}, "out of range"),
        ({"priority": 0}, "priority"),
        ({"priority": 2**31}, "priority"),
        ({"kind": "relay"}, "kind 'relay'"),
        ({"foundation": ""}, "foundation"),
        ({"foundation": "gabc"}, "must not start with 'g'"),
        ({"kind": "given", "foundation": "abc"}, "must start with 'g'"),
    ],
)
def test_candidate_validates_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "host": "192.0.2.1",
        "port": 1,
        "kind": "host",
        "priority": 1,
        "foundation": "abc",
    }
    fields.update(kwargs)
    with pytest.raises(CandidateError) as info:
        Candidate(**fields)  # type: ignore[arg-type]
    assert message in str(info.value)


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:3478", ("192.0.2.1", 3478)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[2001:DB8:0::1]:1", ("2001:db8::1", 1)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("192.0.2.1", "no port"),
        ("192.0.2.1:", "is not a number"),
        ("192.0.2.1:0", "out of range"),
        ("192.0.2.1:65536", "out of range"),
        ("192.0.2.1:x", "is not a number"),
        (":3478", "no host"),
        ("2001:db8::1:3478", "[ADDRESS]:PORT"),
        ("[2001:db8::1:3478", "expected [IPV6]:PORT"),
        ("[192.0.2.1]:3478", "not an IPv6 literal"),
        ("stun.example.org:3478", "not an IPv4/IPv6 literal"),
        (" 192.0.2.1:1", "whitespace"),
        ("", "empty"),
        ("0.0.0.0:1", "unspecified"),
    ],
)
def test_parse_endpoint_rejects(text: str, message: str) -> None:
    with pytest.raises(CandidateError) as info:
        parse_endpoint(text)
    assert message in str(info.value)


def test_parse_endpoint_hostnames_only_on_request() -> None:
    assert parse_endpoint("stun.example.org:3478", allow_hostname=True) == (
        "stun.example.org",
        3478,
    )
    with pytest.raises(CandidateError, match="neither an IP literal nor a hostname"):
        parse_endpoint("bad_host!:3478", allow_hostname=True)
    with pytest.raises(CandidateError, match="unspecified"):
        parse_endpoint("0.0.0.0:1", allow_hostname=True)


# --------------------------------------------------------------------------- observed


def test_observed_candidates() -> None:
    assert observed_candidates(None, [1, 2]) == []
    got = observed_candidates("::ffff:198.51.100.4", [5000, 5001, 5000])
    assert [(c.host, c.port, c.kind) for c in got] == [
        ("198.51.100.4", 5000, "observed"),
        ("198.51.100.4", 5001, "observed"),
    ]
    assert got[0].priority > got[1].priority
    assert Candidate.from_line(got[0].to_line()) == got[0]
    with pytest.raises(CandidateError, match="not an IPv4/IPv6 literal"):
        observed_candidates("peer.example", [1])
    with pytest.raises(CandidateError, match="observed port 0"):
        observed_candidates("198.51.100.4", [0])
