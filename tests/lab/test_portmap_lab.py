"""Router port mapping for real: Debian's miniupnpd (nftables backend) in a lab router,
our PCP and NAT-PMP client in the host behind it, and a transfer across two symmetric
NATs through the mapping, which is gone again afterwards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from testsupport.lab import require_netns

from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, presets
from holepunch_mig.net.keyfiles import pinned_pair
from holepunch_mig.net.portmap import (
    default_gateway,
    delete_mapping,
    probe_gateway,
    request_mapping,
)
from holepunch_mig.wire.portmap import PortMapping, Protocol

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


def _rules(lab: Lab) -> str:
    out = lab.run(
        "left-router",
        ["nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"],
        timeout=5,
        capture_output=True,
        check=True,
    )
    return out.stdout.decode()


def _in_left(lab: Lab, fn: Callable[[], object]) -> object:
    return lab.call_in_netns("left", lambda: trio.run(fn))  # type: ignore[arg-type]


def _lab(factory: Callable[[LabSpec | str], Lab], preset: str) -> Lab:
    require_netns(need=("turnserver", "miniupnpd"))
    return factory(preset)


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp"])
def test_map_and_delete_with_miniupnpd(
    lab_factory: Callable[[LabSpec | str], Lab], protocol: Protocol
) -> None:
    lab = _lab(lab_factory, "symmetric-pcp")
    assert lab.call_in_netns("left", default_gateway) == "10.1.0.1"

    async def grant() -> PortMapping:
        return await request_mapping(45123, 120, protocols=(protocol,), timeout=3.0)

    mapping = _in_left(lab, grant)
    assert isinstance(mapping, PortMapping)
    assert mapping.protocol == protocol
    assert (mapping.external_ip, mapping.external_port) == ("198.51.100.10", 45123)
    assert 60 <= mapping.lifetime <= 120
    assert "dnat ip to 10.1.0.2:45123" in _rules(lab)
    # the mapping is real: the public side reaches a listener on the host through it
    listener = lab.socket("left")
    with listener:
        listener.bind(("0.0.0.0", 45123))
        listener.listen(1)
        client = lab.socket("right")
        with client:
            client.settimeout(3.0)
            client.connect(("198.51.100.10", 45123))
            conn, _addr = listener.accept()
            conn.close()

    async def remove() -> None:
        await delete_mapping(mapping, timeout=3.0)

    _in_left(lab, remove)
    assert "dnat" not in _rules(lab)


def test_probe_reports_the_gateway(lab_factory: Callable[[LabSpec | str], Lab]) -> None:
    lab = _lab(lab_factory, "symmetric-pcp")

    async def probe() -> dict[str, object]:
        return await probe_gateway(timeout=2.0)

    found = _in_left(lab, probe)
    assert isinstance(found, dict)
    assert found["protocol"] == "pcp" and found["external_address"] == "198.51.100.10"
    # the right side's router runs no daemon: ICMP port unreachable, said at once
    right = lab.call_in_netns("right", lambda: trio.run(probe))
    assert isinstance(right, dict)
    assert right["protocol"] is None and "ICMP port unreachable" in str(right["detail"])


@pytest.mark.parametrize("rtt_ms", [0, 20])
def test_transfer_across_two_symmetric_nats_through_the_mapping(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path, rtt_ms: int
) -> None:
    """At 20 ms the mapped side's own SYN would leave before the peer's arrives: it must
    only accept, or its NAT holds the 4-tuple the router's DNAT needs."""
    require_netns(need=("turnserver", "miniupnpd", "iptables"))
    lab = lab_factory(replace(presets()["symmetric-symmetric-pcp"], rtt_ms=rtt_ms))
    payload = tmp_path / "in.bin"
    payload.write_bytes(b"mapped" * 100_000)
    out, rrep, srep = tmp_path / "out.bin", tmp_path / "recv.json", tmp_path / "send.json"
    stun = [a for h, p in lab.stun_endpoints() for a in ("--stun", f"{h}:{p}")]
    keys = pinned_pair(tmp_path)
    recv = lab.popen(
        "right",
        [*CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
         "--report", str(rrep), "-q", "--rounds", "1", *stun, *keys.destination],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    lab.wait_listening("right", CONTROL_PORT, timeout=15.0)
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    send = lab.popen(
        "left",
        [*CLI, "send", "--control", f"{host}:{port}", "--input", str(payload),
         "--report", str(srep), "-q", "--rounds", "1", *stun, *keys.source],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, send_err = send.communicate(timeout=60)
        _, recv_err = recv.communicate(timeout=30)
    finally:
        for proc in (send, recv):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert send.returncode == 0, send_err.decode(errors="replace")
    assert recv.returncode == 0, recv_err.decode(errors="replace")
    assert out.read_bytes() == payload.read_bytes()
    sent, got = json.loads(srep.read_text()), json.loads(rrep.read_text())
    assert sent["path"] == "direct"
    punch = sent["local_port"]
    assert any(
        n.startswith(f"router port mapping (pcp): 198.51.100.10:{punch} -> punch port {punch}")
        for n in sent["notes"]
    )
    assert any("birthday punching not used: not needed: this side has a router" in n
               for n in sent["notes"])  # fmt: skip
    assert sent["hard_nat"] is None and got["hard_nat"] is None
    # the destination (behind its own symmetric NAT) came in through the mapping
    nominated = [p for p in sent["pairs"] if p["outcome"] == "nominated"]
    assert nominated[0]["direction"] == "inbound"
    assert any("it only accepts (the peer dials it)" in n for n in sent["notes"])
    assert nominated[0]["local"].endswith(f":{punch}")
    # and the mapping was deleted when the punch port closed
    assert "dnat" not in _rules(lab)
    probe = lab.socket("right")
    with probe:
        probe.settimeout(1.0)
        with pytest.raises((TimeoutError, socket.timeout, ConnectionRefusedError)):
            probe.connect(("198.51.100.10", punch))
