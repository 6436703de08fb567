"""Gathering our own candidates: local interface addresses and STUN over TCP.

The lines, rules and priorities are ``wire.candidates``; this module asks the machine
(``ifaddr``) and STUN servers (trio) for the addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import ifaddr
import trio

from holepunch_mig.errors import CandidateError, StunError
from holepunch_mig.net.stun import stun_binding_tcp
from holepunch_mig.wire.candidates import Candidate, check_port, dedupe_and_sort, make_candidate
from holepunch_mig.wire.endpoints import format_endpoint

__all__ = ["gather", "host_candidates"]


def _interface_addresses(include_loopback: bool, ipv6: bool) -> list[str]:
    v4: list[str] = []
    v6: list[str] = []
    loop: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                addr = ipaddress.ip_address(str(raw).split("%")[0])
            except ValueError:
                continue
            if addr.version == 6 and (not ipv6 or addr.is_link_local):
                continue
            if addr.is_unspecified or addr.is_multicast or addr.is_link_local:
                continue
            text = str(addr)
            if addr.is_loopback:
                if include_loopback:
                    loop.append(text)
            elif addr.version == 4:
                v4.append(text)
            else:
                v6.append(text)
    out: list[str] = []
    for text in v4 + v6 + loop:
        if text not in out:
            out.append(text)
    return out


def host_candidates(
    port: int, *, include_loopback: bool = False, ipv6: bool = True
) -> list[Candidate]:
    """Host candidates for ``port`` on every local interface address (via ifaddr).

    Skips link-local IPv6 (fe80::/10), and loopback unless ``include_loopback``.
    Order (and priority): IPv4, then IPv6, then loopback.
    """
    check_port(port, "host candidate port")
    addrs = _interface_addresses(include_loopback, ipv6)
    return [
        make_candidate(a, port, "host", other_pref=max(0, 4095 - i)) for i, a in enumerate(addrs)
    ]


async def gather(
    port: int,
    *,
    stun_servers: Sequence[tuple[str, int]] = (),
    given: Sequence[tuple[str, int]] = (),
    include_loopback: bool = False,
    ipv6: bool = True,
    stun_timeout: float = 3.0,
) -> tuple[list[Candidate], list[str]]:
    """Gather our candidates for punch port ``port``.

    Host candidates from interfaces, server-reflexive ones from STUN over TCP sent from
    ``port`` (servers queried concurrently), and ``given`` ones.  Returns candidates
    deduplicated by (host, port) — the higher priority wins, e.g. a STUN answer equal to a
    host address stays ``host`` — sorted by priority descending, plus human-readable notes
    for the report.  Bad ``given`` entries raise :class:`CandidateError`; STUN failures
    only produce notes.
    """
    check_port(port, "punch port")
    notes: list[str] = []
    given_cands = [
        make_candidate(h, p, "given", other_pref=max(0, 8191 - i)) for i, (h, p) in enumerate(given)
    ]
    hosts = host_candidates(port, include_loopback=include_loopback, ipv6=ipv6)
    if not hosts:
        notes.append(
            "no usable interface addresses" + ("" if include_loopback else " (loopback excluded)")
        )
    answers: list[tuple[int, tuple[str, int], tuple[str, int] | str]] = []

    async def ask(index: int, server: tuple[str, int]) -> None:
        try:
            result: tuple[str, int] | str = await stun_binding_tcp(
                server, port, timeout=stun_timeout
            )
        except StunError as exc:
            result = str(exc)
        answers.append((index, server, result))

    async with trio.open_nursery() as nursery:
        for i, server in enumerate(stun_servers):
            if not ipv6 and _is_v6_literal(server[0]):
                notes.append(f"STUN {format_endpoint(*server)} skipped: IPv6 disabled")
                continue
            nursery.start_soon(ask, i, server)

    srflx: list[Candidate] = []
    for index, server, answer in sorted(answers, key=lambda a: a[0]):
        where = format_endpoint(*server)
        if isinstance(answer, str):
            # StunError messages name the server; say it once in the note.
            detail = answer.removeprefix(f"STUN server {where}").removeprefix(":").strip()
            notes.append(f"STUN {where} failed: {detail}")
            continue
        mhost, mport = answer
        try:
            cand = make_candidate(mhost, mport, "srflx", other_pref=max(0, 8191 - index))
        except CandidateError as exc:
            notes.append(f"STUN {where} answered an unusable address: {exc}")
            continue
        note = f"STUN {where}: mapped to {format_endpoint(mhost, mport)}"
        if mport != port:
            note += f" (port {port} not preserved: NAT rewrites ports)"
        notes.append(note)
        srflx.append(cand)
    distinct = {c.endpoint for c in srflx}
    if len(distinct) > 1:
        notes.append(
            "STUN servers saw different mappings "
            + ", ".join(format_endpoint(*e) for e in sorted(distinct))
            + ": NAT mapping looks endpoint-dependent (symmetric); punching may fail"
        )
    return dedupe_and_sort([*given_cands, *hosts, *srflx]), notes


def _is_v6_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
