"""Traversal proven for real: the CLI in network namespaces behind nftables firewalls that
DROP inbound NEW connections, and behind port-preserving masquerade NATs with no STUN."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
from testsupport.lab import require_netns

from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, SideSpec, presets
from holepunch_mig.net.keyfiles import pinned_pair

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
PAYLOAD_BYTES = 64 << 20


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    data = os.urandom(PAYLOAD_BYTES)
    path.write_bytes(data)
    return path, blake3.blake3(data).hexdigest()


@pytest.fixture(scope="module")
def fw_lab() -> Iterator[Lab]:
    require_netns()
    with Lab(presets()["fw-fw"]) as lab:
        yield lab


def transfer(
    lab: Lab,
    workdir: Path,
    payload: Path,
    *,
    recv_extra: Sequence[str] = (),
    send_extra: Sequence[str] = (),
    recv_first: bool = True,
    recv_late: float = 0.0,
) -> tuple[dict[str, object], dict[str, object], Path]:
    """Run recv on the right host and send on the left one; both must exit 0."""
    out = workdir / "out.bin"
    rrep, srep = workdir / "recv.json", workdir / "send.json"
    recv_cmd = [
        *CLI,
        "recv",
        "--control-listen",
        f"0.0.0.0:{CONTROL_PORT}",
        *pinned_pair(workdir).destination,
        "--output",
        str(out),
        "--report",
        str(rrep),
        "-q",
        *recv_extra,
    ]
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    send_cmd = [
        *CLI,
        "send",
        "--control",
        f"{host}:{port}",
        *pinned_pair(workdir).source,
        "--input",
        str(payload),
        "--report",
        str(srep),
        "-q",
        *send_extra,
    ]
    if recv_first:
        receiver = lab.popen("right", recv_cmd, stderr=subprocess.PIPE)
        sender = lab.popen("left", send_cmd, stderr=subprocess.PIPE)
    else:
        sender = lab.popen("left", send_cmd, stderr=subprocess.PIPE)
        if recv_late:
            # the late start is the point of the test: the sender must keep trying
            with pytest.raises(subprocess.TimeoutExpired):
                sender.wait(timeout=recv_late)
        receiver = lab.popen("right", recv_cmd, stderr=subprocess.PIPE)
    try:
        _, send_err = sender.communicate(timeout=60)
        _, recv_err = receiver.communicate(timeout=30)
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sender.returncode == 0, send_err.decode(errors="replace")
    assert receiver.returncode == 0, recv_err.decode(errors="replace")
    return json.loads(rrep.read_text()), json.loads(srep.read_text()), out


def _check(report: dict[str, object], digest: str) -> None:
    assert report["path"] == "direct"
    assert report["ok"] is True
    assert report["digest"] == "blake3" and report["sha256"] == digest
    assert report["bytes"] == PAYLOAD_BYTES
    pairs = report["pairs"]
    assert isinstance(pairs, list)
    assert [p["outcome"] for p in pairs].count("nominated") == 1


def test_firewall_really_drops_inbound(fw_lab: Lab) -> None:
    listener = fw_lab.socket("right")
    with listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = fw_lab.socket("left")
        with client:
            client.settimeout(2.0)
            with pytest.raises((TimeoutError, socket.timeout)):
                client.connect((fw_lab.public_address("right"), port))


def test_twenty_transfers_in_a_row(fw_lab: Lab, payload: tuple[Path, str], tmp_path: Path) -> None:
    path, digest = payload
    for run in range(20):
        work = tmp_path / f"run{run}"
        work.mkdir()
        recv_report, send_report, out = transfer(fw_lab, work, path)
        _check(recv_report, digest)
        _check(send_report, digest)
        assert blake3.blake3(out.read_bytes()).hexdigest() == digest
        assert recv_report["session"] == send_report["session"]
        out.unlink()


def test_receiver_starts_late_and_dials_late(
    fw_lab: Lab, payload: tuple[Path, str], tmp_path: Path
) -> None:
    path, digest = payload
    recv_report, send_report, _ = transfer(
        fw_lab, tmp_path, path, recv_first=False, recv_late=1.0, recv_extra=["--dial-delay", "1"]
    )
    _check(recv_report, digest)
    _check(send_report, digest)


def test_two_port_preserving_nats_without_stun(payload: tuple[Path, str], tmp_path: Path) -> None:
    require_netns()
    spec: LabSpec = replace(presets()["nat-nat"], stun=False)
    assert spec.left == SideSpec(firewall="drop", nat="masquerade")
    path, digest = payload
    with Lab(spec) as lab:
        recv_report, send_report, _ = transfer(lab, tmp_path, path)
        _check(recv_report, digest)
        _check(send_report, digest)
        nominated = next(p for p in send_report["pairs"] if p["outcome"] == "nominated")  # type: ignore[union-attr]
        # no STUN server exists: the winning pair was guessed from the control connection
        assert lab.stun_endpoint() is None
        assert nominated["remote"].startswith(lab.public_address("right") + ":")


def test_punch_port_stays_closed_to_everyone_else(
    fw_lab: Lab, payload: tuple[Path, str], tmp_path: Path
) -> None:
    """While the receiver's punch port listens, a host that is not the peer cannot reach
    it (the firewall drops), and the peer's punched link still comes up."""
    path, digest = payload
    punch_port = 40001
    out = tmp_path / "out.bin"
    receiver = fw_lab.popen(
        "right",
        [
            *CLI,
            "recv",
            "--control-listen",
            f"0.0.0.0:{CONTROL_PORT}",
            *pinned_pair(tmp_path).destination,
            "--output",
            str(out),
            "--port",
            str(punch_port),
            "--dial-delay",
            "3",
            "-q",
            "--report",
            str(tmp_path / "recv.json"),
        ],
    )
    host, port = fw_lab.control_endpoint("right", CONTROL_PORT)
    sender = fw_lab.popen(
        "left",
        [
            *CLI,
            "send",
            "--control",
            f"{host}:{port}",
            *pinned_pair(tmp_path).source,
            "--input",
            str(path),
            "--dial-delay",
            "3",
            "-q",
        ],
    )
    try:
        fw_lab.wait_listening("right", punch_port, timeout=10, proc=receiver)
        probe = fw_lab.socket("public")
        with probe:
            probe.settimeout(1.0)
            with pytest.raises((TimeoutError, socket.timeout)):
                probe.connect((fw_lab.public_address("right"), punch_port))
        assert sender.wait(timeout=60) == 0
        assert receiver.wait(timeout=30) == 0
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert blake3.blake3(out.read_bytes()).hexdigest() == digest
    report = json.loads((tmp_path / "recv.json").read_text())
    assert report["path"] == "direct"
    assert report["local"].endswith(f":{punch_port}")
