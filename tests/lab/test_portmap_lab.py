"""Router port mapping for real: Debian's miniupnpd (nftables backend) in a lab router,
our PCP, NAT-PMP and UPnP-IGD client in the host behind it, and transfers across
symmetric NATs through the mapping, which is gone again afterwards.  The spec and config
tests at the end need no lab."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from testsupport.lab import require_netns

from holepunch_mig.errors import LabError
from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, presets, spec_from_dict, spec_to_dict
from holepunch_mig.lab.netns import miniupnpd_config
from holepunch_mig.net.keyfiles import pinned_pair
from holepunch_mig.net.portmap import (
    default_gateway,
    delete_mapping,
    probe_gateway,
    request_mapping,
)
from holepunch_mig.net.upnp import discover, specific_entry
from holepunch_mig.wire.portmap import PortMapping, Protocol
from holepunch_mig.wire.upnp import IgdService

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


def _transfer(lab: Lab, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """send (left) -> recv (right) with STUN and one round; both reports."""
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
    return sent, got


@pytest.mark.netns
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


@pytest.mark.netns
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


@pytest.mark.netns
@pytest.mark.parametrize("rtt_ms", [0, 20])
def test_transfer_across_two_symmetric_nats_through_the_mapping(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path, rtt_ms: int
) -> None:
    """At 20 ms the mapped side's own SYN would leave before the peer's arrives: it must
    only accept, or its NAT holds the 4-tuple the router's DNAT needs."""
    require_netns(need=("turnserver", "miniupnpd", "iptables"))
    lab = lab_factory(replace(presets()["symmetric-symmetric-pcp"], rtt_ms=rtt_ms))
    sent, got = _transfer(lab, tmp_path)
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


def _upnp_service(lab: Lab) -> IgdService:
    async def find() -> IgdService:
        return await discover("10.1.0.1", trio.current_time() + 3.0)

    service = _in_left(lab, find)
    assert isinstance(service, IgdService)
    return service


def _entry(lab: Lab, service: IgdService, port: int) -> dict[str, str] | None:
    async def look() -> dict[str, str] | None:
        return await specific_entry(service, port, trio.current_time() + 3.0)

    found = _in_left(lab, look)
    assert found is None or isinstance(found, dict)
    return found


@pytest.mark.netns
def test_upnp_only_router_maps_and_deletes(lab_factory: Callable[[LabSpec | str], Lab]) -> None:
    """miniupnpd with PCP/NAT-PMP off: the default protocol list ends with UPnP-IGD."""
    lab = _lab(lab_factory, "symmetric-upnp")

    async def probe() -> dict[str, object]:
        return await probe_gateway(timeout=2.0)

    found = _in_left(lab, probe)
    assert isinstance(found, dict)
    assert found["protocols"] == ["upnp-igd"] and found["external_address"] == "198.51.100.10"
    assert "ICMP port unreachable" not in str(found["detail"])  # detail lists what answered
    service = _upnp_service(lab)
    assert service.control.host == "10.1.0.1"
    assert service.service_type.startswith("urn:schemas-upnp-org:service:WANIPConnection:")

    async def grant() -> PortMapping:
        return await request_mapping(45124, 120, timeout=3.0, description="holepunch_mig test")

    mapping = _in_left(lab, grant)
    assert isinstance(mapping, PortMapping)
    assert mapping.protocol == "upnp-igd"
    assert (mapping.external_ip, mapping.external_port, mapping.lifetime) == (
        "198.51.100.10",
        45124,
        120,
    )
    assert "dnat ip to 10.1.0.2:45124" in _rules(lab)
    entry = _entry(lab, service, 45124)
    assert entry is not None
    assert entry["NewInternalClient"] == "10.1.0.2" and entry["NewInternalPort"] == "45124"
    assert entry["NewPortMappingDescription"] == "holepunch_mig test"

    async def remove() -> None:
        await delete_mapping(mapping, timeout=3.0)

    _in_left(lab, remove)
    assert "dnat" not in _rules(lab)
    assert _entry(lab, service, 45124) is None


@pytest.mark.netns
def test_transfer_through_a_upnp_only_router(
    lab_factory: Callable[[LabSpec | str], Lab], tmp_path: Path
) -> None:
    """A symmetric NAT whose router answers only UPnP-IGD, against a port-preserving NAT:
    direct through the UPnP mapping (no birthday punching), deleted afterwards."""
    require_netns(need=("turnserver", "miniupnpd", "iptables"))
    lab = lab_factory("symmetric-upnp")
    service = _upnp_service(lab)
    sent, got = _transfer(lab, tmp_path)
    assert sent["path"] == "direct" and got["path"] == "direct"
    assert sent["port_mapping"] == "upnp-igd" and got["port_mapping"] is None
    punch = sent["local_port"]
    assert any(
        n.startswith(f"router port mapping (upnp-igd): 198.51.100.10:{punch} -> punch port")
        for n in sent["notes"]
    ), sent["notes"]
    assert sent["hard_nat"] is None and got["hard_nat"] is None
    nominated = [p for p in sent["pairs"] if p["outcome"] == "nominated"]
    assert nominated[0]["direction"] == "inbound"
    # and the mapping is gone now
    assert "dnat" not in _rules(lab)
    assert _entry(lab, service, punch) is None


def test_upnp_port_mapping_in_specs() -> None:
    spec = spec_from_dict(
        {"stun": True, "left": {"nat": "fully-random", "port_mapping": "upnp-igd"}}
    )
    assert spec.left.port_mapping == "upnp-igd"
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert presets()["symmetric-upnp"].left.port_mapping == "upnp-igd"
    assert presets()["symmetric-pcp"].left.port_mapping is True
    with pytest.raises(
        LabError, match=r'left\.port_mapping must be true, false, "pcp" or "upnp-igd"'
    ):
        spec_from_dict({"stun": True, "left": {"nat": "masquerade", "port_mapping": "upnp"}})


def test_miniupnpd_config_per_protocol() -> None:
    both = miniupnpd_config("10.1.0.0/24", "198.51.100.3", 3478)
    assert "enable_natpmp=yes\n" in both and "enable_upnp=yes\n" in both
    only = miniupnpd_config("10.1.0.0/24", "198.51.100.3", 3478, pcp=False)
    assert "enable_natpmp=no\n" in only and "enable_upnp=yes\n" in only
    # secure mode, and our client's ports (1024-65535 on the LAN) are allowed
    assert "secure_mode=yes\n" in only and "allow 1024-65535 10.1.0.0/24 1024-65535\n" in only
