"""Gathering: host candidates from the machine's interfaces, STUN answers, given ones."""

from __future__ import annotations

import ipaddress
from functools import partial

import pytest
import trio
from testsupport.stun import free_port

from holepunch_mig.errors import CandidateError
from holepunch_mig.net.gather import gather, host_candidates

# --------------------------------------------------------------------------- host


def _machine_has_non_loopback() -> bool:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            addr = ipaddress.ip_address(raw.split("%")[0])
            if not addr.is_loopback and not addr.is_link_local:
                return True
    return False


def test_host_candidates_loopback_only_on_request() -> None:
    plain = host_candidates(4000)
    assert all(not ipaddress.ip_address(c.host).is_loopback for c in plain)
    assert all(c.kind == "host" and c.port == 4000 for c in plain)
    if _machine_has_non_loopback():
        assert plain, "machine has a non-loopback address but no host candidate"
    with_lo = host_candidates(4000, include_loopback=True)
    assert "127.0.0.1" in {c.host for c in with_lo}
    assert {c.host for c in plain} < {c.host for c in with_lo}
    # loopback candidates rank last
    assert with_lo[-1].host in ("127.0.0.1", "::1")


def test_host_candidates_skip_link_local_and_optional_ipv6() -> None:
    cands = host_candidates(4000, include_loopback=True)
    assert not any(ipaddress.ip_address(c.host).is_link_local for c in cands if ":" in c.host)
    v4 = host_candidates(4000, include_loopback=True, ipv6=False)
    assert all(":" not in c.host for c in v4)
    assert len({c.priority for c in cands}) == len(cands)


def test_host_candidates_reject_bad_port() -> None:
    with pytest.raises(CandidateError, match="port 0"):
        host_candidates(0)


# --------------------------------------------------------------------------- gather


def test_gather_without_stun() -> None:
    cands, notes, nat = trio.run(
        lambda: gather(4000, given=[("203.0.113.5", 4000), ("203.0.113.5", 4000)])
    )
    assert nat == "unknown"  # no STUN: nothing known about the NAT
    assert cands[0].kind == "given" and cands[0].endpoint == ("203.0.113.5", 4000)
    assert len([c for c in cands if c.kind == "given"]) == 1
    prios = [c.priority for c in cands]
    assert prios == sorted(prios, reverse=True)
    assert len({c.endpoint for c in cands}) == len(cands)
    assert not [n for n in notes if "STUN" in n]


def test_gather_rejects_bad_given() -> None:
    with pytest.raises(CandidateError, match=r"given address 'host\.example'"):
        trio.run(lambda: gather(4000, given=[("host.example", 1)]))
    with pytest.raises(CandidateError, match="given port 0"):
        trio.run(lambda: gather(4000, given=[("192.0.2.1", 0)]))


def test_gather_with_coturn(coturn: tuple[str, int]) -> None:
    port = free_port()
    dead = ("127.0.0.1", free_port())
    cands, notes, nat = trio.run(
        lambda: gather(
            port,
            stun_servers=[coturn, dead],
            include_loopback=True,
            stun_timeout=2.0,
        )
    )
    # coturn on loopback maps 127.0.0.1:port to itself, which is already a host candidate:
    # deduplicated, the host (higher priority) wins.
    lo = [c for c in cands if c.endpoint == ("127.0.0.1", port)]
    assert len(lo) == 1 and lo[0].kind == "host"
    assert nat == "none"  # the mapped address is our own: no NAT
    assert f"STUN {coturn[0]}:{coturn[1]}: mapped to 127.0.0.1:{port}" in notes
    assert any(n.startswith(f"STUN 127.0.0.1:{dead[1]} failed:") and "refused" in n for n in notes)


def test_gather_queries_stun_servers_concurrently() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def main() -> tuple[float, list[tuple[str, int]], list[str]]:
        async with trio.open_nursery() as nursery:
            servers = []
            for _ in range(3):
                serve = partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
                listeners = await nursery.start(serve)
                servers.append(("127.0.0.1", listeners[0].socket.getsockname()[1]))
            start = trio.current_time()
            _cands, notes, _nat = await gather(free_port(), stun_servers=servers, stun_timeout=0.5)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
        return elapsed, servers, notes

    elapsed, servers, notes = trio.run(main)
    assert elapsed < 1.2, f"3 silent servers x 0.5 s took {elapsed:.2f} s: not concurrent"
    # one note per server, in the order of stun_servers whatever order they finished in
    assert [n for n in notes if "failed" in n] == [
        f"STUN {h}:{p} failed: no answer within 0.5 s (waiting for the answer)" for h, p in servers
    ]
