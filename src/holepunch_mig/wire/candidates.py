"""Candidates: addresses a peer may reach us on, and their ICE candidate lines.

Kinds and how they appear in an ICE candidate line (RFC 5245 grammar, RFC 6544 TCP):

=========  ==============  ==================================================
kind       ``typ`` in line  meaning
=========  ==============  ==================================================
host       host            an address of a local interface
given      host            caller-supplied (port forward, known public IP);
                           marked by a foundation starting with ``g``
observed   prflx           the peer's address as the control connection shows
                           it + our announced port (crosses two port-preserving
                           NATs without STUN); peer-reflexive in ICE terms
srflx      srflx           what a STUN server saw (server-reflexive)
=========  ==============  ==================================================

Every line is component 1, transport ``tcp``, ``tcptype so`` (simultaneous open).  Our
own foundations are MD5 hex digests (``aioice.candidate.candidate_foundation``), which
never contain ``g``; ``given`` foundations are ``g`` + 31 hex digits, so the kind
survives a round trip through the line without extension attributes.

Priorities use ``aioice.candidate.candidate_priority`` with the RFC 6544 section 4.2
local preference ``(2**13) * direction_pref + other_pref``: direction_pref for S-O is 2
for host-type candidates and 6 for srflx/prflx; other_pref orders addresses of one kind
(given above host, interfaces in discovery order, IPv4 before IPv6, loopback last).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from aioice.candidate import Candidate as IceCandidate
from aioice.candidate import candidate_foundation, candidate_priority

from holepunch_mig.errors import CandidateError

__all__ = [
    "MAX_LINE",
    "Candidate",
    "CandidateKind",
    "check_port",
    "dedupe_and_sort",
    "make_candidate",
    "observed_candidates",
    "parse_endpoint",
]

CandidateKind = Literal["host", "srflx", "observed", "given"]
KINDS: Final = frozenset(get_args(CandidateKind))

MAX_LINE: Final = 256
"""Longest accepted candidate line, ``candidate:`` prefix included."""

_SDP_TYPE: Final[dict[str, str]] = {
    "host": "host",
    "given": "host",
    "observed": "prflx",
    "srflx": "srflx",
}
_DIRECTION_PREF_SO: Final[dict[str, int]] = {"host": 2, "given": 2, "observed": 6, "srflx": 6}
_MAX_PRIORITY: Final = 2**31 - 1
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{1,32}")
_DIGITS = re.compile(r"[0-9]{1,10}")
_PREFIX = "candidate:"
GIVEN_MARK: Final = "g"


# --------------------------------------------------------------------------- addresses


def _canonical_ip(text: str, what: str = "address") -> str:
    """Return the canonical text of a usable unicast IP literal, else CandidateError."""
    if "%" in text:
        raise CandidateError(f"{what} {text!r} has a scope id; scoped addresses are not usable")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if text.endswith(".local") or text.endswith(".local."):
            raise CandidateError(
                f"{what} {text!r} is an mDNS name; only IPv4/IPv6 literals are accepted"
            ) from None
        raise CandidateError(
            f"{what} {text!r} is not an IPv4/IPv6 literal (hostnames are not accepted)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        raise CandidateError(f"{what} {text!r} is the unspecified address")
    if ip.is_multicast:
        raise CandidateError(f"{what} {text!r} is a multicast address")
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        raise CandidateError(f"{what} {text!r} is the broadcast address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
        raise CandidateError(f"{what} {text!r} is link-local IPv6, unusable without a scope id")
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_link_local:
        raise CandidateError(f"{what} {text!r} is link-local IPv4 (169.254/16), not routable")
    return str(ip)


def _check_remote_address(text: str) -> None:
    """What a peer may not announce although this side accepts it in other places (the
    control connection's address): an IPv4-mapped IPv6 literal -- the IPv4 address is to
    be announced as such, so one endpoint has one spelling."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return  # _canonical_ip names what is wrong with it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise CandidateError(
            f"candidate address {text!r} is IPv4-mapped IPv6; announce {ip.ipv4_mapped} instead"
        )


def is_loopback_address(text: str) -> bool:
    """127/8, ::1 (and their IPv4-mapped spelling)."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_port(port: object, what: str = "port") -> int:
    """``port`` if it is a TCP port 1-65535, else CandidateError naming ``what``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CandidateError(f"{what} {port!r} is out of range 1-65535")
    return port


def parse_endpoint(text: str, *, allow_hostname: bool = False) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` into ``(host, port)``.

    HOST must be an IP literal unless ``allow_hostname`` (for ``--stun``: STUN servers
    are often names); a bare IPv6 literal without brackets is refused because its last
    group is ambiguous with a port.
    """
    if not isinstance(text, str) or not text or len(text) > 300:
        raise CandidateError(f"endpoint {text!r} is empty or too long")
    if text != text.strip():
        raise CandidateError(f"endpoint {text!r} has surrounding whitespace")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise CandidateError(f"endpoint {text!r}: expected [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError
        except ValueError:
            raise CandidateError(
                f"endpoint {text!r}: {host!r} inside brackets is not an IPv6 literal"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise CandidateError(f"endpoint {text!r} has no port; expected HOST:PORT")
        if ":" in host:
            raise CandidateError(f"endpoint {text!r}: write IPv6 endpoints as [ADDRESS]:PORT")
        if not host:
            raise CandidateError(f"endpoint {text!r} has no host; expected HOST:PORT")
    if not _DIGITS.fullmatch(port_text):
        raise CandidateError(f"endpoint {text!r}: port {port_text!r} is not a number")
    port = check_port(int(port_text), f"endpoint {text!r}: port")
    try:
        return _canonical_ip(host, f"endpoint {text!r}: host"), port
    except CandidateError:
        if not allow_hostname or _is_ip_like(host):
            raise
    if not _is_hostname(host):
        raise CandidateError(f"endpoint {text!r}: {host!r} is neither an IP literal nor a hostname")
    return host, port


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_hostname(host: str) -> bool:
    """RFC 1123 names, checked label by label (linear time: no nested quantifiers)."""
    if not 0 < len(host) <= 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def _is_ip_like(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- candidate


@dataclass(frozen=True)
class Candidate:
    """One candidate address.  Validated on construction (CandidateError)."""

    host: str
    port: int
    kind: CandidateKind
    priority: int
    foundation: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CandidateError(f"candidate kind {self.kind!r} is not one of {sorted(KINDS)}")
        canonical = _canonical_ip(self.host, "candidate address")
        if canonical != self.host:
            raise CandidateError(
                f"candidate address {self.host!r} is not in canonical form ({canonical!r})"
            )
        check_port(self.port, "candidate port")
        if (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or not 1 <= self.priority <= _MAX_PRIORITY
        ):
            raise CandidateError(f"candidate priority {self.priority!r} is out of range 1-2^31-1")
        if not isinstance(self.foundation, str) or not _ICE_CHARS.fullmatch(self.foundation):
            raise CandidateError(
                f"candidate foundation {self.foundation!r} must be 1-32 of A-Z a-z 0-9 + /"
            )
        if (self.kind == "given") != self.foundation.startswith(GIVEN_MARK) and self.kind in (
            "host",
            "given",
        ):
            raise CandidateError(
                f"a {self.kind} candidate's foundation "
                f"{'must' if self.kind == 'given' else 'must not'} start with {GIVEN_MARK!r}"
                f" (got {self.foundation!r})"
            )

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def sdp_type(self) -> str:
        return _SDP_TYPE[self.kind]

    def to_ice(self) -> IceCandidate:
        return IceCandidate(
            foundation=self.foundation,
            component=1,
            transport="tcp",
            priority=self.priority,
            host=self.host,
            port=self.port,
            type=self.sdp_type,
            tcptype="so",
        )

    def to_line(self) -> str:
        """``candidate:<foundation> 1 tcp <priority> <ip> <port> typ <type> tcptype so``."""
        return _PREFIX + self.to_ice().to_sdp()

    @classmethod
    def from_line(cls, line: str) -> Candidate:
        """Parse a candidate line (``candidate:`` prefix optional); strict.

        Requires component 1, transport tcp, ``tcptype so``, typ host/srflx/prflx, an IP
        literal (no hostnames, no mDNS ``.local``), port 1-65535, a priority 1..2^31-1, at
        most :data:`MAX_LINE` characters, and no attributes beyond raddr/rport/tcptype/
        generation.  Anything else raises :class:`CandidateError` naming the problem.
        """
        if not isinstance(line, str):
            raise CandidateError(f"candidate line must be str, not {type(line).__name__}")
        if len(line) > MAX_LINE:
            raise CandidateError(
                f"candidate line is too long ({len(line)} > {MAX_LINE} characters)"
            )
        body = line.strip()  # a trailing newline from a line-oriented source is fine
        if not body.isascii() or not body.isprintable():
            raise CandidateError(
                f"candidate line {line!r} contains non-ASCII or control characters"
            )
        if body.lower().startswith(_PREFIX):
            body = body[len(_PREFIX) :]
        bits = body.split(" ") if body else []
        if "" in bits:
            raise CandidateError(f"candidate line {line!r} has empty fields (extra spaces)")
        if len(bits) < 8:
            raise CandidateError(
                f"candidate line {line!r} is missing fields: expected "
                "'<foundation> <component> <transport> <priority> <address> <port> typ <type>'"
            )
        if (len(bits) - 8) % 2:
            raise CandidateError(f"candidate line {line!r}: attribute {bits[-1]!r} has no value")
        foundation, component, transport, priority, host, port, typ_kw, typ = bits[:8]
        if not _ICE_CHARS.fullmatch(foundation):
            raise CandidateError(f"candidate foundation {foundation!r} is not 1-32 ice-chars")
        if component != "1":
            raise CandidateError(f"candidate component {component!r} is not 1")
        if transport.lower() != "tcp":
            raise CandidateError(f"candidate transport {transport!r} is not tcp")
        if not _DIGITS.fullmatch(priority) or not 1 <= int(priority) <= _MAX_PRIORITY:
            raise CandidateError(f"candidate priority {priority!r} is not an integer 1-2^31-1")
        _check_remote_address(host)
        address = _canonical_ip(host, "candidate address")
        if not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise CandidateError(f"candidate port {port!r} is not an integer 1-65535")
        if typ_kw != "typ":
            raise CandidateError(f"candidate line {line!r}: expected 'typ' but found {typ_kw!r}")
        attrs: dict[str, str] = {}
        for i in range(8, len(bits), 2):
            name, value = bits[i], bits[i + 1]
            if name not in ("raddr", "rport", "tcptype", "generation"):
                raise CandidateError(f"candidate attribute {name!r} is not supported")
            if name in attrs:
                raise CandidateError(f"candidate attribute {name!r} appears twice")
            attrs[name] = value
        tcptype = attrs.get("tcptype")
        if tcptype is None:
            raise CandidateError("candidate has no tcptype; only 'tcptype so' is supported")
        if tcptype != "so":
            raise CandidateError(
                f"candidate tcptype {tcptype!r} is not supported; only 'so' (simultaneous open)"
            )
        if "raddr" in attrs and attrs["raddr"] not in ("0.0.0.0", "::"):
            _canonical_ip(attrs["raddr"], "candidate raddr")
        for name in ("rport", "generation"):
            if name in attrs and not _DIGITS.fullmatch(attrs[name]):
                raise CandidateError(f"candidate {name} {attrs[name]!r} is not a number")
        if "rport" in attrs and int(attrs["rport"]) > 65535:
            raise CandidateError(f"candidate rport {attrs['rport']!r} is out of range 0-65535")
        # aioice does the generic field split; our checks above make it total.
        ice = IceCandidate.from_sdp(body)
        kind: CandidateKind
        if typ == "host":
            kind = "given" if foundation.startswith(GIVEN_MARK) else "host"
        elif typ == "srflx":
            kind = "srflx"
        elif typ == "prflx":
            kind = "observed"
        elif typ == "relay":
            raise CandidateError("relay candidates are not supported (no TURN)")
        else:
            raise CandidateError(f"candidate type {typ!r} is not host, srflx or prflx")
        return cls(
            host=address,
            port=int(ice.port),
            kind=kind,
            priority=int(ice.priority),
            foundation=str(ice.foundation),
        )


def priority_for(kind: CandidateKind, other_pref: int = 8191) -> int:
    """ICE priority of a TCP S-O candidate of ``kind`` (RFC 5245 4.1.2.1, RFC 6544 4.2)."""
    if not 0 <= other_pref <= 8191:
        raise ValueError("other_pref is 0-8191")
    local_pref = (1 << 13) * _DIRECTION_PREF_SO[kind] + other_pref
    return int(candidate_priority(1, _SDP_TYPE[kind], local_pref))


def foundation_for(kind: CandidateKind, base: str) -> str:
    """Foundation per RFC 5245 4.1.1.3 (aioice's MD5); ``given`` gets the ``g`` mark."""
    f = str(candidate_foundation(_SDP_TYPE[kind], "tcp", base))
    return GIVEN_MARK + f[1:] if kind == "given" else f


def make_candidate(
    host: str, port: int, kind: CandidateKind, *, other_pref: int = 8191, base: str | None = None
) -> Candidate:
    """Build a candidate with computed priority and foundation; validates ``host``/``port``."""
    address = _canonical_ip(host, f"{kind} address")
    check_port(port, f"{kind} port")
    return Candidate(
        host=address,
        port=port,
        kind=kind,
        priority=priority_for(kind, other_pref),
        foundation=foundation_for(kind, base if base is not None else address),
    )


# --------------------------------------------------------------------------- filtering


def observed_candidates(peer_host: str | None, ports: Iterable[int]) -> list[Candidate]:
    """``observed`` candidates: ``peer_host`` (the peer's address as our control connection
    sees it, e.g. from ``SSH_CONNECTION``) paired with each announced port.

    Used for the *peer's* candidates: across two port-preserving NATs the peer's public
    address plus its punch port is where its SYNs come from.  ``None`` gives ``[]``.
    An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, common with dual-stack sshd) is
    turned into IPv4.
    """
    if peer_host is None:
        return []
    out: list[Candidate] = []
    seen: set[int] = set()
    for i, port in enumerate(ports):
        check_port(port, "observed port")
        if port in seen:
            continue
        seen.add(port)
        out.append(make_candidate(peer_host, port, "observed", other_pref=max(0, 8191 - i)))
    return out


def dedupe_and_sort(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Keep the highest-priority candidate per (host, port); sort by priority, descending."""
    best: dict[tuple[str, int], Candidate] = {}
    for c in candidates:
        cur = best.get(c.endpoint)
        if cur is None or c.priority > cur.priority:
            best[c.endpoint] = c
    return sorted(best.values(), key=lambda c: (-c.priority, c.host, c.port))
